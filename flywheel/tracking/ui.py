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
    # The UI asks /ui-settings where its API is; Prefect answers with the default port unless told otherwise.
    prefect = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env={**env, "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}, start_new_session=True,
    )
    return [mlflow, prefect]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user took the number: ours is gone
        return False
    return True


def stop(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM each server's process group, then SIGKILL what is left of it after `grace` seconds.

    The whole group counts, not only the server we started: a worker it forked must not outlive it.
    """
    for p in procs:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap the leader, or its zombie keeps the group alive
        if not any(_group_alive(p.pid) for p in procs):
            return
        time.sleep(0.2)
    for p in procs:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=10)


class _Stop(BaseException):
    """A stop signal arrived while the servers ran (a BaseException, like KeyboardInterrupt, so no handler
    on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def serve_uis(cfg: FlywheelConfig, mlflow_port: int, prefect_port: int, say: Callable[[str], None]) -> int:
    """Run both UIs until Ctrl-C, SIGTERM or SIGHUP (or until one server exits), then stop both servers' groups.

    Returns the exit code: 0 after Ctrl-C or a server's own exit, 128 + the signal after SIGTERM (143) or SIGHUP
    (129), as a process killed by it reports. The servers run in their own sessions (so a terminal's Ctrl-C
    reaches only this process, and the groups can be stopped whole); without these handlers SIGTERM or SIGHUP
    would end this process at once and leave both servers running. A background process started from a script
    ignores SIGINT, so SIGTERM is the way to stop one.
    """
    import threading

    received: list[int] = []
    armed = False  # raise only once `procs` holds every server, so none can be lost in between

    def on_signal(signum: int, frame) -> None:  # noqa: ANN001
        received.append(signum)
        if armed:
            raise _Stop(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    procs: list[subprocess.Popen] = []
    code = 0
    try:
        procs = start_uis(cfg, mlflow_port, prefect_port)
        armed = True
        if received:
            raise _Stop(received[0])
        wait_for_server(f"http://127.0.0.1:{mlflow_port}/health", procs[0], 120)
        wait_for_server(f"http://127.0.0.1:{prefect_port}/api/health", procs[1], 120)
        say(f"MLflow UI:  http://127.0.0.1:{mlflow_port}")
        say(f"Prefect UI: http://127.0.0.1:{prefect_port}")
        say("Ctrl-C (or SIGTERM, SIGHUP) stops both.")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        code = 0
    except _Stop as stopped:
        code = 128 + stopped.signum
    finally:
        armed = False  # a second signal while stopping is noted, not raised: stop() must finish
        interrupt = signal.getsignal(signal.SIGINT)
        if previous:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stop(procs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if previous:
                signal.signal(signal.SIGINT, interrupt)
    return code
