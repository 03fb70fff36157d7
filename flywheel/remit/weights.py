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


def _group_means(delta: torch.Tensor, mask: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) mean of `delta` over the valid positions of each position's row, or of its (row, document)."""
    if doc_ids is None:
        total = delta.sum(dim=-1, keepdim=True)  # delta is already 0 at invalid positions
        count = mask.sum(dim=-1, keepdim=True).to(delta.dtype)
        return (total / count.clamp(min=1)).expand_as(delta)
    # one group id per (row, document) pair, so packed documents are centred on their own tokens only
    B, T = delta.shape
    rows = torch.arange(B, device=delta.device).unsqueeze(1).expand(B, T)
    pairs = torch.stack([rows, doc_ids.to(device=delta.device, dtype=torch.long)], dim=-1).reshape(-1, 2)
    groups, group_of = torch.unique(pairs, dim=0, return_inverse=True)
    total = torch.zeros(len(groups), dtype=delta.dtype, device=delta.device)
    count = torch.zeros(len(groups), dtype=delta.dtype, device=delta.device)
    total.index_add_(0, group_of, delta.reshape(-1))
    count.index_add_(0, group_of, mask.reshape(-1).to(delta.dtype))
    return (total / count.clamp(min=1))[group_of].view(B, T)


def remit_weights(
    ref_logprobs: torch.Tensor,
    cur_logprobs: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float | None = 0.2,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token ReMiT weights clamp(2*sigmoid(d - mean d), 1-eps, 1+eps), d = ref - cur: a constant, no grad."""
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
        centered = delta - _group_means(delta, mask, doc_ids)
        weights = 2.0 * torch.sigmoid(centered)
        if epsilon is not None:
            weights = weights.clamp(1.0 - epsilon, 1.0 + epsilon)
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
