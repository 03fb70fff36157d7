"""One flywheel round as plain stage functions with MLflow bookkeeping; Prefect only wires them.

Each stage takes the config and artefact references (paths, registry versions) and returns a
small JSON-able dict of references, so a flow can cache it, retry it or run it elsewhere.
Every stage is idempotent on its own content key: rerunning a finished stage returns the
same artefact, rerunning a crashed one resumes from its checkpoint, and registering the
same checkpoint twice returns the existing registry version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flywheel.config import LAUNCH_STAGES, FlywheelConfig
from flywheel.console import stage_output
from flywheel.data.io import distributed_rank, fingerprint
from flywheel.errors import FlywheelError
from flywheel.failpoints import failpoint
from flywheel.tracking.compare import log_round_metrics, log_round_values
from flywheel.tracking.registry import (
    T_BASE_SOURCE,
    T_BASE_VERSION,
    T_DATA,
    T_DATA_EPOCHS,
    T_DATA_SLICE,
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
    """The config a round's stages run with: round 0 is the standard pipeline (NTP mid-training), later
    rounds use the configured objective; under `data.per_round: next_slice` round N reads slice N."""
    update: dict[str, Any] = {}
    if plan.round == 0:
        update["midtrain"] = cfg.midtrain.model_copy(update={"objective": "ntp"})
    if cfg.data.per_round == "next_slice":
        update["data"] = cfg.data.model_copy(update={"slice": plan.round})
    return cfg.model_copy(update=update) if update else cfg


T_PLAN = "flywheel.plan"  # on the round run: the plan made when the round started, reused when it is re-entered


def plan_round(cfg: FlywheelConfig, round_n: int | None = None) -> dict[str, Any]:
    """Read the registry: which round, which reference, which base (a scheduled round passes nothing).

    The round is a state machine you can re-enter: the plan is recorded on the round run when the
    round starts, and a round without a promotion verdict is the round in progress. A rerun after a
    kill at any point takes that round's recorded plan and finishes it before a new round can start.
    Call it holding the flywheel's round slot: it also marks dead processes' stage runs KILLED.
    """

    check_gate_metric(cfg)
    tracker = open_tracker(cfg)
    check_store_history(cfg, tracker)
    tracker.kill_dead_runs()
    open_round = round_in_progress(tracker)
    if open_round is not None:
        n, recorded = open_round
        if round_n is None or round_n == n:
            return {**_resolved(tracker, recorded), "round": n, "finished": False, "resumed": True}
        raise FlywheelError(f"round: round {n} is in progress (started, not yet decided); finish it first by "
                            f"running without a round number (or with round {n})")
    plan = next_round(tracker)
    if round_n is not None and round_n != plan.round:
        done = get_alias(tracker, rl_model_name(cfg), f"round-{round_n}")
        if done is not None and T_PROMOTION in done.tags:
            return {"round": round_n, "finished": True, "rl_version": str(done.version)}
        if round_n > plan.round:
            raise FlywheelError(f"round: {round_n} cannot run before round {plan.round} exists; "
                                f"run round {plan.round} (or leave round empty for the next one)")
    out = {
        "round": plan.round if round_n is None else round_n,
        "finished": False,
        "reference_version": plan.reference_version,
        "reference_path": str(plan.reference_path) if plan.reference_path else None,
        "base": plan.base,
        "base_version": plan.base_version,
    }
    tracker.set_tags(tracker.round_run(out["round"]), {T_PLAN: json.dumps(
        {k: out[k] for k in ("reference_version", "base", "base_version")})})
    tracker.log_new_params(tracker.round_run(out["round"]), round_params(cfg, out))
    record_round(cfg, tracker, out["round"])
    return out


def round_params(cfg: FlywheelConfig, p: dict[str, Any]) -> dict[str, str]:
    """What a round ran with, as the round run's params: MLflow's "show diff only" lists what changed between rounds."""
    from flywheel.tracking.store import code_version

    rcfg = round_config(cfg, _plan({**p, "reference_path": None}))
    mt = rcfg.midtrain
    return {"objective": mt.objective, "epsilon": "none" if mt.epsilon is None else f"{mt.epsilon:g}",
            "token_budget": str(mt.token_budget), "data_per_round": rcfg.data.per_round,
            "data_slice": str(rcfg.data.slice), "reference_version": p["reference_version"] or "none",
            "base": str(p["base"]), "base_version": p["base_version"] or "none",
            "promotion_rule": rcfg.promotion.rule, "config_hash": cfg.section_hash(), "code_version": code_version()}


def round_in_progress(tracker: Tracker) -> tuple[int, dict[str, Any]] | None:
    """The earliest round that recorded a plan but has no promotion verdict yet, with that plan."""
    open_rounds = sorted((n, run) for n, run in tracker.round_runs().items()
                         if T_PLAN in run.data.tags and T_PROMOTION not in run.data.tags)
    if not open_rounds:
        return None
    n, run = open_rounds[0]
    return n, json.loads(run.data.tags[T_PLAN])


def _resolved(tracker: Tracker, recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded plan with its registry versions turned into local folders again (they may live elsewhere now)."""
    from flywheel.tracking.registry import version_path

    out = dict(recorded, reference_path=None)
    if recorded.get("reference_version"):
        name, _, version = recorded["reference_version"].rpartition("/")
        out["reference_path"] = str(version_path(tracker, tracker.client.get_model_version(name, version)))
    if recorded.get("base_version"):
        out["base"] = str(version_path(tracker, tracker.client.get_model_version(base_model_name(tracker.cfg),
                                                                                 recorded["base_version"])))
    return out


