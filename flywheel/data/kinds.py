"""Data-source kinds: how a .jsonl, .json, .parquet file (the first two maybe compressed) or a streamed hub
dataset is read, one entry each.

Every kind answers the same few questions (`SourceKind`): how to cut it into pieces (one token-store task
each), the texts of a piece, its columns, all its rows (post-training), a fingerprint of its bytes and,
where it is cheap, a sample for the token estimate. Adding a kind is one `SourceKind` in `KINDS`; the
file suffixes the config accepts follow from the table. Compressed JSON lines (Dolma's `.json.zst`,
`.json.gz`, ...) are one entry per compression, read by flywheel/data/compressed.py.

Imports nothing of flywheel but data.io, data.compressed, errors and (when a hub stream is read) hub,
so refs and the config may use it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.data.compressed import (
    COMPRESSIONS,
    compressed_rows,
    compressed_sample,
    compressed_texts,
    compression_of,
    first_row,
    looks_like_compressed,
    stripes_of,
)
from flywheel.data.io import (
    BOM,
    file_fingerprint,
    fingerprint,
    json_object_line,
    parquet_schema,
    read_json_rows,
    read_jsonl,
    read_parquet_rows,
)
from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.config import DataSource

ROWS_PER_BATCH = 1000  # documents tokenized per batch (the tokenizer's working set)
FULL_HASH_BYTES = 16 << 20  # files up to this size are fingerprinted by content; larger ones by size, mtime, ends
SAMPLE_BYTES = 1 << 20  # the token estimate tokenizes this much of the first file


@dataclass(frozen=True)
class Piece:
    """One task's share of a source: `path` from `start` to `end` (bytes for jsonl, row groups for parquet;
    for a compressed file, stripe `start` of `end`: every end-th document from the start-th)."""

    path: str
    start: int = 0
    end: int = 0
    kind: str = "jsonl"  # a key of KINDS


@dataclass(frozen=True)
class SourceKind:
    """How one kind of source is read. `target` is a file path, or the dataset id for the hub."""

    name: str
    suffix: str | None  # the file name ending that selects it; None: not a file (the hub)
    pieces: Callable[[str, int], list[Piece]]  # (target, bytes per piece) -> the build's tasks
    texts: Callable[[Piece, DataSource], Iterator[str]]  # the non-empty texts of one piece
    fingerprint: Callable[[str, DataSource], Any]  # what the bytes are, for the store key
    columns: Callable[[Path], tuple[list[str], int]] | None = None  # (first row's columns, 0 when empty else >0)
    rows: Callable[[Path], list[dict[str, Any]]] | None = None  # every row, for a post-training stage
    sample: Callable[[Path, str], tuple[list[str], int]] | None = None  # (texts, bytes read) from the start


# --- jsonl -----------------------------------------------------------------------------------------


def _line_number(path: str, offset: int) -> int:
    """1-based line of byte `offset` (counted only when an error must name it)."""
    n, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            if not block:
                break
            n += block.count(b"\n")
            done += len(block)
    return n


def _jsonl_row(piece: Piece, raw: bytes, pos: int) -> dict | None:
    """The object on one line starting at byte `pos` (None for a blank line), or the sentence naming the line."""
    if pos == 0:
        raw = raw.removeprefix(BOM)
    return json_object_line(Path(piece.path), raw, lambda: _line_number(piece.path, pos), pos)


def jsonl_rows(piece: Piece) -> Iterator[dict]:
    """The rows of the lines that start in [start, end) of a jsonl file.

    A line that is not UTF-8, not JSON or not an object names the file and the line.
    """
    with open(piece.path, "rb") as f:
        if piece.start > 0:
            f.seek(piece.start - 1)
            f.readline()  # the line that starts before `start` belongs to the previous piece
        pos = f.tell()
        while pos < piece.end:
            raw = f.readline()
            if not raw:
                break
            row = _jsonl_row(piece, raw, pos)
            if row is not None:
                yield row
            pos += len(raw)


def jsonl_texts(piece: Piece, field: str) -> Iterator[str]:
    """The non-empty `field` texts of a jsonl piece."""
    for row in jsonl_rows(piece):
        text = row.get(field)
        if isinstance(text, str) and text:
            yield text


def _jsonl_pieces(target: str, piece_bytes: int) -> list[Piece]:
    size = Path(target).stat().st_size
    n = max(1, -(-size // piece_bytes))
    return [Piece(target, size * i // n, size * (i + 1) // n, "jsonl") for i in range(n)]


def _first_jsonl_row(path: Path) -> dict | None:
    """The first non-blank row of a jsonl file, with the same one-sentence errors as a full read."""
    size = path.stat().st_size
    step = 1 << 16
    while True:  # a first line longer than `step` bytes: look further
        row = next(jsonl_rows(Piece(str(path), 0, min(size, step))), None)
        if row is not None or step >= size:
            return row
        step *= 16


def _first_row_columns(first: dict | None) -> tuple[list[str], int]:
    return (list(first) if first else []), (0 if first is None else 1)


def _jsonl_sample(path: Path, field: str) -> tuple[list[str], int]:
    sample = Piece(str(path), 0, min(path.stat().st_size, SAMPLE_BYTES))
    return list(jsonl_texts(sample, field)), sample.end


# --- json and parquet ------------------------------------------------------------------------------


def _json_texts(piece: Piece, src: DataSource) -> Iterator[str]:
    rows = read_json_rows(Path(piece.path))  # a JSON array cannot be streamed; .json files are small
    field = src.text_field
    return (r[field] for r in rows if isinstance(r.get(field), str) and r[field])


def _json_columns(path: Path) -> tuple[list[str], int]:
    rows = read_json_rows(path)
    return _first_row_columns(rows[0] if rows else None)


def _json_sample(path: Path, field: str) -> tuple[list[str], int]:
    rows = read_json_rows(path)  # small by nature: the whole file is the sample
    return [r[field] for r in rows if isinstance(r.get(field), str) and r[field]], path.stat().st_size


def _parquet_sample(path: Path, field: str) -> tuple[list[str], int]:
    """The first row group's texts, and its compressed bytes (every column: what the file's size counts)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if pf.metadata.num_row_groups == 0:
        return [], path.stat().st_size
    group = pf.metadata.row_group(0)
    texts = [t for t in pf.read_row_group(0, columns=[field]).column(0).to_pylist() if isinstance(t, str) and t]
    return texts, sum(group.column(i).total_compressed_size for i in range(group.num_columns))


