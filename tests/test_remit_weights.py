"""remit_weights is the ReMiT formula: these tests pin it, its edge cases and its vectorised doc centring."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.remit.weights import (
    CENTRINGS,
    MAPPINGS,
    ZSCORE_STD_FLOOR,
    describe,
    remit_weights,
    weight_stats,
)


def _inputs(B: int = 3, T: int = 16, spread: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(B, T, generator=g) * spread
    cur = -torch.rand(B, T, generator=g) * spread
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return ref, cur, mask


MAP = {"sigmoid": lambda x: 2.0 / (1.0 + math.exp(-x)), "exp": math.exp, "linear": lambda x: 1.0 + x}


def _loop_variant(ref, cur, mask, epsilon, doc_ids, centring, mapping):
    """The formula (any centring and mapping) the slow, obvious way: one (row, document) at a time."""
    out = torch.zeros(ref.shape, dtype=torch.float64)
    for b in range(ref.shape[0]):
        for doc in doc_ids[b].unique().tolist():
            idx = [t for t in range(ref.shape[1]) if doc_ids[b, t] == doc and mask[b, t]]
            if not idx:
                continue
            d = [float(ref[b, t]) - float(cur[b, t]) for t in idx]
            mean = sum(d) / len(d)
            std = math.sqrt(sum((x - mean) ** 2 for x in d) / len(d))
            for t, dt in zip(idx, d, strict=True):
                x = dt - mean if centring == "mean" else (dt - mean) / max(std, ZSCORE_STD_FLOOR)
                w = MAP[mapping](x)
                out[b, t] = min(max(w, 1 - epsilon), 1 + epsilon) if epsilon is not None else max(w, 0.0)
    return out


def test_reference_equal_to_current_gives_exactly_one():
    ref, _, mask = _inputs()
    w = remit_weights(ref, ref.clone(), mask)
    assert torch.equal(w[mask], torch.ones(int(mask.sum())))
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert w.dtype == torch.float32


def test_constant_shift_of_delta_within_a_row_changes_nothing():
    ref, cur, mask = _inputs()
    shifted = ref.clone()
    shifted[1] += 3.0  # row 1 only: its centring absorbs the shift
    torch.testing.assert_close(
        remit_weights(shifted, cur, mask), remit_weights(ref, cur, mask), atol=1e-6, rtol=0
    )


def test_constant_shift_within_one_document_changes_nothing_with_doc_ids():
    ref, cur, mask = _inputs(B=2, T=12)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [2] * 12])
    shifted = ref.clone()
    shifted[0, 5:] -= 2.5  # document 1 of row 0 only
    before = remit_weights(ref, cur, mask, doc_ids=doc_ids)
    torch.testing.assert_close(remit_weights(shifted, cur, mask, doc_ids=doc_ids), before, atol=1e-6, rtol=0)
    # without doc centring the same shift does move row 0's weights: the test can tell the two apart
    assert not torch.allclose(remit_weights(shifted, cur, mask), remit_weights(ref, cur, mask), atol=1e-3)


@pytest.mark.parametrize("epsilon", [0.05, 0.2, 0.5, 1.0])
def test_bounds_hold_for_every_epsilon(epsilon: float):
    ref, cur, mask = _inputs(B=8, T=256, spread=20.0, seed=1)
    w = remit_weights(ref, cur, mask, epsilon=epsilon)
    valid = w[mask]
    assert valid.min() >= 1 - epsilon - 1e-7 and valid.max() <= 1 + epsilon + 1e-7
    # the spread is large, so both bounds are actually reached
    assert torch.isclose(valid.min(), torch.tensor(1 - epsilon)) and torch.isclose(
        valid.max(), torch.tensor(1 + epsilon)
    )


def test_epsilon_none_is_unclipped_and_inside_zero_two():
    ref, cur, mask = _inputs(B=4, T=64, spread=3.0, seed=2)
    w = remit_weights(ref, cur, mask, epsilon=None)[mask]
    assert (w > 0).all() and (w < 2).all()
    assert w.max() > 1.2 + 0.05 and w.min() < 0.8 - 0.05  # beyond where the default epsilon would clip
    stats = weight_stats(remit_weights(ref, cur, mask, epsilon=None), mask, None)
    assert stats["clip_high"] == 0.0 and stats["clip_low"] == 0.0


def test_invalid_epsilon_is_refused():
    ref, cur, mask = _inputs()
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="epsilon"):
            remit_weights(ref, cur, mask, epsilon=bad)


def test_masked_positions_are_zero_even_when_ref_is_nan_or_inf():
    ref, cur, mask = _inputs()
    clean = remit_weights(ref, cur, mask)
    dirty = ref.clone()
    invalid = (~mask).nonzero()
    assert len(invalid) >= 3
    dirty[tuple(invalid[0])] = float("nan")
    dirty[tuple(invalid[1])] = float("inf")
    dirty[tuple(invalid[2])] = -float("inf")
    w = remit_weights(dirty, cur, mask)
    assert torch.isfinite(w).all()
    assert torch.equal(w, clean)
    assert (w[~mask] == 0).all()


def test_empty_row_and_empty_document_give_zeros_without_nan():
    ref, cur, mask = _inputs(B=2, T=10)
    mask[0] = False  # row 0: no valid position at all
    mask[1, :4] = False  # row 1, document 7: no valid position
    doc_ids = torch.tensor([[0] * 10, [7] * 4 + [8] * 6])
    for ids in (None, doc_ids):
        w = remit_weights(ref, cur, mask, doc_ids=ids)
        assert torch.isfinite(w).all()
        assert (w[0] == 0).all() and (w[1, :4] == 0).all()
        assert (w[1, 4:][mask[1, 4:]] > 0).all() and mask[1, 4:].any()
    assert weight_stats(remit_weights(ref, cur, torch.zeros_like(mask)), torch.zeros_like(mask), 0.2) == {
        "mean": 0.0,
        "std": 0.0,
        "clip_high": 0.0,
        "clip_low": 0.0,
    }


def test_doc_centring_differs_from_row_centring_only_when_document_means_differ():
    ref, cur, mask = _inputs(B=2, T=12, seed=3)
    ref[0, 6:] += 1.0  # row 0's second document has a higher mean delta than its first
    two_docs = torch.tensor([[0] * 6 + [1] * 6, [5] * 12])
    by_row = remit_weights(ref, cur, mask, epsilon=None)
    by_doc = remit_weights(ref, cur, mask, epsilon=None, doc_ids=two_docs)
    assert not torch.allclose(by_doc[0], by_row[0], atol=1e-3)
    torch.testing.assert_close(by_doc[1], by_row[1], atol=1e-6, rtol=0)  # row 1 is a single document


def test_weights_carry_no_gradient():
    ref, cur, mask = _inputs()
    ref = ref.clone().requires_grad_()
    cur = cur.clone().requires_grad_()
    w = remit_weights(ref, cur, mask)
    assert not w.requires_grad and w.grad_fn is None
    (w * cur).sum().backward()  # cur's only path to the loss is the explicit factor, not through w
    assert ref.grad is None
    torch.testing.assert_close(cur.grad, w)


def test_hand_computed_single_row():
    ref = torch.tensor([[-1.0, -2.0, -0.5, 123.0]])
    cur = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    # d = [0.5, -1.0, 0.0], mean = -1/6, centred = [2/3, -5/6, 1/6]
    expected_none = [2 / (1 + math.exp(-c)) for c in (2 / 3, -5 / 6, 1 / 6)] + [0.0]
    expected_02 = [min(max(x, 0.8), 1.2) for x in expected_none[:3]] + [0.0]
    assert expected_02[0] == 1.2 and expected_02[1] == 0.8  # the example exercises both clips
    torch.testing.assert_close(
        remit_weights(ref, cur, mask, epsilon=None), torch.tensor([expected_none]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        remit_weights(ref, cur, mask, epsilon=0.2), torch.tensor([expected_02]), atol=1e-6, rtol=0
    )
    stats = weight_stats(remit_weights(ref, cur, mask, epsilon=0.2), mask, 0.2)
    assert stats["clip_high"] == pytest.approx(1 / 3) and stats["clip_low"] == pytest.approx(1 / 3)
    assert stats["mean"] == pytest.approx(sum(expected_02[:3]) / 3, abs=1e-6)


def test_vectorised_matches_loop_reference_on_packed_rows():
    g = torch.Generator().manual_seed(4)
    B, T = 6, 200
    ref = -torch.rand(B, T, generator=g) * 6
    cur = -torch.rand(B, T, generator=g) * 6
    mask = torch.rand(B, T, generator=g) > 0.3
    # packed rows: sorted global document ids with many boundaries, some shared across rows
    starts = torch.rand(B, T, generator=g) < 0.08
    doc_ids = torch.cumsum(starts.long().view(-1), 0).view(B, T).to(torch.int32)
    assert len(doc_ids.unique()) > 40
    for epsilon in (0.2, 10.0):
        want = _loop_variant(ref, cur, mask, epsilon, doc_ids, "mean", "sigmoid")
        got = remit_weights(ref, cur, mask, epsilon=epsilon, doc_ids=doc_ids)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


# --- the paper's open questions as switches: centring (mean | zscore) x mapping (sigmoid | exp | linear) ---

VARIANTS = [(c, m) for c in CENTRINGS for m in MAPPINGS]
@pytest.mark.parametrize(("centring", "mapping"), VARIANTS)
def test_every_variant_matches_the_loop_reference_on_packed_rows(centring, mapping):
    g = torch.Generator().manual_seed(5)
    ref, cur = -torch.rand(3, 40, generator=g) * 4, -torch.rand(3, 40, generator=g) * 4
    mask = torch.rand(3, 40, generator=g) > 0.25
    doc_ids = torch.cumsum((torch.rand(3, 40, generator=g) < 0.15).long().view(-1), 0).view(3, 40)
    for epsilon in (0.2, None):
        got = remit_weights(ref, cur, mask, epsilon, doc_ids, centring=centring, mapping=mapping)
        torch.testing.assert_close(got.double(), _loop_variant(ref, cur, mask, epsilon, doc_ids, centring, mapping),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("centring", "mapping"), VARIANTS)
def test_every_variant_gives_weight_one_where_the_models_agree_up_to_a_constant(centring, mapping):
    ref, _, mask = _inputs()
    doc_ids = torch.tensor([[0] * 6 + [1] * 10] * 3)
    cur = ref - torch.where(doc_ids == 0, 0.7, -1.3)  # delta constant within each document
    for epsilon in (0.2, None):
        w = remit_weights(ref, cur, mask, epsilon, doc_ids, centring=centring, mapping=mapping)
        # float32 rounding of ref - cur (~1e-7), divided by z-score's std floor, is all that is left
        torch.testing.assert_close(w[mask], torch.ones(int(mask.sum())), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("centring", "mapping"), VARIANTS)
def test_every_variant_is_monotone_in_delta_and_inside_its_clip(centring, mapping):
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(1, 64, generator=g) * 2
    cur, mask = torch.full((1, 64), -3.0), torch.ones(1, 64, dtype=torch.bool)
    for epsilon in (0.05, 0.2, 1.0, None):
        w = remit_weights(cur + delta, cur, mask, epsilon, centring=centring, mapping=mapping)[0]
        by_delta = w[delta[0].argsort()]
        assert (by_delta[1:] >= by_delta[:-1] - 1e-7).all(), (epsilon, by_delta)
        assert by_delta[-1] > by_delta[0]  # and it really moves
        if epsilon is not None:
            assert w.min() >= 1 - epsilon - 1e-6 and w.max() <= 1 + epsilon + 1e-6
        else:
            assert w.min() >= 0


@pytest.mark.parametrize(("centring", "mapping"), VARIANTS)
def test_every_variant_keeps_masked_positions_at_zero_even_when_ref_is_nan(centring, mapping):
    ref, cur, mask = _inputs()
    ref = ref.clone()
    ref[~mask] = float("nan")
    ref[0, ~mask[0]] = float("-inf")
    w = remit_weights(ref, cur, mask, 0.2, centring=centring, mapping=mapping)
    assert torch.isfinite(w).all() and (w[~mask] == 0).all() and (w[mask] > 0).all()


def test_zscore_is_blind_to_the_scale_of_delta_and_mean_centring_is_not():
    ref, cur, mask = _inputs(spread=3.0)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9] * 3)
    scaled = cur + 4.0 * (ref - cur)  # every delta times 4
    z = [remit_weights(r, cur, mask, None, doc_ids, centring="zscore") for r in (ref, scaled)]
    torch.testing.assert_close(z[0], z[1], atol=1e-5, rtol=0)
    m = [remit_weights(r, cur, mask, None, doc_ids) for r in (ref, scaled)]
    assert not torch.allclose(m[0], m[1], atol=1e-3)


def test_the_rule_is_named_for_logs_and_the_weight_page():
    assert describe() == "clamp(2·sigmoid(δ − mean δ), 0.8, 1.2)"
    assert describe(None, "zscore", "exp") == "exp((δ − mean δ) / std δ)"
    assert describe(None, "mean", "linear") == "max(0, 1 + (δ − mean δ))"
    with pytest.raises(ValueError, match="mapping must be one of"):
        remit_weights(*_inputs(), mapping="tanh")
