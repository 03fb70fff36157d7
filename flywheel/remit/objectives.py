"""Mid-training objectives on target-aligned tensors: ntp (the baseline), remit (the method), kd, rho1.

`logits[b, t]` predicts `targets[b, t]`; `mask` is True at valid target positions. Each objective returns the
*sum* of its per-token loss over valid positions; the trainer divides by the number of valid target tokens of
the (global) batch, so micro-batches and ranks add up to one mean.

ntp, remit and rho1 are functions of the per-token log-probs alone (`*_on_logprobs`): the eager path gets
them from the logits here, the chunked and fused loss kernels (flywheel/remit/kernels.py) from the hidden
states without ever holding the (B, T, V) logits. So the formulas live here once, whichever kernel runs.
`LOSSES` hands them to the kernels, one `Loss` per entry of the objective table (catalog.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from flywheel.remit.catalog import NAMES, Objective
from flywheel.remit.weights import logprob_delta, remit_weights

OBJECTIVES = NAMES  # the objective names, in the table's order (catalog.py)
IGNORE_INDEX = -100
Span = tuple[slice, slice]  # (rows, cols): the positions one chunk of a loss covers
WHOLE: Span = (slice(None), slice(None))


@dataclass
class LossParts:
    """What one objective returns: the loss to backpropagate and the detached per-token tensors to log."""

    loss_sum: torch.Tensor  # scalar WITH grad; the trainer divides it by the batch's number of valid targets
    token_logprobs: torch.Tensor  # (B, T) detached log p_theta(target), 0 at invalid
    weights: torch.Tensor | None  # (B, T) detached per-token weights actually applied (None for ntp/kd)
    delta: torch.Tensor | None  # (B, T) detached ref - cur at valid positions, 0 elsewhere (remit, rho1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(target) WITH grad and 0 at invalid positions, via the fused cross-entropy kernel."""
    B, T, V = logits.shape
    safe_targets = torch.where(mask, targets, IGNORE_INDEX)  # -100 or garbage at invalid positions -> ignored
    nll = F.cross_entropy(
        logits.float().reshape(B * T, V),
        safe_targets.reshape(B * T).long(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -nll.view(B, T)  # ignored positions come out as exactly 0


def ntp_on_logprobs(logp: torch.Tensor) -> LossParts:
    """NTP from log p_theta(target) WITH grad (0 at invalid positions)."""
    return LossParts(loss_sum=-logp.sum(), token_logprobs=logp.detach(), weights=None, delta=None)


def ntp(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> LossParts:
    """Plain next-token prediction: the baseline every other objective is compared with."""
    return ntp_on_logprobs(token_logprobs(logits, targets, mask))


def remit_on_logprobs(
    logp: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor,
    epsilon: float | None = 0.2,
    doc_ids: torch.Tensor | None = None,
    centring: str = "mean",
    mapping: str = "sigmoid",
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossParts:
    """ReMiT from log p_theta(target) WITH grad: the weights come from its detached value (no grad).

    `frozen` (weights, base log-probs): δ against the frozen base, the weights stored before training
    (flywheel/remit/frozen.py) and applied as they are.
    """
    cur = logp.detach()
    if frozen is not None:
        w, against = torch.where(mask, frozen[0].to(logp.dtype), 0.0), frozen[1]
    else:
        w, against = remit_weights(ref_logprobs, cur, mask, epsilon=epsilon, doc_ids=doc_ids, centring=centring,
                                   mapping=mapping), cur
    return LossParts(
        loss_sum=(w * -logp).sum(),
        token_logprobs=cur,
        weights=w,
        delta=logprob_delta(ref_logprobs, against, mask),
    )


def remit(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor,
    epsilon: float | None = 0.2,
    doc_ids: torch.Tensor | None = None,
    centring: str = "mean",
    mapping: str = "sigmoid",
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossParts:
    """ReMiT: NLL re-weighted per token by how much more the reference expects it than the current model."""
    return remit_on_logprobs(token_logprobs(logits, targets, mask), mask, ref_logprobs, epsilon, doc_ids,
                             centring, mapping, frozen)


def rho1_weights(
    cur_logprobs: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor, keep: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, excess): 1.0 at the `keep` fraction of valid tokens with the largest excess loss, and that excess.

    The selection is over the whole micro-batch, so it needs every token's log-prob before any gradient.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    with torch.no_grad():
        excess = logprob_delta(ref_logprobs, cur_logprobs, mask)  # NLL_cur - NLL_ref = ref - cur
        n_valid = int(mask.sum())
        k = math.ceil(keep * n_valid - 1e-9)  # the 1e-9 keeps float noise (0.07 * 100 = 7.000000000000001) out
        scores = torch.where(mask, excess, -torch.inf).reshape(-1)
        kept = torch.zeros_like(scores, dtype=torch.bool)
        kept[scores.topk(k).indices] = True
        return (kept.view_as(mask) & mask).float(), excess


def rho1_on_logprobs(logp: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor, keep: float = 0.8
                     ) -> LossParts:
    """Rho-1 from log p_theta(target) WITH grad."""
    cur = logp.detach()
    w, excess = rho1_weights(cur, mask, ref_logprobs, keep)
    return LossParts(loss_sum=(w * -logp).sum() / keep, token_logprobs=cur, weights=w, delta=excess)


def rho1(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor,
    keep: float = 0.8,
) -> LossParts:
    """Rho-1 selective LM: train only on the `keep` fraction of valid tokens with the largest excess loss."""
    return rho1_on_logprobs(token_logprobs(logits, targets, mask), mask, ref_logprobs, keep)


def check_kd_args(vocab: int, temperature: float, alpha: float, top_k: int | None) -> None:
    """The KD settings' ranges, checked by `kd` before it computes anything."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}] (the vocabulary size) or None, got {top_k}")


def kd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.5,
    top_k: int | None = None,
) -> LossParts:
    """Knowledge distillation: alpha * T^2 * KL(p_ref^T || p_theta^T) + (1 - alpha) * NLL per valid token."""
    check_kd_args(logits.shape[-1], temperature, alpha, top_k)
    logp = token_logprobs(logits, targets, mask)
    invalid = ~mask.unsqueeze(-1)

    with torch.no_grad():  # the reference is a constant: no grad into it, no graph kept for it
        ref = ref_logits.detach().float()
        ids = None
        if top_k is not None:
            ref, ids = ref.topk(top_k, dim=-1)  # renormalise the reference over its own top-k ids
        ref_logp = F.log_softmax(ref / temperature, dim=-1)
        ref_logp.masked_fill_(invalid, 0.0)  # a NaN reference at an invalid position would give NaN grads
        ref_p = ref_logp.exp()

    student_logp = F.log_softmax(logits.float() / temperature, dim=-1)  # full vocabulary, also for top-k
    if ids is not None:
        student_logp = student_logp.gather(-1, ids)
    kl = (ref_p * (ref_logp - student_logp)).sum(dim=-1)
    per_token = alpha * temperature**2 * kl - (1 - alpha) * logp
    loss_sum = torch.where(mask, per_token, 0.0).sum()
    return LossParts(loss_sum=loss_sum, token_logprobs=logp.detach(), weights=None, delta=None)


@dataclass(frozen=True)
class LossContext:
    """What an objective reads beside the model's own predictions, with its settings; (B, T) tensors."""

    ref_logprobs: torch.Tensor | None = None  # the reference's log p(target) (remit, rho1)
    ref_head: Any = None  # the reference's logits, or a kernels.Hidden that makes them chunk by chunk (kd)
    doc_ids: torch.Tensor | None = None  # packed documents: remit centres each on its own
    epsilon: float | None = 0.2
    centring: str = "mean"
    mapping: str = "sigmoid"
    rho1_keep: float = 0.8
    kd: dict = field(default_factory=dict)  # temperature, alpha, top_k
    chunk_tokens: int = 2048  # the chunked kernel's tokens per output-layer chunk
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # delta_base frozen: (stored weights, base log-probs)

    def ref_logits(self, span: Span) -> torch.Tensor:
        """The reference's logits at `span`, without grad."""
        with torch.no_grad():
            if isinstance(self.ref_head, torch.Tensor):
                return self.ref_head[span]
            return self.ref_head.logits(*span)

    def docs(self, span: Span) -> torch.Tensor | None:
        return None if self.doc_ids is None else self.doc_ids[span]

    def frozen_at(self, span: Span) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.frozen is None else (self.frozen[0][span], self.frozen[1][span])


@dataclass
class Selection:
    """A second-pass objective's choice over the whole micro-batch: weights, what they came from, the divisor."""

    weights: torch.Tensor
    delta: torch.Tensor
    divisor: float = 1.0


OnLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossContext, Span], LossParts]
OnLogprobs = Callable[[torch.Tensor, torch.Tensor, LossContext], LossParts]
Select = Callable[[torch.Tensor, torch.Tensor, LossContext], Selection]


@dataclass(frozen=True)
class Loss:
    """One objective's formulas in the forms the loss kernels call."""

    on_logits: OnLogits  # (logits, targets, mask) of the positions `span`, which are whole rows where it asks
    on_logprobs: OnLogprobs | None = None  # from log p(target) WITH grad, (B, T): what the fused kernel gives
    select: Select | None = None  # a second pass's token choice from every token's detached log-prob


def _rho1_select(cur: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> Selection:
    kept, excess = rho1_weights(cur, mask, ctx.ref_logprobs, ctx.rho1_keep)
    return Selection(kept, excess, ctx.rho1_keep)


LOSSES: dict[str, Loss] = {
    "ntp": Loss(
        on_logits=lambda z, t, m, ctx, span: ntp(z, t, m),
        on_logprobs=lambda logp, mask, ctx: ntp_on_logprobs(logp)),
    "remit": Loss(
        on_logits=lambda z, t, m, ctx, span: remit(z, t, m, ctx.ref_logprobs[span], ctx.epsilon, ctx.docs(span),
                                                   ctx.centring, ctx.mapping, ctx.frozen_at(span)),
        on_logprobs=lambda logp, mask, ctx: remit_on_logprobs(logp, mask, ctx.ref_logprobs, ctx.epsilon,
                                                              ctx.doc_ids, ctx.centring, ctx.mapping, ctx.frozen)),
    "kd": Loss(on_logits=lambda z, t, m, ctx, span: kd(z, t, m, ctx.ref_logits(span), **ctx.kd)),
    "rho1": Loss(
        on_logits=lambda z, t, m, ctx, span: rho1(z, t, m, ctx.ref_logprobs[span], keep=ctx.rho1_keep),
        on_logprobs=lambda logp, mask, ctx: rho1_on_logprobs(logp, mask, ctx.ref_logprobs, ctx.rho1_keep),
        select=_rho1_select),
}


def loss_of(objective: Objective) -> Loss:
    """The formulas of a catalog entry."""
    return LOSSES[objective.name]
