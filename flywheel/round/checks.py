"""Checks made before a round does any work."""

from __future__ import annotations

from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError


def check_gate_metric(cfg: FlywheelConfig) -> None:
    """`promotion.metric` and every guard must be names the evaluation will report: checked before any work."""
    _check_metric(cfg, cfg.promotion.metric, "promotion.metric")
    for i, guard in enumerate(cfg.promotion.guards):
        _check_metric(cfg, guard.metric, f"promotion.guards.{i}.metric")


def evaluated_tasks(cfg: FlywheelConfig) -> list[str]:
    """The lm-eval tasks and groups the evaluation runs (presets expanded), in order."""
    from flywheel.evaluation.registry import PRESETS

    return list(dict.fromkeys(t for n in cfg.evaluation.tasks for t in ([t for t, _ in PRESETS[n]]
                                                                         if n in PRESETS else [n])))


def _check_metric(cfg: FlywheelConfig, metric: str, field: str) -> None:
    """Known from each task's config (lm-eval's YAML, read without data); a task whose config does not list its
    metrics lets any name under `eval/<task>/` through (its names are known only after it runs)."""
    from flywheel.evaluation.likelihood import GOLD_TARGETS, METRIC
    from flywheel.evaluation.registry import reported_metrics
    from flywheel.metrics import AVG, PREFIX, metric_key

    if metric == AVG:
        return
    known: list[str] = [AVG]
    for task in evaluated_tasks(cfg):
        names = reported_metrics(task)
        if names is None and metric.startswith(metric_key(task, "")):
            return
        known += [metric_key(task, m) for m in names or []]
        gold = any(t == task or t.startswith(f"{task}_") for t in GOLD_TARGETS)  # a group: its subjects' pooled
        if cfg.evaluation.likelihood and gold:  # the gold solution's bits per byte beside them
            known.append(metric_key(task, METRIC))
    if metric not in known:
        raise FlywheelError(f"{field}: '{metric}' is not a metric the evaluation reports (tasks "
                            f"{', '.join(cfg.evaluation.tasks)}); use one of {', '.join(known)}"
                            + ("" if metric.startswith(PREFIX) else f" (names start with '{PREFIX}')"))
