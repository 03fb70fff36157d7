"""The mid-training mixture: an index of fixed-length windows into the sources' token stores.

Nothing is copied. Each source is tokenized once into its store (`flywheel.data.store`); the
mixture is `budget // seq_len` windows of `seq_len` tokens, each inside one shard, shared out
between the sources by weight (largest remainder, so each source is within one window of its
weight), then shuffled with the config's seed. A source with fewer windows than its share is
repeated: every epoch is a fresh seeded permutation of its windows, shifted by a seeded offset
so a repeat sees its documents at other positions, and the epoch count is recorded. A window never crosses a shard, so a shard's tail shorter than `seq_len` is not used
(at most `seq_len - 1` tokens per shard of 64 MiB of text).

Those epochs make one endless seeded stream of windows per source. `data.slice` k takes that
stream's k-th budget-sized stretch: with `data.per_round: next_slice` round N reads slice N, so
each round anneals on text the earlier rounds did not see until the store runs out, and then on a
new epoch (meta.json records where each source's slice starts and ends, in epochs). Slice 0 is
the stream's start, so a single anneal and round 0 read exactly what they read before slices.

    home/cache/packed/<key>/
        windows.npy   int64, the first token of every window, as an offset into the shards listed in
                      meta.json laid end to end (8 bytes per window, not 4 bytes per token)
        meta.json     key, slice, rows, seq_len, tokens, per source: store, documents, windows, epochs
                      (epoch_from and epoch_to: where its slice lies in the stream), bytes

The key covers the tokenizer, each source (its store key: fingerprint, text field, tokenizer),
the weights, the budget, seq_len, the seed and the slice (when not 0), so reference scoring and every training run of a
round read the very same tokens. Rows are read by memory map (`Windows`); a token's document id
comes from the store's document-end offsets, so ReMiT's per-document centring needs no per-token
array.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.data.disk import (
    DataPlan,
    check_space,
    checkpoint_bytes,
    model_parameters,
    reference_cache_bytes,
)
from flywheel.data.fetch import FetchPlan, fetch_files, fetches, plan_fetch
from flywheel.data.io import atomic_dir, distributed_rank, fingerprint, wait_until, write_json
from flywheel.data.store import (
    BuildReport,
    SourceStore,
    build_source,
    estimate_tokens,
    open_store,
    source_need,
    store_key,
)
from flywheel.errors import FlywheelError

MIX_VERSION = 2


# --- reading windows ------------------------------------------------------------------------------


class _Column:
    """`input_ids` or `doc_ids` of the windows: rows read on demand; `np.asarray` reads them all."""

    def __init__(self, windows: Windows, docs: bool):
        self.windows, self.docs = windows, docs

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.windows), self.windows.seq_len)

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - an int or a slice
        read = self.windows.doc_ids_of if self.docs else self.windows.tokens_of
        if isinstance(i, slice):
            rows = range(*i.indices(len(self)))
            out = np.empty((len(rows), self.windows.seq_len), dtype=np.int64 if self.docs else np.int32)
            for k, r in enumerate(rows):
                out[k] = read(r)
            return out
        return read(int(i))

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001, ANN204 - numpy protocol
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class Windows:
    """The mixture's rows, read from the shards by memory map (the Trainer's dataset reads one row at a time)."""

    def __init__(self, folder: Path, meta: dict, starts: np.ndarray):
        self.folder, self.seq_len, self.starts = folder, int(meta["seq_len"]), starts
        shards = meta["shards"]
        self._files = [folder / s["path"] for s in shards]
        self._dtypes = [np.dtype(s["dtype"]) for s in shards]
        self._offsets = np.cumsum([0] + [s["tokens"] for s in shards], dtype=np.int64)
        self._doc_offsets = np.cumsum([0] + [s["documents"] for s in shards], dtype=np.int64)
        self._tokens: dict[int, np.ndarray] = {}
        self._ends: dict[int, np.ndarray] = {}
        self.input_ids = _Column(self, docs=False)
        self.doc_ids = _Column(self, docs=True)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_tokens(self) -> int:
        return len(self) * self.seq_len

    def _locate(self, row: int) -> tuple[int, int]:
        g = int(self.starts[row])
        shard = int(np.searchsorted(self._offsets, g, side="right")) - 1
        return shard, g - int(self._offsets[shard])

    def tokens_of(self, row: int) -> np.ndarray:
        shard, at = self._locate(row)
        if shard not in self._tokens:
            self._tokens[shard] = np.memmap(self._files[shard], dtype=self._dtypes[shard], mode="r")
        return np.asarray(self._tokens[shard][at : at + self.seq_len], dtype=np.int32)

    def doc_ids_of(self, row: int) -> np.ndarray:
        """A global document number per token: the shard's first document + the documents ended before it."""
        shard, at = self._locate(row)
        if shard not in self._ends:
            self._ends[shard] = np.memmap(f"{self._files[shard]}.index", dtype="<u8", mode="r")
        pos = np.arange(at, at + self.seq_len, dtype=np.uint64)
        return self._doc_offsets[shard] + np.searchsorted(self._ends[shard], pos, side="right").astype(np.int64)


