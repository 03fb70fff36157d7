"""The noise-aware gate on synthetic per-item results: rules, refusals, and the interval's coverage."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.errors import FlywheelError
from flywheel.evaluation.items import item_scores, metric_terms
from flywheel.tracking.gate import NotComparable, paired_delta, passes

PROTOCOL = {"tasks": ["world"], "limit": None, "num_fewshot": None, "kind": "post"}


def _items(per_task: dict[str, np.ndarray], protocol: dict | None = None, groups: dict | None = None,
           top: list[str] | None = None) -> dict:
    scores = {t: {"acc": {str(i): float(v) for i, v in enumerate(vals)}} for t, vals in per_task.items()}
    return {"protocol": protocol or PROTOCOL, "top": top or list(per_task), "groups": groups or {}, "scores": scores}


def _pair(rng: np.random.Generator, n: int, p_ref: float, p_cand: float, tasks=("a", "b")) -> tuple[dict, dict]:
    """Paired binary outcomes on n items per task: each item has a latent ease; the candidate's accuracy is p_cand."""
    ref, cand = {}, {}
    for t in tasks:
        u = rng.random(n)  # one shared draw per item: the two models tend to get the same items right
        ref[t] = (u < p_ref).astype(float)
        flip = rng.random(n) < 0.15  # and some items the candidate gets right or wrong on its own
        cand[t] = np.where(flip, (rng.random(n) < p_cand).astype(float), (u < p_cand).astype(float))
    return _items(cand), _items(ref)


def test_a_clearly_worse_candidate_is_rejected_under_every_rule():
    cand, ref = _pair(np.random.default_rng(0), 300, p_ref=0.6, p_cand=0.35)
    iv = paired_delta(cand, ref, "eval/avg", seed=1)
    assert iv.high < -0.1 and iv.items == 600
    for rule in ("noninferior", "superior", "point"):
        ok, why = passes(rule, 0.02, 0.35, 0.6, iv)
        assert not ok, (rule, why)


def test_a_tie_within_the_noise_is_promoted_by_noninferior_and_rejected_by_superior():
    rng = np.random.default_rng(3)
    base = (rng.random(2000) < 0.5).astype(float)
    # 50 items won and 50 lost: the same accuracy, not the same answers
    won = np.flatnonzero(base == 0)[:50]
    lost = np.flatnonzero(base == 1)[:50]
    cand = base.copy()
    cand[won], cand[lost] = 1.0, 0.0
    a, b = _items({"a": cand}), _items({"a": base})
    iv = paired_delta(a, b, "eval/avg", seed=0)
    assert iv.delta == 0 and iv.low < 0 < iv.high and iv.half_width < 0.02  # a tie, inside the noise
    assert passes("noninferior", 0.02, 0.5, 0.5, iv)[0]
    assert not passes("superior", 0.02, 0.5, 0.5, iv)[0]


def test_the_interval_covers_the_true_difference_in_at_least_93_of_100_seeded_trials():
    covered = 0
    for trial in range(100):
        rng = np.random.default_rng(1000 + trial)
        n = 200
        ease = rng.random((2, n))
        # true accuracies 0.55 (reference) and 0.60 (candidate) on both tasks: the true difference of the avg is 0.05
        ref = _items({t: (ease[i] < 0.55).astype(float) for i, t in enumerate("ab")})
        noise = rng.random((2, n)) < 0.2
        cand_scores = {}
        for i, t in enumerate("ab"):
            own = (rng.random(n) < 0.60).astype(float)
            cand_scores[t] = np.where(noise[i], own, (ease[i] < 0.60).astype(float))
        iv = paired_delta(_items(cand_scores), ref, "eval/avg", resamples=1000, seed=trial)
        covered += iv.low <= 0.05 <= iv.high
    assert covered >= 93, covered


def test_results_of_another_protocol_or_other_items_are_refused_by_name():
    cand, ref = _pair(np.random.default_rng(0), 50, 0.5, 0.5)
    other = {**ref, "protocol": {**PROTOCOL, "limit": 20}}
    with pytest.raises(NotComparable, match=r"reference v3 was evaluated under another protocol \(limit 20 vs None"):
        paired_delta(cand, other, "eval/avg", ref_name="reference v3")
    fewer = _items({"a": np.ones(40), "b": np.ones(50)})
    with pytest.raises(NotComparable, match="no scores for the same a items"):
        paired_delta(cand, fewer, "eval/avg")


def test_the_average_pools_a_groups_tasks_and_a_task_metric_reads_its_own_items():
    items = _items({"g1": np.ones(30), "g2": np.zeros(10), "solo": np.ones(5)},
                   groups={"grp": ["g1", "g2"]}, top=["grp", "solo"])
    terms = metric_terms(items, "eval/avg")
    assert terms == {("g1", "acc"): pytest.approx(0.5 * 30 / 40), ("g2", "acc"): pytest.approx(0.5 * 10 / 40),
                     ("solo", "acc"): pytest.approx(0.5)}
    assert metric_terms(items, "eval/solo/acc") == {("solo", "acc"): 1.0}
    with pytest.raises(FlywheelError, match="'eval/solo/bleu' has no per-item scores"):
        metric_terms(items, "eval/solo/bleu")


def test_the_point_difference_is_the_metrics_difference_and_the_bootstrap_is_seeded():
    rng = np.random.default_rng(7)
    a = {t: (rng.random(n) < 0.5).astype(float) for t, n in (("x", 80), ("y", 120))}
    b = {t: (rng.random(len(v)) < 0.4).astype(float) for t, v in a.items()}
    iv = paired_delta(_items(a), _items(b), "eval/avg", seed=5)
    expected = np.mean([a[t].mean() - b[t].mean() for t in a])  # eval/avg: the mean of the tasks' scores
    assert iv.delta == pytest.approx(expected)
    assert paired_delta(_items(a), _items(b), "eval/avg", seed=5) == iv


def test_item_scores_reads_lm_eval_samples_with_their_filters():
    results = {"results": {"t": {}}, "samples": {"t": [
        {"doc_id": 0, "filter": "none", "metrics": ["acc", "bleu"], "acc": 1.0, "bleu": (["x"], ["y"])},
        {"doc_id": 1, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 0.0}]}}
    items = item_scores(results, PROTOCOL)
    assert items["scores"]["t"] == {"acc": {"0": 1.0}, "exact_match_strict_match": {"1": 0.0}}
    assert items["top"] == ["t"] and items["protocol"] == PROTOCOL
