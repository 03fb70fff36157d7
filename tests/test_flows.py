"""The flywheel through Prefect for real: a server on 127.0.0.1, deployments, triggers, a crash and a resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flywheel.tracking.ui import stop, wait_for_server

from .conftest import SMALL_WORLD

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A round small enough for the test suite: a few steps of every stage, a few eval items.
TINY_ROUND = {
    "midtrain": {"token_budget": 8192, "seq_len": 128, "batch_size": 8, "checkpoint_every": 4},
    "posttrain": {"stages": [
        {"kind": "sft", "max_steps": 3, "batch_size": 8},
        {"kind": "grpo", "max_steps": 2, "batch_size": 8, "lr": 5e-5,
         "args": {"num_generations": 4, "max_completion_length": 16}},
    ]},
    "evaluation": {"tasks": ["world"], "limit": 5, "batch_size": 16},
    "promotion": {"min_delta": 1.0},  # always promote, so the test does not depend on tiny-model noise
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 with its own PREFECT_HOME; this process talks to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/health", proc)
        api = f"http://127.0.0.1:{port}/api"
        storage = str(home / "storage")
        keys = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH")
        old = {k: os.environ.get(k) for k in keys}
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=storage)  # children
        # Prefect froze its settings when another test module first imported it: update them in this process too.
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_HOME,
            PREFECT_LOCAL_STORAGE_PATH,
            temporary_settings,
        )

        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_HOME: str(home),
                                         PREFECT_LOCAL_STORAGE_PATH: storage}):
            yield api
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # send queued run logs while the server still listens
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        stop([proc])


def write_config(path: Path, home: Path, name: str, **extra) -> Path:
    doc = {"name": name, "seed": 0, "home": str(home), "world": dict(SMALL_WORLD), **TINY_ROUND, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def _registry(cfg_path: Path):
    from flywheel.config import load_config
    from flywheel.tracking.store import open_tracker

    return open_tracker(load_config(cfg_path))


def _wait_for_deployments(server: subprocess.Popen, log: Path) -> None:
    """`flywheel serve` registers both deployments, then polls: wait until the server knows them."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + 180
    with get_client(sync_client=True) as client:
        for name in ("flywheel-round/flywheel-round", "flywheel-round/flywheel-scheduled"):
            while True:
                tail = log.read_text()[-2000:]
                assert server.poll() is None, f"flywheel serve exited: {tail}"
                try:
                    client.read_deployment_by_name(name)
                    break
                except ObjectNotFound:
                    assert time.time() < deadline, f"{name} was never registered: {tail}"
                    time.sleep(1)


