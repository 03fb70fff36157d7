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
How each kind of source is cut and read is its entry in flywheel/data/kinds.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import DataSource, FlywheelConfig
from flywheel.data.disk import SourceNeed, store_bytes
from flywheel.data.fetch import FetchPlan, bytes_to_fetch, measure_sample
from flywheel.data.io import fingerprint, write_json
from flywheel.data.kinds import HUB, Piece, kind_of, path_selected, piece_texts
from flywheel.errors import FlywheelError
from flywheel.refs import Ref, data_files

STORE_VERSION = 1
PIECE_BYTES = 64 << 20  # a file is cut into pieces of about this size: one task and one shard each
STREAM_TOKENS_PER_DOCUMENT = 1000.0  # a streamed source's documents are not sampled: its index is estimated so

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


def source_ref(cfg: FlywheelConfig, src: DataSource) -> Ref:
    """A source's reference, naming its field (data.sources.<i>.source) for errors."""
    return dataclasses.replace(src.ref, field=f"{_where(cfg, src)}.source")


def source_files(cfg: FlywheelConfig, src: DataSource) -> list[Path] | None:
    """The local files of a source (sorted, so the store is the same on every machine), only those its
    include/exclude patterns select (paths relative to a folder source); None for a hub dataset."""
    ref = source_ref(cfg, src)
    files = data_files(cfg, ref)
    if files is None or not (src.include or src.exclude):
        return files
    root = ref.path if ref.kind == "folder" else Path(os.path.commonpath([p.parent for p in files]))
    chosen = [p for p in files if path_selected(p.relative_to(root).as_posix(), src.include, src.exclude)]
    if not chosen:
        raise FlywheelError(f"{_where(cfg, src)}.include: no file under {root} matches include {src.include} "
                            f"without matching exclude {src.exclude}; fix the patterns")
    return chosen


def source_fingerprint(cfg: FlywheelConfig, src: DataSource, fetched: FetchPlan | None = None) -> Any:
    """What the source's bytes are: file fingerprints; for a fetched hub source its commit and the files' hub
    hashes; for a streamed one id + subset + split + revision."""
    if fetched is not None:
        return ["fetched", *fetched.fingerprint]
    files = source_files(cfg, src)
    if files is None:
        return HUB.fingerprint(src.source, src)
    return [(p.name, kind_of(p).fingerprint(str(p), src)) for p in files]


def tokenizer_fingerprint(tok) -> str:
    """The fast tokenizer's whole definition (normalizer, pre-tokenizer, model, vocab) and its EOS."""
    return fingerprint(tok.backend_tokenizer.to_str(), tok.eos_token)


def store_key(cfg: FlywheelConfig, src: DataSource, tok, max_tokens: int | None,
              fetched: FetchPlan | None = None) -> str:
    return fingerprint(STORE_VERSION, tokenizer_fingerprint(tok), source_fingerprint(cfg, src, fetched),
                       src.text_field, max_tokens)


# --- reading pieces ------------------------------------------------------------------------------


def _check_file(path: Path, field: str, where: str) -> None:
    """Before any work: the file is readable, not empty, and its first row has the text field."""
    columns, n_rows = kind_of(path).columns(path)
    if n_rows == 0:
        raise FlywheelError(f"{path}: is empty (no rows); the mid-training mixture needs documents, so fill it or "
                            "remove this source")
    if field not in columns:
        raise FlywheelError(f"{path}: has no column '{field}' in its first row (columns: {', '.join(columns)}); set "
                            f"{where}.text_field to the column that holds the text")


def source_texts(cfg: FlywheelConfig, src: DataSource) -> Iterator[str]:
    """Every document of a source, piece by piece (what the store build reads), after the same checks."""
    for piece in plan_pieces(cfg, src, 1):
        yield from piece_texts(src, piece)


def _local_sample(cfg: FlywheelConfig, src: DataSource, tok, files: list[Path]) -> tuple[float, float, float]:
    """(tokens per byte, tokenizer tokens/s, tokens per document) on the start of a source's first file (jsonl:
    raw line bytes, so JSON overhead is in the ratio; a compressed file: its compressed bytes; parquet: its
    first row group)."""
    texts, sampled = kind_of(files[0]).sample(files[0], src.text_field)
    return measure_sample(tok, texts, sampled)


