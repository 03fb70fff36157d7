"""lm-eval hooks for the bundled tiny-world tasks (referenced from the YAML files by `!function`).

The data is read from the files beside this module, so the tasks work from any working directory
and wherever the package is installed (a YAML `data_files` path would resolve against the CWD).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from flywheel.answers import first_answer, is_correct

HERE = Path(__file__).resolve().parent
SPLITS = {"test": "world_eval.jsonl", "fewshot": "world_fewshot.jsonl"}


def _read(path: Path) -> list[dict[str, Any]]:
    """Plain json lines; lm-eval loads this file by path, so it stays free of flywheel's own I/O helpers."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_world(**_: Any) -> datasets.DatasetDict:
    """Build the dataset in memory from the bundled files: no hub, no cache folder, no network."""
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_read(HERE / name)) for split, name in SPLITS.items()})


def process_gsm(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Score with the same answer checker as the RL rewards, on the completion cut after its first answer."""
    return {"exact_match": float(is_correct(first_answer(results[0]), doc["answer"]))}