def check_gate_metric(cfg: FlywheelConfig) -> None:
    """`promotion.metric` and every guard must be names the evaluation will report: checked before any work."""
    _check_metric(cfg, cfg.promotion.metric, "promotion.metric")
    for i, guard in enumerate(cfg.promotion.guards):
        _check_metric(cfg, guard.metric, f"promotion.guards.{i}.metric")


def _check_metric(cfg: FlywheelConfig, metric: str, field: str) -> None:
    from flywheel.evaluation.registry import BUNDLED, PRESETS, TASKS_DIR
    from flywheel.metrics import AVG, PREFIX, metric_key

    if metric == AVG:
        return
    tasks = [t for n in cfg.evaluation.tasks for t in ([t for t, _ in PRESETS[n]] if n in PRESETS else [n])]
    known: list[str] = [AVG]
    for task in dict.fromkeys([*cfg.evaluation.tasks, *tasks]):
        if task in BUNDLED:  # our own task files: their metric_list lines name every metric they report
            text = (TASKS_DIR / f"{task}.yaml").read_text()
            known += [metric_key(task, m) for m in re.findall(r"^\s*-\s*metric:\s*(\S+)", text, re.M)]
        elif task not in PRESETS and metric.startswith(metric_key(task, "")):
            return  # an lm-eval task whose metric names are known only after it runs
    if metric not in known:
        raise FlywheelError(f"{field}: '{metric}' is not a metric the evaluation reports (tasks "
                            f"{', '.join(cfg.evaluation.tasks)}); use one of {', '.join(known)}"
                            + ("" if metric.startswith(PREFIX) else f" (names start with '{PREFIX}')"))


def _ledger(cfg: FlywheelConfig) -> Path:
    return cfg.home / "state" / f"{cfg.name}-rounds.json"


def record_round(cfg: FlywheelConfig, tracker: Tracker, round_n: int) -> None:
    """Remember, beside the checkpoints, which rounds this home ran and in which tracking store."""
    from flywheel.data.io import write_json
    from flywheel.tracking.store import tracking_uri

    path = _ledger(cfg)
    led = json.loads(path.read_text()) if path.exists() else {}
    exp = tracker.client.get_experiment(tracker.experiment_id)
    write_json(path, {"tracking_uri": tracking_uri(cfg), "experiment_id": tracker.experiment_id,
                      "experiment_created": exp.creation_time,
                      "rounds": sorted({*led.get("rounds", []), round_n})})


def check_store_history(cfg: FlywheelConfig, tracker: Tracker) -> None:
    """A tracking store that lost the rounds this home ran is an error, never a silent restart at round 0."""
    from flywheel.tracking.store import tracking_uri

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


