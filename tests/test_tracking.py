"""Lineage and promotion against a real MLflow (SQLite in a temp dir, and one real `mlflow server`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.errors import FlywheelError
from flywheel.tracking.compare import compare, log_round_metrics
from flywheel.tracking.registry import (
    T_BASE_SOURCE,
    T_BASE_VERSION,
    T_DATA,
    T_PROMOTION,
    T_REFERENCE,
    base_model_name,
    get_alias,
    lineage,
    next_round,
    promote,
    register_checkpoint,
    rl_model_name,
    version_path,
)
from flywheel.tracking.store import open_tracker
from flywheel.tracking.ui import stop, wait_for_server
from flywheel.world.model import tiny_random_model

from .conftest import small_config


@pytest.fixture(scope="module")
def checkpoints(small_world, tmp_path_factory):
    """Real tiny checkpoints (random Llamas with the world tokenizer), one per simulated stage output."""
    _, report = small_world
    tok = AutoTokenizer.from_pretrained(report.paths.tokenizer)
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i in range(8):
        folder = root / f"ckpt-{i}"
        tiny_random_model("llama", tok, seed=i, hidden=32, layers=1).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[i] = folder
    return out


def items_file(folder: Path, score: float, n: int = 200, protocol: dict | None = None) -> str:
    """Per-item scores of two tasks whose means are `score` (the first round(score·n) items right), as evaluate writes."""
    import json

    right = round(score * n)
    per_item = {str(i): float(i < right) for i in range(n)}
    items = {"protocol": protocol or {"tasks": ["world"], "limit": None, "num_fewshot": None, "kind": "post"},
             "top": ["world_gsm", "world_mc"], "groups": {},
             "scores": {"world_gsm": {"exact_match": per_item}, "world_mc": {"acc": per_item}}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"items-{score}-{n}-{abs(hash(json.dumps(items, sort_keys=True)))}.json"
    path.write_text(json.dumps(items))
    return str(path)


def simulate_round(tracker, round_n, base_ckpt, rl_ckpt, score, reference_version=None, key=None, metrics=None,
                   items_uri=None, before_promote=None):
    """What a round leaves in MLflow: a mid-trained base, an RL candidate, evaluation, promotion.

    `items_uri`: a per-item scores file (default: one whose mean is `score`), or "" for an evaluation without them.
    `before_promote`: called between registration and the gate (to damage a checkpoint registered by reference).
    """
    cfg = tracker.cfg
    items_uri = items_file(cfg.home / "items", score) if items_uri is None else items_uri
    key = key or f"r{round_n}"
    with tracker.stage_run(round_n, "midtrain", {"midtrain": cfg.midtrain.model_dump(mode="json")}) as run:
        tracker.log_history(run, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
        base_v = register_checkpoint(tracker, model=base_model_name(cfg), checkpoint=base_ckpt, run_id=run,
                                     round_n=round_n, stage="midtrain", key=f"base-{key}",
                                     tags={T_REFERENCE: reference_version or "none",
                                           T_BASE_SOURCE: cfg.model.source, T_DATA: "data123"})
    with tracker.stage_run(round_n, "posttrain/sft") as run:
        rl_v = register_checkpoint(tracker, model=rl_model_name(cfg), checkpoint=rl_ckpt, run_id=run,
                                   round_n=round_n, stage="posttrain", key=f"rl-{key}",
                                   tags={T_BASE_VERSION: str(base_v.version), T_BASE_SOURCE: cfg.model.source},
                                   candidate=True)
    log_round_metrics(tracker, round_n, {"eval/avg": score - 0.05}, "base")
    log_round_metrics(tracker, round_n, {"eval/avg": score, "eval/world_gsm/exact_match": score}, "post")
    if items_uri:  # what stage_evaluate does: the per-item scores are an artefact of the evaluation run
        with tracker.stage_run(round_n, "evaluate/post") as run:
            tracker.log_artifact(run, Path(items_uri), "eval")
            items_uri = tracker.artifact_uri(run, f"eval/{Path(items_uri).name}")
    if before_promote is not None:
        before_promote()
    with tracker.stage_run(round_n, "promote"):
        decision = promote(tracker, rl_v, metrics or {"eval/avg": score}, round_run_id=tracker.round_run(round_n),
                           items_uri=items_uri or None)
    return base_v, rl_v, decision


@pytest.fixture
def tracker(tmp_path):
    return open_tracker(small_config(tmp_path / "home", name="fw"))


def test_two_rounds_leave_tags_aliases_and_lineage(tracker, checkpoints):
    assert next_round(tracker).round == 0
    b0, r0, d0 = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.20)
    assert d0.promoted and "first reference" in d0.reason
    plan = next_round(tracker)
    assert plan.round == 1 and plan.reference_version == f"fw-rl/{r0.version}"
    b1, r1, d1 = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.30, reference_version=str(r0.version))
    assert d1.promoted
    client = tracker.client
    assert client.get_model_version_by_alias("fw-rl", "reference").version == r1.version
    assert client.get_model_version_by_alias("fw-rl", "round-1").version == r1.version
    assert client.get_model_version_by_alias("fw-base", "round-0").version == b0.version
    assert get_alias(tracker, "fw-rl", "candidate") is None  # promotion decided
    base1 = client.get_model_version("fw-base", b1.version)
    for tag in ("flywheel.round", "flywheel.stage", "flywheel.reference_version", "flywheel.base_source",
                "flywheel.data_fingerprint", "flywheel.config_hash", "flywheel.code_version", "flywheel.run_id"):
        assert tag in base1.tags, tag
    assert base1.tags["flywheel.reference_version"] == str(r0.version)  # round 1 guided by round 0's RL model
    assert client.get_model_version("fw-base", b0.version).tags["flywheel.reference_version"] == "none"
    chain = lineage(tracker)
    assert chain[0].startswith(f"fw-rl v{r1.version} (round 1")
    assert f"guided by fw-rl v{r0.version}" in chain[1]
    assert "NTP, no reference" in chain[3] and chain[-1].startswith("  ← pre-anneal base world:nano")
    with pytest.raises(FlywheelError, match=r"^fw-rl: version 99 does not exist; run `flywheel lineage CONFIG`"):
        lineage(tracker, "99")
    stages = {r.data.tags["flywheel.stage"] for r in tracker.stage_runs(1)}
    assert stages == {"midtrain", "posttrain/sft", "evaluate/post", "promote"}
    midtrain_run = next(r for r in tracker.stage_runs(1) if r.data.tags["flywheel.stage"] == "midtrain")
    assert midtrain_run.data.params["midtrain.epsilon"] == "0.2"
    assert [m.value for m in client.get_metric_history(midtrain_run.info.run_id, "loss")] == [3.0, 2.5]


def test_gate_refuses_a_regression_records_why_and_force_overrides(tracker, checkpoints):
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    ref_before = str(tracker.client.get_model_version_by_alias("fw-rl", "reference").version)
    _, bad, decision = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.10, reference_version=ref_before)
    assert not decision.promoted
    assert str(tracker.client.get_model_version_by_alias("fw-rl", "reference").version) == ref_before
    tag = tracker.client.get_model_version("fw-rl", bad.version).tags[T_PROMOTION]
    assert tag.startswith("rejected: eval/avg 0.1000 vs reference v1 0.3000, Δ -0.2000 ± ")
    assert "low end <= -0.02 (noninferior)" in tag
    assert tracker.round_runs()[1].data.tags[T_PROMOTION] == tag
    forced = promote(tracker, bad, {"eval/avg": 0.10}, force=True)
    assert forced.promoted and "forced" in forced.reason
    assert tracker.client.get_model_version_by_alias("fw-rl", "reference").version == bad.version


def test_the_paired_gate_records_its_interval_on_the_version_and_round_run_and_the_table_shows_it(tracker, checkpoints,
                                                                                                  tmp_path):
    from flywheel.tracking.registry import T_GATE, T_ITEMS

    _, r0, _ = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    _, r1, d1 = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.45, reference_version=str(r0.version))
    assert d1.promoted and d1.interval.low > 0.1  # 30 more items of 200 right on both tasks
    version = tracker.client.get_model_version("fw-rl", r1.version)
    run_tags = tracker.round_runs()[1].data.tags
    for tags in (version.tags, run_tags):
        assert tags[T_GATE + "rule"] == "noninferior" and tags[T_GATE + "items"] == "400"
        assert float(tags[T_GATE + "delta"]) == pytest.approx(0.15)
        assert float(tags[T_GATE + "ci_low"]) < 0.15 < float(tags[T_GATE + "ci_high"])
    assert version.tags[T_ITEMS].endswith("/eval/" + Path(version.tags[T_ITEMS]).name)  # an artefact of the run
    row = next(line for line in compare(tracker, out_dir=tmp_path / "rep").text.splitlines() if line.startswith("gate"))
    ratio = 0.15 / d1.interval.half_width
    assert row.split(" | ")[:3] == ["gate: eval/avg Δ ± half-width (ratio)", "–",
                                    f"+0.1500 ± {d1.interval.half_width:.4f} ({ratio:.2f})"]


def test_a_reference_of_another_protocol_or_without_items_is_refused_unless_forced_or_point(tmp_path, checkpoints):
    tracker = open_tracker(small_config(tmp_path / "h", name="fw"))
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    other = items_file(tmp_path / "x", 0.50, protocol={"tasks": ["world"], "limit": 50, "num_fewshot": None,
                                                        "kind": "post"})
    _, _, d = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.50, items_uri=other)
    assert not d.promoted and d.reason.startswith("cannot compare: reference v1 was evaluated under another protocol")
    assert "limit None vs 50 now" in d.reason and d.reason.endswith("kept v1")
    _, _, d = simulate_round(tracker, 2, checkpoints[4], checkpoints[5], 0.50, items_uri="")
    assert not d.promoted and "the candidate has no per-item evaluation scores" in d.reason
    forced = open_tracker(small_config(tmp_path / "h", name="fw", promotion={"force": True}))
    _, v3, d = simulate_round(forced, 3, checkpoints[6], checkpoints[7], 0.50, items_uri="")
    assert d.promoted and d.reason.startswith("forced")
    # the reference (v4) now has no items: the paired rules refuse, the point rule compares the values
    point = open_tracker(small_config(tmp_path / "h", name="fw", promotion={"rule": "point"}))
    _, _, d = simulate_round(point, 4, checkpoints[0], checkpoints[2], 0.55, key="r4p")
    assert d.promoted and d.reason.startswith("eval/avg 0.5500 >= reference v4 0.5000")


def test_min_delta_tolerates_a_small_drop(tmp_path, checkpoints):
    tracker = open_tracker(small_config(tmp_path / "h", name="fw", promotion={"min_delta": 0.05, "rule": "point"}))
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    _, _, decision = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.27)
    assert decision.promoted and "eval/avg 0.2700 >= reference v1 0.3000 - min_delta 0.05" in decision.reason


def test_a_guard_rejects_an_otherwise_better_candidate_and_the_decision_names_the_guard(tmp_path, checkpoints):
    guard = {"metric": "eval/world_mc/acc", "max_drop": 0.02}
    tracker = open_tracker(small_config(tmp_path / "h", name="fw", promotion={"guards": [guard]}))
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30,
                   metrics={"eval/avg": 0.30, "eval/world_mc/acc": 0.50})
    ref = str(tracker.client.get_model_version_by_alias("fw-rl", "reference").version)
    # round 1 is better on the main metric but its guarded metric falls 0.05 > 0.02
    _, worse, decision = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.40,
                                        metrics={"eval/avg": 0.40, "eval/world_mc/acc": 0.45})
    assert not decision.promoted
    assert "guard eval/world_mc/acc dropped 0.0500" in decision.reason and "max_drop 0.02" in decision.reason
    assert str(tracker.client.get_model_version_by_alias("fw-rl", "reference").version) == ref
    assert tracker.client.get_model_version("fw-rl", worse.version).tags[T_PROMOTION].startswith(
        "rejected: eval/avg 0.4000 passed, but guard eval/world_mc/acc")
    # round 2: the same gain with the guarded metric inside its max_drop is promoted
    _, _, decision = simulate_round(tracker, 2, checkpoints[4], checkpoints[5], 0.40,
                                    metrics={"eval/avg": 0.40, "eval/world_mc/acc": 0.49})
    assert decision.promoted and "guard eval/world_mc/acc held" in decision.reason


def test_guards_are_checked_against_the_evaluation_before_any_work(tmp_path):
    from flywheel.round.checks import check_gate_metric

    ok = small_config(tmp_path, promotion={"guards": [{"metric": "eval/world_mc/acc", "max_drop": 0.01}]})
    check_gate_metric(ok)
    bad = small_config(tmp_path, promotion={"guards": [{"metric": "eval/world_mc/accuracy"}]})
    with pytest.raises(FlywheelError, match=r"^promotion.guards.0.metric: 'eval/world_mc/accuracy' is not a metric"):
        check_gate_metric(bad)
    with pytest.raises(FlywheelError, match="already the promotion metric"):
        small_config(tmp_path, promotion={"guards": [{"metric": "eval/avg"}]})


def test_unknown_promotion_metric_is_a_clear_error(tracker, checkpoints):
    _, rl, _ = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.3)
    with pytest.raises(FlywheelError, match="promotion.metric: 'eval/avg' is not among"):
        promote(tracker, rl, {"eval/other": 1.0})


def test_racing_promotions_leave_one_consistent_winner_and_both_recorded(tracker, checkpoints):
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.20)
    cfg = tracker.cfg
    versions = []
    for rnd, r in ((1, 3), (2, 5)):
        with tracker.stage_run(rnd, "posttrain") as run:
            versions.append(register_checkpoint(tracker, model=rl_model_name(cfg), checkpoint=checkpoints[r],
                                                run_id=run, round_n=rnd, stage="posttrain", key=f"race{rnd}",
                                                tags={}))
    scores = {str(versions[0].version): 0.30, str(versions[1].version): 0.25}
    barrier = threading.Barrier(2)
    decisions = {}

    def race(v):
        t = open_tracker(cfg)  # each contender has its own client, as two workers would
        barrier.wait()
        score = scores[str(v.version)]
        decisions[str(v.version)] = promote(t, v, {"eval/avg": score}, items_uri=items_file(cfg.home / "race", score))

    threads = [threading.Thread(target=race, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(decisions) == set(scores)
    winner = str(tracker.client.get_model_version_by_alias("fw-rl", "reference").version)
    assert decisions[winner].promoted
    for v in versions:  # both decisions are recorded on their versions
        assert tracker.client.get_model_version("fw-rl", v.version).tags[T_PROMOTION].startswith(
            "promoted" if decisions[str(v.version)].promoted else "rejected")
    # Consistent with one serial order: the loser either was rejected against the winner, or was
    # promoted first and then replaced by the winner (which compared against it).
    loser = next(v for v in scores if v != winner)
    assert (not decisions[loser].promoted and decisions[loser].previous_version == winner) or \
           (decisions[loser].promoted and decisions[winner].previous_version == loser)


def test_rerunning_a_registration_does_not_duplicate_versions(tracker, checkpoints):
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.2, key="same")
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.2, key="same")
    assert len(tracker.client.search_model_versions("name = 'fw-rl'")) == 1
    assert len(tracker.client.search_model_versions("name = 'fw-base'")) == 1


def test_reference_loads_back_with_download_artifacts_and_from_pretrained(tracker, checkpoints, monkeypatch):
    import mlflow
    import torch

    from flywheel.tracking.store import tracking_uri

    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.2)
    # What a user does before loading by alias; mlflow exports these to the environment, so let
    # monkeypatch restore them and keep other tests on their own stores.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tracker.cfg))
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking_uri(tracker.cfg))
    mlflow.set_tracking_uri(tracking_uri(tracker.cfg))
    mlflow.set_registry_uri(tracking_uri(tracker.cfg))
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/fw-rl@reference")
    model = AutoModelForCausalLM.from_pretrained(local)
    original = AutoModelForCausalLM.from_pretrained(checkpoints[1])
    for (n, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    ref = get_alias(tracker, "fw-rl", "reference")
    assert (version_path(tracker, ref) / "model.safetensors").exists()


def test_register_by_reference_points_at_the_folder_without_copying(tmp_path, checkpoints):
    tracker = open_tracker(small_config(tmp_path / "h", name="fw", tracking={"register_by_reference": True}))
    _, rl, _ = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.2)
    assert version_path(tracker, rl) == checkpoints[1].resolve()
    assert not list((tmp_path / "h" / "mlflow" / "artifacts").rglob("model.safetensors"))


def test_next_round_with_start_from_previous_uses_the_previous_rounds_base(tmp_path, checkpoints):
    tracker = open_tracker(small_config(tmp_path / "h", name="fw", midtrain={"start_from": "previous"}))
    b0, _, _ = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.2)
    plan = next_round(tracker)
    assert plan.round == 1 and plan.base_version == str(b0.version)
    assert (Path(plan.base) / "config.json").exists()


def test_compare_tabulates_deltas_writes_a_png_and_logs_both(tracker, checkpoints, tmp_path):
    r0 = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.20)[1]
    simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.35, reference_version=str(r0.version))
    result = compare(tracker, out_dir=tmp_path / "rep")
    assert result.rounds == [0, 1]
    row = next(line for line in result.text.splitlines() if line.startswith("post/eval/avg |"))
    assert row.split(" | ") == ["post/eval/avg", "0.2000", "0.3500", "+0.1500", "+0.1500"]
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arts = {a.path for a in tracker.client.list_artifacts(tracker.summary_run(), "comparison")}
    assert arts == {"comparison/fw-rounds.png", "comparison/fw-rounds.md"}
    history = tracker.client.get_metric_history(tracker.summary_run(), "post/eval/avg")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.20), (1, 0.35)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_code_works_against_a_real_mlflow_server(tmp_path, checkpoints):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", (tmp_path / "server-artifacts").as_uri()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/health", server, 90)
        cfg = small_config(tmp_path / "home", name="team", tracking={"uri": f"http://127.0.0.1:{port}"})
        tracker = open_tracker(cfg)
        from flywheel.round.plan import plan_round

        plan_round(cfg)  # what a round records first: its plan and its params
        _, r0, d0 = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.2)
        assert d0.promoted
        assert next_round(tracker).round == 1
        assert tracker.client.get_model_version_by_alias("team-rl", "reference").version == r0.version
        assert not (tmp_path / "home" / "mlflow").exists()  # nothing went to the embedded store
        # what MLflow's compare view reads back from the server: a finished round run with an end time, the
        # round's params, and each score as a curve (base → RL model) that its charts can draw
        run = tracker.client.get_run(tracker.round_run(0))
        assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
        assert run.data.params["objective"] == "ntp" and run.data.params["data_slice"] == "0"
        curve = tracker.client.get_metric_history(run.info.run_id, "pipeline/eval/avg")
        assert sorted((m.step, round(m.value, 4)) for m in curve) == [(0, 0.15), (1, 0.2)]
        summary = tracker.client.get_run(tracker.summary_run()).info
        assert summary.status == "FINISHED" and summary.end_time
    finally:
        stop([server])
