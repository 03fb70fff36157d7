"""The round as a state machine you can re-enter, a slot that cannot wedge, and a store that cannot lie.

Against a real MLflow (SQLite in a temp dir) with real tiny checkpoints; the slot with real
processes killed by SIGKILL and stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.errors import FlywheelError
from flywheel.round.checks import check_gate_metric
from flywheel.round.plan import T_PLAN, plan_round
from flywheel.slot import RoundSlot
from flywheel.tracking.registry import T_PROMOTION, get_alias, next_round, promote, rl_model_name
from flywheel.tracking.store import open_tracker

from .conftest import process_group_gone, small_config
from .test_tracking import checkpoints, simulate_round  # noqa: F401 - the module fixture is used below

HOLDER = """
import sys, time
from flywheel.config import validate_config
from flywheel.slot import RoundSlot
cfg = validate_config({"name": "slot", "home": sys.argv[1]})
with RoundSlot(cfg, flow_run_id="run-of-the-dead", say=lambda m: print(m, flush=True), poll=0.1, say_every=0.5):
    print("holding", flush=True)
    time.sleep(600)
"""


def _holder(home: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(home)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc


def _wait_line(proc: subprocess.Popen, text: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        assert line or proc.poll() is None, f"process ended before printing {text!r}"
    raise AssertionError(f"{text!r} not printed within {timeout} s")


def test_a_slot_held_by_a_killed_process_is_taken_at_once_and_names_the_dead(tmp_path):
    proc = _holder(tmp_path)
    try:
        _wait_line(proc, "holding")
        os.killpg(proc.pid, signal.SIGKILL)  # no cleanup: the record stays, the kernel drops the flock
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    cfg = small_config(tmp_path, name="slot")
    t0 = time.monotonic()
    with RoundSlot(cfg, say=lambda m: None, poll=0.1) as slot:
        took = time.monotonic() - t0
        assert [r["pid"] for r in slot.stale] == [proc.pid]
        assert slot.stale[0]["flow_run_id"] == "run-of-the-dead"
    assert took < 5, took
    with RoundSlot(cfg, say=lambda m: None) as again:  # the dead one is reported once, then forgotten
        assert again.stale == []


def test_a_waiting_trigger_says_who_holds_the_slot_and_exits_on_sigterm(tmp_path):
    cfg = small_config(tmp_path, name="slot")
    with RoundSlot(cfg, flow_run_id="the-holder", say=lambda m: None):
        waiter = _holder(tmp_path)
        try:
            _wait_line(waiter, f"held by pid {os.getpid()}")
            _wait_line(waiter, "waited")  # and again, every say_every seconds
            waiter.send_signal(signal.SIGTERM)
            assert waiter.wait(timeout=10) == -signal.SIGTERM
        finally:
            if waiter.poll() is None:
                os.killpg(waiter.pid, signal.SIGKILL)
    with RoundSlot(cfg, say=lambda m: None, poll=0.1) as slot:  # the waiter never held it: nothing to clean
        assert all(r["pid"] != os.getpid() for r in slot.stale)


def test_a_registered_candidate_without_a_verdict_is_the_round_in_progress(tmp_path, checkpoints):  # noqa: F811
    tracker = open_tracker(small_config(tmp_path / "h", name="fw"))
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    from flywheel.tracking.registry import T_BASE_VERSION, register_checkpoint

    with tracker.stage_run(1, "posttrain/sft") as run:  # round 1 killed right after its RL model was registered
        register_checkpoint(tracker, model="fw-rl", checkpoint=checkpoints[3], run_id=run, round_n=1,
                            stage="posttrain", key="rl-r1", tags={T_BASE_VERSION: "1"}, candidate=True)
    plan = next_round(tracker)
    assert plan.round == 1  # not 2: the round is finished first
    assert plan.reference_version == "fw-rl/1"


def test_a_rerun_reenters_the_recorded_plan_even_after_the_reference_moved(tmp_path, checkpoints):  # noqa: F811
    cfg = small_config(tmp_path / "h", name="fw")
    tracker = open_tracker(cfg)
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    p1 = plan_round(cfg)
    assert p1.round == 1 and p1.reference_version == "fw-rl/1"
    recorded = json.loads(tracker.round_runs()[1].data.tags[T_PLAN])
    assert recorded["reference_version"] == "fw-rl/1"
    # round 1's promote was killed after it moved @reference but before it recorded the round's verdict
    _, rl1, _ = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.50, reference_version="1")
    tracker.client.delete_tag(tracker.round_runs()[1].info.run_id, T_PROMOTION)
    again = plan_round(cfg)
    assert again.round == 1 and again.resumed
    assert again.reference_version == "fw-rl/1"  # the plan it started with, not the moved alias (v2)
    with pytest.raises(FlywheelError, match="round 1 is in progress"):
        plan_round(cfg, 2)


def test_promote_killed_after_its_verdict_carries_out_that_verdict_once(tmp_path, checkpoints):  # noqa: F811
    tracker = open_tracker(small_config(tmp_path / "h", name="fw"))
    _, rl0, _ = simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    _, rl1, first = simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.10, reference_version="1")
    assert not first.promoted
    # the same call again (what a rerun of a killed promote does) with different metrics: the verdict stands
    again = promote(tracker, rl1, {"eval/avg": 0.99})
    assert not again.promoted and again.reason == first.reason
    assert str(get_alias(tracker, rl_model_name(tracker.cfg), "reference").version) == str(rl0.version)


def test_a_nan_checkpoint_is_never_registered(tmp_path, checkpoints):  # noqa: F811
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from flywheel.tracking.registry import register_checkpoint

    bad = tmp_path / "nan"
    shutil.copytree(checkpoints[4], bad)
    weights = load_file(str(bad / "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name][0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    tracker = open_tracker(small_config(tmp_path / "h", name="fw"))
    with tracker.stage_run(0, "midtrain") as run, pytest.raises(FlywheelError, match=f"tensor '{name}'"):
        register_checkpoint(tracker, model="fw-base", checkpoint=bad, run_id=run, round_n=0, stage="midtrain",
                            key="k", tags={})
    assert tracker.client.search_model_versions("name = 'fw-base'") == []
    assert torch.isnan(weights[name]).any()


def test_an_unknown_gate_metric_fails_before_any_work(tmp_path):
    cfg = small_config(tmp_path, promotion={"metric": "eval/world_gsm/accuracy"})
    with pytest.raises(FlywheelError, match="promotion.metric: 'eval/world_gsm/accuracy' is not a metric.*"
                                            "eval/world_gsm/exact_match"):
        check_gate_metric(cfg)
    with pytest.raises(FlywheelError, match="names start with 'eval/'"):
        check_gate_metric(small_config(tmp_path, promotion={"metric": "avg"}))
    check_gate_metric(small_config(tmp_path, promotion={"metric": "eval/world_mc/acc_norm"}))
    check_gate_metric(small_config(tmp_path, evaluation={"tasks": ["gsm8k"]},
                                   promotion={"metric": "eval/gsm8k/exact_match_strict_match"}))
    assert not (tmp_path / "mlflow").exists()  # nothing was created


def test_a_lost_tracking_store_is_detected_not_restarted_at_round_0(tmp_path, checkpoints):  # noqa: F811
    cfg = small_config(tmp_path / "h", name="fw")
    tracker = open_tracker(cfg)
    plan_round(cfg)  # round 0 starts: the home's ledger remembers it
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    assert plan_round(cfg).round == 1
    # the store is lost: the home now meets an empty one (a new file; the old one may still be open here)
    lost = small_config(tmp_path / "h", name="fw", tracking={"uri": f"sqlite:///{tmp_path / 'empty.db'}"})
    with pytest.raises(FlywheelError, match=r"no record of round\(s\) 0, 1 that this home ran.*"
                                            r"only registration, evaluation and promotion are redone"):
        plan_round(lost)
    (cfg.home / "state" / "fw-rounds.json").unlink()  # the user chose to start again
    assert plan_round(lost).round == 0


def test_stage_runs_left_running_by_a_dead_process_are_marked_killed(tmp_path):
    cfg = small_config(tmp_path / "h", name="fw")
    tracker = open_tracker(cfg)
    parent = tracker.round_run(0)
    orphan = tracker.client.create_run(tracker.experiment_id, run_name="midtrain", tags={
        "flywheel.round": "0", "flywheel.stage": "midtrain", "mlflow.parentRunId": parent}).info.run_id
    plan_round(cfg)
    assert tracker.client.get_run(orphan).info.status == "KILLED"
    assert tracker.client.get_run(parent).info.status == "RUNNING"  # the round itself is still in progress


def test_sigterm_to_a_waiting_round_exits_143_and_leaves_no_prefect_server_behind(tmp_path):
    """The real CLI on Prefect's embedded temporary server: a stopped command leaves no child running."""
    import yaml

    config = tmp_path / "fw.yaml"
    config.write_text(yaml.safe_dump({"name": "fw", "home": str(tmp_path / "h")}))
    cfg = small_config(tmp_path / "h", name="fw")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with RoundSlot(cfg, flow_run_id="the-holder", say=lambda m: None):
        proc = subprocess.Popen([str(Path(sys.executable).parent / "flywheel"), "round", str(config)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            _wait_line(proc, "waiting for the round slot of flywheel 'fw'", timeout=180)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 143
            assert process_group_gone(proc.pid), "a process of the stopped round's group (its server) still runs"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_round_runs_hold_the_rounds_params_and_end_failed_then_finished_with_an_end_time(tmp_path, checkpoints):  # noqa: F811
    cfg = small_config(tmp_path / "h", name="fw")
    tracker = open_tracker(cfg)
    plan_round(cfg)
    params = tracker.round_runs()[0].data.params
    assert {k: params[k] for k in ("objective", "epsilon", "token_budget", "data_slice", "reference_version",
                                   "promotion_rule")} == {
        "objective": "ntp", "epsilon": "0.2", "token_budget": str(cfg.midtrain.token_budget), "data_slice": "0",
        "reference_version": "none", "promotion_rule": "noninferior"}
    assert params["config_hash"] == cfg.section_hash() and params["code_version"]
    simulate_round(tracker, 0, checkpoints[0], checkpoints[1], 0.30)
    p1 = plan_round(cfg)
    run1 = tracker.round_run(1)
    with pytest.raises(RuntimeError), tracker.stage_run(1, "midtrain"):  # a stage that fails fails its round
        raise RuntimeError("out of memory")
    assert tracker.client.get_run(run1).info.status == "FAILED"
    again = plan_round(cfg)  # the rerun resumes the round; its params stay the ones it started with
    assert again.resumed and again.reference_version == p1.reference_version
    simulate_round(tracker, 1, checkpoints[2], checkpoints[3], 0.35, reference_version="1")
    info = tracker.client.get_run(run1).info
    assert info.status == "FINISHED" and info.end_time >= info.start_time
    params1 = tracker.client.get_run(run1).data.params
    assert (params1["objective"], params1["data_slice"], params1["reference_version"]) == ("remit", "1", "fw-rl/1")
