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
