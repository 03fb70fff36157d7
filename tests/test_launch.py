"""Stages as launched jobs: torchrun / accelerate in their own process group, results and logs read back.

The distributed runs are real: two CPU processes over gloo, the same `flywheel stage` command a GPU
node runs. FSDP on CPU needs one test-only wrapper of accelerate (tests/cpu_fsdp/sitecustomize.py says
what accelerate refuses and why); everything else is the product's code path unchanged.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flywheel.config import validate_config
from flywheel.errors import ConfigError
from flywheel.tracking.registry import RoundPlan

from .conftest import small_config

REPO = Path(__file__).resolve().parents[1]
CPU_FSDP = REPO / "tests" / "cpu_fsdp"
# 8 steps of 8 sequences: one process × 8, or two ranks × 4 (the same global batch)
MIDTRAIN = {"token_budget": 8192, "seq_len": 128, "checkpoint_every": 4, "objective": "ntp"}


def test_the_launch_section_rejects_settings_that_cannot_run_naming_the_field():
    cases = {
        "launch: kind local runs one process": {"kind": "local", "nproc_per_node": 2},
        "launch: kind accelerate needs config_file": {"kind": "accelerate"},
        "launch: nnodes 2 needs rdzv_endpoint": {"kind": "torchrun", "nnodes": 2},
        "launch: rdzv_endpoint must be host:port": {"kind": "torchrun", "rdzv_endpoint": "node0"},
        "launch.stages.midtrain.nprocs: unknown field": {"stages": {"midtrain": {"nprocs": 2}}},
        "launch.stages.midtrain: kind local runs one process": {"kind": "torchrun",
                                                                "stages": {"midtrain": {"kind": "local",
                                                                                        "nproc_per_node": 4}}},
    }
    for sentence, launch in cases.items():
        with pytest.raises(ConfigError) as err:
            validate_config({"name": "x", "launch": launch})
        assert sentence in str(err.value), (launch, str(err.value))


def test_per_stage_launch_overrides_only_the_fields_it_sets():
    cfg = validate_config({"name": "x", "launch": {"kind": "torchrun", "nproc_per_node": 8, "grace_seconds": 90,
                                                   "stages": {"evaluate": {"kind": "local"},
                                                              "posttrain": {"nproc_per_node": 4}}}})
    assert cfg.launch.for_stage("midtrain").nproc_per_node == 8
    assert cfg.launch.for_stage("posttrain").model_dump() == {**cfg.launch.for_stage("midtrain").model_dump(),
                                                               "nproc_per_node": 4}
    local = cfg.launch.for_stage("evaluate")
    assert (local.kind, local.nproc_per_node, local.grace_seconds) == ("local", None, 90)


def test_launcher_command_lines_for_one_node_several_nodes_and_accelerate():
    from flywheel.config import LaunchSpec
    from flywheel.launch import launcher_argv

    one = launcher_argv(LaunchSpec(kind="torchrun", nproc_per_node=2, grace_seconds=45), ["midtrain"], "job1")
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in one and "--shutdown-timeout=45" in one
    assert one[-4:] == ["-m", "flywheel.cli", "stage", "midtrain"]
    many = launcher_argv(LaunchSpec(kind="torchrun", nproc_per_node=8, nnodes=4, rdzv_endpoint="node0:29400"),
                         ["midtrain"], "job1")
    assert {"--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=job1"} <= set(many)
    assert "--standalone" not in many
    acc = launcher_argv(LaunchSpec(kind="accelerate", config_file="deploy/accelerate/fsdp.yaml"), ["posttrain"], "j")
    assert acc[1:5] == ["-m", "accelerate.commands.launch", "--config_file", "deploy/accelerate/fsdp.yaml"]
    assert "--num_processes" not in acc  # the accelerate file decides unless nproc_per_node is set


def _plan(cfg):
    from flywheel.round.plan import plan_round
    from flywheel.slot import RoundSlot

    with RoundSlot(cfg):
        return plan_round(cfg, None)


def _launch(cfg, stage, plan, lines=None, **args):
    from flywheel.launch import launched

    say = lines.append if lines is not None else (lambda m: None)
    return launched(cfg, stage, plan, args, cfg.launch.for_stage(stage), say)


def _losses(checkpoint: str) -> list[float]:
    metrics = json.loads((Path(checkpoint).parent / "metrics.json").read_text())
    return [h["loss"] for h in metrics["log_history"] if "loss" in h]


def test_two_rank_ddp_and_fsdp_midtraining_match_one_process_and_publish_the_full_model(
        small_world, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from flywheel.remit.midtrain import midtrain

    world_cfg, _ = small_world
    home = world_cfg.home
    one = midtrain(small_config(home, name="one", midtrain={**MIDTRAIN, "batch_size": 8}))
    ddp_cfg = small_config(home, name="ddp", midtrain={**MIDTRAIN, "batch_size": 4},
                           launch={"kind": "torchrun", "nproc_per_node": 2})
    lines: list[str] = []
    ddp = _launch(ddp_cfg, "midtrain", _plan(ddp_cfg), lines)
    monkeypatch.setenv("FLYWHEEL_TEST_CPU_FSDP", "1")
    monkeypatch.setenv("PYTHONPATH", str(CPU_FSDP))
    fsdp_cfg = small_config(home, name="fsdp", midtrain={**MIDTRAIN, "batch_size": 4},
                            launch={"kind": "accelerate", "config_file": str(CPU_FSDP / "fsdp.yaml")})
    fsdp = _launch(fsdp_cfg, "midtrain", _plan(fsdp_cfg))

    reference = _losses(str(one.checkpoint))
    assert len(reference) == 8
    for name, res in (("ddp", ddp), ("fsdp", fsdp)):
        losses = _losses(res["checkpoint"])
        assert len(losses) == 8 and max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4, (name, losses)
        record = json.loads((Path(res["checkpoint"]) / "flywheel-midtrain.json").read_text())
        assert (record["world_size"], record["global_batch"]) == (2, 8), record
        assert record["launch"] == {"ddp": "torchrun", "fsdp": "accelerate"}[name]
        assert record["fsdp"] is (name == "fsdp")  # the FSDP run really sharded (and gathered to publish)
        assert record["loss_kernel"] in ("chunked", "fused")  # the output layer in pieces, under DDP and FSDP
    full = load_file(str(one.checkpoint / "model.safetensors"))
    for res in (ddp, fsdp):
        got = load_file(str(Path(res["checkpoint"]) / "model.safetensors"))
        assert got.keys() == full.keys()
        for k in full:
            assert got[k].shape == full[k].shape and torch.allclose(got[k], full[k], atol=1e-5), k
    AutoModelForCausalLM.from_pretrained(fsdp["checkpoint"], use_safetensors=True)  # a plain HF folder
    assert any("midtrain step 8/8" in line for line in lines)  # rank 0's progress reached the caller's log
    (job,) = (home / "launch" / "ddp" / "round-0").glob("midtrain-*")
    assert {p.name for p in (job / "logs").iterdir()} == {"launcher.log", "rank0.log", "rank1.log"}
    from flywheel.tracking.store import open_tracker

    tracker = open_tracker(ddp_cfg)
    (run,) = [r for r in tracker.stage_runs(0) if r.info.run_name == "midtrain"]
    logged = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "logs")}
    assert logged == {"logs/launcher.log", "logs/rank0.log", "logs/rank1.log"}


def test_a_failing_rank_fails_the_stage_with_its_exit_code_and_its_own_last_lines(small_world, tmp_path):
    from flywheel.errors import FlywheelError

    world_cfg, _ = small_world
    cfg = small_config(world_cfg.home, name="failing", launch={"kind": "torchrun", "nproc_per_node": 2})
    plan = RoundPlan(0)
    missing = tmp_path / "no-such-model"
    with pytest.raises(FlywheelError) as err:  # exit code 2 is bad input: a FlywheelError, not retried
        _launch(cfg, "evaluate", plan, checkpoint=str(missing), kind="base")
    text = str(err.value)
    assert "evaluate: rank " in text and "exited with code 2" in text, text
    assert str(missing) in text.split("last lines of", 1)[1], text  # the rank's own one-sentence error


class _Cancelled(Exception):
    """What Prefect raises in a flow run's main thread when it is cancelled (there: TerminationSignal)."""


