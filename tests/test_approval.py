"""A person in the promotion loop, on a real MLflow registry: approval, rejection, rollback, a lower-is-better gate.

The served round that pauses on the Prefect server for its form is in test_flows.py; here the registry's side:
what a recommendation, a decision and a rollback leave on the versions and the round runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.errors import FlywheelError
from flywheel.tracking.approval import awaiting, decide, rollback
from flywheel.tracking.compare import compare
from flywheel.tracking.registry import (
    T_APPROVAL,
    T_PROMOTION,
    T_RECOMMENDATION,
    get_alias,
    lineage,
    next_round,
)
from flywheel.tracking.store import open_tracker

from .conftest import small_config
from .test_tracking import checkpoints, simulate_round  # noqa: F401 - checkpoints is a fixture

BPB = "eval/world_gsm/bpb"


def _reference(tracker) -> str | None:
    ref = get_alias(tracker, "fw-rl", "reference")
    return None if ref is None else str(ref.version)


def test_with_approval_required_the_gate_recommends_and_only_a_persons_approval_moves_the_reference(
        tmp_path, checkpoints):  # noqa: F811
    tracker = open_tracker(small_config(tmp_path / "h", name="fw", promotion={"approval": "required"}))
    _, r0, d0 = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    assert d0.awaiting and d0.promoted and _reference(tracker) is None  # recommended, not carried out
    version = tracker.client.get_model_version("fw-rl", r0.version)
    assert version.tags[T_APPROVAL] == "awaiting" and T_PROMOTION not in version.tags
    assert version.tags[T_RECOMMENDATION] == "promote: first reference of this flywheel"
    assert str(awaiting(tracker).version) == str(r0.version)
    assert next_round(tracker).round == 0  # the awaiting round is still the round in progress

    approved = decide(tracker, 0, True, "ladder looks right", "ana")
    assert approved.promoted and _reference(tracker) == str(r0.version) and awaiting(tracker) is None
    for tags in (tracker.client.get_model_version("fw-rl", r0.version).tags, tracker.round_runs()[0].data.tags):
        assert tags[T_APPROVAL] == "approved" and tags["flywheel.approval.by"] == "ana"
        assert tags["flywheel.approval.reason"] == "ladder looks right" and tags["flywheel.approval.at"].endswith("Z")
        assert tags[T_PROMOTION].startswith("promoted: approved by ana: ladder looks right (gate recommended promote")
    assert decide(tracker, 0, True, "ladder looks right", "ana").promoted  # recorded once: a rerun carries it out
    with pytest.raises(FlywheelError, match=r"^round 0: fw-rl v1 was decided already \(promoted: approved by ana"):
        decide(tracker, 0, False, "changed my mind", "bo")

    _, r1, d1 = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.45, reference_version=str(r0.version))
    assert d1.awaiting and d1.promoted  # the gate would promote it...
    rejected = decide(tracker, 1, False, "regresses on our private set", "bo")
    assert not rejected.promoted and _reference(tracker) == str(r0.version)  # ...the person did not
    tags = tracker.client.get_model_version("fw-rl", r1.version).tags
    assert tags[T_APPROVAL] == "rejected" and tags[T_PROMOTION].startswith("rejected: rejected by bo: regresses")
    with pytest.raises(FlywheelError, match=r"a rejection stands; to promote it anyway, rerun the round with force"):
        decide(tracker, 1, True, "changed my mind", "bo")
    assert next_round(tracker).round == 2 and next_round(tracker).reference_version == f"fw-rl/{r0.version}"
    with pytest.raises(FlywheelError, match=r"^round 3 has no RL model|^--round: round 3 has no RL model"):
        decide(tracker, 3, True, "x", "ana")
    with pytest.raises(FlywheelError, match=r"^--reason: say why"):
        decide(tracker, 1, True, "  ", "ana")


def test_a_candidate_with_non_finite_weights_cannot_be_approved(tmp_path, checkpoints):  # noqa: F811
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "damaged-ckpt"
    bad.mkdir()
    for f in checkpoints[1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())

    def damage() -> None:  # after registration (which refuses non-finite weights), before the gate
        weights = load_file(str(bad / "model.safetensors"))
        weights[next(iter(weights))][0] = float("nan")
        save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})

    tracker = open_tracker(small_config(tmp_path / "h", name="fw", promotion={"approval": "required"},
                                        tracking={"register_by_reference": True}))
    _, _, d = simulate_round(tracker, 0, checkpoints[0], bad, 0.30, before_promote=damage)
    assert d.awaiting and not d.promoted and "non-finite" in d.reason
    with pytest.raises(FlywheelError, match=r"^round 0: fw-rl v1 cannot be approved: reject: tensor"):
        decide(tracker, 0, True, "ship it", "ana")
    assert not decide(tracker, 0, False, "broken weights", "ana").promoted


def test_a_rollback_restores_the_replaced_reference_records_why_on_both_and_the_next_round_plans_with_it(
        tmp_path, checkpoints):  # noqa: F811
    tracker = open_tracker(small_config(tmp_path / "h", name="fw"))
    _, r0, _ = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    with pytest.raises(FlywheelError, match=r"replaced no earlier reference \(it is the first\); pass --to VERSION"):
        rollback(tracker, "nothing before it")
    _, r1, d1 = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.45, reference_version=str(r0.version))
    assert d1.promoted and _reference(tracker) == str(r1.version)

    done = rollback(tracker, "users report worse answers", by="ana")
    assert (done.left, done.restored) == (str(r1.version), str(r0.version)) and _reference(tracker) == str(r0.version)
    left = tracker.client.get_model_version("fw-rl", r1.version).tags["flywheel.rolled_back"]
    back = tracker.client.get_model_version("fw-rl", r0.version).tags["flywheel.restored"]
    assert left.startswith(f"to v{r0.version} by ana at ") and left.endswith(": users report worse answers")
    assert back.startswith(f"from v{r1.version} by ana at ")
    assert any(f"restored as @reference from v{r1.version}" in line for line in lineage(tracker))
    assert any("rolled back to v" in line for line in lineage(tracker, str(r1.version)))
    from flywheel.round.plan import plan_round

    plan = plan_round(tracker.cfg)  # what the next round's flow runs first
    assert plan.round == 2 and plan.reference_version == f"fw-rl/{r0.version}"  # planned with the restored one
    assert plan.reference_path is not None and (plan.reference_path / "config.json").exists()
    with pytest.raises(FlywheelError, match=r"^--to: fw-rl has no version 9"):
        rollback(tracker, "x", to="9")
    with pytest.raises(FlywheelError, match=r"is the reference already"):
        rollback(tracker, "x", to=str(r0.version))


def test_promote_without_rollback_and_approve_of_a_round_that_does_not_wait_are_one_sentence_exit_2(
        tmp_path, checkpoints, capsys):  # noqa: F811
    cfg = small_config(tmp_path / "h", name="fw")
    tracker = open_tracker(cfg)
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    config = tmp_path / "fw.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["promote", str(config), "--reason", "x"]) == 2
    assert main(["approve", str(config), "--round", "0", "--approve", "--reason", "ok"]) == 2
    err = capsys.readouterr().err
    assert "promote: rounds promote through their gate" in err and "pass --rollback" in err
    assert "round 0: fw-rl v1 was decided by its gate" in err and "Traceback" not in err
    assert main(["promote", str(config), "--rollback", "--reason", "x"]) == 2  # the first reference: nothing before it


def _bpb_items(folder: Path, bpb: list[float], acc: float) -> str:
    """Per-item scores: world_gsm's bits per byte (given per item) and exact match, world_mc's accuracy."""
    n = len(bpb)
    right = {str(i): float(i < round(acc * n)) for i in range(n)}
    items = {"protocol": {"tasks": ["world"], "limit": None, "num_fewshot": None, "kind": "post"},
             "top": ["world_gsm", "world_mc"], "groups": {},
             "scores": {"world_gsm": {"exact_match": right, "bpb": {str(i): b for i, b in enumerate(bpb)}},
                        "world_mc": {"acc": right}}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"items-{sum(bpb):.4f}-{acc}.json"
    path.write_text(json.dumps(items))
    return str(path)


def test_a_lower_is_better_gate_promotes_lower_bits_per_byte_rejects_higher_and_shows_both_readings(
        tmp_path, checkpoints):  # noqa: F811
    import numpy as np

    promotion = {"metric": BPB, "rule": "superior", "guards": [{"metric": "eval/avg", "max_drop": 0.05}]}
    tracker = open_tracker(small_config(tmp_path / "h", name="fw", promotion=promotion))
    rng = np.random.default_rng(0)
    base = rng.uniform(0.8, 1.2, 200)

    def round_(n, ckpts, bpb, acc):
        items = _bpb_items(tmp_path / "items" / str(n), list(bpb), acc)
        return simulate_round(tracker, n, *ckpts, acc, metrics={BPB: float(np.mean(bpb)), "eval/avg": acc},
                              items_uri=items)

    _, r0, _ = round_(0, (checkpoints[0], checkpoints[1]), base, 0.30)
    _, r1, lower = round_(1, (checkpoints[2], checkpoints[3]), base - 0.01, 0.30)  # 1% better on every item
    assert lower.promoted and lower.interval.high < 0 and "(superior (lower is better))" in lower.reason
    _, r2, higher = round_(2, (checkpoints[4], checkpoints[5]), base + 0.005, 0.30)
    assert not higher.promoted and higher.interval.low > 0 and "high end >= +0" in higher.reason
    assert set(lower.readings) == {BPB, "eval/avg"}  # the guard's interval is measured beside the metric's
    assert lower.readings["eval/avg"].delta == 0.0
    table = compare(tracker, out_dir=tmp_path / "rep").text.splitlines()
    bpb_row = next(line for line in table if line.startswith(f"gate: {BPB}"))
    assert bpb_row.split(" | ")[2].startswith("-0.0100 ± ")
    assert any(line.startswith("gate: eval/avg") for line in table)
    assert _reference(tracker) == str(r1.version)


def test_the_gold_solutions_bits_per_byte_is_a_gate_metric_only_while_the_evaluation_reports_it(tmp_path):
    from flywheel.round.checks import check_gate_metric

    check_gate_metric(small_config(tmp_path, promotion={"metric": BPB}))
    check_gate_metric(small_config(tmp_path, promotion={"guards": [{"metric": BPB, "max_drop": 0.01}]}))
    off = small_config(tmp_path, promotion={"metric": BPB}, evaluation={"likelihood": False})
    with pytest.raises(FlywheelError, match=r"^promotion.metric: 'eval/world_gsm/bpb' is not a metric the evaluation"):
        check_gate_metric(off)
    with pytest.raises(FlywheelError, match=r"'eval/world_mc/bpb' is not a metric"):  # multiple choice: no gold text
        check_gate_metric(small_config(tmp_path, promotion={"metric": "eval/world_mc/bpb"}))
