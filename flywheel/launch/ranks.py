"""Inside a launched job: how this process was started, and what each rank does before the stage runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

ENV_LOGS = "FLYWHEEL_STAGE_LOGS"  # the folder where every rank writes rank<R>.log
ENV_PARENT = "FLYWHEEL_PARENT_PID"  # the process that launched the job: ranks stop when it is gone
ENV_LAUNCH = "FLYWHEEL_LAUNCH"  # local | torchrun | accelerate, recorded beside the stage's output


def launch_kind() -> str:
    """How this process was started: what the launcher said, else torchrun's own variables, else local."""
    if os.environ.get(ENV_LAUNCH):
        return os.environ[ENV_LAUNCH]
    return "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "local"


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
