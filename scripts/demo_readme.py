"""Write the README's demo block from a real `make demo`: the round table and verdicts exactly as printed.

    .venv/bin/python scripts/demo_readme.py          # a fresh clone of HEAD, empty pip/uv caches: install + demo
    .venv/bin/python scripts/demo_readme.py --here   # this checkout's .venv, the demo in an empty temporary home

It runs what a new user runs, times the install and the demo apart, keeps the printed table and verdicts
(`docs/results/demo.json`, with the date, the commit and the machine) and rewrites the block between the
README's demo markers from that file. tests/test_docs.py renders the block from the JSON again and compares, so
the README shows one run's output, not a hand edit. Run it after any change that moves the demo's numbers
(the determinism test proves a rerun on the same machine prints the same table).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from flywheel.data.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULT = ROOT / "docs" / "results" / "demo.json"
START = "<!-- demo:start (scripts/demo_readme.py writes this block from docs/results/demo.json; do not edit) -->"
END = "<!-- demo:end -->"


def printed_table(stdout: str) -> list[str]:
    """The demo's round table and verdict lines, from its 'metric |' header to the line before 'plot:'."""
    lines = stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("metric |")), None)
    if first is None:
        raise SystemExit("the demo printed no round table (no line starts with 'metric |'): see its output above")
    last = next((i for i in range(first, len(lines)) if lines[i].startswith(("plot:", "demo took"))), len(lines))
    return [line.rstrip() for line in lines[first:last]]


def render(result: dict) -> str:
    """The README block: when and where it ran, how long it took, then the table and verdicts as printed."""
    table = [line for line in result["printed"] if "|" in line]
    verdicts = [line for line in result["printed"] if "|" not in line and line.strip()]
    took = f"the demo {result['demo_s']} s"
    if result.get("install_s") is not None:
        took = (f"{result['install_s'] + result['demo_s']} s in all from a fresh clone: the install "
                f"{result['install_s']} s (pip and uv caches empty), {took}")
    return "\n".join([
        START,
        f"As printed by `make demo` on {result['date']} at commit {result['commit']} ({result['machine']}, "
        f"nothing else running); {took}:",
        "", *table, "", *(f"- {v}" for v in verdicts), END])


def write_readme(result: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no demo markers: put {START!r} and {END!r} where the block goes")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text(README, head + render(result) + tail)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine()) \
        if Path("/proc/cpuinfo").exists() else platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, echo its output, return the whole seconds it took and what it printed."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
    return round(time.perf_counter() - t0), proc.stdout


def run_fresh(scratch: Path) -> tuple[int, int, str]:
    """A fresh clone of HEAD with empty pip and uv caches: `make .venv/.installed`, then `make demo`."""
    clone = scratch / "flywheel"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "PIP_CACHE_DIR": str(scratch / "pip-cache"), "UV_CACHE_DIR": str(scratch / "uv-cache"),
           "FLYWHEEL_HOME": str(clone / ".flywheel")}
    install_s, _ = timed(["make", ".venv/.installed"], clone, env)
    demo_s, out = timed(["make", "demo"], clone, env)
    return install_s, demo_s, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--here", action="store_true", help="this checkout's .venv, no install timed")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="flywheel-demo-") as scratch:
        if args.here:
            env = {**os.environ, "FLYWHEEL_HOME": str(Path(scratch) / ".flywheel")}
            install_s = None
            demo_s, out = timed([sys.executable, "-m", "flywheel.cli", "demo", "configs/demo.yaml"], ROOT, env)
        else:
            install_s, demo_s, out = run_fresh(Path(scratch))
    result = {"date": date.today().isoformat(), "commit": commit, "machine": machine(), "install_s": install_s,
              "demo_s": demo_s, "printed": printed_table(out)}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULT, result)
    write_readme(result)
    print(f"{RESULT} and {README}'s demo block written (commit {commit}, demo {demo_s} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
