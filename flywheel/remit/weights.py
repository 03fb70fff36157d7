"""The ReMiT token weights: the one place the formula lives (see docs/DESIGN.md, "ReMiT in one screen").

Every tensor here is aligned to targets: position t holds log p(targets[t]). `mask` is True at valid target
positions; whatever sits at the other positions (even NaN or inf) never reaches a result.
"""

from __future__ import annotations

import torch


def logprob_delta(ref_logprobs: torch.Tensor, cur_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ref - cur in float32 at valid positions and 0 elsewhere: how much more the reference expects each token."""
    delta = ref_logprobs.detach().float() - cur_logprobs.detach().float()
    return torch.where(mask, delta, 0.0)  # where, not *mask: a NaN at an invalid position must not survive


CENTRINGS = ("mean", "zscore")
MAPPINGS = ("sigmoid", "exp", "linear")
ZSCORE_STD_FLOOR = 0.05  # nats: a group whose delta barely varies is not blown up (a constant one gives 0 -> weight 1)


def _group_reduce(values: torch.Tensor, mask: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) mean of `values` (0 at invalid positions) over each position's row, or its (row, document)."""
    if doc_ids is None:
        total = values.sum(dim=-1, keepdim=True)
        count = mask.sum(dim=-1, keepdim=True).to(values.dtype)
        return (total / count.clamp(min=1)).expand_as(values)
    # one group id per (row, document) pair, so packed documents are centred on their own tokens only
    B, T = values.shape
    rows = torch.arange(B, device=values.device).unsqueeze(1).expand(B, T)
    pairs = torch.stack([rows, doc_ids.to(device=values.device, dtype=torch.long)], dim=-1).reshape(-1, 2)
    groups, group_of = torch.unique(pairs, dim=0, return_inverse=True)
    total = torch.zeros(len(groups), dtype=values.dtype, device=values.device)
    count = torch.zeros(len(groups), dtype=values.dtype, device=values.device)
    total.index_add_(0, group_of, values.reshape(-1))
    count.index_add_(0, group_of, mask.reshape(-1).to(values.dtype))
    return (total / count.clamp(min=1))[group_of].view(B, T)


def centre(delta: torch.Tensor, mask: torch.Tensor, doc_ids: torch.Tensor | None = None,
           centring: str = "mean") -> torch.Tensor:
    """delta minus its group's mean (`mean`, the paper's), or that divided by the group's std (`zscore`).

    A group is a row, or a packed document of a row; invalid positions come out 0. z-score divides by
    max(std, ZSCORE_STD_FLOOR), so a group whose delta is constant is 0 everywhere (weight 1).
    """
    if centring not in CENTRINGS:
        raise ValueError(f"centring must be one of {CENTRINGS}, got {centring!r}")
    centred = torch.where(mask, delta - _group_reduce(delta, mask, doc_ids), 0.0)
    if centring == "zscore":
        std = _group_reduce(centred * centred, mask, doc_ids).sqrt()
        centred = centred / std.clamp(min=ZSCORE_STD_FLOOR)
    return centred


def map_weights(centred: torch.Tensor, mapping: str = "sigmoid", epsilon: float | None = 0.2) -> torch.Tensor:
    """Weights from the centred delta: 2*sigmoid (the paper's), exp or 1 + x; each is 1 at 0 and rising.

    Clipped to [1 - epsilon, 1 + epsilon]; without a clip, linear is floored at 0 (a negative weight
    would turn descent into ascent on that token).
    """
    if mapping == "sigmoid":
        weights = 2.0 * torch.sigmoid(centred)
    elif mapping == "exp":
        weights = torch.exp(centred)
    elif mapping == "linear":
        weights = 1.0 + centred
    else:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if epsilon is not None:
        return weights.clamp(1.0 - epsilon, 1.0 + epsilon)
    return weights.clamp(min=0.0) if mapping == "linear" else weights


def describe(epsilon: float | None = 0.2, centring: str = "mean", mapping: str = "sigmoid") -> str:
    """The weight rule in one line, for logs, the weight page and run parameters."""
    d = "(δ − mean δ) / std δ" if centring == "zscore" else "δ − mean δ"
    inner = {"sigmoid": f"2·sigmoid({d})", "exp": f"exp({d})", "linear": f"1 + ({d})"}[mapping]
    if epsilon is None:
        return f"max(0, {inner})" if mapping == "linear" else inner
    return f"clamp({inner}, {1 - epsilon:g}, {1 + epsilon:g})"


def remit_weights(
    ref_logprobs: torch.Tensor,
    cur_logprobs: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float | None = 0.2,
    doc_ids: torch.Tensor | None = None,
    centring: str = "mean",
    mapping: str = "sigmoid",
) -> torch.Tensor:
    """Per-token ReMiT weights, a constant (no grad): by default clamp(2*sigmoid(d - mean d), 1-eps, 1+eps), d = ref - cur.

    `centring` (mean | zscore) and `mapping` (sigmoid | exp | linear) are the paper's open questions as
    switches; the defaults are the paper's rule.
    """
    if epsilon is not None and not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (or None for no clipping), got {epsilon}")
    if ref_logprobs.shape != mask.shape or cur_logprobs.shape != mask.shape:
        raise ValueError(
            f"ref_logprobs {tuple(ref_logprobs.shape)}, cur_logprobs {tuple(cur_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same (B, T) shape"
        )
    if doc_ids is not None and doc_ids.shape != mask.shape:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of mask {tuple(mask.shape)}")
    with torch.no_grad():
        mask = mask.bool()
        delta = logprob_delta(ref_logprobs, cur_logprobs, mask)
        weights = map_weights(centre(delta, mask, doc_ids, centring), mapping, epsilon)
        return torch.where(mask, weights, 0.0)


def weight_stats(weights: torch.Tensor, mask: torch.Tensor, epsilon: float | None) -> dict[str, float]:
    """Mean, std and clipped fractions of the weights over valid positions, to log while training."""
    with torch.no_grad():
        valid = weights.detach().float()[mask.bool()]
        if valid.numel() == 0:
            return {"mean": 0.0, "std": 0.0, "clip_high": 0.0, "clip_low": 0.0}
        if epsilon is None:
            clip_high = clip_low = torch.zeros((), device=valid.device)
        else:
            clip_high = ((valid - (1.0 + epsilon)).abs() <= 1e-6).float().mean()
            clip_low = ((valid - (1.0 - epsilon)).abs() <= 1e-6).float().mean()
        stats = torch.stack([valid.mean(), valid.std(correction=0), clip_high, clip_low]).tolist()  # one sync
    return dict(zip(("mean", "std", "clip_high", "clip_low"), stats, strict=True))
