"""Run one stage as a job: `flywheel stage NAME` under torchrun or accelerate, in its own process group.

Prefect stays the control plane, not the launcher. A flow's task calls `run_stage`, which writes the
stage's input (the validated config and the round's references) to a folder under `home/launch/`,
starts the launcher in a new session, streams rank 0's lines to `say` as they reach its log, and
reads the stage's result from the JSON file rank 0 writes. Every rank writes `logs/rank<R>.log`
and the launcher (torchrun / accelerate) `logs/launcher.log`, files rather than pipes, so the job
never depends on this process staying alive; every log is kept as an MLflow artifact.

Stopping is never left to chance: an exception while waiting (Prefect cancels the flow run with
SIGTERM, a task timeout, Ctrl-C) or `timeout_minutes` sends SIGTERM to the whole group, every rank
saves a checkpoint at the end of its step (flywheel/safety.py), and whatever is still alive after
`grace_seconds` gets SIGKILL. If this process itself is killed outright, each rank notices that its
parent is gone (`watch_parent`) and stops the same way, so no orphaned rank keeps a device.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig, LaunchSpec
from flywheel.data.io import write_json
from flywheel.errors import FlywheelError, Preempted

ENV_LOGS = "FLYWHEEL_STAGE_LOGS"  # the folder where every rank writes rank<R>.log
ENV_PARENT = "FLYWHEEL_PARENT_PID"  # the process that launched the job: ranks stop when it is gone
ENV_LAUNCH = "FLYWHEEL_LAUNCH"  # local | torchrun | accelerate, recorded beside the stage's output
TAIL_LINES = 30


class StageFailed(RuntimeError):
    """A launched stage crashed (not bad input: that is a FlywheelError); the message has the rank's last lines.

    Not a FlywheelError, so the flow's task retries it like any transient failure (a lost node, a timeout).
    """


def launch_kind() -> str:
    """How this process was started: what the launcher said, else torchrun's own variables, else local."""
    if os.environ.get(ENV_LAUNCH):
        return os.environ[ENV_LAUNCH]
    return "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "local"


