"""The round's stage functions: each does its work, then hands the MLflow bookkeeping to `records`.

Each stage takes the config, the round's `RoundPlan` and the earlier stages' results it reads, and returns
a small JSON-able dict of references (paths, registry versions), so a flow can retry it or run it
elsewhere. Every stage is idempotent on its own content key: rerunning a finished stage returns the same
artefact, rerunning a crashed one resumes from its checkpoint, and registering the same checkpoint twice
returns the existing registry version. In a launched job only rank 0 records; the other ranks compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.console import stage_output
from flywheel.data.io import distributed_rank, write_json
from flywheel.failpoints import failpoint
from flywheel.round import records
from flywheel.round.measures import evaluation_memo, round_kl
from flywheel.round.settings import round_config
from flywheel.tracking.compare import log_round_metrics, log_round_values
from flywheel.tracking.registry import PromotionDecision, RoundPlan, promote, rl_model_name
from flywheel.tracking.store import Tracker, open_tracker


def is_main_rank() -> bool:
    """Rank 0 of a launched job (or the only process) does the MLflow bookkeeping; the others only compute."""
    return distributed_rank()[0] == 0


@stage_output("score_reference")
def stage_score_reference(cfg: FlywheelConfig, plan: RoundPlan) -> dict[str, Any]:
    """Score the mixture with the round's reference (the table runs it only when `needs_scoring`)."""
    from flywheel.remit.scoring import score_reference

    rcfg, reference = round_config(cfg, plan), str(plan.reference_path)
    if not is_main_rank():  # a launched job's other ranks score their chunks; rank 0 records
        score_reference(rcfg, reference)
        return {}
    tracker = open_tracker(cfg)
    with tracker.stage_run(plan.round, "score_reference", {"reference": plan.reference_version}) as run:
        rep = score_reference(rcfg, reference)
        records.log_scoring(tracker, run, rep)
    return {"cache": str(rep.cache.folder), "corpus": rep.corpus.key}


@stage_output("midtrain")
def stage_midtrain(cfg: FlywheelConfig, plan: RoundPlan, callbacks: list | None = None) -> dict[str, Any]:
    """Mid-train the round's base and register it as `<name>-base`, tagged with its reference and data."""
    from flywheel.remit.midtrain import midtrain

    rcfg = round_config(cfg, plan)
    reference = str(plan.reference_path) if plan.reference_path else None
    if not is_main_rank():
        midtrain(rcfg, base=plan.base, reference=reference, callbacks=callbacks)
        return {}
    tracker = open_tracker(cfg)
    with tracker.stage_run(plan.round, "midtrain", records.midtrain_params(rcfg, plan), system_metrics=True) as run:
        res = midtrain(rcfg, base=plan.base, reference=reference, callbacks=callbacks)
        data_tags = records.log_midtrain(tracker, run, rcfg, plan, res)
        version = records.register_base(tracker, cfg, run, plan, res, data_tags)
    failpoint("base-registered")
    out = {"checkpoint": str(res.checkpoint), "version": str(version.version), "key": res.key, "reused": res.reused}
    repeat = records.repeated_round(tracker, cfg, plan.round, res.key)
    if repeat is not None:
        out["note"] = _standing_still(plan, repeat)
    return out


def _standing_still(plan: RoundPlan, repeat: int) -> str:
    return (f"round {plan.round} has exactly the mid-training inputs of round {repeat} (same base, "
            f"reference {plan.reference_version or 'none'}, data and settings), so it reproduces that "
            "round's model: the flywheel is standing still. Change the data or the config (data.per_round: "
            "next_slice anneals each round on fresh data), or pass "
            "force_promotion, to move it")


