"""The mid-training objectives: ntp is the yardstick, remit reduces to it when the reference agrees."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F

from flywheel.remit.catalog import NAMES, objective_named
from flywheel.remit.catalog import OBJECTIVES as CATALOG
from flywheel.remit.objectives import (
    OBJECTIVES,
    WHOLE,
    LossContext,
    LossParts,
    kd,
    loss_of,
    ntp,
    remit,
    rho1,
    token_logprobs,
)

B, T, V = 3, 10, 17


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return logits, targets, mask


def _ref_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, seed: int = 1
) -> torch.Tensor:
    """A reference that disagrees with the current model by a random amount per token."""
    g = torch.Generator().manual_seed(seed)
    cur = token_logprobs(logits.detach(), targets, mask)
    return torch.where(mask, cur + torch.randn(B, T, generator=g), 0.0)


def _grad(parts: LossParts, logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(parts.loss_sum, logits)
    return grad


def test_token_logprobs_equals_log_softmax_gather():
    logits, targets, mask = _batch()
    want = F.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = token_logprobs(logits, targets, mask)
    assert got.requires_grad
    torch.testing.assert_close(got.double()[mask], want[mask], atol=1e-6, rtol=0)
    assert (got[~mask] == 0).all()


def test_remit_with_agreeing_reference_is_ntp():
    logits, targets, mask = _batch()
    ref = token_logprobs(logits, targets, mask).detach()
    plain, weighted = ntp(logits, targets, mask), remit(logits, targets, mask, ref)
    assert torch.equal(weighted.weights[mask], torch.ones(int(mask.sum())))
    torch.testing.assert_close(weighted.loss_sum, plain.loss_sum, atol=1e-6, rtol=0)
    torch.testing.assert_close(_grad(weighted, logits), _grad(plain, logits), atol=1e-6, rtol=0)
    assert (weighted.delta == 0).all()


def test_remit_upweights_tokens_the_reference_favours():
    logits, targets, mask = _batch()
    ref = token_logprobs(logits, targets, mask).detach().clone()
    favoured = torch.zeros_like(mask)
    favoured[:, 1::3] = True
    favoured &= mask
    ref[favoured] += 2.0  # the reference finds these tokens far more likely than the current model does
    parts = remit(logits, targets, mask, ref)
    assert (parts.weights[favoured] > 1).all()
    assert (parts.weights[mask & ~favoured] < 1).all()
    torch.testing.assert_close(parts.delta[favoured], torch.full((int(favoured.sum()),), 2.0))

    def favoured_share(grad: torch.Tensor) -> float:
        per_token = grad.norm(dim=-1)
        return float(per_token[favoured].sum() / per_token.sum())

    assert (
        favoured_share(_grad(parts, logits))
        > favoured_share(_grad(ntp(logits, targets, mask), logits)) + 0.05
    )


def test_rho1_keep_one_is_ntp():
    logits, targets, mask = _batch()
    ref = _ref_logprobs(logits, targets, mask)
    plain, selected = ntp(logits, targets, mask), rho1(logits, targets, mask, ref, keep=1.0)
    assert torch.equal(selected.loss_sum, plain.loss_sum)
    assert torch.equal(_grad(selected, logits), _grad(plain, logits))


@pytest.mark.parametrize("keep", [0.07, 0.3, 0.5, 0.8])
def test_rho1_keeps_ceil_keep_n_tokens_with_the_largest_excess_loss(keep: float):
    logits, targets, mask = _batch()
    ref = _ref_logprobs(logits, targets, mask)
    parts = rho1(logits, targets, mask, ref, keep=keep)
    n_valid = int(mask.sum())
    kept = parts.weights.bool()
    assert int(kept.sum()) == math.ceil(round(keep * n_valid, 9))
    assert not (kept & ~mask).any()
    excess = ref - token_logprobs(logits.detach(), targets, mask)  # NLL_cur - NLL_ref
    assert excess[kept].min() > excess[mask & ~kept].max()
    nll = -token_logprobs(logits.detach(), targets, mask)
    torch.testing.assert_close(parts.loss_sum.detach(), nll[kept].sum() / keep)


def test_kd_against_itself_is_only_the_nll_term():
    logits, targets, mask = _batch()
    nll_sum = ntp(logits, targets, mask).loss_sum.detach()
    for temperature in (1.0, 2.0):
        parts = kd(logits, targets, mask, logits.detach(), temperature=temperature, alpha=0.3)
        torch.testing.assert_close(parts.loss_sum.detach(), 0.7 * nll_sum, atol=1e-5, rtol=0)
        assert parts.weights is None and parts.delta is None


def _kl(student: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    p = F.log_softmax(reference.double(), -1)
    q = F.log_softmax(student.double(), -1)
    return float((p.exp() * (p - q)).sum(-1)[mask].sum())


def test_kd_gradient_pulls_the_student_toward_the_reference():
    logits, targets, mask = _batch()
    reference = torch.randn(B, T, V, generator=torch.Generator().manual_seed(5)) * 2
    parts = kd(logits, targets, mask, reference, alpha=1.0)
    torch.testing.assert_close(
        float(parts.loss_sum.detach()), _kl(logits.detach(), reference, mask), atol=1e-4, rtol=0
    )
    stepped = logits.detach() - 0.05 * _grad(parts, logits)
    assert _kl(stepped, reference, mask) < _kl(logits.detach(), reference, mask) - 1e-3


def test_kd_top_k_with_full_vocabulary_equals_full_kd():
    logits, targets, mask = _batch()
    reference = torch.randn(B, T, V, generator=torch.Generator().manual_seed(6))
    full = kd(logits, targets, mask, reference, temperature=1.5, alpha=0.6)
    top = kd(logits, targets, mask, reference, temperature=1.5, alpha=0.6, top_k=V)
    torch.testing.assert_close(top.loss_sum, full.loss_sum, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(_grad(top, logits), _grad(full, logits), atol=1e-6, rtol=0)
    # and a smaller k is a different, still finite, objective
    small = kd(logits, targets, mask, reference, temperature=1.5, alpha=0.6, top_k=3)
    assert torch.isfinite(small.loss_sum) and not torch.allclose(small.loss_sum, full.loss_sum)


def test_no_gradient_flows_into_the_reference():
    logits, targets, mask = _batch()
    ref_logits = torch.randn(B, T, V, requires_grad=True)
    ref_logprobs = token_logprobs(ref_logits, targets, mask)  # carries grad back to ref_logits
    for parts in (
        kd(logits, targets, mask, ref_logits),
        kd(logits, targets, mask, ref_logits, top_k=4),
        remit(logits, targets, mask, ref_logprobs),
        rho1(logits, targets, mask, ref_logprobs),
    ):
        parts.loss_sum.backward()
        assert ref_logits.grad is None
        assert logits.grad is not None
        logits.grad = None


def _run(objective: str, logits, targets, mask, ref_logprobs, ref_logits) -> LossParts:
    if objective == "ntp":
        return ntp(logits, targets, mask)
    if objective == "remit":
        return remit(logits, targets, mask, ref_logprobs)
    if objective == "rho1":
        return rho1(logits, targets, mask, ref_logprobs, keep=0.6)
    return kd(logits, targets, mask, ref_logits, temperature=2.0, top_k=5)


@pytest.mark.parametrize("objective", OBJECTIVES + ("kd_full",))
def test_invalid_positions_change_nothing(objective: str):
    logits, targets, mask = _batch()
    ref_logprobs = _ref_logprobs(logits, targets, mask)
    ref_logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(7))
    run = (lambda *a: kd(*a[:3], a[4])) if objective == "kd_full" else (lambda *a: _run(objective, *a))
    clean = run(logits, targets, mask, ref_logprobs, ref_logits)
    clean_grad = _grad(clean, logits)

    dirty_logits = logits.detach().clone()
    dirty_logits[~mask] = torch.randn(int((~mask).sum()), V) * 50  # the model's output there is irrelevant
    dirty_logits.requires_grad_()
    dirty_targets = torch.where(mask, targets, -100)
    dirty_ref = torch.where(mask, ref_logprobs, float("nan"))
    dirty_ref[~mask & (torch.arange(T) % 2 == 0)] = float("inf")
    dirty_ref_logits = ref_logits.clone()
    dirty_ref_logits[~mask] = float("nan")
    dirty = run(dirty_logits, dirty_targets, mask, dirty_ref, dirty_ref_logits)
    dirty_grad = _grad(dirty, dirty_logits)

    torch.testing.assert_close(dirty.loss_sum, clean.loss_sum, atol=1e-6, rtol=0)
    assert torch.equal(dirty.token_logprobs, clean.token_logprobs)
    for field in ("weights", "delta"):
        a, b = getattr(clean, field), getattr(dirty, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b) and (a[~mask] == 0).all()
    assert torch.isfinite(dirty_grad).all()
    assert (dirty_grad[~mask] == 0).all()
    torch.testing.assert_close(dirty_grad, clean_grad, atol=1e-6, rtol=0)


# The objective table (catalog.py): each entry's needs, and the formulas the kernels call for it.

PINNED_NEEDS = {  # name: (needs a reference, reads the cache / loads the reference when cached, and when online)
    "ntp": (False, (False, False), (False, False)),
    "remit": (True, (True, False), (False, True)),
    "kd": (True, (False, True), (False, True)),
    "rho1": (True, (True, False), (False, True)),
}


def test_each_objective_s_needs_answer_what_midtrain_scoring_and_rounds_ask():
    assert CATALOG.keys() == PINNED_NEEDS.keys() and OBJECTIVES == NAMES
    for name, (needs, cached, online) in PINNED_NEEDS.items():
        o = objective_named(name)
        assert o.needs_reference == needs, name
        assert (o.reads_cache("cached"), o.loads_reference("cached")) == cached, name
        assert (o.reads_cache("online"), o.loads_reference("online")) == online, name
    assert [n for n, o in CATALOG.items() if o.token_weights] == ["remit", "rho1"]  # the weight diagnostics
    assert [n for n, o in CATALOG.items() if o.follows_weight_settings] == ["remit"]  # epsilon, centring, mapping
    with pytest.raises(ValueError, match=r"objective must be one of \('ntp', 'remit', 'kd', 'rho1'\), got 'dpo'"):
        objective_named("dpo")


def test_every_entry_has_the_formulas_its_needs_call_for():
    for name, o in CATALOG.items():
        loss = loss_of(o)
        assert (loss.select is not None) == o.second_pass, name  # a second pass selects from every log-prob
        if o.uses_ref_distribution:  # the full distribution has no per-token log-prob form (no fused path)
            assert loss.on_logprobs is None, name


def test_the_config_accepts_exactly_the_table_s_objectives_and_asks_it_about_kd():
    from flywheel.config import MidtrainConfig

    assert typing.get_args(MidtrainConfig.model_fields["objective"].annotation) == NAMES
    for name, o in CATALOG.items():
        if o.uses_ref_distribution:
            with pytest.raises(ValueError, match=f"objective '{name}' needs the reference's full distribution"):
                MidtrainConfig(objective=name)
        else:
            MidtrainConfig(objective=name)


@pytest.mark.parametrize("name", NAMES)
def test_the_table_s_formulas_are_the_objective_functions(name):
    """`LOSSES` calls the very formulas above: same numbers, bit for bit, eager and from log-probs."""
    logits, targets, mask = _batch()
    ref_logprobs = _ref_logprobs(logits, targets, mask)
    ref_logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(7))
    ctx = LossContext(ref_logprobs=ref_logprobs, ref_head=ref_logits, rho1_keep=0.6,
                      kd={"temperature": 2.0, "top_k": 5})
    got = loss_of(objective_named(name)).on_logits(logits, targets, mask, ctx, WHOLE)
    want = _run(name, logits, targets, mask, ref_logprobs, ref_logits)
    assert torch.equal(got.loss_sum, want.loss_sum) and torch.equal(_grad(got, logits), _grad(want, logits))
    on_logprobs = loss_of(objective_named(name)).on_logprobs
    if on_logprobs is not None:
        from_logprobs = on_logprobs(token_logprobs(logits, targets, mask), mask, ctx)
        assert torch.equal(from_logprobs.loss_sum, want.loss_sum)