def launcher_argv(spec: LaunchSpec, stage_args: list[str], job_id: str) -> list[str]:
    """The command line that starts `flywheel stage ...` on this node under `spec`'s launcher."""
    py = sys.executable
    stage = ["-m", "flywheel.cli", "stage", *stage_args]
    if spec.kind == "local":
        return [py, *stage]
    if spec.kind == "torchrun":
        argv = [py, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node or 1}",
                f"--nnodes={spec.nnodes}", "--max-restarts=0", f"--shutdown-timeout={int(spec.grace_seconds)}"]
        if spec.nnodes == 1 and not spec.rdzv_endpoint:
            argv.append("--standalone")
        else:
            argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={job_id}"]
        return argv + stage
    argv = [py, "-m", "accelerate.commands.launch", "--config_file", str(spec.config_file),
            "--num_machines", str(spec.nnodes)]
    if spec.nproc_per_node:
        argv += ["--num_processes", str(spec.nproc_per_node * spec.nnodes)]
    if spec.rdzv_endpoint:
        host, port = spec.rdzv_endpoint.rsplit(":", 1)
        argv += ["--main_process_ip", host, "--main_process_port", port, "--rdzv_backend", "c10d"]
    return argv + stage


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
    if spec.kind == "accelerate" and not Path(str(spec.config_file)).expanduser().is_file():
        raise FlywheelError(f"launch.config_file: {spec.config_file} is not a file (relative paths are read from "
                            f"{Path.cwd()}); point it at an accelerate config such as deploy/accelerate/fsdp.yaml")
    folder.mkdir(parents=True, exist_ok=True)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    inp, out = folder / "input.json", folder / "result.json"
    out.unlink(missing_ok=True)
    write_json(inp, payload)
    argv = launcher_argv(spec, [stage, "--input", str(inp), "--result", str(out)], job_id=folder.name)
    env = {**os.environ, ENV_LOGS: str(logs), ENV_PARENT: str(os.getpid()), ENV_LAUNCH: spec.kind,
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}  # progress bars would flood the run log
    say(f"{stage}: launching {spec.kind} ({_shape(spec)}); logs in {logs}")
    t0 = time.monotonic()
    rank0 = _Follow(logs / "rank0.log")
    with open(logs / "launcher.log", "w") as launcher_log:
        proc = subprocess.Popen(argv, stdout=launcher_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    deadline = t0 + spec.timeout_minutes * 60 if spec.timeout_minutes else None
    try:
        while True:
            finished = proc.poll() is not None
            for line in rank0.lines():
                say(line)
            if finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                say(f"{stage}: past launch.timeout_minutes ({spec.timeout_minutes}); stopping its processes")
                stop_group(proc, spec.grace_seconds)
                raise StageFailed(f"{stage}: stopped after launch.timeout_minutes = {spec.timeout_minutes} "
                                  f"(each rank saved its checkpoint if it could); logs in {logs}")
            time.sleep(0.5)
    except BaseException:
        stop_group(proc, spec.grace_seconds)  # cancelled, timed out or interrupted: no rank outlives us
        raise
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        text = (logs / "launcher.log").read_text(errors="replace")
        rank, code = failing_rank(text)
        code = proc.returncode if code is None else code
        where = logs / f"rank{rank or 0}.log"
        what = f"rank {rank}" if rank is not None else "the job"
        message = (f"{stage}: {what} exited with code {code} after {seconds:.0f} s; "
                   f"last lines of {where}:\n{_tail(where)}")
        if rank is None:
            message += f"\nlast lines of {logs / 'launcher.log'}:\n{_tail(logs / 'launcher.log')}"
        if code in (143, -signal.SIGTERM) or "stopped by SIGTERM" in _tail(where):
            raise Preempted(message)
        if code == FlywheelError.exit_code:  # bad input: the same every time, so no retry
            raise FlywheelError(message)
        raise StageFailed(message)
    if not out.exists():
        raise StageFailed(f"{stage}: the job exited 0 but wrote no result ({out}); last lines of "
                          f"{logs / 'rank0.log'}:\n{_tail(logs / 'rank0.log')}")
    return json.loads(out.read_text())


def _shape(spec: LaunchSpec) -> str:
    procs = "processes from " + str(spec.config_file) if spec.nproc_per_node is None and spec.kind == "accelerate" \
        else f"{spec.nproc_per_node or 1} process(es)"
    return f"{procs} × {spec.nnodes} node(s)" if spec.nnodes > 1 else procs


# --- inside the job: what each rank does before the stage runs -------------------------------


def rank_logs_to_file() -> None:
    """Each rank writes its stdout and stderr (Python's and C's) to `rank<R>.log` in the job's folder."""
    folder, rank = os.environ.get(ENV_LOGS), int(os.environ.get("RANK", "0"))
    if not folder:
        return
    fd = os.open(Path(folder) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def watch_parent(poll: float = 1.0) -> None:
    """If the process that launched this job dies (even by SIGKILL), SIGTERM ourselves once: save and stop."""
    parent = os.environ.get(ENV_PARENT)
    if not parent:
        return
    pid = int(parent)

    def watch() -> None:
        while True:
            time.sleep(poll)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=watch, name="flywheel-parent-watch", daemon=True).start()


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


def launched(cfg: FlywheelConfig, stage: str, payload: dict[str, Any], spec: LaunchSpec,
             say: Callable[[str], None], label: str | None = None) -> dict[str, Any]:
    """`run_stage` for a round's stage, with its logs kept in MLflow whether it succeeds or fails."""
    round_n = payload["plan"]["round"]
    folder = job_folder(cfg, round_n, label or stage)
    since = int(time.time() * 1000) - 1000
    if spec.nnodes > 1:  # this process runs node 0's agent; the others join torchrun's rendezvous
        files = render_jobs(cfg, spec, stage, ["stage", stage, "--input", str(folder / "input.json"),
                                               "--result", str(folder / "result.json")], folder, nodes=spec.nnodes - 1)
        say(f"{stage}: waiting for {spec.nnodes - 1} more node(s) at {spec.rdzv_endpoint}; start them with "
            f"`sbatch {files['slurm']}` or `kubectl apply -f {files['kubernetes']}` (the home must be shared)")
    try:
        return run_stage(cfg, stage, payload, spec, folder, say=say)
    finally:
        try:
            keep_logs(cfg, round_n, stage, folder / "logs", since)
        except Exception as exc:  # noqa: BLE001 - the stage's own outcome matters more than its logs' copy
            say(f"{stage}: could not copy the logs of {folder} to MLflow ({exc})")


# --- beyond one node: the same torchrun command, started on every node by Slurm or Kubernetes ---------


def _node_command(spec: LaunchSpec, stage_args: list[str], nnodes: int, endpoint: str, job_id: str) -> list[str]:
    """The per-node torchrun command (c10d rendezvous: node ranks are assigned as the agents join)."""
    return ["python", "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc-per-node={spec.nproc_per_node or 1}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={job_id}", "--max-restarts=0", f"--shutdown-timeout={int(spec.grace_seconds)}",
            "-m", "flywheel.cli", *stage_args]


def render_jobs(cfg: FlywheelConfig, spec: LaunchSpec, stage: str, stage_args: list[str], folder: Path,
                nodes: int | None = None, image: str = "ghcr.io/your-org/flywheel:latest",
                namespace: str = "flywheel", home_claim: str = "flywheel-home") -> dict[str, Path]:
    """A Slurm batch script and a Kubernetes Indexed Job that start `nodes` torchrun agents of one stage.

    `nodes` defaults to all `spec.nnodes`; a round that already runs node 0's agent itself renders the
    others (`nnodes - 1`) and waits for them in torchrun's rendezvous. The home must be shared storage.
    """
    import shlex

    import yaml

    nodes = spec.nnodes if nodes is None else nodes
    name = re.sub(r"[^a-z0-9-]", "-", f"flywheel-{cfg.name}-{stage}".lower())[:50].strip("-")
    job_id = folder.name
    gpus = spec.nproc_per_node or 1
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output

    endpoint = spec.rdzv_endpoint or f"{name}-0.{name}:29400"  # pod 0 of the Indexed Job, via the headless service
    slurm_endpoint = spec.rdzv_endpoint or "$head:29400"  # the allocation's first node
    slurm_line = " ".join(f'--rdzv-endpoint="{slurm_endpoint}"' if a == "--rdzv-endpoint=@" else shlex.quote(a)
                          for a in _node_command(spec, stage_args, spec.nnodes, "@", job_id))
    sbatch = folder / f"{stage}.sbatch"
    sbatch.write_text("\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --output={logs}/slurm-%j-%N.log",
        f"#SBATCH --signal=TERM@{int(spec.grace_seconds) + 60}  # preemption: every rank saves before the limit",
        "set -euo pipefail",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"export {ENV_LOGS}={shlex.quote(str(logs))} {ENV_LAUNCH}=torchrun",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"srun --kill-on-bad-exit=1 {slurm_line}",
        "",
    ]))
    k8s_cmd = _node_command(spec, stage_args, spec.nnodes, endpoint, job_id)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
               "spec": {"clusterIP": "None", "selector": {"job-name": name},
                        "ports": [{"name": "rdzv", "port": 29400}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": namespace},
           "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "backoffLimit": 0,
                    "template": {"spec": {
                        "subdomain": name, "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": int(spec.grace_seconds) + 30,
                        "containers": [{
                            "name": "flywheel", "image": image, "command": k8s_cmd, "workingDir": str(Path.cwd()),
                            "env": [{"name": ENV_LOGS, "value": str(logs)}, {"name": ENV_LAUNCH, "value": "torchrun"}],
                            "resources": {"limits": {"nvidia.com/gpu": gpus}},
                            "volumeMounts": [{"name": "flywheel-home", "mountPath": str(cfg.home)}]}],
                        "volumes": [{"name": "flywheel-home", "persistentVolumeClaim": {"claimName": home_claim}}],
                    }}}}
    k8s = folder / f"{stage}-k8s.yaml"
    k8s.write_text(yaml.safe_dump_all([service, job], sort_keys=False))
    return {"slurm": sbatch, "kubernetes": k8s}
