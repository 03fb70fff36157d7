"""Compressed JSON lines (.jsonl or .json, then .gz/.zst/.bz2/.xz): the format of Dolma's shards.

A compressed file is decompressed as a stream by well-kept libraries' incremental decompressors
(zlib, bz2 and lzma from the standard library, `zstandard` for .zst), a megabyte at a time and never
whole in memory, across every gzip member or zstd frame in the file. Dolma names its shards
`.json.gz`/`.json.zst` although every line is one document, so a compressed `.json` is read as JSON
lines too.

A compressed stream cannot be entered in the middle, so a file is one piece of the store build
(Dolma's shards are 0.5-1 GB compressed: a natural unit of work). A file larger than
STRIPE_BYTES is cut by document count instead: piece i of n reads every n-th document from the
i-th, decompressing the whole file but parsing only its own lines.

A corrupt or truncated file stops with one sentence naming the file and how far it got.
"""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import zstandard

from flywheel.data.io import json_object_line
from flywheel.errors import FlywheelError

# the suffix after .jsonl/.json -> a fresh incremental decompressor for one gzip member / zstd frame / stream
COMPRESSIONS: dict[str, Callable[[], Any]] = {
    ".gz": lambda: zlib.decompressobj(wbits=zlib.MAX_WBITS | 16),
    ".zst": lambda: zstandard.ZstdDecompressor().decompressobj(),
    ".bz2": bz2.BZ2Decompressor,
    ".xz": lzma.LZMADecompressor,
}
DECODE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
READ_BYTES = 1 << 20  # compressed bytes read at a time
STRIPE_BYTES = 4 << 30  # a compressed file above this size is cut into stripes by document count


def compression_of(path: str | Path) -> str:
    """The compression suffix of a file name (.gz, .zst, .bz2 or .xz)."""
    suffix = Path(path).suffix
    if suffix not in COMPRESSIONS:
        raise FlywheelError(f"{path}: '{suffix}' is not a compression this reader knows; use one of "
                            f"{'/'.join(COMPRESSIONS)} or decompress the file")
    return suffix


class _Progress:
    """How far a read got: lines and decompressed bytes, for the sentence when the stream breaks."""

    def __init__(self) -> None:
        self.lines, self.bytes = 0, 0

    def __str__(self) -> str:
        size = f"{self.bytes / 1e6:,.1f} MB" if self.bytes >= 1e6 else f"{self.bytes:,} bytes"
        return f"after {self.lines:,} lines ({size} decompressed)"


def _decompressed(raw: IO[bytes], suffix: str, limit: int | None = None) -> Iterator[bytes]:
    """The decompressed bytes of a file, a chunk at a time, across every member or frame in it.

    The libraries' decompressors do the decoding; this loop only starts a new one where a member ends
    (concatenated gzip members, multi-frame zstd) and says when the file ends inside one (truncated).
    `limit`: stop after that many compressed bytes (a sample), without the truncation check.
    """
    decoder, fed, read = COMPRESSIONS[suffix](), False, 0
    while limit is None or read < limit:
        data = raw.read(READ_BYTES if limit is None else min(READ_BYTES, limit - read))
        if not data:
            break
        read += len(data)
        while data:
            fed = True
            yield decoder.decompress(data)
            if not decoder.eof:
                break
            data, decoder, fed = decoder.unused_data, COMPRESSIONS[suffix](), False
    if fed and not decoder.eof and limit is None:
        raise EOFError("the file ends inside a compressed block")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Complete lines (with their newline; a last line may lack it) from a stream of chunks."""
    tail = b""
    for chunk in chunks:
        if not chunk:
            continue
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        yield from (part + b"\n" for part in parts)
    if tail:
        yield tail


def compressed_lines(path: str | Path, progress: _Progress | None = None) -> Iterator[bytes]:
    """Every line of a compressed file, decompressed; a broken stream is one sentence naming the file."""
    path, done = Path(path), progress or _Progress()
    try:
        with open(path, "rb") as raw:
            for line in _lines(_decompressed(raw, compression_of(path))):
                done.lines += 1
                done.bytes += len(line)
                yield line
    except DECODE_ERRORS as exc:
        kind = "truncated" if isinstance(exc, EOFError) else "corrupt"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlywheelError(f"{path}: the {compression_of(path)} stream is {kind} {done} ({first}); download the "
                            "file again or remove it") from None


def _row(path: Path, raw: bytes, line: int, offset: int) -> dict | None:
    """The object on one decompressed line (None when blank), or the sentence naming the line."""
    return json_object_line(path, raw, line, offset, " of the decompressed text")


def compressed_rows(path: str | Path, stripe: int = 0, stripes: int = 1) -> Iterator[dict]:
    """The rows of a compressed JSON-lines file: line k when k % stripes == stripe (all of them by default)."""
    path, done = Path(path), _Progress()
    for raw in compressed_lines(path, done):
        if (done.lines - 1) % stripes == stripe:
            row = _row(path, raw, done.lines, done.bytes - len(raw))
            if row is not None:
                yield row


def compressed_texts(path: str | Path, field: str, stripe: int = 0, stripes: int = 1) -> Iterator[str]:
    """The non-empty `field` texts of a compressed file (other fields, Dolma's metadata included, ignored)."""
    for row in compressed_rows(path, stripe, stripes):
        text = row.get(field)
        if isinstance(text, str) and text:
            yield text


def first_row(path: str | Path) -> dict | None:
    """The first non-blank row (the column check reads no further)."""
    return next(compressed_rows(path), None)


def stripes_of(path: str | Path) -> int:
    """How many pieces a compressed file is cut into (one unless it is larger than STRIPE_BYTES)."""
    return max(1, -(-Path(path).stat().st_size // STRIPE_BYTES))


def prefix_texts(data: bytes, name: str, field: str, whole: bool = False) -> tuple[list[str], int]:
    """(texts, bytes they account for) of the first bytes of a JSON-lines file, compressed or not.

    What a token estimate needs without reading the file: the lines complete in `data` (all of them when
    `whole`), and the share of `data` they came from, so tokens per byte of the file can be measured.
    """
    path = Path(name)
    compressed = looks_like_compressed(name)
    if compressed:
        try:
            lines = list(_lines(_decompressed(io.BytesIO(data), compression_of(name), limit=len(data))))
        except DECODE_ERRORS as exc:
            raise FlywheelError(f"{name}: the first {len(data):,} bytes do not decompress ({exc}); download the file "
                                "again or remove it") from None
    else:
        lines = data.splitlines(keepends=True)
    total = sum(map(len, lines))
    if not whole and lines and not lines[-1].endswith(b"\n"):
        lines.pop()  # cut off by the end of the sample
    kept, texts, at = sum(map(len, lines)), [], 0
    for n, line in enumerate(lines, 1):
        row = _row(path, line, n, at)
        at += len(line)
        if row is not None and isinstance(row.get(field), str) and row[field]:
            texts.append(row[field])
    return texts, round(len(data) * kept / total) if total else len(data)


def looks_like_compressed(name: str | Path) -> bool:
    """Whether a file name ends in a compression suffix (known or not) after .jsonl or .json."""
    parts = Path(name).name.split(".")
    return len(parts) >= 3 and parts[-2] in ("jsonl", "json")


def compressed_sample(path: str | Path, field: str, limit: int) -> tuple[list[str], int]:
    """(texts, compressed bytes they came from) from the first `limit` compressed bytes of a file."""
    with open(path, "rb") as f:
        data = f.read(limit)
    return prefix_texts(data, str(path), field, whole=len(data) == Path(path).stat().st_size)
