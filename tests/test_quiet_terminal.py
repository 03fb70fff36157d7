"""`flywheel round` through the real CLI: one result line per stage on the terminal, the libraries' output in
each stage's log file (an MLflow artifact of the stage's run), and everything back with `--verbose`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


# --- what the terminal shows outside a round's stages ------------------------------------------------------


def test_piped_output_is_120_columns_wide_unless_columns_says_otherwise(tmp_path):
    home = tmp_path / ("h" * (94 - len(str(tmp_path))))  # a 95-character path: its table row is 115 wide
    assert len(str(home)) == 95
    config = write_config(tmp_path / "wide.yaml", home, "wide")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([str(BIN / "flywheel"), "validate", str(config)], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env=env)
    assert piped.returncode == 0, piped.stderr
    row = next((line for line in piped.stdout.splitlines() if str(home) in line), None)
    assert row is not None and 80 < len(row) <= 120, piped.stdout
    narrow = subprocess.run([str(BIN / "flywheel"), "validate", str(config)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**env, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert str(home) not in narrow.stdout, narrow.stdout  # COLUMNS still wins: the row is cut at 80
    assert max(map(len, narrow.stdout.splitlines())) <= 80, narrow.stdout


TIDY = """
import sys
from pathlib import Path

from tqdm import tqdm

from flywheel.console import output_to

with output_to(Path(sys.argv[1]), "tidy"):
    print("before the bar", flush=True)
    for _ in tqdm(range(40), desc="scoring", mininterval=0, miniters=1):
        pass
    for _ in tqdm(range(5), desc="cleared", mininterval=0, miniters=1, leave=False):
        pass
    print("after the bar", flush=True)
"""


def test_a_stage_log_keeps_each_progress_bar_as_one_line_at_its_final_state(tmp_path):
    log = tmp_path / "stage.log"
    proc = subprocess.run([str(BIN / "python"), "-c", TIDY, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    raw = log.read_bytes()
    assert b"\r" not in raw, raw[:2000]
    lines = raw.decode().splitlines()
    assert lines[0].startswith("=====") and lines[0].endswith(" tidy =====")
    assert lines[1] == "before the bar"
    assert re.fullmatch(r"scoring: 100%\|\S+\| 40/40 .*", lines[2]), lines
    assert lines[3] == "after the bar"  # what followed the cleared bar on its line, the bar itself gone
    assert len(lines) == 4, lines


def _two_variant_report(out_dir: Path) -> dict:
    """A real report (summarize, write_report) of ntp and remit over two seeds: remit + 10 and + 20 points."""
    from flywheel.ablation.plan import AblationPlan
    from flywheel.ablation.report import summarize, write_report
    from flywheel.metrics import AVG

    plan = AblationPlan(version=1, name="short", size="smoke", variants=["ntp", "remit"], seeds=[0, 1],
                        fractions=[1.0], config={"midtrain": {"token_budget": 4096}}, references={"rl": None},
                        bootstrapped=[], heldout=None, heldout_limit=0, threads=1, token_heldout=None, kind=None,
                        posttrain=True, accuracy_points="", study="abc123", out_dir=str(out_dir), notes=[])
    avg = {("ntp", 0): 0.2, ("ntp", 1): 0.3, ("remit", 0): 0.3, ("remit", 1): 0.5}
    cells = [{"variant": v, "seed": s, "mid": {"eval/world_mc/acc": x, AVG: x},
              "post": {"eval/world_mc/acc": x, AVG: x}, "curve": [{"tokens": 4096, "metrics": {AVG: x}}],
              "kl": 0.01, "seconds": {"total": 1.0}} for (v, s), x in avg.items()]
    report = summarize(plan, {"metrics": {"eval/world_mc/acc": 0.1, AVG: 0.1}, "references": {}}, cells)
    write_report(report, out_dir)
    return report


def test_ablate_prints_the_headline_and_the_report_path_not_the_report(tmp_path):
    from flywheel import views
    from flywheel.console import wide_console

    report = _two_variant_report(tmp_path / "report")
    console = wide_console()
    with console.capture() as captured:
        views.ablation_report(console, report)  # what `flywheel ablate` ends with
    printed = captured.get().rstrip("\n")
    markdown = Path(report["files"]["markdown"]).read_text()
    assert "| remit | 2 |" in markdown and "## After post-training" in markdown  # the body is in the file ...
    assert "|" not in printed and "##" not in printed, printed  # ... and not on the terminal
    assert report["files"]["markdown"] in printed, printed
    headline = printed.splitlines()[0]
    assert headline.startswith("ablation abc123 (short, size smoke): 2 variant(s) × 2 seed(s); "), headline
    assert "remit − ntp in avg after post-training: +15.0 points (paired t, p 0.205; not significant" in headline


MLFLOW_QUIET = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def test_the_cli_sets_mlflow_quiet_about_run_links_unless_the_user_chose(tmp_path):
    show = f"import os, flywheel.cli; print(os.environ.get({MLFLOW_QUIET!r}))"
    env = {k: v for k, v in os.environ.items() if k != MLFLOW_QUIET}
    for user, seen in ((None, "true"), ("false", "false")):
        proc = subprocess.run([str(BIN / "python"), "-c", show], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**env, **({MLFLOW_QUIET: user} if user else {})})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == seen, (user, proc.stdout, proc.stderr[-2000:])


def test_mlflow_prints_no_run_link_under_the_cli_environment(monkeypatch, capfd):
    """MLflow prints "View run ... at" on ending a run against a server (a RestStore); a bound port that does
    not listen stands for the server: without the variable MLflow reaches for it to print the link."""
    import socket

    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from flywheel.env import offline_env

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        client = TrackingServiceClient(f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setenv(MLFLOW_QUIET, offline_env()[MLFLOW_QUIET])
        client._log_url("0" * 32)  # would fetch the run to name it in the link
        assert capfd.readouterr().out == ""
        monkeypatch.delenv(MLFLOW_QUIET)
        with pytest.raises(MlflowException, match="runs/get"):
            client._log_url("0" * 32)


def test_piped_help_is_as_wide_as_the_rest_of_the_output():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    about = "Flywheel: ReMiT mid-training guided by the last round's RL model, round after round."
    assert len(about) > 80 and about in out, out  # one line, not wrapped at rich's 80 columns
