"""The launchers, one entry each: the command line that starts `flywheel stage ...`, its shape in words, its checks.

A third launcher is one more entry in `LAUNCHERS` (and its name in `LaunchSpec.kind`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import LaunchSpec
from flywheel.errors import FlywheelError


def _processes(spec: LaunchSpec) -> str:
    return f"{spec.nproc_per_node or 1} process(es)"


def _no_check(spec: LaunchSpec) -> None:
    return None


@dataclass(frozen=True)
class Launcher:
    """One launcher: `command(spec, job_id)` is its own argv up to the Python module it runs."""

    kind: str
    command: Callable[[LaunchSpec, str], list[str]]
    processes: Callable[[LaunchSpec], str] = _processes  # how many processes per node, in words
    check: Callable[[LaunchSpec], None] = _no_check  # raises FlywheelError before anything starts


def _local(spec: LaunchSpec, job_id: str) -> list[str]:
    return [sys.executable]


def _torchrun(spec: LaunchSpec, job_id: str) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node or 1}",
            f"--nnodes={spec.nnodes}", "--max-restarts=0", f"--shutdown-timeout={int(spec.grace_seconds)}"]
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        return [*argv, "--standalone"]
    return [*argv, "--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={job_id}"]


def _accelerate(spec: LaunchSpec, job_id: str) -> list[str]:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(spec.config_file),
            "--num_machines", str(spec.nnodes)]
    if spec.nproc_per_node:
        argv += ["--num_processes", str(spec.nproc_per_node * spec.nnodes)]
    if spec.rdzv_endpoint:
        host, port = spec.rdzv_endpoint.rsplit(":", 1)
        argv += ["--main_process_ip", host, "--main_process_port", port, "--rdzv_backend", "c10d"]
    return argv


def _accelerate_processes(spec: LaunchSpec) -> str:
    return f"processes from {spec.config_file}" if spec.nproc_per_node is None else _processes(spec)


def _accelerate_file_exists(spec: LaunchSpec) -> None:
    if not Path(str(spec.config_file)).expanduser().is_file():
        raise FlywheelError(f"launch.config_file: {spec.config_file} is not a file (relative paths are read from "
                            f"{Path.cwd()}); point it at an accelerate config such as deploy/accelerate/fsdp.yaml")


LAUNCHERS: dict[str, Launcher] = {launcher.kind: launcher for launcher in (
    Launcher("local", _local),
    Launcher("torchrun", _torchrun),
    Launcher("accelerate", _accelerate, processes=_accelerate_processes, check=_accelerate_file_exists),
)}


def launcher_argv(spec: LaunchSpec, stage_args: list[str], job_id: str) -> list[str]:
    """The command line that starts `flywheel stage ...` on this node under `spec`'s launcher."""
    return [*LAUNCHERS[spec.kind].command(spec, job_id), "-m", "flywheel.cli", "stage", *stage_args]


def shape(spec: LaunchSpec) -> str:
    """The job's processes in words, e.g. "2 process(es) × 4 node(s)"."""
    procs = LAUNCHERS[spec.kind].processes(spec)
    return f"{procs} × {spec.nnodes} node(s)" if spec.nnodes > 1 else procs
