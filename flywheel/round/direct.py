"""A round without Prefect: the stage table in this process, for tests, benchmarks and other orchestrators."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.data.io import fingerprint
from flywheel.round.plan import plan_round
from flywheel.round.table import Stage, run_stages
from flywheel.slot import RoundSlot


def run_round_direct(cfg: FlywheelConfig, round_n: int | None = None,
                     stages: Iterable[Stage] | None = None) -> dict[str, Any]:
    """Plan the round and run the stage table (or `stages`) holding the flywheel's slot; the plan and every result."""
    with RoundSlot(cfg):
        plan = plan_round(cfg, round_n)
        if plan.finished:
            return plan.to_json()
        results = run_stages(cfg, plan, stages)
    out = {**plan.to_json(), **results}
    if "base" in results and "rl" in results:
        out["key"] = fingerprint(results["base"]["key"], results["rl"]["key"])
    return out
