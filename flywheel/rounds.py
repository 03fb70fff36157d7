"""One flywheel round as plain stage functions with MLflow bookkeeping; Prefect only wires them.

Each stage takes the config and artefact references (paths, registry versions) and returns a
small JSON-able dict of references, so a flow can cache it, retry it or run it elsewhere.
Every stage is idempotent on its own content key: rerunning a finished stage returns the
same artefact, rerunning a crashed one resumes from its checkpoint, and registering the
same checkpoint twice returns the existing registry version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.data.io import fingerprint
from flywheel.tracking.compare import log_round_metrics
from flywheel.tracking.registry import (
    T_BASE_SOURCE,
    T_BASE_VERSION,
    T_DATA,
    T_PROMOTION,
    T_REFERENCE,
    RoundPlan,
    base_model_name,
    find_version,
    get_alias,
    next_round,
    promote,
    register_checkpoint,
    rl_model_name,
)
from flywheel.tracking.store import Tracker, open_tracker


def round_config(cfg: FlywheelConfig, plan: RoundPlan) -> FlywheelConfig:
    """Round 0 is the standard pipeline (NTP mid-training); later rounds use the configured objective."""
    if plan.round == 0:
        return cfg.model_copy(update={"midtrain": cfg.midtrain.model_copy(update={"objective": "ntp"})})
    return cfg


def plan_round(cfg: FlywheelConfig, round_n: int | None = None) -> dict[str, Any]:
    """Read the registry: which round, which reference, which base (a scheduled round passes nothing)."""
    tracker = open_tracker(cfg)
    plan = next_round(tracker)
    if round_n is not None and round_n != plan.round:
        done = get_alias(tracker, rl_model_name(cfg), f"round-{round_n}")
        if done is not None and T_PROMOTION in done.tags:
            return {"round": round_n, "finished": True, "rl_version": str(done.version)}
        if round_n > plan.round:
            from flywheel.errors import FlywheelError

            raise FlywheelError(f"round: {round_n} cannot run before round {plan.round} exists; "
                                f"run round {plan.round} (or leave round empty for the next one)")
    return {
        "round": plan.round if round_n is None else round_n,
        "finished": False,
        "reference_version": plan.reference_version,
        "reference_path": str(plan.reference_path) if plan.reference_path else None,
        "base": plan.base,
        "base_version": plan.base_version,
    }


def _plan(p: dict[str, Any]) -> RoundPlan:
    return RoundPlan(p["round"], p["reference_version"], Path(p["reference_path"]) if p["reference_path"] else None,
                     p["base"], p["base_version"])


def stage_score_reference(cfg: FlywheelConfig, p: dict[str, Any]) -> dict[str, Any]:
    """Score the mixture with the round's reference (cached mode only; otherwise nothing to do)."""
    rcfg = round_config(cfg, _plan(p))
    mt = rcfg.midtrain
    if mt.objective not in ("remit", "rho1") or mt.reference_mode != "cached" or not p["reference_path"]:
        return {"cache": None}
    from flywheel.remit.scoring import score_reference

    tracker = open_tracker(cfg)
    with tracker.stage_run(p["round"], "score_reference", {"reference": p["reference_version"]}) as run:
        rep = score_reference(rcfg, p["reference_path"])
        tracker.log_metrics(run, {"tokens": rep.corpus.meta["tokens"], "computed_chunks": len(rep.computed_chunks),
                                  **({"tokens_per_second": rep.tokens_per_second} if rep.tokens_per_second else {})})
    return {"cache": str(rep.cache.folder), "corpus": rep.corpus.key}


