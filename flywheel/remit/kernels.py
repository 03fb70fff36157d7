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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F

from flywheel.errors import FlywheelError
from flywheel.remit import objectives
from flywheel.remit.objectives import IGNORE_INDEX, LossParts

LOSS_KERNELS = ("auto", "chunked", "fused", "eager")
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


def resolve(requested: str, objective: str, model: torch.nn.Module,
            reference: torch.nn.Module | None = None) -> str:
    """The kernel `requested` (midtrain.loss_kernel) means for this model and objective, or one clear error."""
    if requested not in LOSS_KERNELS:
        raise ValueError(f"loss_kernel must be one of {LOSS_KERNELS}, got {requested!r}")
    if requested == "eager":
        return "eager"
    why = unsupported(model) or (unsupported(reference) if objective == "kd" and reference is not None else None)
    if requested == "auto":
        if why:
            return "eager"
        cuda_fused = torch.cuda.is_available() and objective != "kd" and _liger_problem() is None
        return "fused" if cuda_fused else "chunked"
    if why:
        raise FlywheelError(f"midtrain.loss_kernel: {requested} cannot compute this model's logits in pieces: "
                            f"{why}; set loss_kernel: eager (or auto, which picks it)")
    check_machine(requested, objective)
    return "chunked" if requested == "fused" else requested  # kd has no fused path


def check_machine(requested: str, objective: str) -> None:
    """Refuse `fused` where it cannot run (no CUDA, no liger-kernel >= 0.8.2): before any work, no model needed."""
    if requested == "fused" and objective != "kd":
        problem = "no CUDA device is visible" if not torch.cuda.is_available() else _liger_problem()
        if problem:
            raise FlywheelError(f"midtrain.loss_kernel: fused needs Liger-Kernel's CUDA kernel, but {problem}; "
                                "set loss_kernel: chunked (or auto)")


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


def objective_parts(
    kernel: str,
    objective: str,
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
    kd = kd or {}

    def on_chunk(z: torch.Tensor, rows: slice, cols: slice) -> LossParts:
        t, m = targets[rows, cols], mask[rows, cols]
        if objective == "ntp":
            return objectives.ntp(z, t, m)
        if objective == "remit":
            docs = None if doc_ids is None else doc_ids[rows, cols]
            return objectives.remit(z, t, m, ref_logprobs[rows, cols], epsilon, docs, centring, mapping)
        if objective == "rho1":  # eager only: chunked rho1 selects over the whole batch below
            return objectives.rho1(z, t, m, ref_logprobs, keep=rho1_keep)
        with torch.no_grad():
            ref_z = ref_head.logits(rows, cols) if isinstance(ref_head, Hidden) else ref_head[rows, cols]
        return objectives.kd(z, t, m, ref_z, **kd)

    if objective not in objectives.OBJECTIVES:
        raise ValueError(f"objective must be one of {objectives.OBJECTIVES}, got {objective!r}")
    if kernel == "eager":
        return on_chunk(head, slice(None), slice(None))
    if kernel == "fused" and objective != "kd":
        logp = fused_logprobs(head, targets, mask)
        if objective == "ntp":
            return objectives.ntp_on_logprobs(logp)
        if objective == "remit":
            return objectives.remit_on_logprobs(logp, mask, ref_logprobs, epsilon, doc_ids, centring, mapping)
        return objectives.rho1_on_logprobs(logp, mask, ref_logprobs, rho1_keep)
    if objective == "kd":
        objectives.check_kd_args(head.weight.shape[0], kd.get("temperature", 1.0), kd.get("alpha", 0.5),
                                 kd.get("top_k"))
    if objective != "rho1":
        return chunked_parts(head, on_chunk, chunk_tokens, whole_rows=objective == "remit")

    def nll(z: torch.Tensor, rows: slice, cols: slice) -> LossParts:
        return objectives.ntp(z, targets[rows, cols], mask[rows, cols])

    with torch.no_grad():  # pass 1: every token's log-prob, to pick the kept ones over the whole micro-batch
        cur = chunked_parts(head, nll, chunk_tokens).token_logprobs
    kept, excess = objectives.rho1_weights(cur, mask, ref_logprobs, rho1_keep)

    def kept_nll(z: torch.Tensor, rows: slice, cols: slice) -> LossParts:
        logp = objectives.token_logprobs(z, targets[rows, cols], mask[rows, cols])
        return LossParts((kept[rows, cols] * -logp).sum(), logp.detach(), None, None)

    parts = chunked_parts(head, kept_nll, chunk_tokens)
    return LossParts(parts.loss_sum / rho1_keep, parts.token_logprobs, kept, excess)


def token_logprobs_of(model: torch.nn.Module, input_ids: torch.Tensor, kernel: str = "auto",
                      chunk_tokens: int = 2048) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1 of each row (float32), aligned to targets input_ids[:, 1:]; no grad.

    What reference scoring needs: chunked for every kernel but eager (no gradient here, so fused buys nothing),
    and eager where the model's logits cannot be chunked.
    """
    targets = input_ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool)
    if kernel == "eager" or unsupported(model):
        logits = model(input_ids=input_ids).logits[:, :-1]
        return objectives.token_logprobs(logits, targets, mask)
    _, states = forward_hidden(model, input_ids)
    head = hidden_of(model, states[:, :-1])
    return objective_parts("chunked", "ntp", head, targets, mask, chunk_tokens=chunk_tokens).token_logprobs
