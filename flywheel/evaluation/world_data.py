"""The rows of the bundled tiny-world evaluation tasks, generated from the task generator.

`scripts/make_eval_tasks.py` writes them into `tasks/`; a test regenerates them and compares,
so the committed files cannot drift from the generator. Evaluation rows are held-out problem
identities (disjoint from every training split whatever the world seed); few-shot examples are
training problems, so no evaluation problem ever appears in a prompt.
"""

from __future__ import annotations

import random
from itertools import zip_longest
from pathlib import Path
from typing import Any

from flywheel.world import tasks

EVAL_PER_LEVEL = 40  # level 1 has only ~20 held-out identities, so it gets fewer
FEWSHOT_PER_LEVEL = 2
SEED = 0
EVAL_FILE = "world_eval.jsonl"
FEWSHOT_FILE = "world_fewshot.jsonl"


def _wrong_solutions(problem: tasks.Problem, k: int = 3) -> list[str]:
    """k plausible wrong solutions with distinct wrong answers: one slipped step, carried through."""
    rng = random.Random(f"world_mc:{problem.key}")
    wrong: dict[str, str] = {}
    while len(wrong) < k:
        text = tasks.corrupt(problem, rng)
        wrong.setdefault(text.rsplit("#### ", 1)[1], text)
    return list(wrong.values())


def _row(problem: tasks.Problem) -> dict[str, Any]:
    """One problem with both task views: the worked solution (generation) and four solutions to choose from."""
    choices = [problem.solution, *_wrong_solutions(problem)]
    random.Random(f"order:{problem.key}").shuffle(choices)
    return {
        "id": problem.key,
        "level": problem.level,
        "question": problem.question,
        "solution": problem.solution,
        "answer": str(problem.answer),
        "choices": choices,
        "label": choices.index(problem.solution),
    }


def make_rows() -> dict[str, list[dict[str, Any]]]:
    """Every bundled row, by file name; deterministic, so the files can be checked against it."""
    by_level = [tasks.generate(lvl, EVAL_PER_LEVEL, seed=SEED, split="eval") for lvl in tasks.LEVELS]
    # round-robin over levels, so a `limit` (the first n rows) still covers every level
    held = [p for group in zip_longest(*by_level) for p in group if p is not None]
    shots = [p for lvl in tasks.LEVELS for p in tasks.generate(lvl, FEWSHOT_PER_LEVEL, seed=SEED, split="train")]
    return {EVAL_FILE: [_row(p) for p in held], FEWSHOT_FILE: [_row(p) for p in shots]}


def write_rows(folder: Path) -> dict[str, int]:
    """Write the bundled jsonl files atomically; returns the row count of each."""
    from flywheel.data.io import write_jsonl

    return {name: write_jsonl(folder / name, rows) for name, rows in make_rows().items()}
