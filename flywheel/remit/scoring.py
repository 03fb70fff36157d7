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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    resolve_model,
    tokenizer_identity,
)

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
    tok = load_tokenizer(cfg)
    ref_path = resolve_model(cfg, reference)
    check_same_vocabulary(tok, load_tokenizer(cfg, reference), cfg.model.source, reference)
    tok_id = tokenizer_identity(tok)
    corpus = build_mixture(cfg, tok, tok_id)
    packed = corpus.load()
    mt = cfg.midtrain
    key = cache_key(cfg, ref_path, tok_id, corpus.key)
    root = cfg.home / "cache" / "reference"
    final = root / key
    if (final / "index.json").exists():
        cache = open_cache(final, key, len(packed), mt.seq_len)
        return ScoreReport(cache, corpus, [], time.perf_counter() - t0, None)

    partial = root / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_rank()
    rows_per_chunk = max(1, chunk_tokens // mt.seq_len)
    n_chunks = -(-len(packed) // rows_per_chunk)
    store = getattr(np, mt.cache_dtype)
    # each rank scores on its own GPU (LOCAL_RANK, as torchrun / accelerate set it), else on the CPU
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if torch.cuda.is_available() \
        else torch.device("cpu")
    model = None
    computed, scored_tokens, scoring_time = [], 0, 0.0

    def bounds(c: int) -> tuple[int, int]:
        return c * rows_per_chunk, min(len(packed), (c + 1) * rows_per_chunk)

    for c in range(rank, n_chunks, world):
        lo, hi = bounds(c)
        path = partial / f"chunk-{c:05d}.npy"
        if _chunk_done(path, hi - lo, mt.seq_len):
            continue  # finished before an interruption
        if model is None:
            model = load_model(cfg, reference, for_training=False).to(device)
        t1 = time.perf_counter()
        out = np.empty((hi - lo, mt.seq_len), dtype=store)
        with torch.inference_mode():
            for b in range(lo, hi, mt.score_batch_size):
                ids = torch.from_numpy(np.asarray(packed.input_ids[b : min(hi, b + mt.score_batch_size)], dtype=np.int64))
                lp = reference_logprobs(model, ids.to(device), mt.loss_kernel, mt.loss_chunk_tokens)
                lp = lp.clamp_(min=-FP16_MAX).cpu()
                out[b - lo : b - lo + len(ids)] = lp.numpy().astype(store)
        scoring_time += time.perf_counter() - t1
        scored_tokens += out.size
        with tempfile.NamedTemporaryFile(dir=partial, suffix=".tmp", delete=False) as f:
            np.save(f, out)
        publish(f.name, path)
        computed.append(c)
        failpoint("score-reference-chunk")  # crash tests: a kill here must lose no finished chunk
    tps = scored_tokens / scoring_time if scoring_time else None
    if rank != 0:
        wait_until("rank 0 to write the reference cache's index",
                  lambda: [] if (final / "index.json").exists() else ["index.json"])
        return ScoreReport(open_cache(final, key, len(packed), mt.seq_len, verify=False), corpus, computed,
                           time.perf_counter() - t0, tps)
    waiting = set(range(n_chunks)) - set(range(0, n_chunks, world))  # rank 0's own are written

    def missing() -> list[str]:  # each poll looks only at the chunks not yet seen complete
        waiting.difference_update([c for c in sorted(waiting) if _chunk_done(
            partial / f"chunk-{c:05d}.npy", bounds(c)[1] - bounds(c)[0], mt.seq_len)])
        return [f"chunk-{c:05d}" for c in sorted(waiting)]

    wait_until("the other ranks' reference chunks", missing)
    chunks = [
        {"file": f"chunk-{c:05d}.npy", "rows": min(len(packed), (c + 1) * rows_per_chunk) - c * rows_per_chunk,
         "sha256": _sha256(partial / f"chunk-{c:05d}.npy")}
        for c in range(n_chunks)
    ]
    write_json(partial / "index.json", {
        "key": key, "rows": len(packed), "seq_len": mt.seq_len, "dtype": mt.cache_dtype,
        "rows_per_chunk": rows_per_chunk, "chunks": chunks, "reference": reference,
        "reference_identity": model_identity(ref_path), "corpus": corpus.key, "tokenizer": tok_id,
    })
    os.replace(partial, final)
    cache = open_cache(final, key, len(packed), mt.seq_len, verify=False)
    return ScoreReport(cache, corpus, computed, time.perf_counter() - t0, tps)
