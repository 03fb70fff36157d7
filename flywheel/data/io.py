"""Small, atomic file helpers shared by every stage that writes artefacts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from flywheel.errors import FlywheelError

T = TypeVar("T")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def publish(tmp: str | Path, final: Path) -> None:
    """Rename a finished temp file or folder into place with the permissions a plain write would give.

    mkstemp/mkdtemp create 0600/0700 so a half-written temp is private; the published artefact
    (a checkpoint, a report, a cache chunk) must be readable by the team like any other file.
    """
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask())
    os.replace(tmp, final)


def _atomic_write(path: Path, write: Callable[[IO[str]], T]) -> T:
    """Write through a temp file beside `path`, then rename: readers never see half a file.

    On any failure the temp file is removed, and an OSError without a file name (a full disk
    reports none) is re-raised naming `path`, so the one-line error can say where it happened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    f = tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8")
    try:
        with f:
            result = write(f)
        publish(f.name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(f.name)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return result


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (temp file + rename); returns how many."""

    def write(f: IO[str]) -> int:
        n = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        return n

    return _atomic_write(path, write)


def _not_utf8(path: Path, line: int, offset: int, byte: bytes) -> FlywheelError:
    """The sentence for bytes that are not UTF-8: the file, the line, the byte offset and the byte."""
    return FlywheelError(f"{path}: is not UTF-8 text at line {line} (byte 0x{byte.hex()} at byte offset {offset}); "
                         "re-encode the file as UTF-8")


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors write


def json_object_line(path: Path, raw: bytes, line: int | Callable[[], int], offset: int, of: str = "") -> dict | None:
    """The JSON object on one line of a JSON-lines file (None for a blank line), or the one sentence naming it.

    `line`: its 1-based number, or a function that counts it (only when an error must name it); `offset`:
    the byte where the line starts; `of`: what the numbers count in (" of the decompressed text").
    """
    number = line if isinstance(line, int) else None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = number or line()
        raise _not_utf8(path, number, offset + exc.start, raw[exc.start:exc.start + 1]) from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlywheelError(f"{path}: line {number or line()}{of}, column {exc.colno} is not valid JSON ({exc.msg}); "
                            "fix or remove it") from None
    if not isinstance(row, dict):
        raise FlywheelError(f"{path}: line {number or line()}{of} is not a JSON object; each line must be {{...}}")
    return row


def _open_data(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FlywheelError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise FlywheelError(f"{path}: is a folder, not a data file; point at a .jsonl/.json/.parquet file") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) per non-blank line, streamed; a bad line names the file, the line and the byte offset."""
    with _open_data(path) as f:
        offset = 0
        for i, raw in enumerate(f, 1):
            row = json_object_line(path, raw.removeprefix(BOM) if i == 1 else raw, i, offset)
            offset += len(raw)
            if row is not None:
                yield i, row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl file, naming the file and line (and byte offset) when a line is not a JSON object."""
    return [row for _, row in iter_jsonl(path)]


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """A .json file's rows: a JSON array of objects, one object of equal-length column lists, or JSON lines."""
    with _open_data(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _not_utf8(path, line, exc.start, data[exc.start:exc.start + 1]) from None
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return read_jsonl(path)  # JSON lines in a .json file, as `datasets` also accepts
        raise FlywheelError(f"{path}: line {exc.lineno}, column {exc.colno} is not valid JSON ({exc.msg}); "
                            "fix it") from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        doc = [dict(zip(doc, values, strict=False)) for values in zip(*doc.values(), strict=False)]
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise FlywheelError(f"{path}: must hold a JSON array of row objects (or an object of column lists)")
    return doc


def read_parquet_rows(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """A parquet file's rows (only `columns` when given), or one sentence when it is not readable parquet."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FlywheelError(f"{path}: file not found; check the path")
    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlywheelError(f"{path}: is not a readable parquet file ({first}); rewrite it or use .jsonl") from None


def parquet_schema(path: Path) -> tuple[list[str], int]:
    """A parquet file's column names and row count, from its footer, without reading the data."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FlywheelError(f"{path}: file not found; check the path")
    try:
        meta = pq.ParquetFile(path).metadata
        return list(meta.schema.to_arrow_schema().names), meta.num_rows
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlywheelError(f"{path}: is not a readable parquet file ({first}); rewrite it or use .jsonl") from None


def wait_until(what: str, missing: Callable[[], list[str]], poll: float = 0.5) -> None:
    """Wait on the file system, not a collective, until `missing()` is empty; log what is awaited once a minute.

    How ranks of a torchrun job wait for a file another rank writes (a store, a cache index).
    """
    import logging
    import time

    log, said = logging.getLogger("flywheel"), time.monotonic()
    while left := missing():
        if time.monotonic() - said > 60:
            log.warning("waiting for %s: %d missing (%s)", what, len(left), ", ".join(left[:4]))
            said = time.monotonic()
        time.sleep(poll)


def distributed_rank() -> tuple[int, int]:
    """This process's rank and the world size under torchrun / accelerate launch ((0, 1) otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    _atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True))


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temp file + rename)."""
    _atomic_write(path, lambda f: f.write(text))


def fingerprint(*parts: Any) -> str:
    """A short content hash of JSON-able parts: the basis of every cache key."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Hash of a file's bytes, streamed, for data fingerprints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only when complete.

    If the body raises, the temporary folder is removed and `final` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # someone finished the same build first; theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        publish(tmp, final)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest Trainer checkpoint that finished writing; half-written ones (a kill mid-save) are removed.

    The HF Trainer writes `checkpoint-N/` in place and its `trainer_state.json` last, so a
    folder without it was interrupted and cannot be resumed from.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        if (path / "trainer_state.json").exists():
            found.append((int(step), path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    return str(max(found)[1]) if found else None
