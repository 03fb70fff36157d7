"""The token store: each mid-training source tokenized once into sharded token files on disk.

Memory is bounded by a piece, not by the corpus. A source (a `world:` corpus, a local
.jsonl/.json/.parquet file, a folder or a glob of them, or a streamed hub dataset) is cut
into *pieces* — a byte range of a jsonl file, a run of parquet row groups, a whole .json
file, a shard of a hub stream — and each piece is one task of a datatrove pipeline
(`LocalPipelineExecutor`: tasks run on `workers` processes, a rerun skips completed tasks).
Each task writes one shard in datatrove's own format, so its readers and tools work on it:

    home/cache/tokens/<key>/
        00000.ds          tokens, little-endian uint16 (vocab <= 65,536) or uint32
        00000.ds.index    uint64 end offset of every document (in tokens): boundaries, not a per-token array
        store.json        key, tokenizer, dtype, and per shard: tokens, documents, bytes; written last

A shard is written as `.<n>.ds.tmp` and renamed when its task completes; the folder is
`<key>.partial/` until every shard is there, then renamed to `<key>/`. So a kill loses at most
the running pieces, and nothing half-built ever looks complete. Every document ends with EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import DATA_FILE_SUFFIXES, DataSource, FlywheelConfig
from flywheel.data.io import _not_utf8, fingerprint, parquet_schema, read_json_rows, write_json
from flywheel.errors import FlywheelError

STORE_VERSION = 1
PIECE_BYTES = 64 << 20  # a jsonl file is cut into pieces of about this size: one task and one shard each
ROWS_PER_BATCH = 1000  # documents tokenized per batch (the tokenizer's working set)
FULL_HASH_BYTES = 16 << 20  # files up to this size are fingerprinted by content; larger ones by size, mtime, ends


@dataclass(frozen=True)
class Piece:
    """One task's share of a source: `path` from `start` to `end` (bytes for jsonl, row groups for parquet)."""

    path: str
    start: int = 0
    end: int = 0
    kind: str = "jsonl"  # jsonl | json | parquet | hub


@dataclass
class SourceStore:
    """A complete store of one source: its shards' token and index files, memory-mapped on demand."""

    folder: Path
    meta: dict

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def shards(self) -> list[dict]:
        return self.meta["shards"]

    def tokens(self, shard: int) -> np.ndarray:
        return np.memmap(self.folder / self.shards[shard]["file"], dtype=self.dtype, mode="r")

    def doc_ends(self, shard: int) -> np.ndarray:
        return np.memmap(self.folder / (self.shards[shard]["file"] + ".index"), dtype="<u8", mode="r")


# --- what a source is made of -------------------------------------------------------------------


def _where(cfg: FlywheelConfig, src: DataSource) -> str:
    index = next((i for i, s in enumerate(cfg.data.sources) if s is src), None)
    return f"data.sources.{index}" if index is not None else "data.sources"