def test_deployments_triggered_through_the_api_turn_the_flywheel(prefect_server, small_world, tmp_path):
    from prefect.deployments import run_deployment

    from flywheel.tracking.registry import lineage

    cfg, _ = small_world
    config = write_config(tmp_path / "fw.yaml", cfg.home, "served")
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed with the server
    server = subprocess.Popen([str(BIN / "flywheel"), "serve", str(config)], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect import get_client

        _wait_for_deployments(server, tmp_path / "serve.log")
        first = run_deployment("flywheel-round/flywheel-round", parameters={"config": str(config)}, timeout=600,
                               poll_interval=2)
        assert first.state.is_completed(), first.state
        # Two triggers at once, as from the UI and the schedule: they must become rounds 1 and 2.
        a = run_deployment("flywheel-round/flywheel-round", parameters={"config": str(config)}, timeout=0)
        b = run_deployment("flywheel-round/flywheel-scheduled", timeout=0)
        deadline = time.time() + 900
        with get_client(sync_client=True) as client:
            while True:
                states = [client.read_flow_run(r.id).state for r in (a, b)]
                if all(s.is_final() for s in states) or time.time() > deadline:
                    break
                time.sleep(2)
        assert all(s.is_completed() for s in states), states
    finally:
        stop([server])
        log.close()
    tracker = _registry(config)
    versions = tracker.client.search_model_versions("name = 'served-rl'")
    assert sorted(int(v.tags["flywheel.round"]) for v in versions) == [0, 1, 2]  # no round ran twice
    ref = tracker.client.get_model_version_by_alias("served-rl", "reference")
    assert ref.tags["flywheel.round"] == "2"
    base2 = tracker.client.get_model_version_by_alias("served-base", "round-2")
    round1_rl = tracker.client.get_model_version_by_alias("served-rl", "round-1")
    assert base2.tags["flywheel.reference_version"] == str(round1_rl.version)  # round 2 guided by round 1
    chain = lineage(tracker)
    assert "round 2" in chain[0] and f"guided by served-rl v{round1_rl.version}" in chain[1]
    # fresh data each round (data.per_round next_slice), the paired gate's numbers, the guidance's dynamics
    bases = tracker.client.search_model_versions("name = 'served-base'")
    assert sorted(v.tags["flywheel.data_slice"] for v in bases) == ["0", "1", "2"]
    assert len({v.tags["flywheel.data_fingerprint"] for v in bases}) == 3 and ", slice 2 (" in chain[1]
    for v in versions:
        assert v.tags["flywheel.promotion.rule"] == "noninferior"
        if v.tags["flywheel.round"] != "0":  # round 0 is the first reference: nothing to pair with
            low, high = float(v.tags["flywheel.promotion.ci_low"]), float(v.tags["flywheel.promotion.ci_high"])
            assert low <= float(v.tags["flywheel.promotion.delta"]) <= high
            assert v.tags["flywheel.promotion.items"] == "10"  # 5 items of each of the two world tasks
    summary = tracker.summary_run()
    steps = {m: sorted(x.step for x in tracker.client.get_metric_history(summary, m))
             for m in ("remit/weight_std", "remit/clip_high", "dynamics/kl_to_reference")}
    assert steps == {"remit/weight_std": [0, 1, 2], "remit/clip_high": [0, 1, 2], "dynamics/kl_to_reference": [1, 2]}
    # every training stage says how fast it ran, at the logging cadence (flywheel/perf.py)
    stages = {r.data.tags["flywheel.stage"]: r.info.run_id for r in tracker.stage_runs(2)}
    trained = [s for s in stages if s == "midtrain" or s.startswith("posttrain/")]
    assert "midtrain" in trained and len(trained) == 1 + len(TINY_ROUND["posttrain"]["stages"]), stages
    for stage in trained:
        speed = tracker.client.get_metric_history(stages[stage], "perf/tokens_per_s")
        assert speed and all(m.value > 0 for m in speed), (stage, speed)


def _wait_state(client, run_id, done, what: str, timeout: float = 600):  # noqa: ANN001, ANN202
    deadline = time.time() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and done(run.state):
            return run
        assert time.time() < deadline, f"flow run never {what}: {run.state}"
        time.sleep(1)


def _wait_for(condition, what: str, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"never saw {what}"
        time.sleep(1)


def _log_text(client, run_id) -> str:  # noqa: ANN001
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return "\n".join(entry.message for entry in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))


def _notify_automation(name: str):  # noqa: ANN202
    """The notification automation docs/rounds.md shows, created on the test's server (disabled: nothing is sent)."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import SlackWebhook
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger

    block_id = SlackWebhook(url="https://hooks.slack.com/services/T0/B0/x").save("flywheel-team", overwrite=True)
    return Automation(
        name=f"{name}: a round awaits approval", enabled=False,
        trigger=EventTrigger(expect={"flywheel.round.awaiting-approval"},
                             match={"prefect.resource.id": f"flywheel.{name}"}, posture="Reactive", threshold=1),
        actions=[SendNotification(block_document_id=block_id, subject=f"flywheel {name}",
                                  body="Round {{ event.payload.round }} awaits approval: {{ event.payload.reason }}")],
    ).create()


def test_a_served_round_with_approval_required_pauses_with_its_evidence_and_a_person_or_the_timeout_decides(
        prefect_server, small_world, tmp_path):
    """Round 0 approved on the pause form (through the API), round 1 rejected with `flywheel approve` while a trigger
    is turned away, round 2 rejected by the timeout; every outcome an event on the flywheel's resource."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.flow_runs import resume_flow_run

    from flows.approval import decide_from_terminal
    from flywheel.config import load_config

    cfg, _ = small_world
    promotion = {**TINY_ROUND["promotion"], "approval": "required", "approval_timeout": 60}
    config = write_config(tmp_path / "fw.yaml", cfg.home, "approved", promotion=promotion)
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed with the server
    server = subprocess.Popen([str(BIN / "flywheel"), "serve", str(config)], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tracker = _registry(config)

    def reference() -> str | None:
        from flywheel.tracking.registry import get_alias

        ref = get_alias(tracker, "approved-rl", "reference")
        return None if ref is None else str(ref.version)

    def trigger():  # noqa: ANN202
        return run_deployment("flywheel-round/flywheel-round", parameters={"config": str(config)}, timeout=0)

    try:
        _wait_for_deployments(server, tmp_path / "serve.log")
        automation = _notify_automation("approved")  # docs/rounds.md's example, against this server
        with get_client(sync_client=True) as client:
            r0 = _wait_state(client, trigger().id, lambda s: s.is_paused(), "paused")
            evidence = client.read_artifacts()
            text = next(a.data for a in evidence if a.key == "approved-round-0-approval")
            assert "The gate recommends **promote**: first reference of this flywheel" in text
            assert "flywheel approve CONFIG --round 0" in text and reference() is None  # nothing moved yet
            resume_flow_run(r0.id, run_input={"decision": "approve", "reason": "first reference looks sane",
                                              "by": "ana"})
            assert _wait_state(client, r0.id, lambda s: s.is_final(), "finished").state.is_completed()
            v0 = tracker.client.get_model_version("approved-rl", "1")
            assert reference() == "1" and v0.tags["flywheel.approval"] == "approved"
            assert v0.tags["flywheel.approval.by"] == "ana" and "first reference looks sane" in v0.tags["flywheel.promotion"]

            r1 = _wait_state(client, trigger().id, lambda s: s.is_paused(), "paused")
            text = next(a.data for a in client.read_artifacts() if a.key == "approved-round-1-approval")
            assert "| eval/avg |" in text and "interval" in text  # the paired reading, with its interval
            late = _wait_state(client, trigger().id, lambda s: s.is_final(), "finished")  # turned away, not queued
            assert late.state.is_completed()
            _wait_for(lambda: "round 1 awaits approval of approved-rl v2" in _log_text(client, late.id), "its log")
            assert len(tracker.client.search_model_versions("name = 'approved-rl'")) == 2  # no round 2 on v1
            line = decide_from_terminal(load_config(config), 1, False, "worse on our private set")
            assert line.startswith("round 1: rejected: rejected by ") and "resumed" in line
            assert _wait_state(client, r1.id, lambda s: s.is_final(), "finished").state.is_completed()
            v1 = tracker.client.get_model_version("approved-rl", "2")
            assert reference() == "1" and v1.tags["flywheel.approval.reason"] == "worse on our private set"

            r2 = _wait_state(client, trigger().id, lambda s: s.is_paused(), "paused")
            t0 = time.time()
            assert _wait_state(client, r2.id, lambda s: s.is_final(), "finished").state.is_completed()
            assert time.time() - t0 > 30  # it waited for the 60 s timeout
            v2 = tracker.client.get_model_version("approved-rl", "3")
            assert v2.tags["flywheel.approval"] == "timed out" and reference() == "1"
            assert v2.tags["flywheel.promotion"].startswith("rejected: timed out by timeout: no decision within 60 s")
            expected = sorted(["flywheel.round.awaiting-approval"] * 3 + ["flywheel.round.promoted"]
                              + ["flywheel.round.rejected"] * 2)

            def events() -> list[str]:  # the server stores events a moment after the runs end
                found = client.read_events(EventFilter(resource=EventResourceFilter(id=["flywheel.approved"]),
                                                       event=EventNameFilter(prefix=["flywheel.round."])), limit=50)
                return sorted(e.event for e in found.events)

            _wait_for(lambda: events() == expected, f"the six outcome events (got {events()})")
    finally:
        stop([server])
        log.close()
    assert automation.id is not None and automation.trigger.expect == {"flywheel.round.awaiting-approval"}


def _weights(folder: Path):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_killed_round_resumes_from_cache_and_checkpoint_and_ends_like_an_uninterrupted_one(
        prefect_server, small_world, tmp_path):
    import torch

    cfg, _ = small_world
    extra = {"midtrain": {**TINY_ROUND["midtrain"], "token_budget": 30_720, "checkpoint_every": 5}}
    crashy = write_config(tmp_path / "crashy.yaml", cfg.home, "crashy", **extra)
    cmd = [str(BIN / "flywheel"), "round", str(crashy)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runs = cfg.home / "runs" / "crashy"
    deadline = time.time() + 300
    while not list(runs.glob("midtrain-*/checkpoints/checkpoint-5/trainer_state.json")):
        assert proc.poll() is None, "the round ended before it could be killed"
        assert time.time() < deadline, "mid-training never checkpointed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no cleanup, no exception handlers
    proc.wait(timeout=30)
    assert not list(runs.glob("midtrain-*/model"))

    from flows.round import flywheel_round

    flywheel_round(str(crashy))  # the re-run (in this process: only the kill needed a subprocess)
    (metrics_path,) = runs.glob("midtrain-*/metrics.json")
    resumed = json.loads(metrics_path.read_text())["resumed_from"]
    assert resumed and re.search(r"checkpoint-\d+$", resumed), resumed

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_runs = [r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
                     if r.parameters.get("config") == str(crashy)]
        rerun = flow_runs[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[rerun.id])))
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}
    assert states.get("score-reference") == "Completed", states
    assert states.get("midtrain") == "Completed", states  # was running: resumed from its checkpoint

    clean = write_config(tmp_path / "clean.yaml", cfg.home, "clean", **extra)
    flywheel_round(str(clean))  # the uninterrupted run to compare with
    t_crashy, t_clean = _registry(crashy), _registry(clean)
    for model in ("base", "rl"):
        a = t_crashy.client.search_model_versions(f"name = 'crashy-{model}'")
        b = t_clean.client.search_model_versions(f"name = 'clean-{model}'")
        assert len(a) == len(b) == 1  # no duplicate versions after the crash
    base_a = t_crashy.client.get_model_version_by_alias("crashy-base", "round-0")
    base_b = t_clean.client.get_model_version_by_alias("clean-base", "round-0")
    from flywheel.tracking.registry import version_path

    wa, wb = _weights(version_path(t_crashy, base_a)), _weights(version_path(t_clean, base_b))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert t_crashy.client.get_model_version_by_alias("crashy-rl", "reference").tags["flywheel.round"] == "0"