def is_main_rank() -> bool:
    """Rank 0 of a launched job (or the only process) does the MLflow bookkeeping; the others only compute."""
    return distributed_rank()[0] == 0


def run_named_stage(name: str, cfg: FlywheelConfig, payload: dict[str, Any],
                    callbacks: list | None = None) -> dict[str, Any]:
    """A stage by its launch name, with the arguments a launched job reads from its input file."""
    p = payload["plan"]
    if name == "score_reference":
        return stage_score_reference(cfg, p)
    if name == "midtrain":
        return stage_midtrain(cfg, p, callbacks=callbacks)
    if name == "posttrain":
        return stage_posttrain(cfg, p, payload["base"], callbacks=callbacks)
    if name == "evaluate":
        return stage_evaluate(cfg, p, payload["checkpoint"], payload["kind"])
    raise FlywheelError(f"stage: unknown stage '{name}' (one of {', '.join(LAUNCH_STAGES)})")


def _plan(p: dict[str, Any]) -> RoundPlan:
    return RoundPlan(p["round"], p["reference_version"], Path(p["reference_path"]) if p["reference_path"] else None,
                     p["base"], p["base_version"])


def needs_scoring(cfg: FlywheelConfig, p: dict[str, Any]) -> bool:
    """Whether the round's mid-training reads a reference cache (cached ReMiT / Rho-1 with a reference)."""
    mt = round_config(cfg, _plan(p)).midtrain
    return mt.objective in ("remit", "rho1") and mt.reference_mode == "cached" and bool(p["reference_path"])


@stage_output("score_reference")
def stage_score_reference(cfg: FlywheelConfig, p: dict[str, Any]) -> dict[str, Any]:
    """Score the mixture with the round's reference (cached mode only; otherwise nothing to do)."""
    rcfg = round_config(cfg, _plan(p))
    if not needs_scoring(cfg, p):
        return {"cache": None}
    from flywheel.remit.scoring import score_reference

    if not is_main_rank():  # a launched job's other ranks score their chunks; rank 0 records
        score_reference(rcfg, p["reference_path"])
        return {}
    tracker = open_tracker(cfg)
    with tracker.stage_run(p["round"], "score_reference", {"reference": p["reference_version"]}) as run:
        rep = score_reference(rcfg, p["reference_path"])
        tracker.log_metrics(run, {"tokens": rep.corpus.meta["tokens"], "computed_chunks": len(rep.computed_chunks),
                                  **({"tokens_per_second": rep.tokens_per_second} if rep.tokens_per_second else {})})
    return {"cache": str(rep.cache.folder), "corpus": rep.corpus.key}


@stage_output("midtrain")
def stage_midtrain(cfg: FlywheelConfig, p: dict[str, Any], callbacks: list | None = None) -> dict[str, Any]:
    """Mid-train the round's base and register it as `<name>-base`, tagged with its reference and data."""
    from flywheel.remit.midtrain import midtrain

    plan = _plan(p)
    rcfg = round_config(cfg, plan)
    reference = str(plan.reference_path) if plan.reference_path else None
    if not is_main_rank():
        midtrain(rcfg, base=plan.base, reference=reference, callbacks=callbacks)
        return {}
    tracker = open_tracker(cfg)
    base_source = f"{base_model_name(cfg)} v{plan.base_version}" if plan.base_version else plan.base
    with tracker.stage_run(plan.round, "midtrain", {"midtrain": rcfg.midtrain.model_dump(mode="json"),
                                                    "base": plan.base, "reference": plan.reference_version}) as run:
        res = midtrain(rcfg, base=plan.base, reference=reference, callbacks=callbacks)
        tracker.log_history(run, res.metrics.get("log_history", []))
        corpus_key = res.metrics.get("corpus") or res.key
        for src in rcfg.data.sources:
            _log_source(tracker, run, rcfg, src.source, corpus_key)
        if res.html is not None:
            tracker.log_artifact(run, res.html, "remit")
        data_tags = slice_tags(rcfg, corpus_key)
        tracker.set_tags(run, data_tags)
        tracker.log_new_params(tracker.round_run(plan.round), {"data_fingerprint": corpus_key})
        from flywheel.remit.dynamics import round_weight_stats

        log_round_values(tracker, plan.round, round_weight_stats(res.metrics.get("log_history", []),
                                                                 rcfg.midtrain.objective))
        version = register_checkpoint(
            tracker, model=base_model_name(cfg), checkpoint=res.checkpoint, run_id=run, round_n=plan.round,
            stage="midtrain", key=f"round{plan.round}-midtrain-{res.key}",
            tags={T_REFERENCE: plan.reference_version.split("/")[-1] if plan.reference_version else "none",
                  T_BASE_SOURCE: base_source,
                  T_DATA: corpus_key, **data_tags},
        )
    failpoint("base-registered")
    out = {"checkpoint": str(res.checkpoint), "version": str(version.version), "key": res.key}
    repeat = repeated_round(tracker, cfg, plan.round, res.key)
    if repeat is not None:
        out["note"] = (f"round {plan.round} has exactly the mid-training inputs of round {repeat} (same base, "
                       f"reference {plan.reference_version or 'none'}, data and settings), so it reproduces that "
                       "round's model: the flywheel is standing still. Change the data or the config (data.per_round: "
                       "next_slice anneals each round on fresh data), or pass "
                       "force_promotion, to move it")
    return out


