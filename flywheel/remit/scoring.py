"""Reference scoring: the frozen reference's per-token log-probs, computed once, stored beside the tokens.

The reference never changes during a round and the corpus is fixed, so ReMiT needs no second
model at training time: `score_reference` runs the reference forward-only over the packed
mixture and writes `log p_ref(x_t | x_<t)` as 16-bit side-car arrays aligned to the tokens.

Storage: float16 by default. Log-probs live in about [-30, 0]; float16 keeps 11 significant
bits there (relative rounding error <= 2^-11), bfloat16 only 8 (<= 2^-8), and float16's range
(|x| <= 65504) covers every finite log-prob a float32 softmax produces. So float16 is 8x more
precise for the same 2 bytes. The effect on the loss is bounded: see `storage_error_bound`.

Layout of `home/cache/reference/<key>/`:
    chunk-00000.npy ...   (rows_in_chunk, seq_len) log-probs; column 0 is 0 (no context in the row)
    index.json            key, shapes, dtype and a sha256 per chunk; written last
While scoring, the folder is `<key>.partial/`; each chunk is written to a temp name and
renamed, so an interrupted run resumes at the first missing chunk, and the folder is renamed
to `<key>` only when complete. Under torchrun each rank scores its own chunks (see
`score_reference`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.data.io import distributed_rank, fingerprint, publish, wait_until, write_json
from flywheel.data.mixture import PackedCorpus, build_mixture
from flywheel.env import keep_freed_memory
from flywheel.errors import FlywheelError
from flywheel.failpoints import failpoint
from flywheel.models import (
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    model_identity,
    tokenizer_identity,
)
from flywheel.refs import model_location

SCORE_VERSION = 1
CHUNK_TOKENS = 1 << 20
FP16_MAX = 65504.0
# unit roundoff of each storage type (round to nearest): |stored - exact| <= u * |exact|
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}


def storage_error_bound(ref_logprobs, mean_nll: float, dtype: str) -> float:
    """Largest change of the ReMiT loss that storing `ref_logprobs` in `dtype` can cause.

    With e_t the storage error of token t and E = max|e_t| <= u * max|log p_ref|, the centred
    delta moves by at most 2E; 2*sigmoid has slope <= 1/2, so each weight moves by at most E
    (the clamp only shrinks that); the loss sum(w*nll)/N therefore moves by at most E * mean(nll).
    """
    import torch

    worst = float(torch.as_tensor(ref_logprobs).abs().max()) * UNIT_ROUNDOFF[dtype]
    return worst * mean_nll


@dataclass
class ReferenceCache:
    """A complete, verified cache of reference log-probs for one packed corpus."""

    folder: Path
    index: dict
    chunks: list[np.ndarray] = field(default_factory=list)

    @property
    def rows_per_chunk(self) -> int:
        return int(self.index["rows_per_chunk"])

    def rows(self, idx: int) -> np.ndarray:
        """The log-probs of packed row `idx` (a view into a memory-mapped chunk)."""
        c, r = divmod(idx, self.rows_per_chunk)
        return self.chunks[c][r]


@dataclass
class ScoreReport:
    cache: ReferenceCache
    corpus: PackedCorpus
    computed_chunks: list[int]
    seconds: float
    tokens_per_second: float | None
    mfu: float | None = None  # forward FLOPs (a third of training's, flywheel/perf.py) over the device's peak


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _refuse(folder: Path, why: str) -> FlywheelError:
    return FlywheelError(
        f"reference cache {folder}: {why}; delete that folder and run `flywheel score-reference CONFIG` again"
    )


def open_cache(folder: Path, expected_key: str, rows: int, seq_len: int, verify: bool = True) -> ReferenceCache:
    """Open a finished cache, refusing one whose key, shape or checksums do not match what training expects."""
    index_path = folder / "index.json"
    if not index_path.exists():
        raise _refuse(folder, "has no index.json (scoring did not finish)")
    index = json.loads(index_path.read_text())
    if index.get("key") != expected_key:
        raise _refuse(folder, f"was made for key {index.get('key')}, not {expected_key} (stale)")
    if index.get("rows") != rows or index.get("seq_len") != seq_len:
        raise _refuse(folder, f"holds {index.get('rows')}x{index.get('seq_len')} rows, the corpus has {rows}x{seq_len}")
    chunks = []
    for entry in index["chunks"]:
        path = folder / entry["file"]
        if not path.exists():
            raise _refuse(folder, f"{entry['file']} is missing")
        if verify and _sha256(path) != entry["sha256"]:
            raise _refuse(folder, f"{entry['file']} does not match its checksum (changed or truncated)")
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError:
            raise _refuse(folder, f"{entry['file']} is not a readable array (truncated)") from None
        if arr.shape != (entry["rows"], seq_len) or str(arr.dtype) != index["dtype"]:
            raise _refuse(folder, f"{entry['file']} has shape {arr.shape} {arr.dtype}, expected {entry['rows']}x{seq_len}")
        chunks.append(arr)
    if sum(len(c) for c in chunks) != rows:
        raise _refuse(folder, "its chunks do not add up to the corpus's rows")
    return ReferenceCache(folder, index, chunks)


def write_derived_cache(source: ReferenceCache, final: Path, key: str, chunk_of: Callable[[int, np.ndarray], np.ndarray],
                        index_extra: Callable[[], dict]) -> None:
    """Write a cache derived chunk by chunk from `source` (same rows, layout and index), published whole.

    `chunk_of(c, source_chunk)` gives chunk c's array; `index_extra()`, called after the last chunk, the index's
    own fields (it may raise to refuse the result). The folder is built under a temporary name and renamed to
    `final` at the end; an interruption or a refusal leaves nothing behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent))
    try:
        chunks = []
        for c, entry in enumerate(source.index["chunks"]):
            with tempfile.NamedTemporaryFile(dir=partial, suffix=".tmp", delete=False) as f:
                np.save(f, chunk_of(c, source.chunks[c]))
            publish(f.name, partial / entry["file"])
            chunks.append({**entry, "sha256": _sha256(partial / entry["file"])})
        write_json(partial / "index.json", {**source.index, "key": key, "chunks": chunks, **index_extra()})
        _publish_folder(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def reference_logprobs(model, input_ids, kernel: str = "auto", chunk_tokens: int = 2048):  # noqa: ANN001, ANN201
    """log p(x_t | x_<t) for t >= 1 of each row, float32, with column 0 set to 0 (aligned to input_ids).

    The output layer runs in chunks of `chunk_tokens` (flywheel/remit/kernels.py), so no (B, T, V) logits
    exist; `kernel` "eager" (midtrain.loss_kernel) takes the model's full logits instead.
    """
    import torch

    from flywheel.remit.kernels import token_logprobs_of

    lp = token_logprobs_of(model, input_ids, kernel, chunk_tokens)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def cache_key(cfg: FlywheelConfig, ref_path: str, tok_id: str, corpus_key: str) -> str:
    """Everything the stored numbers depend on: reference weights, tokenizer, corpus, packing, dtype."""
    mt = cfg.midtrain
    return fingerprint(SCORE_VERSION, model_identity(ref_path), tok_id, corpus_key, mt.seq_len, mt.cache_dtype)


def _chunk_done(path: Path, rows: int, seq_len: int) -> bool:
    if not path.exists():
        return False
    try:
        return np.load(path, mmap_mode="r").shape == (rows, seq_len)
    except (ValueError, OSError):
        return False


@dataclass
class _Scoring:
    """One scoring job: the packed corpus, its cache key and folders, and how it is cut into chunks."""

    key: str
    ref_path: str
    tok_id: str
    corpus: PackedCorpus
    packed: Any
    final: Path
    seq_len: int
    rows_per_chunk: int

    @property
    def partial(self) -> Path:
        return self.final.with_name(f"{self.key}.partial")

    @property
    def n_chunks(self) -> int:
        return -(-len(self.packed) // self.rows_per_chunk)

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.rows_per_chunk, min(len(self.packed), (c + 1) * self.rows_per_chunk)

    def chunk(self, c: int) -> Path:
        return self.partial / f"chunk-{c:05d}.npy"

    def done(self, c: int) -> bool:
        lo, hi = self.bounds(c)
        return _chunk_done(self.chunk(c), hi - lo, self.seq_len)

    def cache(self, verify: bool = True) -> ReferenceCache:
        return open_cache(self.final, self.key, len(self.packed), self.seq_len, verify=verify)


def score_reference(cfg: FlywheelConfig, reference: str, chunk_tokens: int = CHUNK_TOKENS) -> ScoreReport:
    """Score the packed mixture with the reference once; reuse a finished cache, resume a partial one.

    Data-parallel without collectives: under torchrun / accelerate launch, rank r scores chunks
    r, r + world, r + 2*world ...; rank 0 waits for every chunk on the file system, writes the
    index and renames the folder; the other ranks wait for that. Each chunk is the same
    computation whichever rank does it, so the cache is the one a single process writes.
    """
    import torch

    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        keep_freed_memory()  # flat time per row at any scoring batch (flywheel/env.py)
    job = _scoring_job(cfg, reference, chunk_tokens)
    if (job.final / "index.json").exists():
        return ScoreReport(job.cache(), job.corpus, [], time.perf_counter() - t0, None)

    job.partial.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_rank()
    try:
        computed, tps, mfu = _score_chunks(cfg, reference, job, range(rank, job.n_chunks, world))
        if rank != 0:
            wait_until("rank 0 to write the reference cache's index",
                       lambda: [] if (job.final / "index.json").exists() else ["index.json"])
        else:
            _write_index(cfg, reference, job, others=set(range(job.n_chunks)) - set(range(0, job.n_chunks, world)))
    except FileNotFoundError:
        if not (job.final / "index.json").exists():
            raise
        # another run on this home scored the same cache and published it (the partial folder was shared)
        return ScoreReport(job.cache(), job.corpus, [], time.perf_counter() - t0, None)
    return ScoreReport(job.cache(verify=False), job.corpus, computed, time.perf_counter() - t0, tps, mfu)


def _scoring_job(cfg: FlywheelConfig, reference: str, chunk_tokens: int) -> _Scoring:
    """The tokenizer checked against the reference's, the packed mixture, and the cache's key and folder."""
    tok = load_tokenizer(cfg)
    ref_path = model_location(cfg, reference)
    check_same_vocabulary(tok, load_tokenizer(cfg, reference), cfg.model.source, reference)
    tok_id = tokenizer_identity(tok)
    corpus = build_mixture(cfg, tok, tok_id)
    packed = corpus.load()
    mt = cfg.midtrain
    key = cache_key(cfg, ref_path, tok_id, corpus.key)
    return _Scoring(key, ref_path, tok_id, corpus, packed, cfg.home / "cache" / "reference" / key, mt.seq_len,
                    max(1, chunk_tokens // mt.seq_len))


def _score_chunks(cfg: FlywheelConfig, reference: str, job: _Scoring, mine: range
                  ) -> tuple[list[int], float | None, float | None]:
    """Score this rank's chunks that are not on disk yet, each published whole; (chunks scored, tokens/s, MFU)."""
    import torch

    # each rank scores on its own GPU (LOCAL_RANK, as torchrun / accelerate set it), else on the CPU
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if torch.cuda.is_available() \
        else torch.device("cpu")
    model = None
    computed, scored_tokens, scoring_time = [], 0, 0.0
    for c in mine:
        if job.done(c):
            continue  # finished before an interruption
        if model is None:
            model = load_model(cfg, reference, for_training=False).to(device)
        t1 = time.perf_counter()
        out = _score_rows(cfg, model, job.packed, *job.bounds(c), device)
        scoring_time += time.perf_counter() - t1
        scored_tokens += out.size
        with tempfile.NamedTemporaryFile(dir=job.partial, suffix=".tmp", delete=False) as f:
            np.save(f, out)
        publish(f.name, job.chunk(c))
        computed.append(c)
        failpoint("score-reference-chunk")  # crash tests: a kill here must lose no finished chunk
    if not scoring_time:
        return computed, None, None
    tps = scored_tokens / scoring_time
    return computed, tps, forward_mfu(model, tps, cfg.midtrain.seq_len, cfg.launch.for_stage("score_reference"))


def forward_mfu(model, tokens_per_second: float, seq_len: int, launch) -> float | None:  # noqa: ANN001
    """A forward pass's model FLOPs utilisation (a third of a training step's FLOPs per token)."""
    from flywheel.perf import device_peak_tflops, flops_per_token, model_shape

    peak = device_peak_tflops(launch.peak_tflops)
    if peak is None:
        return None
    params, layers, hidden = model_shape(model)
    return tokens_per_second * flops_per_token(params, 0, layers, hidden, seq_len) / 3 / (peak * 1e12)


def _score_rows(cfg: FlywheelConfig, model, packed, lo: int, hi: int, device) -> np.ndarray:  # noqa: ANN001
    """The reference's log-probs of packed rows [lo, hi), in `midtrain.cache_dtype`."""
    import torch

    mt = cfg.midtrain
    store = getattr(np, mt.cache_dtype)
    out = np.empty((hi - lo, mt.seq_len), dtype=store)
    with torch.inference_mode():
        for b in range(lo, hi, mt.score_batch_size):
            ids = torch.from_numpy(np.asarray(packed.input_ids[b : min(hi, b + mt.score_batch_size)], dtype=np.int64))
            lp = reference_logprobs(model, ids.to(device), mt.loss_kernel, mt.loss_chunk_tokens)
            lp = lp.clamp_(min=-FP16_MAX).cpu()
            out[b - lo : b - lo + len(ids)] = lp.numpy().astype(store)
    return out


def _write_index(cfg: FlywheelConfig, reference: str, job: _Scoring, others: set[int]) -> None:
    """Rank 0: wait for the other ranks' chunks, write the index with every chunk's checksum, publish the folder."""
    def missing() -> list[str]:  # each poll looks only at the chunks not yet seen complete
        others.difference_update([c for c in sorted(others) if job.done(c)])
        return [f"chunk-{c:05d}" for c in sorted(others)]

    wait_until("the other ranks' reference chunks", missing)
    chunks = [{"file": job.chunk(c).name, "rows": job.bounds(c)[1] - job.bounds(c)[0], "sha256": _sha256(job.chunk(c))}
              for c in range(job.n_chunks)]
    mt = cfg.midtrain
    write_json(job.partial / "index.json", {
        "key": job.key, "rows": len(job.packed), "seq_len": mt.seq_len, "dtype": mt.cache_dtype,
        "rows_per_chunk": job.rows_per_chunk, "chunks": chunks, "reference": reference,
        "reference_identity": model_identity(job.ref_path), "corpus": job.corpus.key, "tokenizer": job.tok_id,
    })
    _publish_folder(job.partial, job.final)


def _publish_folder(partial: Path, final: Path) -> None:
    """Rename a finished cache folder into place; if another run published the same one first, keep theirs."""
    try:
        os.replace(partial, final)
    except OSError:
        if not (final / "index.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
