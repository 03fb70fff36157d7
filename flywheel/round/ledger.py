"""The home's ledger of the rounds it ran, so a lost tracking store is an error, not a restart at round 0."""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.config import FlywheelConfig
from flywheel.data.io import write_json
from flywheel.errors import FlywheelError
from flywheel.tracking.store import Tracker, tracking_uri


def _ledger(cfg: FlywheelConfig) -> Path:
    return cfg.home / "state" / f"{cfg.name}-rounds.json"


def record_round(cfg: FlywheelConfig, tracker: Tracker, round_n: int) -> None:
    """Remember, beside the checkpoints, which rounds this home ran and in which tracking store."""
    path = _ledger(cfg)
    led = json.loads(path.read_text()) if path.exists() else {}
    exp = tracker.client.get_experiment(tracker.experiment_id)
    write_json(path, {"tracking_uri": tracking_uri(cfg), "experiment_id": tracker.experiment_id,
                      "experiment_created": exp.creation_time,
                      "rounds": sorted({*led.get("rounds", []), round_n})})


def check_store_history(cfg: FlywheelConfig, tracker: Tracker) -> None:
    """A tracking store that lost the rounds this home ran is an error, never a silent restart at round 0."""
    path = _ledger(cfg)
    if not path.exists():
        return
    led = json.loads(path.read_text())
    missing = sorted(set(led.get("rounds", [])) - set(tracker.round_runs()))
    if not missing:
        return
    exp = tracker.client.get_experiment(tracker.experiment_id)
    replaced = led.get("experiment_created") not in (None, exp.creation_time)
    raise FlywheelError(
        f"tracking: the MLflow store at {tracking_uri(cfg)} has no record of round(s) "
        f"{', '.join(map(str, missing))} that this home ran ({path})"
        + (" and its experiment was created anew" if replaced else "")
        + "; the store was lost or replaced. Restore it and rerun, or delete that file to start this flywheel "
        f"again from round 0 in this store (finished checkpoints under {cfg.home / 'runs'} are reused where they "
        "verify, so only registration, evaluation and promotion are redone)")