def stage_midtrain(cfg: FlywheelConfig, p: dict[str, Any], callbacks: list | None = None) -> dict[str, Any]:
    """Mid-train the round's base and register it as `<name>-base`, tagged with its reference and data."""
    from flywheel.remit.midtrain import midtrain

    plan = _plan(p)
    rcfg = round_config(cfg, plan)
    tracker = open_tracker(cfg)
    base_source = f"{base_model_name(cfg)} v{plan.base_version}" if plan.base_version else plan.base
    with tracker.stage_run(plan.round, "midtrain", {"midtrain": rcfg.midtrain.model_dump(mode="json"),
                                                    "base": plan.base, "reference": plan.reference_version}) as run:
        res = midtrain(rcfg, base=plan.base, reference=str(plan.reference_path) if plan.reference_path else None,
                       callbacks=callbacks)
        tracker.log_history(run, res.metrics.get("log_history", []))
        corpus_key = res.metrics.get("corpus") or res.key
        for src in rcfg.data.sources:
            _log_source(tracker, run, rcfg, src.source, corpus_key)
        if res.html is not None:
            tracker.log_artifact(run, res.html, "remit")
        version = register_checkpoint(
            tracker, model=base_model_name(cfg), checkpoint=res.checkpoint, run_id=run, round_n=plan.round,
            stage="midtrain", key=f"round{plan.round}-midtrain-{res.key}",
            tags={T_REFERENCE: plan.reference_version.split("/")[-1] if plan.reference_version else "none",
                  T_BASE_SOURCE: base_source,
                  T_DATA: corpus_key},
        )
    out = {"checkpoint": str(res.checkpoint), "version": str(version.version), "key": res.key}
    repeat = repeated_round(tracker, cfg, plan.round, res.key)
    if repeat is not None:
        out["note"] = (f"round {plan.round} has exactly the mid-training inputs of round {repeat} (same base, "
                       f"reference {plan.reference_version or 'none'}, data and settings), so it reproduces that "
                       "round's model: the flywheel is standing still. Change the data or the config, or pass "
                       "force_promotion, to move it")
    return out


def repeated_round(tracker: Tracker, cfg: FlywheelConfig, round_n: int, key: str) -> int | None:
    """The earliest earlier round whose mid-training had the same cache key (same inputs), if any."""
    for earlier in range(round_n):
        if find_version(tracker, base_model_name(cfg), f"round{earlier}-midtrain-{key}") is not None:
            return earlier
    return None


def _log_source(tracker: Tracker, run: str, cfg: FlywheelConfig, source: str, digest: str) -> None:
    if source.startswith("world:"):
        from flywheel.world.build import resolve_world_ref

        tracker.log_dataset(run, resolve_world_ref(cfg, source), source, digest)
    elif Path(source).exists():
        tracker.log_dataset(run, Path(source), source, digest)


def stage_evaluate(cfg: FlywheelConfig, p: dict[str, Any], checkpoint: str, kind: str) -> dict[str, Any]:
    """Evaluate a checkpoint (base: few-shot; post: zero-shot with the chat template) and log round metrics."""
    from flywheel.evaluation import evaluate

    tracker = open_tracker(cfg)
    with tracker.stage_run(p["round"], f"evaluate/{kind}", {"evaluation": cfg.evaluation.model_dump(mode="json"),
                                                             "checkpoint": checkpoint}) as run:
        result = evaluate(cfg, checkpoint, kind=kind)
        tracker.log_metrics(run, result.metrics)
        for path in (result.results_path, result.samples_path):
            if path is not None and Path(path).exists():
                tracker.log_artifact(run, Path(path), "eval")
    log_round_metrics(tracker, p["round"], result.metrics, kind)
    return {"metrics": result.metrics}


