"""What a round's plan changes in the config, and the decisions that follow from it."""

from __future__ import annotations

from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.remit.catalog import BASELINE, objective_named
from flywheel.tracking.registry import RoundPlan


def round_config(cfg: FlywheelConfig, plan: RoundPlan) -> FlywheelConfig:
    """The config a round's stages run with: round 0 is the standard pipeline (NTP mid-training), later
    rounds use the configured objective; under `data.per_round: next_slice` round N reads slice N."""
    update: dict[str, Any] = {}
    if plan.round == 0:
        update["midtrain"] = cfg.midtrain.model_copy(update={"objective": BASELINE.name})
    if cfg.data.per_round == "next_slice":
        update["data"] = cfg.data.model_copy(update={"slice": plan.round})
    return cfg.model_copy(update=update) if update else cfg


def needs_scoring(cfg: FlywheelConfig, plan: RoundPlan) -> bool:
    """Whether the round's mid-training reads a reference cache (cached ReMiT / Rho-1 with a reference)."""
    mt = round_config(cfg, plan).midtrain
    return objective_named(mt.objective).reads_cache(mt.reference_mode) and plan.reference_path is not None


def round_summary(cfg: FlywheelConfig, plan: RoundPlan) -> str:
    """What the round's mid-training does, as its first log line says it: the objective the round really runs
    (round 0, a form's override) and the reference only when that objective reads one."""
    objective = objective_named(round_config(cfg, plan).midtrain.objective)
    name = {"remit": "ReMiT", "rho1": "Rho-1"}.get(objective.name, objective.name.upper())  # NTP, KD
    if plan.round == 0:
        return f"{name} (round 0)"
    if not objective.needs_reference or plan.reference_version is None:
        unused = f"; the reference {plan.reference_version} is not used" if plan.reference_version else ""
        return f"{name} (midtrain.objective {objective.name}{unused})"
    return f"{name} guided by {plan.reference_version}"
