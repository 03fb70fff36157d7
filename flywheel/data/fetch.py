"""A hub source too large to stream: its files fetched into the Hugging Face cache, then tokenized by every worker.

One streaming task reads a hub dataset at one worker's speed (about 0.5M tokens/s), more than a day for
50B tokens. So a hub source whose share of the budget is above `data.fetch_above_tokens` is planned,
fetched and built as local files:

1. plan (`plan_fetch`): resolve the source's `revision` (None: main) to its commit; list the subset's
   data files at that commit (include/exclude patterns on the repo paths); measure tokens per byte on the
   first bytes of one file (a ranged read, nothing downloaded whole); then take files in an order the
   seed decides until their estimated tokens cover the share with FETCH_MARGIN to spare. Never the whole
   subset: Dolmino's dclm folder is far larger than the ~24B tokens the 1B mix takes from it. The plan is
   kept under home/cache/fetch/<key>.json, so a later run (offline too) reads the same files of the same
   commit: a store never silently mixes two versions of a dataset.
2. fetch (`fetch_files`): `huggingface_hub.snapshot_download` of exactly those files at that commit,
   `data.fetch_workers` in parallel, resumable, into the Hugging Face cache (a second run downloads
   nothing); then every file's bytes are checked against the hub's own hash (sha256 of an LFS file, the
   git blob id of a small one), once: the verified list is kept beside the plan.
3. build: the token store reads the fetched files like any local folder, one piece per file, every worker
   busy. The store key carries the commit and the files' hashes.

A hub source below the threshold is still streamed by one task (flywheel/data/kinds.py, kind "hub").
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flywheel.data.compressed import looks_like_compressed, prefix_texts
from flywheel.data.io import fingerprint, write_json
from flywheel.data.kinds import DATA_FILE_SUFFIXES, SAMPLE_BYTES, kind_of, path_selected
from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.config import DataSource, FlywheelConfig

FETCH_VERSION = 1
FETCH_MARGIN = 0.25  # fetch files for 25% more tokens than the share: estimate error and shard tails


@dataclass(frozen=True)
class HubFile:
    """One file of a hub dataset at a commit: its path, size and the hub's hash of its bytes."""

    path: str
    size: int
    sha256: str | None  # an LFS file's sha256
    blob_id: str  # the git blob id (sha1 of "blob <size>\0" + bytes): what the hub hashes a small file by


@dataclass(frozen=True)
class FetchPlan:
    """Which files of which commit a hub source reads, and what they are estimated to hold."""

    repo: str
    revision: str | None  # as configured
    commit: str  # what it resolved to
    files: tuple[HubFile, ...]  # the files to fetch, sorted by path (the store's order)
    subset_files: int  # files in the subset (include/exclude) at that commit
    subset_bytes: int
    share_tokens: int  # tokens the mixture takes from this source
    tokens_per_byte: float  # measured on the sample
    sample_tokens_per_second: float  # the tokenizer on the sample, one process
    tokens_per_document: float

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def est_tokens(self) -> int:
        return int(self.bytes * self.tokens_per_byte)

    @property
    def fingerprint(self) -> list:
        """What the store key holds for this source: the repo, the commit and every file's hash."""
        return [self.repo, self.commit, [(f.path, f.sha256 or f.blob_id) for f in self.files]]

    def to_json(self) -> dict:
        return {**asdict(self), "version": FETCH_VERSION}

    @classmethod
    def from_json(cls, data: dict) -> FetchPlan:
        data = {k: v for k, v in data.items() if k != "version"}
        return cls(**{**data, "files": tuple(HubFile(**f) for f in data["files"])})


def fetches(cfg: FlywheelConfig, src: DataSource, share_tokens: int | None) -> bool:
    """Whether a source is fetched (a hub dataset whose share is above data.fetch_above_tokens)."""
    return src.ref.kind == "hub" and share_tokens is not None and share_tokens > cfg.data.fetch_above_tokens


