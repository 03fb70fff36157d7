"""Token-level outcome measures: held-out loss by token class and by the reference's preference.

Accuracy on a few hundred problems is a coarse instrument. ReMiT makes a sharper prediction: the
tokens it up-weights (those the reference believes more than the student) should lose loss faster
than under NTP, and the others may pay for it. These measures check that on a held-out split of the
mid-training distribution, for every checkpoint the ablation evaluates.

Token classes (of the *predicted* token x_t, decided from the token ids and the tokenizer's text of
each id, so they work on any corpus that marks answers the GSM8K way):
    answer    a token after a `####` marker, up to the end of that line or document, with a non-space
              character (the final answer's digits);
    result    a token with a digit right of an `=` on its line: a computed value of the worked solution
              (on the tiny world the final answer repeats the last one, so the work is done here);
    digit     any other token containing a digit (operands: the question's numbers, left-hand sides);
    operator  a token whose non-space characters are all arithmetic: + - * / = ( ) x ×;
    prose     everything else: words, spaces, punctuation, line breaks, the `####` marker, end of document.

Buckets by the reference's preference: centred δ_t = (log p_ref − log p_base) − its per-document mean,
with the *pre-anneal base* standing in for the live model (every anneal starts there, so the buckets
are computed once per reference); the pooled held-out tokens are cut at the tertiles of centred δ into
`top` (the reference prefers them most: what ReMiT up-weights), `middle` and `bottom`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("answer", "result", "digit", "operator", "prose")
BUCKETS = ("top", "middle", "bottom")
ANSWER_MARK = "####"
OPERATOR_CHARS = frozenset("+-*/=()x×")
_CODE = {name: i for i, name in enumerate(CLASSES)}


@dataclass(frozen=True)
class Pieces:
    """The text of every token id, and which ids are special (end of document, padding...)."""

    text: tuple[str, ...]
    special: frozenset[int]


_PIECES: dict[str, Pieces] = {}


def pieces(tok: Any) -> Pieces:
    """Each id's decoded text (so byte-level markers like Ġ are spaces again), computed once per vocabulary."""
    from flywheel.models import tokenizer_identity

    key = tokenizer_identity(tok)
    if key not in _PIECES:
        size = max(len(tok), max(tok.get_vocab().values()) + 1)
        _PIECES[key] = Pieces(tuple(tok.decode([i]) for i in range(size)), frozenset(tok.all_special_ids))
    return _PIECES[key]


def classify(ids: Sequence[int], table: Pieces) -> np.ndarray:
    """The class code (index into CLASSES) of every token of one sequence, as int8.

    The answer marker is found in the decoded text, not in single tokens, so a tokenizer that splits
    `####` into four `#` tokens is read the same as one that keeps it whole.
    """
    texts = ["\n" if int(t) in table.special else (table.text[int(t)] if 0 <= int(t) < len(table.text) else "")
             for t in ids]
    starts = np.cumsum([0] + [len(t) for t in texts])
    full = "".join(texts)
    answer = np.zeros(len(full) + 1, dtype=bool)  # characters that belong to a final answer
    result = np.zeros(len(full) + 1, dtype=bool)  # characters right of an `=` on their line
    begin = 0
    while begin <= len(full):
        end = full.find("\n", begin)
        end = len(full) if end < 0 else end
        mark, eq = full.find(ANSWER_MARK, begin, end), full.find("=", begin, end)
        if mark >= 0:
            answer[mark + len(ANSWER_MARK):end] = True
        if eq >= 0:
            result[eq + 1:end] = True
        begin = end + 1
    out = np.empty(len(texts), dtype=np.int8)
    for i, text in enumerate(texts):
        stripped = text.strip()
        digits = any(c.isdigit() for c in stripped)
        if stripped and answer[starts[i]] and "#" not in text:
            out[i] = _CODE["answer"]
        elif digits and result[starts[i]]:
            out[i] = _CODE["result"]
        elif digits:
            out[i] = _CODE["digit"]
        elif stripped and all(c in OPERATOR_CHARS for c in stripped):
            out[i] = _CODE["operator"]
        else:
            out[i] = _CODE["prose"]
    return out


CERTAIN_OF = {"answers": ("answer",), "results": ("answer", "result")}


def answer_mask(ids: Sequence[int], table: Pieces, certain_of: str = "answers") -> np.ndarray:
    """True where an oracle is certain: final-answer tokens, or (`results`) every computed value too."""
    return np.isin(classify(ids, table), [_CODE[c] for c in CERTAIN_OF[certain_of]])