def _parquet_pieces(target: str, piece_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(target).metadata
    groups, rows = meta.num_row_groups, meta.num_rows
    per = max(1, groups * piece_bytes // max(1, Path(target).stat().st_size)) if rows else groups
    return [Piece(target, g, min(groups, g + per), "parquet") for g in range(0, groups, per)]


def _parquet_texts(piece: Piece, src: DataSource) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=range(piece.start, piece.end),
                                 columns=[src.text_field]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t)


def file_bytes_fingerprint(target: str, src: DataSource | None = None) -> str:
    """Content hash for files up to FULL_HASH_BYTES; above, size + mtime + the first and last MiB.

    Every `midtrain` start fingerprints every source file, so a 50B-token corpus must not be read
    whole each time: an edit changes the mtime, a copy that keeps mtime and size keeps the bytes.
    """
    path = Path(target)
    st = path.stat()
    if st.st_size <= FULL_HASH_BYTES:
        return file_fingerprint(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(-(1 << 20), os.SEEK_END)
        tail = f.read()
    return fingerprint(st.st_size, st.st_mtime_ns, hashlib.sha256(head + tail).hexdigest())


# --- a streamed hub dataset ------------------------------------------------------------------------


def _hub_texts(piece: Piece, src: DataSource) -> Iterator[str]:
    """Shard `piece.start` of `piece.end` of a streamed hub dataset (never fully downloaded)."""
    import datasets

    from flywheel.hub import check_hub_access, hub_failure

    try:
        check_hub_access("data.sources", src.source, "dataset")
        if src.exclude:
            raise FlywheelError(f"{src.source}: exclude applies to a fetched hub source, not a streamed one; choose "
                                "the files with include, or raise the share above data.fetch_above_tokens")
        stream = datasets.load_dataset(src.source, src.subset, split=src.split, streaming=True,
                                       revision=src.revision, data_files=src.include or None)
        if piece.end > 1:
            stream = stream.shard(num_shards=piece.end, index=piece.start)
        for row in stream:
            if src.text_field not in row:
                raise FlywheelError(f"{src.source}: has no column '{src.text_field}' (columns: {', '.join(row)}); "
                                    "set text_field")
            text = row[src.text_field]
            if isinstance(text, str) and text:
                yield text
    except FlywheelError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, unknown split: all mean "cannot get it here"
        failure = hub_failure("data.sources", src.source, exc, "dataset")
        if failure is not None:
            raise failure from None
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlywheelError(f"{src.source}: could not load the hub dataset (split '{src.split}'): {first}; check "
                            "the id, the subset and the split") from None


def _hub_pieces(target: str, piece_bytes: int) -> list[Piece]:
    # one stream: a hub source's pieces must not depend on the worker count (its store key does not)
    return [Piece(target, 0, 1, "hub")]


# --- compressed JSON lines (Dolma's shards) -------------------------------------------------------


def _compressed(base: str, compression: str) -> SourceKind:
    """The kind of `.<base><compression>` files: JSON lines decompressed as a stream (a .json too: Dolma's)."""
    name = f"{base}{compression}"

    def pieces(target: str, _: int) -> list[Piece]:
        n = stripes_of(target)
        return [Piece(target, i, n, name) for i in range(n)]

    return SourceKind(name, f".{name}", pieces=pieces,
                      texts=lambda piece, src: compressed_texts(piece.path, src.text_field, piece.start, piece.end),
                      fingerprint=file_bytes_fingerprint, columns=lambda path: _first_row_columns(first_row(path)),
                      rows=lambda path: list(compressed_rows(path)),
                      sample=lambda path, field: compressed_sample(path, field, SAMPLE_BYTES))


# --- the table -------------------------------------------------------------------------------------

KINDS: dict[str, SourceKind] = {kind.name: kind for kind in (
    SourceKind("jsonl", ".jsonl", pieces=_jsonl_pieces, texts=lambda piece, src: jsonl_texts(piece, src.text_field),
               fingerprint=file_bytes_fingerprint, columns=lambda path: _first_row_columns(_first_jsonl_row(path)),
               rows=read_jsonl, sample=_jsonl_sample),
    SourceKind("json", ".json", pieces=lambda target, _: [Piece(target, 0, 0, "json")], texts=_json_texts,
               fingerprint=file_bytes_fingerprint, columns=_json_columns, rows=read_json_rows, sample=_json_sample),
    SourceKind("parquet", ".parquet", pieces=_parquet_pieces, texts=_parquet_texts,
               fingerprint=file_bytes_fingerprint, columns=parquet_schema, rows=read_parquet_rows,
               sample=_parquet_sample),
    SourceKind("hub", None, pieces=_hub_pieces, texts=_hub_texts,
               fingerprint=lambda target, src: fingerprint(target, src.subset, src.split, src.revision, src.include)),
    *(_compressed(base, c) for base in ("jsonl", "json") for c in COMPRESSIONS),
)}
HUB = KINDS["hub"]
DATA_FILE_SUFFIXES = tuple(k.suffix for k in KINDS.values() if k.suffix)  # what a local data file may end with
DATA_FILE_WORDS = f".jsonl/.json/.parquet file (.jsonl/.json may add {'/'.join(COMPRESSIONS)})"  # the same, in words


def kind_of(path: str | Path) -> SourceKind:
    """The kind of a local data file, by the end of its name (the longest suffix that matches)."""
    name = Path(path).name
    found = [k for k in KINDS.values() if k.suffix and name.endswith(k.suffix)]
    if not found:
        if looks_like_compressed(path):
            compression_of(path)  # names the unknown compression
        raise FlywheelError(f"{path}: is not a {DATA_FILE_WORDS}; point at one")
    return max(found, key=lambda k: len(k.suffix or ""))


def piece_texts(src: DataSource, piece: Piece) -> Iterator[str]:
    """The texts of one piece of `src`, read by the piece's kind."""
    return KINDS[piece.kind].texts(piece, src)


def path_selected(relative: str, include: list[str], exclude: list[str]) -> bool:
    """Whether a file, by its path inside a source's folder or hub repository, is in the source's subset.

    fnmatch patterns (`*` crosses folders, as in the hub's allow_patterns): included when `include` is
    empty or one pattern matches, and no `exclude` pattern matches.
    """
    if include and not any(fnmatchcase(relative, pattern) for pattern in include):
        return False
    return not any(fnmatchcase(relative, pattern) for pattern in exclude)
