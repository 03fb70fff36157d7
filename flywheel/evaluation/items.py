"""Per-item scores: what the noise-aware promotion gate pairs between a candidate and its reference.

An evaluation's headline numbers are means over items; comparing two models by their means alone
throws away that both answered the *same* items. `item_scores` keeps, per task and per flat metric
name (the names of flywheel.metrics), every document's score, plus the protocol that decides which
items and prompts there were (tasks, limit, few-shot count, kind) and the task tree that
`eval/avg` is computed over. `metric_terms` writes a metric as the weighted sum of per-task item
means that it is, so a difference of the metric is the same weighted sum of paired differences.

    items.json   {"protocol": {...}, "top": [...], "groups": {group: [tasks]},
                  "scores": {task: {metric: {doc_id: score}}}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.metrics import AVG, PREFIX, metric_name, primary_metric, top_level

ITEMS_FILE = "items.json"


def item_scores(results: Mapping[str, Any], protocol: dict[str, Any]) -> dict[str, Any]:
    """Every document's numeric score per task and metric, from `simple_evaluate`'s output (with samples)."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for task, samples in results.get("samples", {}).items():
        per_metric = scores.setdefault(task, {})
        for s in samples:
            for m in s.get("metrics", []):
                value = s.get(m)
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    continue  # corpus-level metrics (bleu, ...) keep tuples per item: no per-item number
                per_metric.setdefault(metric_name(f"{m},{s.get('filter', 'none')}"), {})[str(s["doc_id"])] = float(value)
    groups = {g: list(members) for g, members in (results.get("group_subtasks") or {}).items()}
    return {"protocol": protocol, "top": top_level(results), "groups": groups, "scores": scores}


def _leaves(name: str, groups: Mapping[str, list[str]]) -> list[str]:
    if name not in groups:
        return [name]
    return [leaf for child in groups[name] for leaf in _leaves(child, groups)]


def _pooled(name: str, items: Mapping[str, Any], metric: str | None) -> dict[tuple[str, str], float]:
    """A task's (or group's, items pooled over its tasks) score as {(task, metric): weight}; weights sum to 1."""
    scores = items["scores"]
    terms: dict[tuple[str, str], float] = {}
    for leaf in _leaves(name, items["groups"]):
        if leaf not in scores:
            continue
        m = metric or primary_metric(leaf, scores[leaf])
        if m is not None and scores[leaf].get(m):
            terms[(leaf, m)] = float(len(scores[leaf][m]))
    total = sum(terms.values())
    return {k: n / total for k, n in terms.items()} if total else {}


def metric_terms(items: Mapping[str, Any], metric: str) -> dict[tuple[str, str], float]:
    """`metric` as {(task, item metric): coefficient}: the metric is the sum of coefficient × that item mean.

    `eval/avg` is the mean of the top-level tasks' primary scores (a group pools its tasks' items, as
    lm-eval's size-weighted group aggregate does); `eval/<task>/<metric>` is that task's items (or its
    group's, pooled). A metric with no per-item scores cannot be paired, and says so.
    """
    if metric == AVG:
        tops = [t for t in items["top"] if _pooled(t, items, None)]
        terms: dict[tuple[str, str], float] = {}
        for t in tops:
            for key, w in _pooled(t, items, None).items():
                terms[key] = terms.get(key, 0.0) + w / len(tops)
    else:
        task, _, name = metric.removeprefix(PREFIX).partition("/")
        terms = _pooled(task, items, name) if metric.startswith(PREFIX) and name else {}
    if not terms:
        raise FlywheelError(f"promotion.metric: '{metric}' has no per-item scores in the evaluation's samples "
                            "(a corpus-level metric, or a task the evaluation did not run), so the paired gate "
                            "cannot bootstrap it; use promotion.rule: point, or another metric")
    return terms