def _stage_processes(folder_part: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flywheel.cli" in cmd and folder_part in cmd:
            found.append(proc.info["pid"])
    return found


def test_a_cancelled_job_stops_every_rank_after_they_save_and_the_next_launch_resumes(small_world):
    world_cfg, _ = small_world
    budget = {**MIDTRAIN, "token_budget": 40 * 8 * 128, "batch_size": 4, "checkpoint_fraction": None,
              "checkpoint_minutes": None, "checkpoint_every": 1000}  # no checkpoint but the one SIGTERM makes
    cfg = small_config(world_cfg.home, name="cancelled", midtrain=budget,
                       launch={"kind": "torchrun", "nproc_per_node": 2, "grace_seconds": 30})
    plan = _plan(cfg)

    def say(line: str) -> None:
        if "midtrain step 4/40" in line:
            raise _Cancelled

    from flywheel.launch import launched

    t0 = time.monotonic()
    with pytest.raises(_Cancelled):
        launched(cfg, "midtrain", plan, {}, cfg.launch.for_stage("midtrain"), say)
    assert time.monotonic() - t0 < 120
    (job,) = (cfg.home / "launch" / "cancelled" / "round-0").glob("midtrain-*")
    assert _stage_processes(str(job)) == []  # launched returns only once the whole group is gone
    (saved,) = list((cfg.home / "runs" / "cancelled").glob("midtrain-*/checkpoints/checkpoint-*"))
    assert {p.name for p in saved.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}  # both saved
    assert "stopped by SIGTERM" in (job / "logs" / "rank0.log").read_text()
    res = _launch(cfg, "midtrain", plan)
    metrics = json.loads((Path(res["checkpoint"]).parent / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(saved) and metrics["steps"] == 40
    assert not os.environ.get("FLYWHEEL_TEST_CPU_FSDP")


def test_several_nodes_render_a_slurm_script_and_an_indexed_kubernetes_job_that_rendezvous(tmp_path):
    import shutil
    import subprocess

    import yaml

    from flywheel.launch import render_jobs

    cfg = small_config(tmp_path / "home", name="big", launch={"kind": "torchrun", "nproc_per_node": 8,
                                                               "nnodes": 4, "rdzv_endpoint": "node0:29400"})
    spec = cfg.launch.for_stage("midtrain")
    files = render_jobs(cfg, spec, "midtrain", ["midtrain", "configs/olmo-1b.yaml"], tmp_path / "job", nodes=3)
    script = files["slurm"].read_text()
    bash = shutil.which("bash")
    assert bash and subprocess.run([bash, "-n", str(files["slurm"])]).returncode == 0  # it parses as bash
    assert "#SBATCH --nodes=3" in script and "#SBATCH --gpus-per-node=8" in script
    assert '--rdzv-endpoint="node0:29400"' in script and "--nnodes=4" in script  # joins the 4-node rendezvous
    assert (tmp_path / "job" / "logs").is_dir()  # Slurm writes --output there but does not create it
    service, job = yaml.safe_load_all(files["kubernetes"].read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == service["spec"]["selector"]["job-name"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
    assert "--rdzv-endpoint=node0:29400" in container["command"] and container["command"][-2:] == [
        "midtrain", "configs/olmo-1b.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["terminationGracePeriodSeconds"] > spec.grace_seconds  # ranks save before the pod is killed
    # without an endpoint, the pods meet at pod 0 of the job through its headless service
    alone = cfg.launch.model_copy(update={"rdzv_endpoint": None, "nnodes": 1})
    files = render_jobs(cfg, alone, "posttrain", ["posttrain", "c.yaml"], tmp_path / "job2")
    _, job = yaml.safe_load_all(files["kubernetes"].read_text())
    name = job["metadata"]["name"]
    assert f"--rdzv-endpoint={name}-0.{name}:29400" in job["spec"]["template"]["spec"]["containers"][0]["command"]


def test_an_accelerate_launch_with_a_missing_config_file_is_one_sentence_before_anything_starts(tmp_path):
    from flywheel.errors import FlywheelError
    from flywheel.launch import run_stage

    cfg = small_config(tmp_path / "home", launch={"kind": "accelerate", "config_file": "no/such/fsdp.yaml"})
    with pytest.raises(FlywheelError, match=r"launch.config_file: no/such/fsdp.yaml is not a file"):
        run_stage(cfg, "midtrain", {"config": {}, "plan": {"round": 0}}, cfg.launch.for_stage("midtrain"),
                  tmp_path / "job")
    assert not (tmp_path / "job").exists()  # nothing half-written


LAUNCHER = """
import sys
sys.path.insert(0, {repo!r})
from tests.conftest import small_config
from tests.test_launch import _launch, _plan
cfg = small_config({home!r}, name="orphaned", midtrain={midtrain!r}, launch={{"kind": "torchrun", "nproc_per_node": 2}})
_launch(cfg, "midtrain", _plan(cfg), lines=[])
"""


def test_ranks_whose_launcher_is_killed_outright_save_and_exit_so_none_is_orphaned(small_world, tmp_path):
    import signal
    import subprocess
    import sys

    world_cfg, _ = small_world
    budget = {**MIDTRAIN, "token_budget": 60 * 8 * 128, "batch_size": 4, "checkpoint_fraction": None,
              "checkpoint_minutes": None, "checkpoint_every": 1000}
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER.format(repo=str(REPO), home=str(world_cfg.home), midtrain=budget))
    launcher = subprocess.Popen([sys.executable, str(script)], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs = world_cfg.home / "launch" / "orphaned" / "round-0"
    deadline = time.monotonic() + 180
    while not any("midtrain step" in p.read_text() for p in jobs.glob("midtrain-*/logs/rank0.log")):
        assert launcher.poll() is None and time.monotonic() < deadline, "the job never reached its training steps"
        time.sleep(0.3)
    (job,) = jobs.glob("midtrain-*")
    ranks = _stage_processes(str(job))
    assert len(ranks) >= 3  # torchrun and two ranks, in a session of their own
    os.kill(launcher.pid, signal.SIGKILL)  # the flow-run process dies with no chance to stop its job
    launcher.wait(timeout=10)
    t0 = time.monotonic()
    while _stage_processes(str(job)):
        assert time.monotonic() - t0 < 60, "ranks outlived their launcher by a minute"
        time.sleep(0.5)
    (saved,) = (world_cfg.home / "runs" / "orphaned").glob("midtrain-*/checkpoints/checkpoint-*")
    assert {p.name for p in saved.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}  # both saved
    assert (saved / "trainer_state.json").is_file()  # written last: the checkpoint is complete


def test_render_job_from_the_cli_writes_both_files_for_the_configs_nodes(tmp_path):
    import yaml

    from flywheel.cli import main

    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"name": "big", "home": str(tmp_path / "home"), "launch": {
        "kind": "torchrun", "nproc_per_node": 4, "nnodes": 2, "rdzv_endpoint": "head:29400"}}))
    assert main(["render-job", str(config), "--stage", "posttrain", "--args", "--checkpoint /ckpt",
                 "--out", str(tmp_path / "out")]) == 0
    script = (tmp_path / "out" / "posttrain.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and f"flywheel.cli posttrain {config} --checkpoint /ckpt" in script
    assert main(["render-job", str(config), "--stage", "train", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


POSTTRAIN = {"stages": [{"kind": "sft", "max_steps": 3, "batch_size": 4},
                        {"kind": "grpo", "max_steps": 2, "batch_size": 4, "lr": 5e-5,
                         "args": {"num_generations": 4, "max_completion_length": 16}}]}


def test_trl_post_training_under_accelerate_fsdp_on_two_ranks_publishes_full_models(small_world, monkeypatch):
    from transformers import AutoModelForCausalLM

    from flywheel.checkpoints import first_non_finite
    from flywheel.refs import resolve_world_ref

    world_cfg, _ = small_world
    monkeypatch.setenv("FLYWHEEL_TEST_CPU_FSDP", "1")
    monkeypatch.setenv("PYTHONPATH", str(CPU_FSDP))
    cfg = small_config(world_cfg.home, name="fsdp-post", posttrain=POSTTRAIN,
                       launch={"kind": "accelerate", "config_file": str(CPU_FSDP / "fsdp.yaml")})
    base = resolve_world_ref(cfg, cfg.model.source)
    res = _launch(cfg, "posttrain", _plan(cfg), base={"checkpoint": str(base), "version": "1", "key": "k"})
    for stage in ("0-sft", "1-grpo"):  # SFT and GRPO (generation from a sharded model) both ran sharded
        model = Path(res["checkpoint"]).parents[1] / stage / "model"
        record = json.loads((model / "flywheel-posttrain.json").read_text())
        assert (record["fsdp"], record["world_size"], record["launch"]) == (True, 2, "accelerate"), record
        assert first_non_finite(model) is None
    AutoModelForCausalLM.from_pretrained(res["checkpoint"], use_safetensors=True)
