"""Loss kernels: the objective's loss from the last hidden states, without the (B, T, V) logits.

A causal LM's logits are B x T x V; at OLMo-2's vocabulary (100,352) one float32 copy of them for the
paper's 8 x 4,096-token micro-batch is 13 GB, and cross-entropy keeps more of that size for backward.
`midtrain.loss_kernel` picks how the loss is computed (the formulas stay in objectives.py either way):

- eager: the model's logits and the objective on them. The reference implementation.
- chunked: the model returns its last hidden states (`output_hidden_states`, `logits_to_keep=1`); the
  output layer is applied one chunk of about `loss_chunk_tokens` tokens at a time, and for each chunk the
  objective (objectives.py, on that chunk's logits) and the gradient of its loss with respect to those
  logits are computed at once and folded straight into the gradients of the hidden states and of the
  output weight. Backward only scales the stored gradients, so nothing is recomputed, and no tensor
  larger than one chunk's logits (and their gradient) ever exists. ReMiT centres delta over a row (or a
  row's documents), so its chunks are whole rows; ntp and kd may split a long row into token ranges.
  rho1 picks its tokens over the whole micro-batch: one pass without gradient reads every log-prob, the
  second trains (the one objective that recomputes).
- fused: Liger-Kernel's fused linear cross-entropy (CUDA, liger-kernel >= 0.8.2, whose reduction="none"
  gradients are right) gives the per-token NLL with its gradient; ntp, remit and rho1 take it as their
  log-probs. kd has no fused path: it runs chunked.
- auto: fused on CUDA where liger-kernel is installed, else chunked; eager for a model whose logits are
  not a plain linear map of its last hidden states (soft-capped or scaled logits).

Each kernel is one `Kernel` entry in `KERNELS`: how it computes an objective's `LossParts` and why it
cannot run somewhere; what it does per objective it reads from the objective's catalog entry and
`objectives.LOSSES`. A new kernel is one entry here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F

from flywheel.errors import FlywheelError
from flywheel.remit import objectives
from flywheel.remit.catalog import Objective, objective_named
from flywheel.remit.objectives import IGNORE_INDEX, WHOLE, Loss, LossContext, LossParts, loss_of

LIGER_MIN = (0, 8, 2)  # Liger PR #1298: reduction="none" gave wrong weight gradients before 0.8.2
# config fields some families use to transform logits after the output layer (Gemma-2, Cohere, Granite)
_LOGIT_TRANSFORMS = (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))


@dataclass
class Hidden:
    """The last hidden states aligned to targets, and the output layer that turns them into logits."""

    states: torch.Tensor  # (B, T, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None

    def logits(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        return F.linear(self.states[rows, cols], self.weight, self.bias)


def unsupported(model: torch.nn.Module) -> str | None:
    """Why this model's logits are not `output_layer(last hidden state)` we can call in chunks; None if they are."""
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"{name} has no linear output layer"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{name}.forward takes no logits_to_keep"
    for field, neutral in _LOGIT_TRANSFORMS:
        value = getattr(model.config, field, neutral)
        if value is not None and value != neutral:
            return f"{name} transforms its logits after the output layer ({field}={value})"
    return None


def _liger_problem() -> str | None:
    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return "liger-kernel is not installed (pip install 'flywheel[gpu]')"
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if parts < LIGER_MIN:
        return f"liger-kernel {version} is older than 0.8.2, whose reduction='none' gradients are wrong"
    return None


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Run the model for its last (final-norm) hidden states; it computes logits for the last position only."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    return out, out.hidden_states[-1]


def hidden_of(model: torch.nn.Module, states: torch.Tensor) -> Hidden:
    """`states` with `model`'s (unwrapped) output layer, refusing one that is still sharded at loss time."""
    head = model.get_output_embeddings()
    weight = head.weight
    sharded = type(weight).__name__ == "DTensor" or weight.dim() != 2 or weight.shape[1] != states.shape[-1]
    if sharded:
        raise FlywheelError(
            "midtrain.loss_kernel: the output layer's weight is sharded when the loss runs (FSDP wraps it as its "
            "own unit); wrap by transformer layer (fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP) or set "
            "loss_kernel: eager")
    return Hidden(states, weight, head.bias)