def centred_delta(ref_lp: Sequence[np.ndarray], base_lp: Sequence[np.ndarray]) -> np.ndarray:
    """Per document δ = log p_ref − log p_base minus its own mean, all documents' tokens concatenated."""
    parts = []
    for r, b in zip(ref_lp, base_lp, strict=True):
        d = np.asarray(r, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        parts.append(d - d.mean() if d.size else d)
    return np.concatenate(parts) if parts else np.zeros(0)


def delta_buckets(delta: np.ndarray) -> np.ndarray:
    """0 top, 1 middle, 2 bottom third of the pooled centred δ (ties at a cut go to the lower bucket)."""
    if delta.size == 0:
        return np.zeros(0, dtype=np.int8)
    low, high = np.quantile(delta, [1 / 3, 2 / 3])
    return np.where(delta > high, 0, np.where(delta > low, 1, 2)).astype(np.int8)


def group_means(nll: np.ndarray, codes: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    """Mean of `nll` over the tokens of each code (None for a class with no token)."""
    return {name: (float(nll[codes == i].mean()) if (codes == i).any() else None) for i, name in enumerate(names)}


# --- the held-out split and its scores ------------------------------------------------------------


@dataclass
class HeldoutTokens:
    """The held-out documents as token ids, with the class of every scored token (positions 1..n-1)."""

    ids: list[list[int]]
    classes: np.ndarray  # concatenated over documents, aligned with `scores`' output

    @property
    def n_tokens(self) -> int:
        return int(self.classes.size)


def heldout_tokens(texts: Sequence[str], tok: Any) -> HeldoutTokens:
    """Tokenize each document as the packer does (ids, then end of document) and classify its targets."""
    from flywheel.data.packing import tokenize_documents

    ids = [d for d in tokenize_documents(list(texts), tok) if len(d) > 1]
    table = pieces(tok)
    classes = [classify(d, table)[1:] for d in ids]
    return HeldoutTokens(ids, np.concatenate(classes) if classes else np.zeros(0, dtype=np.int8))


def scores(model: Any, docs: list[list[int]], pad: int, batch: int = 32, kernel: str = "auto"
           ) -> list[np.ndarray]:
    """log p(x_t | x_<t) for t >= 1 of every document, scored alone (right-padded: causal, so exact)."""
    import torch

    from flywheel.remit.kernels import token_logprobs_of

    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths per batch: less padding
    by_index: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            width = max(len(docs[i]) for i in idx)
            ids = torch.tensor([docs[i] + [pad] * (width - len(docs[i])) for i in idx])
            lp = token_logprobs_of(model, ids, kernel).float().cpu().numpy()
            for row, i in enumerate(idx):
                by_index[i] = lp[row, : len(docs[i]) - 1].copy()
    return [by_index[i] for i in range(len(docs))]


def model_scores(cfg: Any, model_path: str | Path, held: HeldoutTokens, cache_dir: Path,
                 transform: Any = None) -> list[np.ndarray]:
    """`scores` of one model on the held-out split, memoised on disk by (model content, split)."""
    from flywheel.data.io import fingerprint
    from flywheel.models import load_model, model_identity

    key = fingerprint("heldout-scores", 1, model_identity(str(model_path)), held.ids)
    path = cache_dir / f"{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return [z[f"d{i}"] for i in range(len(held.ids))]
    model = load_model(cfg, str(model_path), for_training=False)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    lp = scores(model, held.ids, int(pad), kernel=cfg.midtrain.loss_kernel)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"d{i}": a for i, a in enumerate(lp)})
    tmp.replace(path)
    return lp


def measures(lp: Sequence[np.ndarray], held: HeldoutTokens, buckets: dict[str, np.ndarray]
             ) -> dict[str, Any]:
    """Held-out NLL (nats/token): all tokens, each class, and each δ-bucket under each reference."""
    nll = -np.concatenate(lp) if lp else np.zeros(0)
    return {"all": float(nll.mean()) if nll.size else None, "classes": group_means(nll, held.classes, CLASSES),
            "buckets": {role: group_means(nll, b, BUCKETS) for role, b in buckets.items()},
            "tokens": int(nll.size)}


def class_counts(held: HeldoutTokens) -> dict[str, int]:
    return {name: int((held.classes == i).sum()) for i, name in enumerate(CLASSES)}
