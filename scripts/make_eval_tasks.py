"""Regenerate the bundled tiny-world evaluation data in flywheel/evaluation/tasks/ (commit the result)."""

from __future__ import annotations

from flywheel.evaluation import TASKS_DIR
from flywheel.evaluation.world_data import write_rows


def main() -> None:
    """Write the files and say how many rows each has, so a reviewer sees what changed."""
    for name, count in write_rows(TASKS_DIR).items():
        print(f"{TASKS_DIR / name}: {count} rows")


if __name__ == "__main__":
    main()
