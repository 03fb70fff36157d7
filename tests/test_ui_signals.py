"""`flywheel ui` stops both of its servers on SIGTERM and SIGHUP, not only on Ctrl-C.

The servers run in their own sessions, so a signal to `flywheel ui` reaches only it; before, SIGTERM ended it
at once and left both servers running. Exit codes: 143 after SIGTERM, 129 after SIGHUP (128 + the signal).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import process_group_gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def _wait(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize(("signum", "exit_code", "when"), [
    (signal.SIGTERM, 143, "both servers answer"),  # the usual case: a running UI is told to stop
    (signal.SIGHUP, 129, "both servers started"),  # still starting: nothing may be left half-started either
])
def test_ui_stops_both_server_groups_and_exits_on_signal(tmp_path: Path, signum: int, exit_code: int, when: str):
    config = tmp_path / "ui.yaml"
    config.write_text(f"name: ui-signals\nhome: {tmp_path / 'home'}\n")
    mlflow_port, prefect_port = _free_port(), _free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "ui", str(config), "--mlflow-port", str(mlflow_port),
         "--prefect-port", str(prefect_port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group, so the finally below can stop it whatever happens
    )
    servers: list[int] = []
    try:
        def both_started() -> bool:
            servers[:] = [c.pid for c in psutil.Process(ui.pid).children()]
            return len(servers) == 2

        _wait(both_started, 60, "flywheel ui starts its two servers")
        if when == "both servers answer":
            _wait(lambda: _answers(f"http://127.0.0.1:{mlflow_port}/health")
                  and _answers(f"http://127.0.0.1:{prefect_port}/api/health"), 90, "both servers answer")
            with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=5) as r:
                settings = json.loads(r.read())  # where the browser's UI sends its API calls: this port, not 4200
            assert settings["api_url"] == f"http://127.0.0.1:{prefect_port}/api", settings
        assert all(os.getpgid(pid) == pid for pid in servers)  # each server leads its own group
        ui.send_signal(signum)
        assert ui.wait(timeout=45) == exit_code, ui.stderr.read()
        for pid in servers:
            assert process_group_gone(pid, timeout=5), f"server group {pid} outlived flywheel ui"
        assert not _answers(f"http://127.0.0.1:{mlflow_port}/health")
        assert not _answers(f"http://127.0.0.1:{prefect_port}/api/health")
    finally:
        for pgid in [ui.pid, *servers]:
            _kill_group(pgid)
        ui.wait(timeout=10)
