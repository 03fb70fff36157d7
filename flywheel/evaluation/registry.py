"""Which lm-eval tasks a config names: presets, the bundled offline tasks, and everything lm-eval ships.

Names are checked before any model loads. The bundled names and presets are known without lm-eval;
only a name that is neither makes us index lm-eval's 14,000+ built-in tasks (about 14 s), once.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED = ("world_gsm", "world_mc")

# name -> ((lm-eval task, few-shot examples for a base model), ...). paper10 follows the usual settings
# of the paper's suite: GSM8K 8-shot CoT, MATH 4-shot (Minerva), GPQA 0, BBH 3-shot CoT, IFEval 0,
# HumanEval 0, MBPP 3, TruthfulQA MC2 0, ARC-Challenge 25, MMLU-Pro 5.
PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    "world": (("world_gsm", 3), ("world_mc", 3)),
    "paper10": (
        ("gsm8k_cot", 8),
        ("minerva_math", 4),
        ("gpqa_main_zeroshot", 0),
        ("bbh_cot_fewshot", 3),
        ("ifeval", 0),
        ("humaneval", 0),
        ("mbpp", 3),
        ("truthfulqa_mc2", 0),
        ("arc_challenge", 25),
        ("mmlu_pro", 5),
    ),
}
_PRESET_SHOTS = {task: shots for members in PRESETS.values() for task, shots in members}
# Tasks that execute model-written code (lm-eval refuses them unless the caller confirms).
UNSAFE = ("humaneval", "mbpp")


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task, group or tag to run, and how many examples a base model sees before each question."""

    name: str
    fewshot: int | None  # None: the task's own default
    bundled: bool


def _spec(name: str) -> TaskSpec:
    return TaskSpec(name, _PRESET_SHOTS.get(name), name in BUNDLED)


@functools.cache
def full_task_manager() -> Any:
    """lm-eval's built-in tasks plus ours; built once per process because indexing takes ~14 s."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=True)


def task_manager(specs: Iterable[TaskSpec]) -> Any:
    """Only our folder when only bundled tasks run (instant); lm-eval's defaults too otherwise."""
    if all(s.bundled for s in specs):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return full_task_manager()


def _unknown(name: str, known: list[str]) -> FlywheelError:
    """The error for a name lm-eval does not know, with the closest names it does."""
    close = difflib.get_close_matches(name, [*PRESETS, *known], n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"presets are {', '.join(PRESETS)}"
    return FlywheelError(
        f"evaluation.tasks: unknown task '{name}'; {hint} (`lm_eval ls tasks` lists every installed task)"
    )


def resolve_tasks(names: Iterable[str]) -> list[TaskSpec]:
    """Expand presets and check every name, before anything expensive happens."""
    names = list(names)
    others = [n for n in names if n not in PRESETS and n not in BUNDLED]
    if others:
        known = full_task_manager().all_tasks
        known_set = set(known)
        for name in others:
            if name not in known_set:
                raise _unknown(name, known)
    specs = [_spec(task) for n in names for task in ([t for t, _ in PRESETS[n]] if n in PRESETS else [n])]
    return list(dict.fromkeys(specs))


def reported_metrics(name: str) -> list[str] | None:
    """The flat metric names (metrics.metric_name) lm-eval will report for one task or group, read from its
    config without loading any data; None when the config does not say (a tag, a Python task class, a list
    inherited through `include`, a metric given as a function)."""
    from flywheel.metrics import metric_name

    if name in BUNDLED:
        cfg = _bundled_config(name)
    else:
        entry = full_task_manager()._entry(name)  # the index entry: the task's YAML as written, no dataset read
        cfg = entry.cfg if entry is not None else None
    if not isinstance(cfg, dict):
        return None
    if "group" in cfg and "aggregate_metric_list" in cfg:
        pairs = [(m["metric"], flt) for m in cfg["aggregate_metric_list"]
                 for flt in _as_list(m.get("filter_list", "none"))]
    elif "metric_list" in cfg:
        filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
        pairs = [(m["metric"], flt) for m in cfg["metric_list"] for flt in filters]
    else:
        return None
    if not all(isinstance(m, str) and re.fullmatch(r"[\w@]+", m) for m, _ in pairs):
        return None  # a metric given as a function: lm-eval names it only when it runs
    return list(dict.fromkeys(metric_name(f"{metric},{flt}") for metric, flt in pairs))


def task_datasets(name: str, depth: int = 0) -> list[str]:
    """The hub datasets a task reads (a group's: its members'), from lm-eval's index without loading any; []
    when the index does not say."""
    entry = full_task_manager()._entry(name)
    cfg = entry.cfg if entry is not None and isinstance(entry.cfg, dict) else {}
    if isinstance(cfg.get("dataset_path"), str):
        return [cfg["dataset_path"]]
    members = cfg.get("task") if isinstance(cfg.get("task"), list) and depth < 3 else []
    return list(dict.fromkeys(p for m in members if isinstance(m, str) for p in task_datasets(m, depth + 1)))


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _bundled_config(name: str) -> dict[str, Any]:
    """Our task files' metric_list (their `!function` tags keep a plain YAML loader from reading them whole)."""
    text = (TASKS_DIR / f"{name}.yaml").read_text()
    return {"metric_list": [{"metric": m} for m in re.findall(r"^\s*-\s*metric:\s*(\S+)", text, re.M)]}