# --- talking to the hub -----------------------------------------------------------------------------


def _hub_call(field: str, repo: str, call):  # noqa: ANN001, ANN202 - any hub call, its failure one sentence
    from flywheel.hub import worded_hub_call

    return worded_hub_call(field, repo, call, "dataset", "check the id and the revision")


def _listing(repo: str, commit: str, src: DataSource, field: str) -> list[HubFile]:
    """The subset's data files at `commit`, sorted by path."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    tree = _hub_call(field, repo, lambda: list(HfApi().list_repo_tree(repo, repo_type="dataset", revision=commit,
                                                                      recursive=True)))
    files = [HubFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id) for e in tree
             if isinstance(e, RepoFile) and e.path.endswith(DATA_FILE_SUFFIXES)
             and path_selected(e.path, src.include, src.exclude)]
    if not files:
        raise FlywheelError(f"{field}: no data file of {repo} at {commit[:12]} matches include {src.include} without "
                            f"matching exclude {src.exclude}; fix the patterns (paths as in the repo, e.g. "
                            "data/math/*)")
    return sorted(files, key=lambda f: f.path)


def _sample(repo: str, commit: str, file: HubFile, field: str) -> tuple[list[str], int]:
    """(texts, bytes they account for) of one file: its first SAMPLE_BYTES by a ranged read where the kind
    is JSON lines, else the whole file (a parquet or .json file cannot be read from a prefix)."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    if not (file.path.endswith(".jsonl") or looks_like_compressed(file.path)):
        local = Path(hf_hub_download(repo, file.path, repo_type="dataset", revision=commit))
        return kind_of(local).sample(local, field)
    url = hf_hub_url(repo, file.path, repo_type="dataset", revision=commit)
    data = bytearray()
    with get_session().stream("GET", url, headers={**build_hf_headers(), "Range": f"bytes=0-{SAMPLE_BYTES - 1}"},
                              follow_redirects=True) as answer:
        answer.raise_for_status()
        for block in answer.iter_bytes():
            data += block
            if len(data) >= SAMPLE_BYTES:
                break
    return prefix_texts(bytes(data[:SAMPLE_BYTES]), file.path, field, whole=len(data) >= file.size)


# --- the plan ---------------------------------------------------------------------------------------


def choose_files(files: list[HubFile], tokens_per_byte: float, share_tokens: int, seed: list[int]) -> list[HubFile]:
    """Files in a seeded order until their estimated tokens cover the share plus FETCH_MARGIN (all, if short)."""
    want = share_tokens * (1 + FETCH_MARGIN)
    chosen, tokens = [], 0.0
    for i in np.random.default_rng(seed).permutation(len(files)):
        if tokens >= want:
            break
        chosen.append(files[int(i)])
        tokens += files[int(i)].size * tokens_per_byte
    return sorted(chosen, key=lambda f: f.path)


