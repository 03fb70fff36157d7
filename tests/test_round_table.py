"""The one stage table drives every runner: the direct runner, the Prefect flow and the launched-stage worker."""

from __future__ import annotations

import json

import pytest
import yaml

from flywheel.config import LAUNCH_STAGES
from flywheel.errors import FlywheelError
from flywheel.round.table import STAGES, Stage
from flywheel.tracking.registry import RoundPlan

from .conftest import small_config


def test_the_table_names_the_tasks_the_ui_knows_and_every_launchable_stage():
    assert [s.task for s in STAGES] == ["score-reference", "midtrain", "evaluate", "posttrain", "evaluate", "promote"]
    assert [s.name for s in STAGES] == ["score_reference", "midtrain", "evaluate/base", "posttrain", "evaluate/post",
                                        "promote"]
    assert {s.launch for s in STAGES if s.launch} == set(LAUNCH_STAGES)  # what launch.stages accepts
    seen: set[str] = set()
    for stage in STAGES:  # a stage reads only what the stages before it returned
        assert set(stage.needs) <= seen, stage.name
        seen.add(stage.key)


def test_a_round_plan_survives_its_json_boundary(tmp_path):
    plan = RoundPlan(2, "fw-rl/3", tmp_path / "ref", "/base", "4", resumed=True)
    assert RoundPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert RoundPlan.from_json({"round": 0}) == RoundPlan(0)


def _fake_stages(calls: list) -> tuple[Stage, ...]:
    """A table of stages that only record how they were called, in the shape the flow's report reads."""

    def stage(name: str, key: str, result: dict, needs: tuple[str, ...] = (), **kw) -> Stage:
        def run(cfg, plan, **arguments):
            calls.append((name, plan.round, arguments))
            return result

        return Stage(name, name.replace("/", "-"), key, run, needs=needs, **kw)

    return (
        stage("never", "never", {"ran": True}, applies=lambda cfg, plan: False, skipped={"ran": False}),
        stage("train", "base", {"checkpoint": "ckpt", "note": "a note"}),
        stage("judge/base", "base_eval", {"metrics": {"eval/avg": 0.1}}, needs=("base",),
              inputs=lambda got: {"checkpoint": got["base"]["checkpoint"]}),
        stage("added", "extra", {"extra": 1}, needs=("base", "base_eval")),
        stage("judge/post", "post_eval", {"metrics": {"eval/avg": 0.2}}),
        stage("decide", "decision", {"promoted": False, "reason": "kept"}, needs=("post_eval",)),
    )


def test_the_direct_runner_runs_the_tables_stages_in_order_including_one_added_in_a_test(tmp_path):
    from flywheel.round.direct import run_round_direct

    calls: list = []
    out = run_round_direct(small_config(tmp_path, name="direct"), stages=_fake_stages(calls))
    assert [c[0] for c in calls] == ["train", "judge/base", "added", "judge/post", "decide"]
    assert calls[1][2] == {"checkpoint": "ckpt"}
    assert calls[2][2] == {"base": {"checkpoint": "ckpt", "note": "a note"}, "base_eval": {"metrics": {"eval/avg": 0.1}}}
    assert out["never"] == {"ran": False} and out["extra"] == {"extra": 1} and out["round"] == 0


def test_the_flow_runs_the_tables_stages_as_prefect_tasks_in_order(tmp_path, monkeypatch):
    import flows.round

    calls: list = []
    monkeypatch.setattr(flows.round, "STAGES", _fake_stages(calls))
    config = tmp_path / "flow.yaml"
    config.write_text(yaml.safe_dump({"name": "flow", "home": str(tmp_path / "home")}))
    out = flows.round.flywheel_round(str(config))
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # the run's log lines reach the temporary server while it still listens
    assert [c[0] for c in calls] == ["train", "judge/base", "added", "judge/post", "decide"]
    assert out["extra"] == {"extra": 1} and out["never"] == {"ran": False}
    assert out["decision"]["reason"] == "kept" and out["round"] == 0


def test_the_launched_worker_runs_the_tables_entry_named_on_its_command_line(tmp_path, monkeypatch):
    from flywheel.launch.worker import run_launched_stage
    from flywheel.round import table

    calls: list = []
    monkeypatch.setattr(table, "STAGES", tuple(s if s.name != "train" else Stage(
        s.name, s.task, s.key, s.run, launch="train") for s in _fake_stages(calls)))
    cfg = small_config(tmp_path, name="worker")
    payload = {"config": cfg.model_dump(mode="json"), "plan": RoundPlan(3, base="/b").to_json(), "checkpoint": "c"}
    (tmp_path / "input.json").write_text(json.dumps(payload))
    run_launched_stage("train", tmp_path / "input.json", tmp_path / "result.json")
    assert calls == [("train", 3, {"checkpoint": "c"})]
    assert json.loads((tmp_path / "result.json").read_text()) == {"checkpoint": "ckpt", "note": "a note"}
    with pytest.raises(FlywheelError, match="stage: unknown stage 'judge'"):
        run_launched_stage("judge", tmp_path / "input.json", tmp_path / "result.json")