def estimate_tokens(cfg: FlywheelConfig, src: DataSource, tok, cap: int | None,
                    fetched: FetchPlan | None = None) -> int | None:
    """About how many tokens a source holds (the progress bar's ETA): its bytes x a sample's tokens per byte;
    a fetched hub source by its plan's sample; a streamed one is its cap (None without one)."""
    if fetched is not None:
        return fetched.est_tokens
    files = source_files(cfg, src)
    if files is None:
        return cap
    return int(_local_sample(cfg, src, tok, files)[0] * sum(p.stat().st_size for p in files))


def source_need(cfg: FlywheelConfig, index: int, tok, cap: int | None, plan: FetchPlan | None,
                key: str) -> SourceNeed:
    """What building source `index` reads and writes (data/disk.py), estimated from a sample; nothing built."""
    src, vocab = cfg.data.sources[index], len(tok)
    done = cfg.home / "cache" / "tokens" / key / "store.json"
    if done.exists():
        meta = json.loads(done.read_text())
        return SourceNeed(index, src.source, "built", len(meta["shards"]), None, meta["tokens"], None)
    if plan is not None:
        return SourceNeed(index, src.source, "fetch", len(plan.files), plan.bytes, plan.est_tokens,
                          plan.sample_tokens_per_second, store_bytes(plan.est_tokens, vocab, plan.tokens_per_document),
                          bytes_to_fetch(plan))
    files = source_files(cfg, src)
    if files is None:
        return SourceNeed(index, src.source, "stream", None, None, cap, None,
                          store_bytes(cap or 0, vocab, STREAM_TOKENS_PER_DOCUMENT))
    size = sum(p.stat().st_size for p in files)
    per_byte, speed, per_doc = _local_sample(cfg, src, tok, files)
    return SourceNeed(index, src.source, "local", len(files), size, int(per_byte * size), speed,
                      store_bytes(int(per_byte * size), vocab, per_doc))


def plan_pieces(cfg: FlywheelConfig, src: DataSource, workers: int, files: list[Path] | None = None) -> list[Piece]:
    """Cut a source into tasks, each file by its kind (jsonl by byte ranges, parquet by row groups, a compressed
    file whole); a streamed hub dataset is one stream (its pieces must not depend on the worker count: its store
    key does not). `files`: a fetched hub source's local files."""
    files = files if files is not None else source_files(cfg, src)
    if files is None:
        return HUB.pieces(src.source, PIECE_BYTES)
    pieces = []
    for path in files:
        _check_file(path, src.text_field, _where(cfg, src))
        pieces += kind_of(path).pieces(str(path), PIECE_BYTES)
    return pieces


# --- the datatrove pipeline -------------------------------------------------------------------------


@dataclass
class BuildReport:
    store: SourceStore
    reused: bool
    seconds: float


def build_source(cfg: FlywheelConfig, src: DataSource, tok, max_tokens: int | None = None,
                 workers: int | None = None, on_tokens: Callable[[int], None] | None = None,
                 fetched: tuple[FetchPlan, list[Path]] | None = None) -> BuildReport:
    """Tokenize one source into its store (reusing a complete one, resuming a partial one).

    `fetched`: a hub source's fetch plan and its files, fetched into the Hugging Face cache (data/fetch.py).
    """
    t0 = time.perf_counter()
    if getattr(tok, "backend_tokenizer", None) is None:
        raise FlywheelError(f"{cfg.model.tokenizer or cfg.model.source}: the token store needs a fast tokenizer "
                            "(tokenizer.json); convert it with transformers' AutoTokenizer(use_fast=True)")
    if tok.eos_token is None or tok.eos_token_id is None:
        raise FlywheelError(f"{cfg.model.tokenizer or cfg.model.source}: the tokenizer has no eos token; the store "
                            "needs one to end each document")
    plan, files = fetched or (None, None)
    key = store_key(cfg, src, tok, max_tokens, plan)
    root = cfg.home / "cache" / "tokens"
    final = root / key
    if (final / "store.json").exists():
        return BuildReport(open_store(final, key), True, time.perf_counter() - t0)
    workers = max(1, workers or cfg.data.workers or os.cpu_count() or 1)
    pieces = plan_pieces(cfg, src, workers, files)
    partial = root / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer_file = partial / "tokenizer.json"
    if not tokenizer_file.exists():
        tok.backend_tokenizer.save(str(tokenizer_file))
    per_piece = max_tokens  # only a hub source is capped, and it is one piece
    from flywheel.data.shards import QuietExecutor, ReadPiece, WriteShard  # datatrove: imported only to build

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
    meta = {**_finish(partial, key, src, pieces, tok), "revision": plan.commit if plan else src.revision}
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