class _StoredGrads(torch.autograd.Function):
    """The loss value; backward hands out the gradients computed with it in forward, times the upstream grad."""

    @staticmethod
    def forward(ctx, value, states, weight, bias, g_states, g_weight, g_bias):  # noqa: ANN001, ANN205
        ctx.save_for_backward(g_states, g_weight, g_bias)
        ctx.weight_dtype = weight.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        g_states, g_weight, g_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (None,
                g_states * g.to(g_states.dtype) if need[1] else None,
                (g_weight * g).to(ctx.weight_dtype) if need[2] else None,
                (g_bias * g).to(ctx.weight_dtype) if need[3] and g_bias is not None else None,
                None, None, None)


def chunks(rows: int, cols: int, chunk_tokens: int, whole_rows: bool) -> list[tuple[slice, slice]]:
    """Rectangles of (rows, cols) covering every position once, each about `chunk_tokens` tokens."""
    if cols <= chunk_tokens or whole_rows:
        per = max(1, chunk_tokens // cols)
        return [(slice(r, min(rows, r + per)), slice(None)) for r in range(0, rows, per)]
    return [(slice(r, r + 1), slice(c, min(cols, c + chunk_tokens)))
            for r in range(rows) for c in range(0, cols, chunk_tokens)]


ChunkLoss = Callable[[torch.Tensor, slice, slice], LossParts]


def chunked_parts(head: Hidden, chunk_loss: ChunkLoss, chunk_tokens: int, whole_rows: bool = False) -> LossParts:
    """Apply `chunk_loss` to each chunk's logits; the summed loss carries the exact gradient of the whole.

    `chunk_loss(logits, rows, cols)` is an objective on the logits of positions [rows, cols]; its
    per-token tensors are written back into (B, T) tensors.
    """
    B, T, H = head.states.shape
    s, w = head.states.detach(), head.weight.detach()
    b = None if head.bias is None else head.bias.detach()
    need = torch.is_grad_enabled() and (head.states.requires_grad or head.weight.requires_grad)
    if need:
        g_s = torch.empty_like(s)  # the chunks cover every position once
        g_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        g_b = None if b is None else torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    total = torch.zeros((), dtype=torch.float32, device=s.device)
    out: dict[str, torch.Tensor] = {}
    for rows, cols in chunks(B, T, chunk_tokens, whole_rows):
        with torch.no_grad():
            z = F.linear(s[rows, cols], w, b)
        if need:
            z.requires_grad_(True)
            with torch.enable_grad():
                part = chunk_loss(z, rows, cols)
            (g_z,) = torch.autograd.grad(part.loss_sum, z)
            with torch.no_grad():
                g_s[rows, cols] = g_z @ w
                flat_g, flat_s = g_z.reshape(-1, g_z.shape[-1]), s[rows, cols].reshape(-1, H)
                if g_z.dtype == torch.float32:
                    g_w.addmm_(flat_g.T, flat_s)
                else:  # half-precision matmul, summed over chunks in float32
                    g_w += (flat_g.T @ flat_s).float()
                if g_b is not None:
                    g_b += flat_g.sum(0).float()
            del g_z, flat_g
        else:
            part = chunk_loss(z, rows, cols)
        del z
        total += part.loss_sum.detach().float()
        for name in ("token_logprobs", "weights", "delta"):
            value = getattr(part, name)
            if value is not None:
                out.setdefault(name, torch.zeros(B, T, dtype=value.dtype, device=value.device))[rows, cols] = value
    loss = _StoredGrads.apply(total, head.states, head.weight, head.bias, g_s, g_w, g_b) if need else total
    return LossParts(loss_sum=loss, token_logprobs=out["token_logprobs"], weights=out.get("weights"),
                     delta=out.get("delta"))


def fused_logprobs(head: Hidden, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(target) WITH grad from Liger's fused linear cross-entropy (CUDA only), 0 at invalid."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    B, T, H = head.states.shape
    safe = torch.where(mask, targets, IGNORE_INDEX).reshape(-1).long()
    nll = liger_fused_linear_cross_entropy(head.states.reshape(-1, H), head.weight, safe, head.bias,
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return -torch.where(mask, nll.view(B, T).float(), 0.0)


def _nll(targets: torch.Tensor, mask: torch.Tensor) -> ChunkLoss:
    """Plain NLL on a chunk's logits: what a second pass and reference scoring read the log-probs from."""
    return lambda z, rows, cols: objectives.ntp(z, targets[rows, cols], mask[rows, cols])


def _second_pass(loss: Loss, head: Hidden, targets: torch.Tensor, mask: torch.Tensor,
                 ctx: LossContext) -> LossParts:
    """Chunked, for an objective that picks its tokens over the whole micro-batch: read, select, then train."""
    with torch.no_grad():  # pass 1: every token's log-prob, to pick the kept ones over the whole micro-batch
        cur = chunked_parts(head, _nll(targets, mask), ctx.chunk_tokens).token_logprobs
    chosen = loss.select(cur, mask, ctx)

    def weighted_nll(z: torch.Tensor, rows: slice, cols: slice) -> LossParts:
        logp = objectives.token_logprobs(z, targets[rows, cols], mask[rows, cols])
        return LossParts((chosen.weights[rows, cols] * -logp).sum(), logp.detach(), None, None)

    parts = chunked_parts(head, weighted_nll, ctx.chunk_tokens)
    return LossParts(parts.loss_sum / chosen.divisor, parts.token_logprobs, chosen.weights, chosen.delta)


def _eager_parts(objective: Objective, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                 ctx: LossContext) -> LossParts:
    return loss_of(objective).on_logits(logits, targets, mask, ctx, WHOLE)


def _chunked_parts(objective: Objective, head: Hidden, targets: torch.Tensor, mask: torch.Tensor,
                   ctx: LossContext) -> LossParts:
    loss = loss_of(objective)
    if objective.second_pass:
        return _second_pass(loss, head, targets, mask, ctx)

    def on_chunk(z: torch.Tensor, rows: slice, cols: slice) -> LossParts:
        return loss.on_logits(z, targets[rows, cols], mask[rows, cols], ctx, (rows, cols))

    return chunked_parts(head, on_chunk, ctx.chunk_tokens, whole_rows=objective.whole_rows)


def _fused_parts(objective: Objective, head: Hidden, targets: torch.Tensor, mask: torch.Tensor,
                 ctx: LossContext) -> LossParts:
    on_logprobs = loss_of(objective).on_logprobs
    if on_logprobs is None:  # no log-prob form (kd): it runs chunked
        return _chunked_parts(objective, head, targets, mask, ctx)
    return on_logprobs(fused_logprobs(head, targets, mask), mask, ctx)


def _fused_machine_problem() -> str | None:
    problem = "no CUDA device is visible" if not torch.cuda.is_available() else _liger_problem()
    if problem:
        return f"midtrain.loss_kernel: fused needs Liger-Kernel's CUDA kernel, but {problem}; " \
               "set loss_kernel: chunked (or auto)"
    return None


Parts = Callable[[Objective, torch.Tensor | Hidden, torch.Tensor, torch.Tensor, LossContext], LossParts]


@dataclass(frozen=True)
class Kernel:
    """One way to compute an objective's loss (`midtrain.loss_kernel`), and what it needs to run."""

    name: str
    parts: Parts  # (objective, head, targets, mask, ctx) -> LossParts; head: the logits, or a `Hidden`
    from_hidden: bool = True  # starts from the last hidden states: the logits must be a linear map of them
    logprob_form: bool = False  # runs an objective through its log-prob form; one without it runs chunked
    machine_problem: Callable[[], str | None] | None = None  # what this machine lacks for it, in one sentence
    resolves_to: str | None = None  # the kernel that trains when it is asked for by name, if not itself

    def handles(self, objective: Objective) -> bool:
        """Whether it computes this objective itself rather than handing it to another kernel."""
        return not self.logprob_form or loss_of(objective).on_logprobs is not None

    def machine_refusal(self, objective: Objective) -> str | None:
        """Why this machine cannot run it for `objective` (no model needed); None if it can."""
        return self.machine_problem() if self.machine_problem and self.handles(objective) else None

    def available(self, model: torch.nn.Module, objective: Objective,
                  reference: torch.nn.Module | None = None) -> str | None:
        """Why it cannot compute `objective` for this model (and kd's reference) here, in one sentence; or None."""
        if self.from_hidden:
            why = unsupported(model) or (
                unsupported(reference) if objective.uses_ref_distribution and reference is not None else None)
            if why:
                return (f"midtrain.loss_kernel: {self.name} cannot compute this model's logits in pieces: "
                        f"{why}; set loss_kernel: eager (or auto, which picks it)")
        return self.machine_refusal(objective)

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                unwrapped: torch.nn.Module | None = None) -> tuple[Any, torch.Tensor | Hidden]:
        """The model's output and the head this kernel starts from, aligned to targets input_ids[:, 1:]."""
        if not self.from_hidden:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
            return out, out.logits[:, :-1]
        out, states = forward_hidden(model, input_ids, attention_mask)
        return out, hidden_of(unwrapped if unwrapped is not None else model, states[:, :-1])


EAGER = Kernel("eager", _eager_parts, from_hidden=False)
CHUNKED = Kernel("chunked", _chunked_parts)
# asked for by name, fused has always trained through chunked; only auto trains fused
FUSED = Kernel("fused", _fused_parts, logprob_form=True, machine_problem=_fused_machine_problem,
               resolves_to="chunked")
KERNELS: dict[str, Kernel] = {k.name: k for k in (CHUNKED, FUSED, EAGER)}
LOSS_KERNELS = ("auto", *KERNELS)  # midtrain.loss_kernel's values
AUTO_ORDER = (FUSED, CHUNKED, EAGER)  # auto takes the first that computes the objective itself and can run here


def resolve(requested: str, objective: str | Objective, model: torch.nn.Module,
            reference: torch.nn.Module | None = None) -> str:
    """The kernel `requested` (midtrain.loss_kernel) means for this model and objective, or one clear error."""
    if requested not in LOSS_KERNELS:
        raise ValueError(f"loss_kernel must be one of {LOSS_KERNELS}, got {requested!r}")
    objective = objective_named(objective)
    if requested == "auto":
        usable = (k for k in AUTO_ORDER if k.handles(objective) and not k.available(model, objective, reference))
        return next(usable).name
    kernel = KERNELS[requested]
    why = kernel.available(model, objective, reference)
    if why:
        raise FlywheelError(why)
    return kernel.resolves_to or kernel.name


def check_machine(requested: str, objective: str | Objective) -> None:
    """Refuse a kernel this machine cannot run (fused: no CUDA, no liger-kernel >= 0.8.2): before any work."""
    kernel = KERNELS.get(requested)
    problem = kernel.machine_refusal(objective_named(objective)) if kernel else None
    if problem:
        raise FlywheelError(problem)


def objective_parts(
    kernel: str,
    objective: str | Objective,
    head: torch.Tensor | Hidden,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    ref_head: torch.Tensor | Hidden | None = None,
    doc_ids: torch.Tensor | None = None,
    epsilon: float | None = 0.2,
    centring: str = "mean",
    mapping: str = "sigmoid",
    rho1_keep: float = 0.8,
    kd: dict | None = None,
    chunk_tokens: int = 2048,
) -> LossParts:
    """One objective's `LossParts` through one kernel: `head` is the logits (eager) or a `Hidden` (the others).

    kd's reference comes as `ref_head` (its logits or its `Hidden`); remit and rho1 read `ref_logprobs`.
    """
    objective = objective_named(objective)
    ctx = LossContext(ref_logprobs, ref_head, doc_ids, epsilon, centring, mapping, rho1_keep, kd or {}, chunk_tokens)
    return KERNELS[kernel].parts(objective, head, targets, mask, ctx)


def token_logprobs_of(model: torch.nn.Module, input_ids: torch.Tensor, kernel: str = "auto",
                      chunk_tokens: int = 2048) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1 of each row (float32), aligned to targets input_ids[:, 1:]; no grad.

    What reference scoring needs: chunked for every kernel but eager (no gradient here, so fused buys nothing),
    and eager where the model's logits cannot be chunked.
    """
    targets = input_ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool)
    if kernel == EAGER.name or unsupported(model):
        _, logits = EAGER.forward(model, input_ids)
        return objectives.token_logprobs(logits, targets, mask)
    _, head = CHUNKED.forward(model, input_ids)
    return chunked_parts(head, _nll(targets, mask), chunk_tokens).token_logprobs
