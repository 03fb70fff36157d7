"""Run model-written Python against its tests in a separate, limited, isolated process (code_exec's engine).

Layers, strongest available first:
- bubblewrap (`bwrap`): read-only root, private /tmp with only a fresh work folder writable, no network,
  own pid namespace (when its init dies the kernel kills everything inside), dies with its parent.
- `unshare -rn --pid`: no network and its own pid namespace, but the file system is NOT isolated.
- nothing: resource limits and the timeout only (a warning says so, once).
Always: a wall-clock timeout that SIGKILLs the whole process group; RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE /
RLIMIT_NPROC set by the harness before any model code runs; as root the child runs as `nobody`, because the
kernel never enforces RLIMIT_NPROC for uid 0 and a fork bomb would otherwise be bounded only by the timeout.

The harness runs the code, then each test separately, and reports `<nonce> <passed>` on stdout as its very
last act. The nonce arrives on stdin and is never on disk or in argv, so code that prints, exits 0 early,
crashes or hangs cannot fake a pass: no report means a score of 0. (Code that deliberately digs the nonce
out of the harness's memory could still forge it; this guards against accidents and cheap hacks, not a
determined attacker. Run untrusted models' code on a machine you can afford to lose.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger("flywheel.posttrain")

NOBODY = 65534
# Kept free of names that model code could reach through builtins: everything it needs after the model's
# code has run is bound to a local first, so replacing builtins.exec or json.dumps cannot fake a pass.
HARNESS = r"""# flywheel-sandbox-harness
import json, os, resource, sys
job = json.loads(sys.stdin.read())
os.close(0)
os.open(os.devnull, os.O_RDONLY)
for name, value in job["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))

def main(job, _exec=exec, _compile=compile, _write=os.write, _exit=os._exit, _base=BaseException,
         _flush=sys.stdout.flush, _stdout=os.dup(1)):
    nonce = job.pop("nonce")
    ns = {"__name__": "__sandbox__"}
    passed = 0
    try:
        _exec(_compile(job.pop("code"), "<completion>", "exec"), ns)
        ok = True
    except _base:
        ok = False
    if ok:
        for test in job.pop("tests"):
            try:
                _exec(_compile(test, "<test>", "exec"), ns)
                passed += 1
            except _base:
                pass
    try:
        _flush()
    except _base:
        pass
    _write(_stdout, ("\n%s %d\n" % (nonce, passed)).encode())
    _exit(0)

main(job)
"""


@dataclass(frozen=True)
class Limits:
    """What one run of model code may use: wall time, address space, processes, bytes per file written."""

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    max_processes: int = 64
    max_file_bytes: int = 16 << 20


@dataclass
class RunResult:
    """How a run ended; `score` is the fraction of tests passed, 0 unless the harness finished its report."""

    passed: int
    total: int
    reported: bool
    timed_out: bool
    seconds: float
    mode: str
    run_id: str
    workdir: str

    @property
    def score(self) -> float:
        return self.passed / self.total if self.reported and self.total else 0.0


@dataclass(frozen=True)
class _Setup:
    mode: str  # bwrap | unshare | none
    python: str
    demote: bool  # run as nobody (we are root)


_setup: _Setup | None = None
_setup_lock = threading.Lock()


def _prefix(mode: str, workdir: str) -> list[str]:
    """The isolation wrapper in front of `python -I -c HARNESS`."""
    if mode == "bwrap":
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                "--bind", workdir, "/tmp/work", "--chdir", "/tmp/work", "--unshare-all", "--die-with-parent",
                "--new-session", "--cap-drop", "ALL", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
                "--setenv", "HOME", "/tmp/work", "--setenv", "LANG", "C.UTF-8"]
    if mode == "unshare":
        return ["unshare", "-rn", "--pid", "--fork", "--kill-child", "--mount-proc"]
    return []


def _python_candidates() -> list[str]:
    """This interpreter first; as `nobody` it may be unreadable (e.g. under /root), so then the system one."""
    found = [sys.executable]
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        found.append(system)
    return found


def _probe(mode: str, python: str, demote: bool) -> bool:
    """True when this wrapper + interpreter + user can run a trivial program here."""
    with tempfile.TemporaryDirectory(prefix="flywheel-probe-") as workdir:
        if demote:
            os.chown(workdir, NOBODY, NOBODY)
        cmd = [*_prefix(mode, workdir), python, "-I", "-c", "print(6 * 7)"]
        try:
            out = subprocess.run(cmd, cwd=workdir, capture_output=True, timeout=30, env=_env(workdir),
                                 **_demote_kwargs(demote))
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0 and out.stdout.strip() == b"42"


def _demote_kwargs(demote: bool) -> dict:
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if demote else {}


def _env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}


def sandbox_setup(refresh: bool = False) -> _Setup:
    """Pick the strongest isolation that works on this machine (probed once per process) and warn if weak."""
    global _setup
    with _setup_lock:
        if _setup is not None and not refresh:
            return _setup
        demote = hasattr(os, "geteuid") and os.geteuid() == 0
        modes = [m for m in ("bwrap", "unshare") if shutil.which(m)] + ["none"]
        choice = None
        for mode in modes:
            for python in _python_candidates():
                if _probe(mode, python, demote):
                    choice = _Setup(mode, python, demote)
                    break
            if choice:
                break
        if choice is None:  # even plain python as nobody failed: run as ourselves
            choice = _Setup("none", sys.executable, False)
        if choice.mode == "unshare":
            log.warning("code_exec: bubblewrap (bwrap) not found; model code runs with no network and "
                        "resource limits, but file-system isolation is OFF (install the 'bubblewrap' "
                        "package)")
        elif choice.mode == "none":
            log.warning("code_exec: neither bwrap nor unshare works here; model code runs with resource "
                        "limits and a timeout only: network and file system are NOT isolated (install "
                        "'bubblewrap')")
        if hasattr(os, "geteuid") and os.geteuid() == 0 and not choice.demote:
            log.warning("code_exec: running as root and cannot switch to 'nobody'; the process limit is not "
                        "enforced, so a fork bomb is bounded only by the timeout")
        _setup = choice
        return choice


def _user_tasks(uid: int) -> int:
    """Threads the kernel counts against `uid`'s RLIMIT_NPROC right now."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


def _rlimits(limits: Limits, uid: int) -> dict[str, int]:
    """Limits for the harness; NPROC counts every task of the user, so it is added to what already runs."""
    return {
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_CPU": math.ceil(limits.timeout_s) + 1,
        "RLIMIT_FSIZE": limits.max_file_bytes,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": _user_tasks(uid) + limits.max_processes,
    }


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait for `pid` to exit WITHOUT reaping it, so its process-group id stays ours until the kill."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _report(out: IO[bytes], nonce: str, limit: int) -> int | None:
    """The harness's final `<nonce> <passed>` line, if it wrote one."""
    out.seek(0)
    data = out.read(limit + 4096)
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        head, _, count = line.partition(" ")
        if head == nonce and count.isdigit():
            return int(count)
    return None


def run_tests(code: str, tests: list[str], limits: Limits = Limits()) -> RunResult:
    """Run `code`, then each of `tests` in the same namespace, in a sandbox; count the tests that pass."""
    setup = sandbox_setup()
    run_id = secrets.token_hex(8)  # in argv, so leftover processes can be found; unlike the nonce, not secret
    nonce = secrets.token_hex(16)
    uid = NOBODY if setup.demote else os.getuid()
    job = {"nonce": nonce, "code": code, "tests": list(tests), "limits": _rlimits(limits, uid)}
    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="flywheel-code-")
    try:
        os.chmod(workdir, 0o700)
        if setup.demote:
            os.chown(workdir, NOBODY, NOBODY)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as stdin:
            stdin.write(json.dumps(job).encode())
            stdin.seek(0)
            cmd = [*_prefix(setup.mode, workdir), setup.python, "-I", "-c", HARNESS, f"flywheel-run-{run_id}"]
            proc = subprocess.Popen(cmd, cwd=workdir, stdin=stdin, stdout=out, stderr=subprocess.DEVNULL,
                                    env=_env(workdir), start_new_session=True, **_demote_kwargs(setup.demote))
            finished = _wait_unreaped(proc.pid, limits.timeout_s)
            try:  # the leader is not reaped yet, so this group id cannot belong to anyone else
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            passed = _report(out, nonce, limits.max_file_bytes)
    finally:
        _remove(workdir)
    reported = passed is not None
    seconds = time.perf_counter() - t0
    return RunResult(passed or 0, len(tests), reported, not finished, seconds, setup.mode, run_id, workdir)


def _remove(workdir: str) -> None:
    """Delete the work folder even if the code made parts of it unreadable."""
    def fix(func, path, _exc):  # noqa: ANN001 - shutil's onexc signature
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(workdir, onexc=fix)
    else:
        shutil.rmtree(workdir, onerror=fix)