def measure_sample(tok, texts: list[str], nbytes: int) -> tuple[float, float, float]:
    """(tokens per byte, tokens per second of the tokenizer, tokens per document) on a sample's texts (+1 EOS
    each): what a source's size, build time and document index are estimated from (zeros for no text)."""
    if not texts:
        return 0.0, 0.0, 1.0
    t0 = time.perf_counter()
    tokens = sum(len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"])
    return tokens / max(1, nbytes), tokens / max(1e-9, time.perf_counter() - t0), tokens / len(texts)


def plan_key(cfg: FlywheelConfig, src: DataSource, index: int, tokenizer_id: str, share_tokens: int) -> str:
    return fingerprint(FETCH_VERSION, src.source, src.revision, src.include, src.exclude, src.text_field,
                       tokenizer_id, share_tokens, cfg.seed, index)


def plan_fetch(cfg: FlywheelConfig, index: int, tok, tokenizer_id: str, share_tokens: int) -> FetchPlan:
    """The files a hub source reads (kept under home/cache/fetch/, so every later run reads the same ones)."""
    src = cfg.data.sources[index]
    field = f"data.sources.{index}.source"
    memo = cfg.home / "cache" / "fetch" / f"{plan_key(cfg, src, index, tokenizer_id, share_tokens)}.json"
    if memo.exists():
        return FetchPlan.from_json(json.loads(memo.read_text()))
    from huggingface_hub import HfApi

    repo = src.source
    commit = _hub_call(field, repo, lambda: HfApi().dataset_info(repo, revision=src.revision or "main").sha)
    files = _listing(repo, commit, src, field)
    seed = [cfg.seed, index, FETCH_VERSION]
    first = files[int(np.random.default_rng(seed).permutation(len(files))[0])]
    texts, nbytes = _hub_call(field, repo, lambda: _sample(repo, commit, first, src.text_field))
    if not texts:
        raise FlywheelError(f"{field}: {repo}/{first.path} has no non-empty '{src.text_field}' in its first "
                            f"{SAMPLE_BYTES >> 20} MiB; set text_field to the field that holds the text")
    per_byte, speed, per_doc = measure_sample(tok, texts, nbytes)
    plan = FetchPlan(repo, src.revision, commit, tuple(choose_files(files, per_byte, share_tokens, seed)),
                     len(files), sum(f.size for f in files), share_tokens, per_byte, speed, per_doc)
    write_json(memo, plan.to_json())
    return plan


# --- fetching and checking ----------------------------------------------------------------------------


def _hub_hash(path: Path, file: HubFile) -> str:
    """The hub's hash of a local file's bytes: sha256 for an LFS file, else the git blob id."""
    h = hashlib.sha256() if file.sha256 else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verify(folder: Path, plan: FetchPlan, memo: Path, workers: int) -> None:
    """Every fetched file's bytes against the hub's hash (files checked before, by size and mtime, skipped)."""
    seen: dict[str, Any] = json.loads(memo.read_text()) if memo.exists() else {}
    todo = [f for f in plan.files if seen.get(f.path) != [(folder / f.path).stat().st_size,
                                                          (folder / f.path).stat().st_mtime_ns]]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL: one core per file
        hashes = list(pool.map(lambda f: _hub_hash((folder / f.path).resolve(), f), todo))
    for f, got in zip(todo, hashes, strict=True):
        if got != (f.sha256 or f.blob_id):
            raise FlywheelError(f"{plan.repo}/{f.path}: the fetched bytes hash to {got[:12]}, not the hub's "
                                f"{(f.sha256 or f.blob_id)[:12]}; delete it from the Hugging Face cache "
                                "(huggingface-cli delete-cache) and run again")
        seen[f.path] = [(folder / f.path).stat().st_size, (folder / f.path).stat().st_mtime_ns]
    write_json(memo, seen)


def fetch_files(cfg: FlywheelConfig, index: int, plan: FetchPlan) -> list[Path]:
    """Download a plan's files (what is cached is not fetched again), check them, and return their local paths."""
    from huggingface_hub import snapshot_download

    field = f"data.sources.{index}.source"
    folder = Path(_hub_call(field, plan.repo, lambda: snapshot_download(
        plan.repo, repo_type="dataset", revision=plan.commit, allow_patterns=[f.path for f in plan.files],
        max_workers=cfg.data.fetch_workers)))
    _verify(folder, plan, cfg.home / "cache" / "fetch" / f"verified-{fingerprint(plan.repo, plan.commit)}.json",
            cfg.data.workers or cfg.data.fetch_workers)
    return [folder / f.path for f in plan.files]


def bytes_to_fetch(plan: FetchPlan) -> int:
    """The bytes of a plan's files not yet in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return sum(f.size for f in plan.files if not isinstance(
        try_to_load_from_cache(plan.repo, f.path, revision=plan.commit, repo_type="dataset"), str))
