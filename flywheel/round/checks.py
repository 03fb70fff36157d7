"""Checks made before a round does any work."""

from __future__ import annotations

import re

from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError


def check_gate_metric(cfg: FlywheelConfig) -> None:
    """`promotion.metric` and every guard must be names the evaluation will report: checked before any work."""
    _check_metric(cfg, cfg.promotion.metric, "promotion.metric")
    for i, guard in enumerate(cfg.promotion.guards):
        _check_metric(cfg, guard.metric, f"promotion.guards.{i}.metric")


def _check_metric(cfg: FlywheelConfig, metric: str, field: str) -> None:
    from flywheel.evaluation.registry import BUNDLED, PRESETS, TASKS_DIR
    from flywheel.metrics import AVG, PREFIX, metric_key

    if metric == AVG:
        return
    tasks = [t for n in cfg.evaluation.tasks for t in ([t for t, _ in PRESETS[n]] if n in PRESETS else [n])]
    known: list[str] = [AVG]
    for task in dict.fromkeys([*cfg.evaluation.tasks, *tasks]):
        if task in BUNDLED:  # our own task files: their metric_list lines name every metric they report
            text = (TASKS_DIR / f"{task}.yaml").read_text()
            known += [metric_key(task, m) for m in re.findall(r"^\s*-\s*metric:\s*(\S+)", text, re.M)]
        elif task not in PRESETS and metric.startswith(metric_key(task, "")):
            return  # an lm-eval task whose metric names are known only after it runs
    if metric not in known:
        raise FlywheelError(f"{field}: '{metric}' is not a metric the evaluation reports (tasks "
                            f"{', '.join(cfg.evaluation.tasks)}); use one of {', '.join(known)}"
                            + ("" if metric.startswith(PREFIX) else f" (names start with '{PREFIX}')"))
