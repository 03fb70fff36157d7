"""Write deploy/requirements.lock: the exact versions of flywheel's runtime dependencies in this environment.

Run it with the project's tested `.venv` (`make test` passed there): `.venv/bin/python deploy/lock.py`. The
worker image (Dockerfile.worker) installs the project under this file as pip constraints, so the team's
worker runs the versions the test suite ran. Only the runtime closure is written: no dev extras, no pip.
A local version label (torch's `+cpu`) is dropped, so the image takes the platform's build of that version.
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


def closure(root: str) -> dict[str, str]:
    """Every distribution `root` needs at run time (extras it names included), with its installed version."""
    env = default_environment()
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
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


def main() -> int:
    pins = closure("flywheel")
    lines = [f"{name}=={re.sub(r'[+].*$', '', version)}" for name, version in sorted(pins.items())]
    header = ("# flywheel's runtime dependencies at the versions its tests ran with; made by deploy/lock.py.\n"
              "# Used as pip constraints by deploy/Dockerfile.worker. Regenerate after changing pyproject.toml.\n")
    LOCK.write_text(header + "\n".join(lines) + "\n")
    print(f"{LOCK}: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