def slice_tags(cfg: FlywheelConfig, corpus_key: str) -> dict[str, str]:
    """Which slice of the mixture's window stream an anneal read, and where it lies in each source's epochs."""
    from flywheel.data.mixture import PackedCorpus, packed_folder

    corpus = PackedCorpus(packed_folder(cfg, corpus_key), corpus_key)
    sources = corpus.meta["sources"] if (corpus.folder / "meta.json").exists() else []
    epochs = "; ".join(f"{s['source']} epochs {s.get('epoch_from', 0):.2f}-{s.get('epoch_to', s['epochs']):.2f}"
                       for s in sources)
    return {T_DATA_SLICE: str(cfg.data.slice), **({T_DATA_EPOCHS: epochs} if epochs else {})}


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


@stage_output("evaluate")
def stage_evaluate(cfg: FlywheelConfig, p: dict[str, Any], checkpoint: str, kind: str) -> dict[str, Any]:
    """Evaluate a checkpoint (base: few-shot; post: zero-shot with the chat template) and log round metrics.

    A rerun of the round (after a kill) reuses the scores of a checkpoint it already evaluated: the
    key is the checkpoint's manifest (sizes and checksums of its files), so rebuilt weights are re-scored.
    """
    from flywheel.data.io import file_fingerprint, write_json
    from flywheel.evaluation import evaluate

    if not is_main_rank():  # lm-eval splits the requests over a launched job's ranks and gathers on rank 0
        evaluate(cfg, checkpoint, kind=kind)
        return {}
    manifest = Path(checkpoint) / "flywheel-manifest.json"
    memo = None
    if manifest.exists():
        memo = cfg.home / "evals" / "verified" / (fingerprint(
            file_fingerprint(manifest), kind, cfg.model.dtype, cfg.evaluation.model_dump(mode="json")) + ".json")
    tracker = open_tracker(cfg)
    with tracker.stage_run(p["round"], f"evaluate/{kind}", {"evaluation": cfg.evaluation.model_dump(mode="json"),
                                                             "checkpoint": checkpoint}) as run:
        if memo is not None and memo.exists():
            recorded = json.loads(memo.read_text())
            metrics, items = recorded["metrics"], recorded.get("items")
            tracker.set_tags(run, {"flywheel.reused": memo})
            tracker.log_metrics(run, metrics)
        else:
            result = evaluate(cfg, checkpoint, kind=kind)
            metrics, items = result.metrics, result.items_path and str(result.items_path)
            tracker.log_metrics(run, metrics)
            for path in (result.results_path, result.samples_path):
                if path is not None and Path(path).exists():
                    tracker.log_artifact(run, Path(path), "eval")
            if memo is not None:
                write_json(memo, {"checkpoint": checkpoint, "kind": kind, "metrics": metrics, "items": items})
        items_uri = None
        if items and Path(items).is_file():  # the per-item scores the next round's gate pairs with
            tracker.log_artifact(run, Path(items), "eval")
            items_uri = tracker.artifact_uri(run, f"eval/{Path(items).name}")
    log_round_metrics(tracker, p["round"], metrics, kind)
    if kind == "post" and p.get("reference_path"):  # how far this round's RL model moved from its guide
        log_round_values(tracker, p["round"], round_kl(cfg, p, checkpoint))
    return {"metrics": metrics, "items_uri": items_uri}