# The kill campaign: SIGKILL the round's whole process group at each point where a crash could leave
# state half-made, rerun, and compare with a round nobody killed. The points are failpoints
# (flywheel/failpoints.py): a kill there is a real SIGKILL, placed exactly, so the test is not a race.
KILL_POINTS = ("score-reference-chunk", "midtrain-checkpoint", "base-registered", "posttrain-checkpoint",
               "rl-registered", "promote")


def _round_metrics(tracker, round_n: int) -> dict[str, float]:
    return dict(tracker.round_runs()[round_n].data.metrics)


def test_a_round_killed_at_every_stage_finishes_as_if_never_killed(prefect_server, small_world, tmp_path):
    import shutil

    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.round import flywheel_round
    from flywheel.tracking.registry import T_PROMOTION

    cfg, _ = small_world
    # A home of its own (with a copy of the session's world): the reference cache is content-addressed, and
    # other tests' rounds in the session home would leave the killed round's scoring already done.
    home = tmp_path / "home"
    shutil.copytree(cfg.home / "world", home / "world")
    configs = {name: write_config(tmp_path / f"{name}.yaml", home, name) for name in ("steady", "killed")}
    for path in configs.values():
        flywheel_round(str(path))  # round 0 (NTP) of both, uninterrupted

    cmd = [str(BIN / "flywheel"), "round", str(configs["killed"])]
    for point in (*KILL_POINTS, None):
        env = {**os.environ, "FLYWHEEL_FAILPOINT": point or ""}
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                              start_new_session=True)  # its own group: the failpoint kills that, not pytest
        out = proc.stdout + proc.stderr
        if point is None:
            assert proc.returncode == 0, out[-3000:]
        else:
            assert proc.returncode == -signal.SIGKILL, f"{point}: not killed ({proc.returncode}): {out[-3000:]}"
        assert "round 1" in out and "round 2" not in out, f"{point}: {out[-3000:]}"  # the same round, every time
        assert "waiting for the" not in out, f"{point}: the rerun waited for the slot: {out[-3000:]}"
        if point != KILL_POINTS[0]:
            assert "round 1 (resumed)" in out and "a previous trigger died" in out, f"{point}: {out[-3000:]}"
        assert time.monotonic() - t0 < 300
    # round 1 uninterrupted: what the killed one must equal (it reuses the reference cache, which is
    # content-addressed and checksummed; run first, it would leave the killed round no scoring to kill)
    flywheel_round(str(configs["steady"]))

    steady, killed = _registry(configs["steady"]), _registry(configs["killed"])
    for model in ("base", "rl"):  # one version per round: nothing registered twice, nothing skipped
        assert sorted(int(v.tags["flywheel.round"]) for v in
                      killed.client.search_model_versions(f"name = 'killed-{model}'")) == [0, 1]
    for v in killed.client.search_model_versions("name = 'killed-rl'"):
        assert T_PROMOTION in v.tags  # no version without a decision
    verdict = {t.cfg.name: t.client.get_model_version_by_alias(f"{t.cfg.name}-rl", "round-1").tags[T_PROMOTION]
               for t in (steady, killed)}
    assert verdict["killed"] == verdict["steady"], verdict
    a, b = _round_metrics(steady, 1), _round_metrics(killed, 1)
    assert a.keys() == b.keys() and a
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-6, (k, a[k], b[k])
    assert killed.client.get_model_version_by_alias("killed-rl", "reference").tags["flywheel.round"] == "1"
    running = killed.client.search_runs([killed.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert [r.info.run_name for r in running] == []  # the killed stages' runs were marked KILLED
    with get_client(sync_client=True) as client:
        flow_runs = [r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=100)
                     if r.parameters.get("config") == str(configs["killed"])]
    states = [r.state.name for r in flow_runs]
    assert states.count("Completed") == 2 and states.count("Crashed") == len(KILL_POINTS), states


def _job_pids(part: str) -> list[int]:
    """The launched stage processes (launcher and ranks) whose command line names this job folder part."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flywheel.cli stage" in cmd and part in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            pids.append(proc.info["pid"])
    return pids


def test_a_served_round_launched_with_torchrun_runs_two_ranks_and_a_cancel_leaves_no_rank_and_resumes(
        prefect_server, small_world, tmp_path):
    import psutil
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from flywheel.remit.midtrain import midtrain

    from .conftest import small_config

    cfg, _ = small_world
    two = {"kind": "torchrun", "nproc_per_node": 2, "grace_seconds": 20}
    per_rank = {**TINY_ROUND["midtrain"], "batch_size": 4}  # two ranks × 4 = the one-process batch of 8
    config = write_config(tmp_path / "launched.yaml", cfg.home, "launched", launch=two, midtrain=per_rank)
    longer = write_config(tmp_path / "launched-long.yaml", cfg.home, "launched", launch=two,
                          midtrain={**per_rank, "token_budget": 8192 * 8})  # round 1: long enough to cancel
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed with the server
    server = subprocess.Popen([str(BIN / "flywheel"), "serve", str(config)], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    launches = cfg.home / "launch" / "launched"
    try:
        _wait_for_deployments(server, tmp_path / "serve.log")
        first = run_deployment("flywheel-round/flywheel-round", parameters={"config": str(config)}, timeout=900,
                               poll_interval=2)
        assert first.state.is_completed(), (first.state, (tmp_path / "serve.log").read_text()[-3000:])
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with get_client(sync_client=True) as client:  # rank 0's progress lines reached the Prefect run log
            messages = [m.message for m in client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first.id])), limit=200)]
        assert any(m.startswith("midtrain step 8/8 loss") for m in messages), messages[-20:]
        assert not list((launches / "round-0").glob("score_reference-*"))  # an NTP round has nothing to score
        assert not list((launches / "round-0").glob("evaluate-*"))  # lm-eval splits over CUDA ranks only
        for stage in ("midtrain", "posttrain"):
            (job,) = (launches / "round-0").glob(f"{stage}-*")
            assert sorted(p.name for p in (job / "logs").iterdir()) == ["launcher.log", "rank0.log", "rank1.log"], stage

        second = run_deployment("flywheel-round/flywheel-round", parameters={"config": str(longer)}, timeout=0)
        deadline = time.time() + 300
        while not any("midtrain step" in p.read_text() for p in (launches / "round-1").glob("midtrain-*/logs/rank0.log")):
            assert time.time() < deadline, "round 1 never reached mid-training steps"
            time.sleep(0.5)
        pids = _job_pids(str(launches / "round-1" / "midtrain-"))
        assert len(pids) >= 3  # torchrun and its two ranks
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(second.id, Cancelling(message="cancelled by the test"), force=True)
            t0 = time.time()
            while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
                assert time.time() - t0 < 60, f"stage processes still alive 60 s after the cancel: {pids}"
                time.sleep(0.5)
            while not client.read_flow_run(second.id).state.is_final():
                assert time.time() - t0 < 120
                time.sleep(1)
            assert client.read_flow_run(second.id).state.name in ("Cancelled", "Crashed")
        saved = list((cfg.home / "runs" / "launched").glob("midtrain-*/checkpoints/checkpoint-*"))
        assert saved, "no rank checkpoint was saved on the cancel"

        third = run_deployment("flywheel-round/flywheel-round", parameters={"config": str(longer)}, timeout=900,
                               poll_interval=2)
        assert third.state.is_completed(), (third.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        stop([server])
        log.close()
    tracker = _registry(config)
    (resumed,) = [json.loads(p.read_text()) for p in (cfg.home / "runs" / "launched").glob("midtrain-*/metrics.json")
                  if json.loads(p.read_text())["steps"] == 64]
    assert resumed["resumed_from"] and resumed["world_size"] == 2 and resumed["launch"] == "torchrun"
    for stage in ("score_reference", "midtrain", "posttrain"):  # round 1 scored with the round-0 RL model
        assert any(sorted(p.name for p in (job / "logs").iterdir()) == ["launcher.log", "rank0.log", "rank1.log"]
                   for job in (launches / "round-1").glob(f"{stage}-*")), stage
    for model in ("base", "rl"):  # one registry version per model per round, the cancel notwithstanding
        assert sorted(int(v.tags["flywheel.round"]) for v in
                      tracker.client.search_model_versions(f"name = 'launched-{model}'")) == [0, 1]
    runs = [r.info.run_name for r in tracker.stage_runs(0)]
    assert sorted(runs) == sorted(["midtrain", "evaluate/base", "posttrain/sft", "posttrain/grpo",
                                   "evaluate/post", "promote"]), runs
    (mid,) = [r for r in tracker.stage_runs(0) if r.info.run_name == "midtrain"]
    assert {a.path for a in tracker.client.list_artifacts(mid.info.run_id, "logs")} == {
        "logs/launcher.log", "logs/rank0.log", "logs/rank1.log"}
    # round 0's two-rank loss curve is the one-process curve with the same global batch
    one = midtrain(small_config(cfg.home, name="launched-one", midtrain={**TINY_ROUND["midtrain"], "objective": "ntp"}))
    (two_rank,) = [json.loads(p.read_text()) for p in (cfg.home / "runs" / "launched").glob("midtrain-*/metrics.json")
                   if json.loads(p.read_text())["steps"] == 8]
    curve = [h["loss"] for h in two_rank["log_history"] if "loss" in h]
    ref = [h["loss"] for h in one.metrics["log_history"] if "loss" in h]
    assert len(curve) == len(ref) > 1 and max(abs(a - b) for a, b in zip(curve, ref, strict=True)) <= 1e-4
