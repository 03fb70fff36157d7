"""MiniPLM-style sample-level selection: keep the documents the reference likes more than the base does.

Each document of the packed mixture gets the mean of log p_ref − log p_base over its tokens; the
top `keep` fraction by that gap is written to a jsonl, which becomes the `miniplm` variant's
`data.sources` (then plain NTP on it, same token budget). Selection is per document, not per
token: that is what separates it from Rho-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.data.io import fingerprint, read_jsonl, write_jsonl

MINIPLM_VERSION = 1


@dataclass
class Selection:
    """The kept documents' file and how the cut fell."""

    path: Path
    documents: int
    kept: int
    threshold: float | None  # the smallest kept gap


def document_gaps(ref_logprobs: np.ndarray, base_logprobs: np.ndarray,
                  doc_ids: np.ndarray) -> dict[int, float]:
    """Mean reference-minus-base log-prob per document, over tokens predicted from their own document.

    Column 0 of a row and the first token of a document are predicted without context from the
    same document, so they are left out; a document with no such token gets NaN (ranked last).
    """
    ref, base, docs = (np.asarray(a) for a in (ref_logprobs, base_logprobs, doc_ids))
    valid = np.zeros(docs.shape, dtype=bool)
    valid[:, 1:] = docs[:, 1:] == docs[:, :-1]
    all_docs, inverse = np.unique(docs, return_inverse=True)
    inverse = inverse.reshape(docs.shape)
    gap = (ref.astype(np.float64) - base.astype(np.float64))[valid]
    sums = np.bincount(inverse[valid], weights=gap, minlength=len(all_docs))
    counts = np.bincount(inverse[valid], minlength=len(all_docs))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {int(d): float(m) for d, m in zip(all_docs, means, strict=True)}


def top_documents(gaps: dict[int, float], keep: float) -> list[int]:
    """The round(keep × n) documents with the largest gap (ties: lower id first), in id order."""
    n = len(gaps)
    k = max(1, min(n, math.floor(keep * n + 0.5)))
    ranked = sorted(gaps, key=lambda d: (math.isnan(gaps[d]), 0.0 if math.isnan(gaps[d]) else -gaps[d], d))
    return sorted(ranked[:k])


def _score(model, input_ids: np.ndarray, batch: int) -> np.ndarray:  # noqa: ANN001 - torch model, lazy import
    """log p(x_t | x_<t) of every packed row, float32, aligned to the tokens."""
    import torch

    from flywheel.remit.scoring import reference_logprobs

    out = np.empty(input_ids.shape, dtype=np.float32)
    with torch.inference_mode():
        for b in range(0, len(input_ids), batch):
            ids = torch.from_numpy(np.asarray(input_ids[b : b + batch], dtype=np.int64))
            out[b : b + len(ids)] = reference_logprobs(model, ids).numpy()
    return out


def select_documents(cfg: FlywheelConfig, base: str, reference: str, keep: float = 0.8) -> Selection:
    """Score the config's packed mixture with base and reference, write the top `keep` documents as jsonl.

    Content-keyed like every stage: the same corpus, models and fraction reuse the written file.
    """
    from flywheel.data.mixture import build_mixture
    from flywheel.models import load_model, load_tokenizer, model_identity, tokenizer_identity
    from flywheel.refs import model_location

    tok = load_tokenizer(cfg)
    corpus = build_mixture(cfg, tok, tokenizer_identity(tok))
    key = fingerprint(MINIPLM_VERSION, corpus.key, model_identity(model_location(cfg, base)),
                      model_identity(model_location(cfg, reference)), keep, cfg.model.dtype)
    path = cfg.home / "cache" / "miniplm" / f"{key}.jsonl"
    if path.exists():
        rows = read_jsonl(path)
        n_docs = len(np.unique(np.asarray(corpus.load().doc_ids)))
        threshold = min((r["gap"] for r in rows if r["gap"] is not None), default=None)
        return Selection(path, n_docs, len(rows), threshold)
    packed = corpus.load()
    batch = cfg.midtrain.score_batch_size
    base_lp = _score(load_model(cfg, base, for_training=False), packed.input_ids, batch)
    ref_lp = _score(load_model(cfg, reference, for_training=False), packed.input_ids, batch)
    gaps = document_gaps(ref_lp, base_lp, packed.doc_ids)
    kept = top_documents(gaps, keep)
    flat_ids = np.asarray(packed.input_ids).reshape(-1)
    flat_docs = np.asarray(packed.doc_ids).reshape(-1)
    order = np.argsort(flat_docs, kind="stable")  # tokens grouped by document, original order inside each
    starts = np.searchsorted(flat_docs[order], kept, side="left")
    ends = np.searchsorted(flat_docs[order], kept, side="right")
    rows = ({"text": tok.decode(flat_ids[order[s:e]].tolist(), skip_special_tokens=True), "doc": d,
             "gap": None if math.isnan(gaps[d]) else gaps[d]}
            for d, s, e in zip(kept, starts, ends, strict=True))
    write_jsonl(path, (r for r in rows if r["text"].strip()))
    threshold = min((gaps[d] for d in kept if not math.isnan(gaps[d])), default=None)
    return Selection(path, len(gaps), len(kept), threshold)