def stage_posttrain(cfg: FlywheelConfig, p: dict[str, Any], base: dict[str, Any],
                    callbacks: list | None = None) -> dict[str, Any]:
    """Run the TRL chain on the mid-trained base; register the result as the `<name>-rl` candidate."""
    from flywheel.posttrain import posttrain

    tracker = open_tracker(cfg)
    res = posttrain(cfg, base["checkpoint"], callbacks=callbacks)
    run_ids = []
    for st in res.stages:
        params = {"stage": cfg.posttrain.stages[st.index].model_dump(mode="json")}
        with tracker.stage_run(p["round"], f"posttrain/{st.kind}", params) as run:
            run_ids.append(run)
            tracker.log_history(run, st.log_history)
            tracker.log_metrics(run, {"seconds": st.seconds, "seconds_per_step": st.seconds_per_step,
                                           **{k: v for k, v in st.notes.items() if isinstance(v, int | float)}})
    version = register_checkpoint(
        tracker, model=rl_model_name(cfg), checkpoint=res.checkpoint, run_id=run_ids[-1], round_n=p["round"],
        stage="posttrain", key=f"round{p['round']}-posttrain-{res.key}", candidate=True,
        tags={T_BASE_VERSION: base["version"], T_BASE_SOURCE: p["base"],
              T_REFERENCE: p["reference_version"].split("/")[-1] if p["reference_version"] else "none"},
    )
    return {"checkpoint": str(res.checkpoint), "version": str(version.version), "key": res.key}


def stage_promote(cfg: FlywheelConfig, p: dict[str, Any], rl: dict[str, Any], metrics: dict[str, float]) -> dict:
    """The promotion gate; the decision is recorded on the round run and on the version."""
    tracker = open_tracker(cfg)
    with tracker.stage_run(p["round"], "promote", {"promotion": cfg.promotion.model_dump(mode="json")}) as run:
        candidate = tracker.client.get_model_version(rl_model_name(cfg), rl["version"])
        d = promote(tracker, candidate, metrics, round_run_id=tracker.round_run(p["round"]))
        tracker.set_tags(run, {"promoted": d.promoted, "reason": d.reason})
    return {"promoted": d.promoted, "reason": d.reason, "version": d.candidate_version,
            "previous": d.previous_version}


def round_report(cfg: FlywheelConfig, p: dict[str, Any], base_eval: dict, post_eval: dict, decision: dict,
                 note: str | None = None) -> str:
    """The round's markdown summary: metrics table, promotion decision, where the MLflow runs are."""
    tracker = open_tracker(cfg)
    rows = ["| metric | mid-trained base | RL model |", "|---|---|---|"]
    for k in sorted(set(base_eval["metrics"]) | set(post_eval["metrics"])):
        b, r = base_eval["metrics"].get(k), post_eval["metrics"].get(k)
        rows.append(f"| {k} | {'' if b is None else f'{b:.4f}'} | {'' if r is None else f'{r:.4f}'} |")
    guide = p["reference_version"] or "none (NTP round)"
    run = tracker.round_run(p["round"])
    return "\n".join([
        f"# {cfg.name}: round {p['round']}",
        f"Reference: `{guide}`. Promotion: **{'promoted' if decision['promoted'] else 'kept the reference'}** — "
        f"{decision['reason']}.",
        *([f"Note: {note}."] if note else []),
        "", *rows, "",
        f"MLflow: experiment `{cfg.name}`, round run `{run}` (tracking URI `{_uri(cfg)}`).",
    ])


def _uri(cfg: FlywheelConfig) -> str:
    from flywheel.tracking.store import tracking_uri

    return tracking_uri(cfg)


def run_round_direct(cfg: FlywheelConfig, round_n: int | None = None) -> dict[str, Any]:
    """The same stages without Prefect: for tests, benchmarks and users who orchestrate otherwise."""
    p = plan_round(cfg, round_n)
    if p["finished"]:
        return p
    stage_score_reference(cfg, p)
    base = stage_midtrain(cfg, p)
    base_eval = stage_evaluate(cfg, p, base["checkpoint"], "base")
    rl = stage_posttrain(cfg, p, base)
    post_eval = stage_evaluate(cfg, p, rl["checkpoint"], "post")
    decision = stage_promote(cfg, p, rl, post_eval["metrics"])
    return {**p, "base": base, "rl": rl, "base_eval": base_eval, "post_eval": post_eval, "decision": decision,
            "key": fingerprint(base["key"], rl["key"])}
