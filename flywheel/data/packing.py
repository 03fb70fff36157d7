"""Tokenize documents and pack them into fixed-length rows, keeping each token's document id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase


@dataclass
class Packed:
    """Rows of `seq_len` tokens; `doc_ids` says which document each token came from (for per-document centring)."""

    input_ids: np.ndarray  # (rows, seq_len) int32
    doc_ids: np.ndarray  # (rows, seq_len) int32, a global document index

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.size)


def tokenize_documents(texts: Sequence[str], tok: PreTrainedTokenizerBase, batch: int = 2048) -> list[list[int]]:
    """Each document's ids followed by EOS, so the model learns where a document ends."""
    eos = tok.eos_token_id
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        enc = tok(list(texts[i : i + batch]), add_special_tokens=False)["input_ids"]
        out.extend(ids + [eos] for ids in enc)
    return out


def pack(docs: Sequence[Sequence[int]], seq_len: int) -> Packed:
    """Concatenate documents and cut into full rows; the ragged tail is dropped (no padding to mask)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(lengths.sum()))
    doc_of_token = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
    rows = len(flat) // seq_len
    keep = rows * seq_len
    return Packed(flat[:keep].reshape(rows, seq_len), doc_of_token[:keep].reshape(rows, seq_len))
