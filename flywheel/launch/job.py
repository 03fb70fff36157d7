"""One stage as a job on this node: start it in its own session, follow rank 0, stop it whole, read its result."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.config import FlywheelConfig, LaunchSpec
from flywheel.data.io import write_json
from flywheel.errors import FlywheelError, Preempted
from flywheel.launch.launchers import LAUNCHERS, launcher_argv, shape
from flywheel.launch.nodes import render_jobs
from flywheel.launch.ranks import ENV_LAUNCH, ENV_LOGS, ENV_PARENT

if TYPE_CHECKING:
    from flywheel.tracking.registry import RoundPlan

TAIL_LINES = 30


class StageFailed(RuntimeError):
    """A launched stage crashed (not bad input: that is a FlywheelError); the message has the rank's last lines.

    Not a FlywheelError, so the flow's task retries it like any transient failure (a lost node, a timeout).
    """


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM to the job's whole group, SIGKILL to what is left after the grace period; reaps the leader."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # the leader is reaped here; its children by it, or by init once it is gone
            if not _group_alive(pgid):
                return
            time.sleep(0.2)
    proc.poll()


def failing_rank(launcher_output: str) -> tuple[int | None, int | None]:
    """The rank torchrun names as the root cause of a failure, and its exit code (accelerate uses torchrun too)."""
    cause = launcher_output.rsplit("Root Cause", 1)
    if len(cause) < 2:
        return None, None
    rank = re.search(r"rank\s*:\s*(\d+)", cause[1])
    code = re.search(r"exitcode\s*:\s*(-?\d+)", cause[1])
    return (int(rank.group(1)) if rank else None), (int(code.group(1)) if code else None)


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


class _Follow:
    """New complete lines of a file another process appends to (a rank's log), read without holding it open."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = path, 0, ""

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        *done, self.rest = (self.rest + chunk).split("\n")
        return done


def run_stage(cfg: FlywheelConfig, stage: str, payload: dict[str, Any], spec: LaunchSpec, folder: Path,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `flywheel stage <stage>` as a job under `spec`, wait for it and return the result rank 0 wrote.

    `payload` is what the stage reads (`config`, `plan` and stage arguments). A non-zero exit raises
    `StageFailed` (or `Preempted` for a stage stopped by SIGTERM; `FlywheelError` for bad input, exit
    code 2) with the failing rank's last lines. Every process of the job writes to files, never to a
    pipe of ours, so the job keeps running (and stops cleanly) even if this process is killed.
    """
    LAUNCHERS[spec.kind].check(spec)
    logs, inp, out = _job_files(folder, payload)
    argv = launcher_argv(spec, [stage, "--input", str(inp), "--result", str(out)], job_id=folder.name)
    say(f"{stage}: launching {spec.kind} ({shape(spec)}); logs in {logs}")
    t0 = time.monotonic()
    proc = _start(argv, spec, logs)
    _follow(proc, stage, spec, logs, say, deadline=t0 + spec.timeout_minutes * 60 if spec.timeout_minutes else None)
    if proc.returncode != 0:
        raise _failure(stage, proc.returncode, logs, time.monotonic() - t0)
    if not out.exists():
        raise StageFailed(f"{stage}: the job exited 0 but wrote no result ({out}); last lines of "
                          f"{logs / 'rank0.log'}:\n{_tail(logs / 'rank0.log')}")
    return json.loads(out.read_text())


def _job_files(folder: Path, payload: dict[str, Any]) -> tuple[Path, Path, Path]:
    """The job's folder with its logs folder and input file written, and no result from an earlier try."""
    folder.mkdir(parents=True, exist_ok=True)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    inp, out = folder / "input.json", folder / "result.json"
    out.unlink(missing_ok=True)
    write_json(inp, payload)
    return logs, inp, out


def _start(argv: list[str], spec: LaunchSpec, logs: Path) -> subprocess.Popen:
    """The launcher in a session of its own, writing to files only, so it outlives this process cleanly."""
    env = {**os.environ, ENV_LOGS: str(logs), ENV_PARENT: str(os.getpid()), ENV_LAUNCH: spec.kind,
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}  # progress bars would flood the run log
    with open(logs / "launcher.log", "w") as launcher_log:
        return subprocess.Popen(argv, stdout=launcher_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def _follow(proc: subprocess.Popen, stage: str, spec: LaunchSpec, logs: Path, say: Callable[[str], None],
            deadline: float | None) -> None:
    """Rank 0's lines to `say` until the job exits; past the deadline, or on any exception, the group is stopped."""
    rank0 = _Follow(logs / "rank0.log")
    try:
        while True:
            finished = proc.poll() is not None
            for line in rank0.lines():
                say(line)
            if finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                say(f"{stage}: past launch.timeout_minutes ({spec.timeout_minutes}); stopping its processes")
                stop_group(proc, spec.grace_seconds)
                raise StageFailed(f"{stage}: stopped after launch.timeout_minutes = {spec.timeout_minutes} "
                                  f"(each rank saved its checkpoint if it could); logs in {logs}")
            time.sleep(0.5)
    except BaseException:
        stop_group(proc, spec.grace_seconds)  # cancelled, timed out or interrupted: no rank outlives us
        raise


def _failure(stage: str, returncode: int, logs: Path, seconds: float) -> Exception:
    """The error of a job that exited non-zero, with the failing rank's last lines (and the launcher's if unknown)."""
    rank, code = failing_rank((logs / "launcher.log").read_text(errors="replace"))
    code = returncode if code is None else code
    where = logs / f"rank{rank or 0}.log"
    what = f"rank {rank}" if rank is not None else "the job"
    message = f"{stage}: {what} exited with code {code} after {seconds:.0f} s; last lines of {where}:\n{_tail(where)}"
    if rank is None:
        message += f"\nlast lines of {logs / 'launcher.log'}:\n{_tail(logs / 'launcher.log')}"
    if code in (143, -signal.SIGTERM) or "stopped by SIGTERM" in _tail(where):
        return Preempted(message)
    if code == FlywheelError.exit_code:  # bad input: the same every time, so no retry
        return FlywheelError(message)
    return StageFailed(message)


def job_folder(cfg: FlywheelConfig, round_n: int, stage: str) -> Path:
    """A fresh folder for one launch of a stage (a retry gets its own, so its logs never mix with the last)."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    return cfg.home / "launch" / cfg.name / f"round-{round_n}" / f"{stage}-{stamp}"


def keep_logs(cfg: FlywheelConfig, round_n: int, stage: str, logs: Path, since_ms: int) -> list[str]:
    """Every rank's log as an artifact (`logs/`) of the stage's MLflow runs started since the launch."""
    from flywheel.tracking.store import STAGE_TAG, open_tracker

    if not logs.is_dir() or not any(logs.iterdir()):
        return []
    tracker = open_tracker(cfg)
    runs = [r.info.run_id for r in tracker.stage_runs(round_n)
            if r.info.start_time >= since_ms and r.data.tags.get(STAGE_TAG, "").startswith(stage)]
    for run_id in runs:
        tracker.log_artifact(run_id, logs, "logs")
    return runs


def launched(cfg: FlywheelConfig, stage: str, plan: RoundPlan, arguments: dict[str, Any], spec: LaunchSpec,
             say: Callable[[str], None], label: str | None = None) -> dict[str, Any]:
    """`run_stage` for a round's stage, with its logs kept in MLflow whether it succeeds or fails.

    The job's input file holds the config, the plan (as JSON: `RoundPlan.to_json`) and the stage's arguments.
    """
    folder = job_folder(cfg, plan.round, label or stage)
    since = int(time.time() * 1000) - 1000
    if spec.nnodes > 1:  # this process runs node 0's agent; the others join torchrun's rendezvous
        files = render_jobs(cfg, spec, stage, ["stage", stage, "--input", str(folder / "input.json"),
                                               "--result", str(folder / "result.json")], folder, nodes=spec.nnodes - 1)
        say(f"{stage}: waiting for {spec.nnodes - 1} more node(s) at {spec.rdzv_endpoint}; start them with "
            f"`sbatch {files['slurm']}` or `kubectl apply -f {files['kubernetes']}` (the home must be shared)")
    payload = {"config": cfg.model_dump(mode="json"), "plan": plan.to_json(), **arguments}
    try:
        return run_stage(cfg, stage, payload, spec, folder, say=say)
    finally:
        try:
            keep_logs(cfg, plan.round, stage, folder / "logs", since)
        except Exception as exc:  # noqa: BLE001 - the stage's own outcome matters more than its logs' copy
            say(f"{stage}: could not copy the logs of {folder} to MLflow ({exc})")
