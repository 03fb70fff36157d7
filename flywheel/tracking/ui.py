"""`flywheel ui`: the MLflow UI and the Prefect UI on 127.0.0.1 over the flywheel's embedded stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError
from flywheel.tracking.store import tracking_uri


def prefect_home(cfg: FlywheelConfig) -> Path:
    """Where the flywheel's embedded Prefect server keeps its database and settings."""
    return cfg.home / "prefect"


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Return when `url` answers; a clear error if the server exits first or never answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise FlywheelError(f"{url}: the server exited with code {proc.returncode}; is the port already in use?")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise FlywheelError(f"{url}: no answer after {timeout:.0f} s")


def start_uis(cfg: FlywheelConfig, mlflow_port: int, prefect_port: int) -> list[subprocess.Popen]:
    """Start both servers in their own process groups (so they can be stopped by PID, children included)."""
    bin_dir = Path(sys.executable).parent
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PREFECT_HOME": str(prefect_home(cfg))}
    mlflow = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", uri, "--default-artifact-root", (cfg.home / "mlflow" / "artifacts").resolve().as_uri()],
        env=env, start_new_session=True,
    )
    prefect = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env=env, start_new_session=True,
    )
    return [mlflow, prefect]


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each server's process group, then SIGKILL what is left after 20 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def serve_uis(cfg: FlywheelConfig, mlflow_port: int, prefect_port: int, say: Callable[[str], None]) -> None:
    procs = start_uis(cfg, mlflow_port, prefect_port)
    try:
        wait_for_server(f"http://127.0.0.1:{mlflow_port}/health", procs[0], 120)
        wait_for_server(f"http://127.0.0.1:{prefect_port}/api/health", procs[1], 120)
        say(f"MLflow UI:  http://127.0.0.1:{mlflow_port}")
        say(f"Prefect UI: http://127.0.0.1:{prefect_port}")
        say("Ctrl-C stops both.")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(procs)
