"""How the guidance changes from round to round (the paper leaves this open): per-round ReMiT weight
statistics, and how far each round's RL model has moved from the reference that guided its round.

The KL is measured on held-out text of the mid-training distribution: the first rows of the
slice *after* the round's own (`data.slice + 1`), which this round's anneal did not read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.remit.catalog import Objective, objective_named

WEIGHT_STATS = ("weight_std", "clip_high", "clip_low", "delta_mean")
HELDOUT_ROWS = 32  # windows of held-out text for the KL: 4,096 tokens at the demo's seq_len


def round_weight_stats(log_history: Iterable[dict], objective: str | Objective) -> dict[str, float]:
    """The anneal's mean `remit/<stat>` over its logged steps; an objective that weighs every token 1 (ntp)
    has std and clips 0."""
    rows = [h for h in log_history if "remit/weight_std" in h]
    if rows:
        return {f"remit/{k}": float(np.mean([h[f"remit/{k}"] for h in rows if f"remit/{k}" in h]))
                for k in WEIGHT_STATS if any(f"remit/{k}" in h for h in rows)}
    if objective_named(objective).unit_weights:
        return {"remit/weight_std": 0.0, "remit/clip_high": 0.0, "remit/clip_low": 0.0}
    return {}


def mean_kl(model, reference, batches: Iterable[tuple]) -> float:  # noqa: ANN001 - two causal LMs
    """Mean per-token KL(model ‖ reference) of the next-token distributions over (input_ids, attention_mask) batches."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for input_ids, mask in batches:
            input_ids, mask = input_ids.to(device), mask.to(device)
            lp = F.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float(), -1)
            lq = F.log_softmax(reference(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            valid = mask[:, 1:].bool()
            total += float(kl[valid].sum())
            count += int(valid.sum())
    return total / max(1, count)


def _row_batches(rows: np.ndarray, batch: int) -> Iterator[tuple]:
    import torch

    for b in range(0, len(rows), batch):
        ids = torch.from_numpy(np.asarray(rows[b : b + batch], dtype=np.int64))
        yield ids, torch.ones_like(ids)


def heldout_rows(cfg: FlywheelConfig, n: int = HELDOUT_ROWS) -> np.ndarray:
    """The first `n` rows of the slice after `cfg.data.slice`: mid-training text the round did not anneal on."""
    from flywheel.data.mixture import build_mixture
    from flywheel.models import load_tokenizer, tokenizer_identity

    tok = load_tokenizer(cfg)
    nxt = cfg.model_copy(update={"data": cfg.data.model_copy(update={"slice": cfg.data.slice + 1})})
    windows = build_mixture(nxt, tok, tokenizer_identity(tok)).load()
    return np.asarray(windows.input_ids[: min(n, len(windows))])


def kl_to_reference(cfg: FlywheelConfig, model_path: str | Path, reference: str | Path,
                    rows: np.ndarray, batch: int = 8) -> float:
    """KL(model ‖ reference) per token on token rows, on the GPU when there is one."""
    import torch

    from flywheel.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(cfg, str(model_path), for_training=False).to(device)
    ref = load_model(cfg, str(reference), for_training=False).to(device)
    return mean_kl(model, ref, _row_batches(rows, batch))