def round_kl(cfg: FlywheelConfig, p: dict[str, Any], checkpoint: str) -> dict[str, float]:
    """`dynamics/kl_to_reference`: KL(RL model ‖ the round's reference) per token on held-out mid-training text.

    Remembered per (checkpoint manifest, reference, held-out slice), so a resumed round does not recompute it.
    """
    from flywheel.data.io import file_fingerprint, write_json
    from flywheel.remit.dynamics import heldout_rows, kl_to_reference

    rcfg = round_config(cfg, _plan(p))
    manifest, ref_manifest = Path(checkpoint) / "flywheel-manifest.json", Path(p["reference_path"]) / "flywheel-manifest.json"
    memo = None
    if manifest.exists() and ref_manifest.exists():
        memo = cfg.home / "evals" / "verified" / (fingerprint(
            "kl", file_fingerprint(manifest), file_fingerprint(ref_manifest), rcfg.data.model_dump(mode="json"),
            rcfg.midtrain.seq_len, rcfg.midtrain.token_budget) + ".json")  # the data section holds the slice
        if memo.exists():
            return json.loads(memo.read_text())
    out = {"dynamics/kl_to_reference": kl_to_reference(cfg, checkpoint, p["reference_path"], heldout_rows(rcfg))}
    if memo is not None:
        write_json(memo, out)
    return out


@stage_output("posttrain")
def stage_posttrain(cfg: FlywheelConfig, p: dict[str, Any], base: dict[str, Any],
                    callbacks: list | None = None) -> dict[str, Any]:
    """Run the TRL chain on the mid-trained base; register the result as the `<name>-rl` candidate."""
    from flywheel.posttrain import posttrain

    if not is_main_rank():
        posttrain(cfg, base["checkpoint"], callbacks=callbacks)
        return {}
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
    failpoint("rl-registered")
    return {"checkpoint": str(res.checkpoint), "version": str(version.version), "key": res.key}


def stage_promote(cfg: FlywheelConfig, p: dict[str, Any], rl: dict[str, Any], post_eval: dict[str, Any]) -> dict:
    """The promotion gate on the RL model's evaluation; the decision is recorded on the round run and the version."""
    tracker = open_tracker(cfg)
    with tracker.stage_run(p["round"], "promote", {"promotion": cfg.promotion.model_dump(mode="json")}) as run:
        candidate = tracker.client.get_model_version(rl_model_name(cfg), rl["version"])
        round_run = tracker.round_run(p["round"])
        d = promote(tracker, candidate, post_eval["metrics"], round_run_id=round_run,
                    items_uri=post_eval.get("items_uri"))
        tracker.set_tags(run, {"promoted": d.promoted, "reason": d.reason})
    return {"promoted": d.promoted, "reason": d.reason, "version": d.candidate_version,
            "previous": d.previous_version, "interval": d.interval.to_dict() if d.interval else None}


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
    from flywheel.slot import RoundSlot

    with RoundSlot(cfg):
        p = plan_round(cfg, round_n)
        if p["finished"]:
            return p
        stage_score_reference(cfg, p)
        base = stage_midtrain(cfg, p)
        base_eval = stage_evaluate(cfg, p, base["checkpoint"], "base")
        rl = stage_posttrain(cfg, p, base)
        post_eval = stage_evaluate(cfg, p, rl["checkpoint"], "post")
        decision = stage_promote(cfg, p, rl, post_eval)
    return {**p, "base": base, "rl": rl, "base_eval": base_eval, "post_eval": post_eval, "decision": decision,
            "key": fingerprint(base["key"], rl["key"])}