@dataclass
class PackedCorpus:
    """A built mixture: its window index and the stores it points into."""

    folder: Path
    key: str
    builds: list[BuildReport] = field(default_factory=list)  # this call's store builds (empty when reused)

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())

    def load(self) -> Windows:
        meta = self.meta
        for s in meta["shards"]:
            if not (self.folder / s["path"]).exists():
                raise FlywheelError(f"mixture {self.folder}: its token shard {s['path']} is missing; run "
                                    "`flywheel prepare-data CONFIG` to rebuild the store")
        return Windows(self.folder, meta, np.load(self.folder / "windows.npy", mmap_mode="r"))


# --- building -------------------------------------------------------------------------------------


def packed_folder(cfg: FlywheelConfig, key: str) -> Path:
    """Where the mixture with this key keeps its window index and meta.json."""
    return cfg.home / "cache" / "packed" / key


def window_counts(n_windows: int, weights: list[float]) -> list[int]:
    """Windows per source: each within one window of its weighted share, summing to `n_windows`."""
    total = sum(weights)
    exact = [n_windows * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n_windows - sum(counts)]:
        counts[i] += 1
    return counts


def _source_windows(store: SourceStore, base: int, seq_len: int, shift: int = 0) -> np.ndarray:
    """The first token of every whole window of a store, `shift` tokens into each shard, as global offsets."""
    parts, offset = [], base
    for s in store.shards:
        n = max(0, s["tokens"] - shift) // seq_len
        parts.append(offset + shift + np.arange(n, dtype=np.int64) * seq_len)
        offset += s["tokens"]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _take(store: SourceStore, base: int, seq_len: int, count: int, rng: np.random.Generator, skip: int = 0
          ) -> tuple[np.ndarray, float, float]:
    """Windows `skip` to `skip + count` of a store's endless stream, and the epochs where they start and end.

    The stream is one seeded permutation of the store's windows per epoch. The first epoch's windows
    start at each shard's first token; every repeat shifts them by a seeded offset, so a repeated
    document is seen at other positions and beside other text. Slice k of a flywheel is `skip = k * count`:
    slice 0 is what a single anneal reads, and a later slice reads on where the previous one stopped.
    """
    parts, remaining, shift, start = [], count, 0, 0
    epoch, epoch_from, epoch_to = 0, None, 0.0
    while remaining > 0:
        avail = _source_windows(store, base, seq_len, shift)
        if len(avail) == 0:
            avail, shift = _source_windows(store, base, seq_len), 0  # shards shorter than seq_len + shift
        n = len(avail)
        order = rng.permutation(n)
        lo = max(0, skip - start)  # where the slice begins inside this epoch (n: not yet)
        if lo < n:
            pick = avail[order[lo : lo + remaining]]
            parts.append(pick)
            remaining -= len(pick)
            epoch_from = epoch + lo / n if epoch_from is None else epoch_from
            epoch_to = epoch + (lo + len(pick)) / n
        start += n
        epoch += 1
        shift = int(rng.integers(seq_len))
    windows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return windows, epoch_from or 0.0, epoch_to