@stage_output("evaluate")
def stage_evaluate(cfg: FlywheelConfig, plan: RoundPlan, checkpoint: str, kind: str) -> dict[str, Any]:
    """Evaluate a checkpoint (base: few-shot; post: zero-shot with the chat template) and log round metrics.

    A rerun of the round (after a kill) reuses the scores of a checkpoint it already evaluated.
    """
    from flywheel.evaluation import evaluate

    if not is_main_rank():  # lm-eval splits the requests over a launched job's ranks and gathers on rank 0
        evaluate(cfg, checkpoint, kind=kind)
        return {}
    memo = evaluation_memo(cfg, checkpoint, kind)
    tracker = open_tracker(cfg)
    with tracker.stage_run(plan.round, f"evaluate/{kind}", {"evaluation": cfg.evaluation.model_dump(mode="json"),
                                                             "checkpoint": checkpoint}) as run:
        metrics, items = _scores(cfg, tracker, run, checkpoint, kind, memo)
        items_uri = records.log_items(tracker, run, items)
    log_round_metrics(tracker, plan.round, metrics, kind)
    if kind == "post" and plan.reference_path is not None:  # how far this round's RL model moved from its guide
        log_round_values(tracker, plan.round, round_kl(cfg, plan, checkpoint))
    return {"metrics": metrics, "items_uri": items_uri}


def _scores(cfg: FlywheelConfig, tracker: Tracker, run: str, checkpoint: str, kind: str,
            memo: Path | None) -> tuple[dict[str, float], str | None]:
    """The evaluation's metrics and per-item scores file: remembered ones if the memo has them, else fresh."""
    from flywheel.evaluation import evaluate

    if memo is not None and memo.exists():
        recorded = json.loads(memo.read_text())
        tracker.set_tags(run, {"flywheel.reused": memo})
        tracker.log_metrics(run, recorded["metrics"])
        return recorded["metrics"], recorded.get("items")
    result = evaluate(cfg, checkpoint, kind=kind)
    items = result.items_path and str(result.items_path)
    records.log_evaluation(tracker, run, result)
    if memo is not None:
        write_json(memo, {"checkpoint": checkpoint, "kind": kind, "metrics": result.metrics, "items": items})
    return result.metrics, items


@stage_output("posttrain")
def stage_posttrain(cfg: FlywheelConfig, plan: RoundPlan, base: dict[str, Any],
                    callbacks: list | None = None) -> dict[str, Any]:
    """Run the TRL chain on the mid-trained base; register the result as the `<name>-rl` candidate."""
    from flywheel.posttrain import posttrain

    if not is_main_rank():
        posttrain(cfg, base["checkpoint"], callbacks=callbacks)
        return {}
    tracker = open_tracker(cfg)
    res = posttrain(cfg, base["checkpoint"], callbacks=callbacks)
    run_ids = records.log_posttrain(tracker, cfg, plan, res)
    version = records.register_rl(tracker, cfg, run_ids[-1], plan, res, base)
    failpoint("rl-registered")
    return {"checkpoint": str(res.checkpoint), "version": str(version.version), "key": res.key, "reused": res.reused}


def stage_promote(cfg: FlywheelConfig, plan: RoundPlan, rl: dict[str, Any], post_eval: dict[str, Any]) -> dict:
    """The promotion gate on the RL model's evaluation; the decision is recorded on the round run and the version."""
    tracker = open_tracker(cfg)
    with tracker.stage_run(plan.round, "promote", {"promotion": cfg.promotion.model_dump(mode="json")}) as run:
        candidate = tracker.client.get_model_version(rl_model_name(cfg), rl["version"])
        round_run = tracker.round_run(plan.round)
        d = promote(tracker, candidate, post_eval["metrics"], round_run_id=round_run,
                    items_uri=post_eval.get("items_uri"))
        tracker.set_tags(run, {"promoted": d.promoted, "reason": d.reason, "awaiting": d.awaiting})
    return decision_result(d)


def decision_result(d: PromotionDecision) -> dict[str, Any]:
    """A promotion decision as the round's result: JSON-able; with `awaiting` the gate's recommendation, which
    a person decides on (promotion.approval: required)."""
    return {"promoted": d.promoted, "reason": d.reason, "version": d.candidate_version,
            "previous": d.previous_version, "interval": d.interval.to_dict() if d.interval else None,
            "readings": {m: r.to_dict() for m, r in d.readings.items()}, "awaiting": d.awaiting}
