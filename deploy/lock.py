"""Write deploy/requirements.lock: the exact versions of flywheel's dependencies, runtime and dev, in one file.

`make lock` runs it inside a scratch venv where the project was just resolved afresh (torch from pip's own
step, the rest by uv within pyproject.toml's ranges); `make demo` / `make test` then install exactly this list
with no resolution (`uv pip install --no-deps`), and the worker image (Dockerfile.worker) installs the runtime
part, everything above the DEV_MARK line. A local version label (torch's `+cpu`) is dropped, so a machine takes
its platform's build of that version. The pins hold for Linux, CPython 3.11 (the CI machine); markers for
other platforms are evaluated away when the lock is written.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).with_name("requirements.lock")
ROOT = "flywheel"
DEV_MARK = "# --- dev: make test only (the worker image stops here) ---"
HEADER = ("# flywheel's dependencies at exact versions, made by `make lock` (deploy/lock.py); do not edit by hand.\n"
          "# make demo / make test install it with `uv pip install --no-deps` (torch in its own pip step first);\n"
          "# deploy/Dockerfile.worker installs the lines above the dev mark. Linux, CPython 3.11.\n")


def closure(root: str, root_extras: frozenset[str] = frozenset()) -> dict[str, str]:
    """Every distribution `root` needs at run time (extras it names included), with its installed version."""
    env = default_environment()
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, root_extras)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # a dependency for another platform or Python
        key = canonicalize_name(dist.metadata["Name"])
        if key != canonicalize_name(root):
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": extra}) for extra in (extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def render(runtime: dict[str, str], dev: dict[str, str]) -> str:
    """The lock's text: runtime pins, the dev mark, then what only the dev extra adds."""
    def pins(found: dict[str, str]) -> list[str]:
        return [f"{name}=={re.sub(r'[+].*$', '', version)}" for name, version in sorted(found.items())]
    dev_only = {k: v for k, v in dev.items() if k not in runtime}
    return HEADER + "\n".join([*pins(runtime), DEV_MARK, *pins(dev_only)]) + "\n"


def pins(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """The lock's runtime and dev-only pins, by canonical name."""
    runtime: dict[str, str] = {}
    dev: dict[str, str] = {}
    part = runtime
    for line in text.splitlines():
        if line.strip() == DEV_MARK:
            part = dev
        elif line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            part[canonicalize_name(name)] = version.strip()
    return runtime, dev


def problems(project: dict, text: str) -> list[str]:
    """Where pyproject.toml's [project] table and the lock disagree: each requirement must be pinned inside
    its range, a runtime one above the dev mark."""
    runtime, dev = pins(text)
    found = []
    wanted = [(d, runtime, "runtime") for d in project["dependencies"]]
    wanted += [(d, runtime | dev, "dev") for d in project.get("optional-dependencies", {}).get("dev", [])]
    for dep, where, part in wanted:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name not in where:
            found.append(f"{req.name} ({part}) is not in {LOCK.name}")
        elif not req.specifier.contains(where[name], prereleases=True):
            found.append(f"{LOCK.name} pins {name}=={where[name]}, outside pyproject.toml's {dep}")
    return found


def main() -> int:
    runtime = closure(ROOT)
    dev = closure(ROOT, frozenset({"dev"}))
    if not runtime:
        print(f"{ROOT} is not installed in {sys.prefix}: run this with the venv the project was installed into")
        return 2
    tmp = LOCK.with_suffix(".lock.tmp")
    tmp.write_text(render(runtime, dev))
    tmp.replace(LOCK)
    print(f"{LOCK}: {len(runtime)} runtime packages, {len(set(dev) - set(runtime))} more for dev")
    return 0


if __name__ == "__main__":
    sys.exit(main())