def source_files(cfg: FlywheelConfig, src: DataSource) -> list[Path] | None:
    """The local files of a source (sorted, so the store is the same on every machine); None for a hub dataset."""
    ref = src.source
    if ref.startswith("world:"):
        from flywheel.world.build import resolve_world_ref

        return [resolve_world_ref(cfg, ref)]
    path = Path(ref).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_FILE_SUFFIXES))
        if not files:
            raise FlywheelError(f"{_where(cfg, src)}.source: the folder {ref} holds no {'/'.join(DATA_FILE_SUFFIXES)} "
                                "files; point it at the folder with the data")
        return files
    if has_magic(ref):
        files = sorted(Path(p) for p in glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise FlywheelError(f"{_where(cfg, src)}.source: the glob {ref} matches no file; fix the pattern")
        bad = [p for p in files if not p.name.endswith(DATA_FILE_SUFFIXES)]
        if bad:
            raise FlywheelError(f"{_where(cfg, src)}.source: the glob {ref} matches {bad[0]}, which is not "
                                f"{'/'.join(DATA_FILE_SUFFIXES)}; narrow the pattern")
        return files
    return None


def _file_fingerprint(path: Path) -> str:
    """Content hash for files up to FULL_HASH_BYTES; above, size + mtime + the first and last MiB.

    Every `midtrain` start fingerprints every source file, so a 50B-token corpus must not be read
    whole each time: an edit changes the mtime, a copy that keeps mtime and size keeps the bytes.
    """
    from flywheel.data.io import file_fingerprint

    st = path.stat()
    if st.st_size <= FULL_HASH_BYTES:
        return file_fingerprint(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(-(1 << 20), os.SEEK_END)
        tail = f.read()
    return fingerprint(st.st_size, st.st_mtime_ns, hashlib.sha256(head + tail).hexdigest())


def source_fingerprint(cfg: FlywheelConfig, src: DataSource) -> Any:
    """What the source's bytes are: file fingerprints, or id + subset + split for a hub dataset."""
    files = source_files(cfg, src)
    if files is None:
        return fingerprint(src.source, src.subset, src.split)
    return [(p.name, _file_fingerprint(p)) for p in files]


def tokenizer_fingerprint(tok) -> str:
    """The fast tokenizer's whole definition (normalizer, pre-tokenizer, model, vocab) and its EOS."""
    return fingerprint(tok.backend_tokenizer.to_str(), tok.eos_token)


def store_key(cfg: FlywheelConfig, src: DataSource, tok, max_tokens: int | None) -> str:
    return fingerprint(STORE_VERSION, tokenizer_fingerprint(tok), source_fingerprint(cfg, src), src.text_field,
                       max_tokens)


# --- reading pieces ------------------------------------------------------------------------------


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


def _jsonl_texts(piece: Piece, field: str | None) -> Iterator[Any]:
    """The texts of the lines that start in [start, end) of a jsonl file (with `field` None: the rows).

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
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(Path(piece.path), _line_number(piece.path, pos), pos + exc.start,
                                raw[exc.start:exc.start + 1]) from None
            if pos == 0:
                line = line.removeprefix("\ufeff")
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FlywheelError(f"{piece.path}: line {_line_number(piece.path, pos)}, column {exc.colno} is "
                                        f"not valid JSON ({exc.msg}); fix or remove it") from None
                if not isinstance(row, dict):
                    raise FlywheelError(f"{piece.path}: line {_line_number(piece.path, pos)} is not a JSON object; "
                                        "each line must be {...}")
                text = row if field is None else row.get(field)
                if field is None or (isinstance(text, str) and text):
                    yield text
            pos += len(raw)


def _parquet_texts(piece: Piece, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=range(piece.start, piece.end), columns=[field]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t)


def _hub_texts(src: DataSource, piece: Piece) -> Iterator[str]:
    """Shard `piece.start` of `piece.end` of a streamed hub dataset (never fully downloaded)."""
    import datasets

    from flywheel.models import check_hub_access, hub_failure

    try:
        check_hub_access("data.sources", src.source, "dataset")
        stream = datasets.load_dataset(src.source, src.subset, split=src.split, streaming=True)
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


def piece_texts(src: DataSource, piece: Piece) -> Iterator[str]:
    if piece.kind == "jsonl":
        return _jsonl_texts(piece, src.text_field)
    if piece.kind == "parquet":
        return _parquet_texts(piece, src.text_field)
    if piece.kind == "json":
        rows = read_json_rows(Path(piece.path))  # a JSON array cannot be streamed; .json files are small
        return (r[src.text_field] for r in rows if isinstance(r.get(src.text_field), str) and r[src.text_field])
    return _hub_texts(src, piece)


def _check_file(path: Path, field: str, where: str) -> None:
    """Before any work: the file is readable, not empty, and its first row has the text field."""
    if path.suffix == ".parquet":
        columns, n_rows = parquet_schema(path)
    else:
        first = None
        if path.suffix == ".jsonl":
            first = _first_jsonl_row(path)
        else:
            rows = read_json_rows(path)
            first = rows[0] if rows else None
        n_rows = 0 if first is None else 1
        columns = list(first) if first else []
    if n_rows == 0:
        raise FlywheelError(f"{path}: is empty (no rows); the mid-training mixture needs documents, so fill it or "
                            "remove this source")
    if field not in columns:
        raise FlywheelError(f"{path}: has no column '{field}' in its first row (columns: {', '.join(columns)}); set "
                            f"{where}.text_field to the column that holds the text")


def _first_jsonl_row(path: Path) -> dict | None:
    """The first non-blank row of a jsonl file, with the same one-sentence errors as a full read."""
    size = path.stat().st_size
    step = 1 << 16
    while True:  # a first line longer than `step` bytes: look further
        texts = _jsonl_rows(Piece(str(path), 0, min(size, step)))
        row = next(texts, None)
        if row is not None or step >= size:
            return row
        step *= 16


def _jsonl_rows(piece: Piece) -> Iterator[dict]:
    """The rows (objects) of the lines starting in a piece; errors as in `_jsonl_texts`."""
    yield from _jsonl_texts(piece, None)


def source_texts(cfg: FlywheelConfig, src: DataSource) -> Iterator[str]:
    """Every document of a source, piece by piece (what the store build reads), after the same checks."""
    for piece in plan_pieces(cfg, src, 1):
        yield from piece_texts(src, piece)


def estimate_tokens(cfg: FlywheelConfig, src: DataSource, tok, cap: int | None) -> int | None:
    """About how many tokens a source holds (for the progress bar's ETA): bytes x tokens per byte of a sample.

    Measured on the first MiB of the first jsonl file (raw line bytes, so JSON overhead is in the
    ratio); None where the size cannot be known up front (a hub stream without cap, parquet, json).
    """
    files = source_files(cfg, src)
    if files is None:
        return cap
    if not all(p.suffix == ".jsonl" for p in files):
        return None
    first = files[0]
    sample = Piece(str(first), 0, min(first.stat().st_size, 1 << 20))
    texts = list(_jsonl_texts(sample, src.text_field))
    tokens = sum(len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    return int(tokens / max(1, sample.end) * sum(p.stat().st_size for p in files))


def plan_pieces(cfg: FlywheelConfig, src: DataSource, workers: int) -> list[Piece]:
    """Cut a source into tasks: jsonl by byte ranges, parquet by row groups, hub streams by shards."""
    files = source_files(cfg, src)
    if files is None:  # one stream: a hub source's pieces must not depend on the worker count (its store key does not)
        return [Piece(src.source, 0, 1, "hub")]
    pieces = []
    for path in files:
        _check_file(path, src.text_field, _where(cfg, src))
        if path.suffix == ".jsonl":
            size = path.stat().st_size
            n = max(1, -(-size // PIECE_BYTES))
            pieces += [Piece(str(path), size * i // n, size * (i + 1) // n, "jsonl") for i in range(n)]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            groups, rows = meta.num_row_groups, meta.num_rows
            per = max(1, groups * PIECE_BYTES // max(1, path.stat().st_size)) if rows else groups
            pieces += [Piece(str(path), g, min(groups, g + per), "parquet") for g in range(0, groups, per)]
        else:
            pieces.append(Piece(str(path), 0, 0, "json"))
    return pieces


# --- the datatrove pipeline -------------------------------------------------------------------------


@dataclass
class BuildReport:
    store: SourceStore
    reused: bool
    seconds: float


def build_source(cfg: FlywheelConfig, src: DataSource, tok, max_tokens: int | None = None,
                 workers: int | None = None, on_tokens: Callable[[int], None] | None = None) -> BuildReport:
    """Tokenize one source into its store (reusing a complete one, resuming a partial one)."""
    t0 = time.perf_counter()
    if getattr(tok, "backend_tokenizer", None) is None:
        raise FlywheelError(f"{cfg.model.tokenizer or cfg.model.source}: the token store needs a fast tokenizer "
                            "(tokenizer.json); convert it with transformers' AutoTokenizer(use_fast=True)")
    if tok.eos_token is None or tok.eos_token_id is None:
        raise FlywheelError(f"{cfg.model.tokenizer or cfg.model.source}: the tokenizer has no eos token; the store "
                            "needs one to end each document")
    key = store_key(cfg, src, tok, max_tokens)
    root = cfg.home / "cache" / "tokens"
    final = root / key
    if (final / "store.json").exists():
        return BuildReport(open_store(final, key), True, time.perf_counter() - t0)
    workers = max(1, workers or cfg.data.workers or os.cpu_count() or 1)
    pieces = plan_pieces(cfg, src, workers)
    partial = root / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer_file = partial / "tokenizer.json"
    if not tokenizer_file.exists():
        tok.backend_tokenizer.save(str(tokenizer_file))
    per_piece = max_tokens  # only a hub source is capped, and it is one piece
    from flywheel.data.shards import QuietExecutor, ReadPiece, WriteShard

    steps = [ReadPiece(src, pieces), WriteShard(partial, tokenizer_file, tok.eos_token, per_piece)]

    executor = QuietExecutor(steps, tasks=len(pieces), workers=min(workers, len(pieces)),
                             logging_dir=str(partial / "datatrove"), skip_completed=True)
    executor.log_file = str(partial / "datatrove.log")
    watcher = _TokenWatcher(partial, np.dtype(np.uint16 if len(tok) <= 65536 else np.uint32).itemsize, on_tokens)
    try:
        with watcher:
            executor.run()
    except FlywheelError:
        shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing worth resuming, nothing left half-built
        raise
    meta = _finish(partial, key, src, pieces, tok)
    if meta["documents"] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise FlywheelError(f"{src.source}: has no non-empty '{src.text_field}' documents; fill that column or set "
                            "text_field to the column that holds the text")
    write_json(partial / "store.json", meta)
    shutil.rmtree(partial / "datatrove", ignore_errors=True)
    os.replace(partial, final)
    return BuildReport(open_store(final, key), False, time.perf_counter() - t0)


def _finish(partial: Path, key: str, src: DataSource, pieces: list[Piece], tok) -> dict:
    itemsize = 2 if len(tok) <= 65536 else 4
    shards = []
    for r in range(len(pieces)):
        ds = partial / f"{r:05d}.ds"
        if not ds.exists():
            raise FlywheelError(f"token store {partial}: shard {ds.name} is missing after the build; rerun "
                                "`flywheel prepare-data CONFIG` to finish it")
        tokens, docs = ds.stat().st_size // itemsize, (partial / f"{ds.name}.index").stat().st_size // 8
        shards.append({"file": ds.name, "tokens": tokens, "documents": docs, "piece": asdict(pieces[r])})
    total_bytes = sum((partial / s["file"]).stat().st_size + (partial / f"{s['file']}.index").stat().st_size
                      for s in shards)
    return {"key": key, "version": STORE_VERSION, "source": src.source, "text_field": src.text_field,
            "tokenizer": tokenizer_fingerprint(tok), "dtype": "<u2" if itemsize == 2 else "<u4",
            "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
            "bytes": total_bytes, "shards": shards}


def open_store(folder: Path, key: str) -> SourceStore:
    meta = json.loads((folder / "store.json").read_text())
    if meta.get("key") != key:
        raise FlywheelError(f"token store {folder}: was built for key {meta.get('key')}, not {key} (another "
                            "tokenizer or other data); delete that folder and run `flywheel prepare-data CONFIG`")
    return SourceStore(folder, meta)


class _TokenWatcher:
    """Reports tokens written so far (sizes of the shards being written) to `on_tokens`, twice a second."""

    def __init__(self, folder: Path, itemsize: int, on_tokens: Callable[[int], None] | None):
        self.folder, self.itemsize, self.on_tokens = folder, itemsize, on_tokens
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self) -> int:
        total = 0
        for p in self.folder.iterdir():
            if p.name.endswith((".ds", ".ds.tmp")):
                try:
                    total += p.stat().st_size
                except FileNotFoundError:  # renamed between listing and stat
                    pass
        return total // self.itemsize

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.on_tokens(self.count())

    def __enter__(self) -> _TokenWatcher:
        if self.on_tokens is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.on_tokens(self.count())
