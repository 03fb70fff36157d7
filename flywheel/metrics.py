"""Metric names: the one place lm-eval's output becomes the flat names every stage logs and compares.

lm-eval reports `results[task]["exact_match,none"]`; the flywheel logs `eval/world_gsm/exact_match`.
The filter suffix is dropped when it is lm-eval's default (`none`) and kept as `_<filter>` otherwise,
so `exact_match,strict-match` and `exact_match,flexible-extract` stay two names. `eval/avg` is the
mean of each requested task's primary metric (a group counts once, not once per subtask).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "eval/"
AVG = "eval/avg"  # the promotion gate's default metric (config.PromotionConfig.metric)
STDERR_MARK = "_stderr,"
DEFAULT_FILTER = "none"
# Metrics where a smaller value is the better model: likelihoods per byte or word (evaluation/likelihood.py's
# bpb, lm-eval's perplexity tasks). Every other metric is an accuracy-like score, higher is better.
GOLD_BPB = "bpb"  # bits per byte of a task's gold solution, added beside its scores (evaluation/likelihood.py)
LOWER_IS_BETTER = frozenset({GOLD_BPB, "bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity"})

# The score each task is judged by, as flat metric names. Tasks not listed use their first metric.
PRIMARY_METRICS: dict[str, str] = {
    "world_gsm": "exact_match",
    "world_mc": "acc",
    "gsm8k": "exact_match_flexible_extract",
    "gsm8k_cot": "exact_match_flexible_extract",
    "minerva_math": "exact_match",
    "gpqa_main_zeroshot": "acc_norm",
    "bbh_cot_fewshot": "exact_match_get_answer",
    "ifeval": "prompt_level_strict_acc",
    "humaneval": "pass_at_1_create_test",
    "mbpp": "pass_at_1",
    "truthfulqa_mc2": "acc",
    "arc_challenge": "acc_norm",
    "mmlu_pro": "exact_match_custom_extract",
}


def _clean(name: str) -> str:
    """Keep names MLflow accepts and people can type: letters, digits, '_', '.', '-'."""
    name = name.replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def metric_name(key: str) -> str:
    """lm-eval's `metric,filter` key as a stable flat name: `acc,none` -> `acc`, `em,strict-match` -> `em_strict_match`."""
    metric, _, flt = key.partition(",")
    if flt and flt != DEFAULT_FILTER:
        metric = f"{metric}_{flt.replace('-', '_')}"
    return _clean(metric)


def metric_key(task: str, metric: str) -> str:
    """The full flat name of one task's metric, e.g. `eval/world_gsm/exact_match`."""
    return f"{PREFIX}{_clean(task)}/{metric}"


def task_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """One task's numeric metrics from an lm-eval results row; stderrs, aliases and sample counts are dropped."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if "," not in key or STDERR_MARK in key or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[metric_name(key)] = float(value)
    return out


def primary_metric(task: str, available: Iterable[str] = ()) -> str | None:
    """The flat metric a task is judged by: the listed one if the run reported it, else the run's first metric
    (never the gold-solution bpb flywheel adds beside a task's own scores, so it never enters `eval/avg`)."""
    given = list(available)
    available = [m for m in given if m != GOLD_BPB]
    listed = PRIMARY_METRICS.get(task)
    if listed and (not given or listed in available):
        return listed
    return available[0] if available else None


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of a flat metric is better, judged by its last path part: `eval/world_gsm/bpb` is
    not (LOWER_IS_BETTER), `eval/world_gsm/exact_match` and `eval/avg` (a mean of primary scores) are."""
    return metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


def top_level(results: Mapping[str, Any]) -> list[str]:
    """The tasks and groups that were asked for: everything that is not a member of a reported group."""
    subtasks = results.get("group_subtasks", {}) or {}
    members = {child for children in subtasks.values() for child in children}
    names = [*results.get("results", {}), *results.get("groups", {})]
    return [n for n in dict.fromkeys(names) if n not in members]


def _primary_value(name: str, per_task: Mapping[str, dict[str, float]], subtasks: Mapping[str, list[str]]) -> float | None:
    """A task's primary score; a group without its own aggregate scores the mean of its members."""
    metrics = per_task.get(name, {})
    primary = primary_metric(name, metrics)
    if primary is not None:
        return metrics[primary]
    values = [v for child in subtasks.get(name, []) if (v := _primary_value(child, per_task, subtasks)) is not None]
    return sum(values) / len(values) if values else None


def flatten_results(results: Mapping[str, Any]) -> dict[str, float]:
    """`simple_evaluate`'s output as flat `eval/<task>/<metric>` names plus `eval/avg`."""
    rows = {**results.get("results", {}), **results.get("groups", {})}
    per_task = {name: task_metrics(row) for name, row in rows.items()}
    flat = {metric_key(task, m): v for task, metrics in per_task.items() for m, v in sorted(metrics.items())}
    subtasks = results.get("group_subtasks", {}) or {}
    primaries = [v for name in top_level(results) if (v := _primary_value(name, per_task, subtasks)) is not None]
    if primaries:
        flat[AVG] = sum(primaries) / len(primaries)
    return dict(sorted(flat.items()))


def by_task(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Regroup flat `eval/<task>/<metric>` names per task (without `eval/avg`), e.g. to print a table."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(PREFIX) and key != AVG:
            task, _, metric = key.removeprefix(PREFIX).partition("/")
            out.setdefault(task, {})[metric] = value
    return out
