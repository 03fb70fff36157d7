"""Planning a round: which round, which reference, which base, read from the registry once.

The round is a state machine you can re-enter: the plan is recorded on the round run (the `flywheel.plan`
tag) when the round starts, and a round without a promotion verdict is the round in progress. A rerun
after a kill at any point takes that round's recorded plan and finishes it before a new round can start.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError
from flywheel.evaluation.run import check_backend
from flywheel.posttrain.chain import check_posttrain
from flywheel.round.checks import check_gate_metric
from flywheel.round.ledger import check_store_history, record_round
from flywheel.round.settings import round_config
from flywheel.tracking.registry import (
    T_PROMOTION,
    RoundPlan,
    base_model_name,
    get_alias,
    next_round,
    rl_model_name,
    version_path,
)
from flywheel.tracking.store import Tracker, code_version, open_tracker

__all__ = ["T_PLAN", "RoundPlan", "plan_round", "round_in_progress", "round_params"]

T_PLAN = "flywheel.plan"  # on the round run: the plan made when the round started, reused when it is re-entered
RECORDED = ("reference_version", "base", "base_version")  # what T_PLAN holds (paths are found again from versions)


def plan_round(cfg: FlywheelConfig, round_n: int | None = None) -> RoundPlan:
    """Read the registry: which round, which reference, which base (a scheduled round passes nothing).

    Call it holding the flywheel's round slot: it also marks dead processes' stage runs KILLED.
    """
    check_gate_metric(cfg)
    check_backend(cfg)  # evaluation.backend vllm without vllm or a GPU: one sentence before the round starts
    check_posttrain(cfg)  # the chat template and every TRL argument, before the anneal rather than after it
    tracker = open_tracker(cfg)
    check_store_history(cfg, tracker)
    tracker.kill_dead_runs()
    open_round = round_in_progress(tracker)
    if open_round is not None:
        n, recorded = open_round
        if round_n is None or round_n == n:
            return _reopened(tracker, n, recorded)
        raise FlywheelError(f"round: round {n} is in progress (started, not yet decided); finish it first by "
                            f"running without a round number (or with round {n})")
    return _new_round(cfg, tracker, round_n)


def _new_round(cfg: FlywheelConfig, tracker: Tracker, round_n: int | None) -> RoundPlan:
    """The registry's next round (or round `round_n`), recorded on its round run; a decided round is finished."""
    upcoming = next_round(tracker)
    if round_n is not None and round_n != upcoming.round:
        done = get_alias(tracker, rl_model_name(cfg), f"round-{round_n}")
        if done is not None and T_PROMOTION in done.tags:
            return RoundPlan(round_n, finished=True, rl_version=str(done.version))
        if round_n > upcoming.round:
            raise FlywheelError(f"round: {round_n} cannot run before round {upcoming.round} exists; "
                                f"run round {upcoming.round} (or leave round empty for the next one)")
    plan = upcoming if round_n is None else replace(upcoming, round=round_n)
    run = tracker.round_run(plan.round)
    tracker.set_tags(run, {T_PLAN: json.dumps({k: getattr(plan, k) for k in RECORDED})})
    tracker.log_new_params(run, round_params(cfg, plan))
    record_round(cfg, tracker, plan.round)
    return plan


def round_params(cfg: FlywheelConfig, plan: RoundPlan) -> dict[str, str]:
    """What a round ran with, as the round run's params: MLflow's "show diff only" lists what changed between rounds."""
    rcfg = round_config(cfg, plan)
    mt = rcfg.midtrain
    return {"objective": mt.objective, "epsilon": "none" if mt.epsilon is None else f"{mt.epsilon:g}",
            "token_budget": str(mt.token_budget), "data_per_round": rcfg.data.per_round,
            "data_slice": str(rcfg.data.slice), "reference_version": plan.reference_version or "none",
            "base": str(plan.base), "base_version": plan.base_version or "none",
            "promotion_rule": rcfg.promotion.rule, "config_hash": cfg.section_hash(), "code_version": code_version()}


def round_in_progress(tracker: Tracker) -> tuple[int, dict[str, Any]] | None:
    """The earliest round that recorded a plan but has no promotion verdict yet, with that plan."""
    open_rounds = sorted((n, run) for n, run in tracker.round_runs().items()
                         if T_PLAN in run.data.tags and T_PROMOTION not in run.data.tags)
    if not open_rounds:
        return None
    n, run = open_rounds[0]
    return n, json.loads(run.data.tags[T_PLAN])


def _reopened(tracker: Tracker, round_n: int, recorded: dict[str, Any]) -> RoundPlan:
    """A recorded plan with its registry versions turned into local folders again (they may live elsewhere now)."""
    reference_path, base = None, recorded.get("base")
    if recorded.get("reference_version"):
        name, _, version = recorded["reference_version"].rpartition("/")
        reference_path = version_path(tracker, tracker.client.get_model_version(name, version))
    if recorded.get("base_version"):
        base = str(version_path(tracker, tracker.client.get_model_version(base_model_name(tracker.cfg),
                                                                          recorded["base_version"])))
    return RoundPlan(round_n, recorded.get("reference_version"), reference_path, base, recorded.get("base_version"),
                     resumed=True)
