"""One round at a time per flywheel, with a slot that cannot wedge: a lock the OS frees with its process.

The slot is an `flock` on `home/locks/round-<name>.lock`: the kernel drops it the instant its
holder dies (SIGKILL, OOM killer, preemption), so the next trigger takes it within a poll
interval instead of waiting for a lease that an embedded Prefect server never reclaims.
Every trigger, holder or waiter, also leaves a small record (pid, process start time, host,
Prefect flow run, Prefect lease) in `home/locks/round-<name>.d/`; the trigger that takes the
slot reads the records of dead processes on this host, so it can say who died and clean up
after them (crash their flow runs, release their server lease) before it starts.

Across machines (a team Prefect server, workers on several hosts) the flow also holds the
server's global concurrency limit; a dead remote holder's lease expires on the server
(60 s here, plus the repossessor's 15 s scan).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.data.io import write_json


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/<pid>/stat): tells a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def is_alive(record: dict[str, Any]) -> bool:
    """Whether the process a record names still runs (records from other hosts are assumed alive)."""
    if record.get("host") != socket.gethostname():
        return True
    start = process_start(int(record.get("pid", -1)))
    return start is not None and start == record.get("start")


@dataclass
class RoundSlot:
    """Hold the flywheel's round slot for the body of a `with`; see the module docstring."""

    cfg: FlywheelConfig
    flow_run_id: str | None = None
    say: Callable[[str], None] = print
    poll: float = 1.0
    say_every: float = 60.0
    stale: list[dict[str, Any]] = field(default_factory=list)  # records of dead triggers, filled on entry
    waited: float = 0.0

    def __post_init__(self) -> None:
        locks = self.cfg.home / "locks"
        self.lock_path = locks / f"round-{self.cfg.name}.lock"
        self.records = locks / f"round-{self.cfg.name}.d"
        self.me = {"pid": os.getpid(), "start": process_start(os.getpid()), "host": socket.gethostname(),
                   "flow_run_id": self.flow_run_id, "since": time.time(), "holding": False, "lease_id": None}
        self.record_path = self.records / f"{self.me['pid']}-{uuid.uuid4().hex[:8]}.json"
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any] | None:
        for rec in self._read_records():
            if rec.get("holding") and rec.get("_path") != str(self.record_path):
                return rec
        return None

    def _read_records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.records.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a record being written, or a torn one from a crash: ignored
            rec["_path"] = str(path)
            out.append(rec)
        return out

    def update(self, **fields: Any) -> None:
        """Add facts to this trigger's record (e.g. the server lease id once it is held)."""
        self.me.update(fields)
        write_json(self.record_path, self.me)

    def __enter__(self) -> RoundSlot:
        self.records.mkdir(parents=True, exist_ok=True)
        self.update()
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = last_said = time.monotonic()
        said = False
        try:
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                now = time.monotonic()
                if not said or now - last_said >= self.say_every:
                    holder = self._holder()
                    who = (f"pid {holder['pid']} on {holder['host']} (flow run {holder.get('flow_run_id') or '-'}, "
                           f"since {time.strftime('%H:%M:%S', time.localtime(holder['since']))})"
                           if holder else "another trigger")
                    self.say(f"waiting for the round slot of flywheel '{self.cfg.name}': held by {who}; "
                             f"waited {now - t0:.0f} s")
                    last_said, said = now, True
                time.sleep(self.poll)  # SIGTERM interrupts this sleep: a waiting trigger exits on it
        except BaseException:
            self._close()
            raise
        self.waited = time.monotonic() - t0
        self.stale = []
        for rec in self._read_records():
            if rec["_path"] != str(self.record_path) and not is_alive(rec):
                self.stale.append(rec)
                Path(rec["_path"]).unlink(missing_ok=True)
        self.update(holding=True, since=time.time())
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        self.record_path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
