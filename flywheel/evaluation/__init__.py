"""The evaluation stage: lm-eval on a checkpoint, flat metric names, the bundled offline tasks.

Importing this package is cheap; lm-eval (5-7 s to import) loads only when a run needs it.
"""

from __future__ import annotations

from flywheel.evaluation.registry import BUNDLED, PRESETS, TASKS_DIR, TaskSpec, resolve_tasks
from flywheel.evaluation.run import EvalResult, check_backend, eval_dir, evaluate, format_table, print_table

__all__ = [
    "BUNDLED",
    "PRESETS",
    "TASKS_DIR",
    "EvalResult",
    "TaskSpec",
    "check_backend",
    "eval_dir",
    "evaluate",
    "format_table",
    "print_table",
    "resolve_tasks",
]
