"""A flywheel you can leave alone: NaN stops a stage, bad folders are rebuilt, SIGTERM saves and resumes."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TrainerCallback

from flywheel.checkpoints import MANIFEST, first_non_finite, verify_checkpoint
from flywheel.errors import FlywheelError, NonFiniteError, Preempted
from flywheel.posttrain import posttrain
from flywheel.remit.midtrain import midtrain

from .conftest import SMALL_WORLD, process_group_gone, small_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# 8 optimizer steps of plain NTP on 4 x 64 tokens: no reference, no scoring cache; the cheapest real anneal.
NTP = {"objective": "ntp", "token_budget": 8 * 4 * 64, "seq_len": 64, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.1}
STEP_TOKENS = 4 * 64


def ntp_config(home, name="safety", **midtrain_extra):
    return small_config(home, name=name, midtrain={**NTP, **midtrain_extra})


class Collect(logging.Handler):
    def __init__(self, logger: str) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(logger), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


class RecordSaves(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


# --- non-finite guard --------------------------------------------------------------------------------------


def test_a_huge_midtrain_lr_stops_at_the_first_non_finite_step_and_no_checkpoint_holds_a_nan(small_world, tmp_path):
    cfg = ntp_config(small_world[0].home, lr=1e6, checkpoint_fraction=0.125)  # a checkpoint after every step
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as err:
        midtrain(cfg, run_dir=run_dir)
    msg = str(err.value)
    assert isinstance(err.value, FlywheelError)  # the CLI prints it as one line, exit code 2
    found = re.match(r"midtrain: the (loss|gradient norm) was (nan|inf|-inf) at step (\d+); ", msg)
    assert found, msg
    # the run has 8 steps (budget / tokens per step): the step named must be one of them. Fails for a
    # 0-based step counter (step 0) or one that runs past the run's end (step 9 and on).
    assert int(found[3]) in range(1, 9), msg
    assert "before the optimizer applied it" in msg and "lower midtrain.lr" in msg
    assert not (run_dir / "model").exists()
    saved = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    if saved:
        assert f"last good checkpoint: {saved[-1]};" in msg
    else:
        assert "last good checkpoint: none yet; the run restarts from the base" in msg
    for folder in saved:
        assert first_non_finite(folder) is None, folder


def test_a_huge_sft_lr_stops_the_stage_naming_it_and_publishes_nothing(small_world, tmp_path):
    cfg, report = small_world
    cfg = small_config(cfg.home, posttrain={"stages": [{"kind": "sft", "max_steps": 3, "batch_size": 4, "lr": 1e6}]})
    with pytest.raises(NonFiniteError, match=r"^posttrain\.stages\.0 \(sft\): the (loss|gradient norm) was "
                                             r"(nan|inf|-inf) at step \d; .*lower posttrain\.stages\.0\.lr"):
        posttrain(cfg, report.paths.base, run_dir=tmp_path / "pt")
    assert not (tmp_path / "pt" / "0-sft" / "model").exists()
    for folder in (tmp_path / "pt" / "0-sft" / "checkpoints").glob("checkpoint-*"):
        assert first_non_finite(folder) is None, folder


def test_first_non_finite_finds_a_planted_nan_or_inf(small_world, tmp_path):
    _, report = small_world
    assert first_non_finite(report.paths.base) is None
    weights = load_file(str(report.paths.base / "model.safetensors"))
    name = sorted(weights)[len(weights) // 2]
    for bad in (float("nan"), float("inf")):
        planted = dict(weights)
        planted[name] = planted[name].clone()
        planted[name].view(-1)[3] = bad
        folder = tmp_path / str(bad)
        folder.mkdir()
        save_file(planted, str(folder / "model.safetensors"))
        assert first_non_finite(folder) == name


# --- verified reuse ----------------------------------------------------------------------------------------


def test_verify_checkpoint_names_each_kind_of_damage(small_world, tmp_path):
    _, report = small_world
    good = report.paths.base
    assert verify_checkpoint(good) is None  # the world base carries a manifest too

    def damaged(tag, damage):
        folder = tmp_path / tag
        shutil.copytree(good, folder)
        damage(folder)
        return verify_checkpoint(folder)

    weights = "model.safetensors"
    assert "no flywheel-manifest.json" in damaged("nomanifest", lambda f: (f / MANIFEST).unlink())
    assert "config.json is missing" in damaged("missing", lambda f: (f / "config.json").unlink())
    assert "truncated" in damaged("short", lambda f: os.truncate(f / weights, 1000))

    def flip(f):
        data = bytearray((f / weights).read_bytes())
        data[-1] ^= 0xFF
        (f / weights).write_bytes(bytes(data))

    assert "does not match its checksum" in damaged("flipped", flip)

    def bad_header(f):
        data = bytearray((f / weights).read_bytes())
        data[8:12] = b"\xff\xfe\xfd\xfc"
        (f / weights).write_bytes(bytes(data))

    assert "unreadable safetensors header" in damaged("header", bad_header)


def test_a_truncated_midtrain_model_is_rebuilt_and_logs_why_and_a_good_one_is_reused(small_world, tmp_path):
    cfg = ntp_config(small_world[0].home, token_budget=4 * STEP_TOKENS, checkpoint_fraction=None)
    run_dir = tmp_path / "mt"
    first = midtrain(cfg, run_dir=run_dir)
    assert verify_checkpoint(first.checkpoint) is None
    again = midtrain(cfg, run_dir=run_dir)
    assert again.reused
    shutil.copytree(first.checkpoint, tmp_path / "first")
    os.truncate(first.checkpoint / "model.safetensors", 1000)
    with Collect("flywheel.midtrain") as warnings:
        rebuilt = midtrain(cfg, run_dir=run_dir)
    assert not rebuilt.reused
    assert any("model.safetensors" in m and "truncated" in m and "building it again" in m for m in warnings)
    assert verify_checkpoint(rebuilt.checkpoint) is None
    same_weights(rebuilt.checkpoint, tmp_path / "first")
    AutoModelForCausalLM.from_pretrained(rebuilt.checkpoint)  # loads: what `evaluate` does next


def test_a_posttrain_stage_without_a_manifest_is_rebuilt_and_logs_why(small_world, tmp_path):
    cfg, report = small_world
    cfg = small_config(cfg.home, posttrain={"stages": [{"kind": "sft", "max_steps": 2, "batch_size": 4}]})
    run_dir = tmp_path / "pt"
    first = posttrain(cfg, report.paths.base, run_dir=run_dir)
    assert posttrain(cfg, report.paths.base, run_dir=run_dir).reused
    (first.checkpoint / MANIFEST).unlink()  # what a folder from before manifests looks like
    with Collect("flywheel.posttrain") as warnings:
        again = posttrain(cfg, report.paths.base, run_dir=run_dir)
    assert not again.reused and again.stages[0].steps == 2
    assert any("no flywheel-manifest.json" in m for m in warnings)
    assert verify_checkpoint(again.checkpoint) is None


# --- checkpoint cadence ------------------------------------------------------------------------------------


def test_checkpoints_come_at_every_fraction_of_a_short_run_and_the_sigterm_handler_is_restored(small_world,
                                                                                               tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    saves = RecordSaves()
    midtrain(ntp_config(small_world[0].home, checkpoint_fraction=0.25), run_dir=tmp_path / "f", callbacks=[saves])
    assert saves.steps == [2, 4, 6, 8]  # checkpoint_every (200) alone would save only at the last step
    assert signal.getsignal(signal.SIGTERM) is before
    clock = RecordSaves()
    midtrain(ntp_config(small_world[0].home, token_budget=4 * STEP_TOKENS, checkpoint_fraction=None,
                        checkpoint_minutes=1e-9), run_dir=tmp_path / "m", callbacks=[clock])
    assert clock.steps == [1, 2, 3, 4]  # the wall-clock cadence: due after every step


# --- SIGTERM -----------------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_ends_like_an_uninterrupted_run(small_world, tmp_path):
    home = small_world[0].home
    extra = {"token_budget": 12 * STEP_TOKENS, "checkpoint_every": 2, "checkpoint_fraction": None}  # 12 steps
    path = tmp_path / "sigterm.yaml"
    path.write_text(yaml.safe_dump({"name": "sigterm", "seed": 0, "home": str(home), "world": dict(SMALL_WORLD),
                                    "midtrain": {**NTP, **extra}}))
    proc = subprocess.Popen([str(BIN / "flywheel"), "midtrain", str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((home / "runs" / "sigterm").glob("midtrain-*/checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "mid-training never checkpointed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == Preempted.exit_code == 143, err[-3000:]
    (run_dir,) = (home / "runs" / "sigterm").glob("midtrain-*")
    assert "midtrain: stopped by SIGTERM at step " in err and "rerun the same command to resume" in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert 2 <= step < 12, "SIGTERM must stop the run early"
    saved = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert f"checkpoint saved at {saved}" in " ".join(err.split())  # rich may wrap the long line
    assert (saved / "trainer_state.json").is_file()
    assert not (run_dir / "model").exists(), "a preempted run must not publish its model"

    cfg = small_config(home, name="sigterm", midtrain={**NTP, **extra})
    resumed = midtrain(cfg)
    assert resumed.resumed_from == str(saved)
    clean = midtrain(cfg, run_dir=tmp_path / "clean")
    same_weights(resumed.checkpoint, clean.checkpoint)


def test_sigterm_to_a_two_rank_launch_stops_both_ranks_at_one_step_and_the_relaunch_resumes(small_world,
                                                                                            tmp_path):
    """What a preempted node does: SIGTERM to the launcher, which forwards it to its ranks (gloo, 2 CPU ranks)."""
    import json

    home = small_world[0].home
    extra = {"token_budget": 40 * 2 * STEP_TOKENS, "batch_size": 4, "checkpoint_every": 5,
             "checkpoint_fraction": None}  # 40 steps of 2 ranks x 4 rows
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump({"name": "ranks", "seed": 0, "home": str(home), "world": dict(SMALL_WORLD),
                                    "midtrain": {**NTP, **extra}}))
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "deploy/accelerate/ddp.yaml"),
           "-m", "flywheel.cli", "midtrain", str(path)]
    runs = home / "runs" / "ranks"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list(runs.glob("midtrain-*/checkpoints/checkpoint-5/trainer_state.json")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "mid-training never checkpointed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler's preemption notice reaches it
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, out[-3000:]
        assert process_group_gone(proc.pid, timeout=10), "a rank is still running after the launcher exited"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = sorted({int(m) for m in re.findall(r"stopped by SIGTERM at step (\d+)", out)})
    assert out.count("stopped by SIGTERM at step") == 2, out[-3000:]  # both ranks stopped and said so
    assert len(steps) == 1 and 5 <= steps[0] < 40, out[-3000:]  # ... at the same step
    (run_dir,) = runs.glob("midtrain-*")
    assert (run_dir / "checkpoints" / f"checkpoint-{steps[0]}" / "trainer_state.json").is_file()
    assert not (run_dir / "model").exists()

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith(f"checkpoint-{steps[0]}") and metrics["steps"] == 40


# --- failpoints --------------------------------------------------------------------------------------------


def test_a_failpoint_kills_its_process_group_only_when_named():
    code = "from flywheel.failpoints import failpoint; failpoint('here'); print('alive')"
    for named, expect in (("here", -signal.SIGKILL), ("elsewhere", 0)):
        env = {**os.environ, "FLYWHEEL_FAILPOINT": named}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                              start_new_session=True)
        assert proc.returncode == expect, proc.stderr
        assert ("alive" in proc.stdout) == (expect == 0)