def _window_count(cfg: FlywheelConfig) -> int:
    mt = cfg.midtrain
    n_windows = mt.token_budget // mt.seq_len
    if n_windows == 0:
        raise FlywheelError(f"midtrain.token_budget: {mt.token_budget} tokens is less than one window of "
                            f"midtrain.seq_len={mt.seq_len}; raise the budget")
    return n_windows


def _stream_caps(cfg: FlywheelConfig, counts: list[int]) -> list[int | None]:
    """Tokens to read per source: a hub source is streamed only as far as its share (plus a window per shard
    tail, dropped); a local one is read whole."""
    seq_len = cfg.midtrain.seq_len
    return [(c + 1) * seq_len if s.ref.kind == "hub" else None for s, c in zip(cfg.data.sources, counts, strict=True)]


def mixture_key(cfg: FlywheelConfig, tokenizer_id: str, store_keys: list[str]) -> str:
    """The mixture's cache key: tokenizer, sources and their stores, budget, seq_len, seed and slice (when not 0)."""
    mt, part = cfg.midtrain, cfg.data.slice
    sources_json = [s.model_dump(mode="json") for s in cfg.data.sources]
    return fingerprint(MIX_VERSION, tokenizer_id, list(zip(sources_json, store_keys, strict=True)),
                       mt.token_budget, mt.seq_len, cfg.seed, *([("slice", part)] if part else []))


def _source_stores(cfg: FlywheelConfig, tok, keys: list[str], caps: list[int | None], plans: list[FetchPlan | None],
                   workers: int, on_source: Callable[[int, int | None], None] | None,
                   on_tokens: Callable[[int], None] | None) -> tuple[list[SourceStore], list[BuildReport]]:
    """Every source's store, opened when complete, else built (a fetched hub source's files fetched first)."""
    builds, stores = [], []
    for i, (src, cap, plan) in enumerate(zip(cfg.data.sources, caps, plans, strict=True)):
        done = cfg.home / "cache" / "tokens" / keys[i] / "store.json"
        if done.exists():
            stores.append(open_store(done.parent, keys[i]))
            continue
        fetched = (plan, fetch_files(cfg, i, plan)) if plan is not None else None
        if on_source is not None:
            on_source(i, estimate_tokens(cfg, src, tok, cap, plan))
        rep = build_source(cfg, src, tok, max_tokens=None if plan else cap, workers=workers, on_tokens=on_tokens,
                           fetched=fetched)
        builds.append(rep)
        stores.append(rep.store)
    return stores, builds


def source_plans(cfg: FlywheelConfig, tok, tokenizer_id: str) -> tuple[list[int], list[int | None],
                                                                        list[FetchPlan | None], list[str]]:
    """Per source: its windows, the tokens a streamed hub source reads, the fetch plan of a fetched one, and
    its store key (what a build would write: nothing is built here)."""
    counts = window_counts(_window_count(cfg), [s.weight for s in cfg.data.sources])
    caps = _stream_caps(cfg, counts)
    plans = [plan_fetch(cfg, i, tok, tokenizer_id, cap) if fetches(cfg, src, cap) else None
             for i, (src, cap) in enumerate(zip(cfg.data.sources, caps, strict=True))]
    caps = [None if plan else cap for cap, plan in zip(caps, plans, strict=True)]
    keys = [store_key(cfg, s, tok, cap, plan) for s, cap, plan in zip(cfg.data.sources, caps, plans, strict=True)]
    return counts, caps, plans, keys


