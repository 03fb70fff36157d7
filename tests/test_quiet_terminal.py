"""`flywheel round` through the real CLI: one result line per stage on the terminal, the libraries' output in
each stage's log file (an MLflow artifact of the stage's run), and everything back with `--verbose`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .test_flows import BIN, REPO, write_config

MAX_LINES = 10  # six stage lines and the round's verdict, with room for a short note
STAGES = ("score_reference", "midtrain", "evaluate/base", "posttrain", "evaluate/post", "promote")
TRAINER_DICT = re.compile(r"\{'loss': ")
TQDM_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")


def _flywheel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flywheel"), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, start_new_session=True)


@pytest.fixture(scope="module")
def quiet_round(small_world, tmp_path_factory):
    cfg, _ = small_world
    # its own evaluation limit: an evaluation of the same weights by another test (same seed, same world) would
    # otherwise be reused from the home's memo, and a reused evaluation prints no progress bar
    config = write_config(tmp_path_factory.mktemp("quiet") / "quiet.yaml", cfg.home, "quiet",
                          evaluation={"tasks": ["world"], "limit": 4, "batch_size": 16})
    proc = _flywheel("round", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config, cfg.home, proc.stdout + proc.stderr


def test_a_round_prints_one_result_line_per_stage_and_no_library_output(quiet_round):
    _, _, out = quiet_round
    lines = out.splitlines()
    assert len(lines) <= MAX_LINES, out
    for stage in STAGES:
        found = [line for line in lines if re.match(rf"round 0\s+{re.escape(stage)}\s", line)]
        assert len(found) == 1, f"{stage}: {found}\n{out}"
    assert not TRAINER_DICT.search(out), out
    assert not TQDM_BAR.search(out), out
    for noise in ("Task run", "Flow run", "FutureWarning", "Custom kwargs", "Starting temporary server"):
        assert noise not in out, f"{noise!r} on the terminal:\n{out}"
    assert lines[-1].startswith("round 0: "), out


def test_each_stage_log_holds_its_library_output_and_is_an_artifact_of_the_stage_run(quiet_round):
    from flywheel.config import load_config
    from flywheel.tracking.store import STAGE_TAG, open_tracker

    config, home, _ = quiet_round
    logs = home / "logs" / "quiet" / "round-0"
    for name in ("midtrain", "posttrain"):
        assert TRAINER_DICT.search((logs / f"{name}.log").read_text()), f"no Trainer dict in {name}.log"
    assert TQDM_BAR.search((logs / "evaluate-base.log").read_text()), "no lm-eval progress bar in evaluate-base.log"
    tracker = open_tracker(load_config(config))
    runs = {r.data.tags[STAGE_TAG]: r.info.run_id for r in tracker.stage_runs(0)}
    expected = {"midtrain": "midtrain.log", "evaluate/base": "evaluate-base.log", "posttrain/sft": "posttrain.log",
                "posttrain/grpo": "posttrain.log", "evaluate/post": "evaluate-post.log"}
    for stage, file in expected.items():
        kept = Path(tracker.client.download_artifacts(runs[stage], f"logs/{file}"))
        assert kept.read_text() == (logs / file).read_text(), f"{stage}: its artifact differs from {file}"


def test_verbose_shows_the_trainer_dicts_on_the_terminal_and_writes_no_stage_log(small_world, tmp_path):
    cfg, _ = small_world
    config = write_config(tmp_path / "verbose.yaml", cfg.home, "verbose")
    # Killed (SIGKILL to its process group) once mid-training's model is registered: the dicts are out by then.
    proc = _flywheel("round", str(config), "--verbose",
                     env={"FLYWHEEL_FAILPOINT": "base-registered", "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == -9, f"exit {proc.returncode}, not the failpoint's kill:\n{out[-3000:]}"
    assert TRAINER_DICT.search(out), out[-3000:]
    assert TQDM_BAR.search(out), out[-3000:]
    assert "Task run" in out, out[-3000:]  # Prefect's console lines too
    assert not (cfg.home / "logs" / "verbose").exists()