def _write_index(cfg: FlywheelConfig, folder: Path, key: str, stores: list[SourceStore], counts: list[int]) -> None:
    """Take each source's windows for this slice, shuffle them together, and write windows.npy + meta.json."""
    seq_len, part = cfg.midtrain.seq_len, cfg.data.slice
    starts, sources, shards, base = [], [], [], 0
    for i, (src, store, count) in enumerate(zip(cfg.data.sources, stores, counts, strict=True)):
        if len(_source_windows(store, base, seq_len)) == 0:
            raise FlywheelError(f"data.sources.{i}.source: {src.source} holds {store.meta['tokens']:,} tokens in "
                                f"shards shorter than midtrain.seq_len={seq_len}; add data or shorten seq_len")
        rng = np.random.default_rng([cfg.seed, i, MIX_VERSION])
        taken, epoch_from, epoch_to = _take(store, base, seq_len, count, rng, skip=part * count)
        starts.append(taken)
        sources.append({"source": src.source, "store": store.key, "documents": store.meta["documents"],
                        "revision": store.meta.get("revision"),
                        "store_tokens": store.meta["tokens"], "windows": int(count),
                        "tokens": int(count) * seq_len, "epochs": round(epoch_to - epoch_from, 4),
                        "epoch_from": round(epoch_from, 4), "epoch_to": round(epoch_to, 4),
                        "bytes": store.meta["bytes"]})
        shards += [{"path": os.path.relpath(store.folder / s["file"], folder), "dtype": store.meta["dtype"],
                    "tokens": s["tokens"], "documents": s["documents"]} for s in store.shards]
        base += store.meta["tokens"]
    index = np.concatenate(starts)
    index = index[np.random.default_rng([cfg.seed, MIX_VERSION]).permutation(len(index))]
    with atomic_dir(folder) as tmp:
        np.save(tmp / "windows.npy", index)
        write_json(tmp / "meta.json", {"key": key, "slice": part, "rows": len(index), "seq_len": seq_len,
                                       "tokens": len(index) * seq_len, "sources": sources, "shards": shards})


def data_plan(cfg: FlywheelConfig, tok, tokenizer_id: str, workers: int | None = None) -> DataPlan:
    """What building the mixture will read and write, per source, and the run's cache and checkpoints (disk.py)."""
    from huggingface_hub import constants

    _, caps, plans, keys = source_plans(cfg, tok, tokenizer_id)
    needs = [source_need(cfg, i, tok, cap, plan, key)
             for i, (cap, plan, key) in enumerate(zip(caps, plans, keys, strict=True))]
    return DataPlan(cfg.home, Path(constants.HF_HUB_CACHE), max(1, workers or cfg.data.workers or os.cpu_count() or 1),
                    needs, reference_cache_bytes(cfg), checkpoint_bytes(cfg, model_parameters(cfg)))


def build_mixture(cfg: FlywheelConfig, tok, tokenizer_id: str, workers: int | None = None,
                  on_source: Callable[[int, int | None], None] | None = None,
                  on_tokens: Callable[[int], None] | None = None, force: bool = False) -> PackedCorpus:
    """Build (or reuse) every source's store and the window index; reuse the whole mixture when the key matches.

    `on_source(i, estimated_tokens)` is called before source i's store is built, `on_tokens(n)` as
    its tokens are written (the CLI's progress bar). Before a store is built, the disk: a file system with
    less free space than the run will write refuses, unless `force` (flywheel/data/disk.py).
    """
    workers = max(1, workers or cfg.data.workers or os.cpu_count() or 1)
    counts, caps, plans, keys = source_plans(cfg, tok, tokenizer_id)
    key = mixture_key(cfg, tokenizer_id, keys)
    folder = packed_folder(cfg, key)
    rank, world = distributed_rank()
    if world > 1 and rank != 0:  # under torchrun, rank 0 builds; the others read what it wrote
        wait_until("rank 0 to build the mixture", lambda: [] if (folder / "meta.json").exists() else [key])
        return PackedCorpus(folder, key)
    if not force and not all((cfg.home / "cache" / "tokens" / k / "store.json").exists() for k in keys):
        check_space(data_plan(cfg, tok, tokenizer_id, workers))
    stores, builds = _source_stores(cfg, tok, keys, caps, plans, workers, on_source, on_tokens)
    if not (folder / "meta.json").exists():
        _write_index(cfg, folder, key, stores, counts)
    return PackedCorpus(folder, key, builds)
