"""The round's MLflow bookkeeping: what each stage logs on its run and registers, kept beside the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.tracking.compare import log_round_values
from flywheel.tracking.registry import (
    T_BASE_SOURCE,
    T_BASE_VERSION,
    T_DATA,
    T_DATA_EPOCHS,
    T_DATA_REVISIONS,
    T_DATA_SLICE,
    T_REFERENCE,
    RoundPlan,
    base_model_name,
    find_version,
    register_checkpoint,
    rl_model_name,
)
from flywheel.tracking.store import Tracker


def reference_tag(plan: RoundPlan) -> str:
    """The reference's RL version number as the registry's lineage tags hold it ("none" in an NTP round)."""
    return plan.reference_version.split("/")[-1] if plan.reference_version else "none"


def log_scoring(tracker: Tracker, run: str, rep: Any) -> None:
    """The reference scoring's size and speed on its run."""
    speed = {"tokens_per_second": rep.tokens_per_second, "perf/tokens_per_s_per_device": rep.tokens_per_second,
             "perf/mfu": rep.mfu}
    tracker.log_metrics(run, {"tokens": rep.corpus.meta["tokens"], "computed_chunks": len(rep.computed_chunks),
                              **{k: v for k, v in speed.items() if v is not None}})


def midtrain_params(rcfg: FlywheelConfig, plan: RoundPlan) -> dict[str, Any]:
    return {"midtrain": rcfg.midtrain.model_dump(mode="json"), "base": plan.base, "reference": plan.reference_version}


def log_midtrain(tracker: Tracker, run: str, rcfg: FlywheelConfig, plan: RoundPlan, res: Any) -> dict[str, str]:
    """Mid-training's history, data sources, token-weight page and slice on its run; returns the data tags."""
    from flywheel.remit.dynamics import round_weight_stats

    history = res.metrics.get("log_history", [])
    tracker.log_history(run, history)
    corpus_key = res.metrics.get("corpus") or res.key
    for src in rcfg.data.sources:
        _log_source(tracker, run, rcfg, src.source, corpus_key)
    if res.html is not None:
        tracker.log_artifact(run, res.html, "remit")
    data_tags = slice_tags(rcfg, corpus_key)
    tracker.set_tags(run, data_tags)
    tracker.log_new_params(tracker.round_run(plan.round), {"data_fingerprint": corpus_key})
    log_round_values(tracker, plan.round, round_weight_stats(history, rcfg.midtrain.objective))
    return {T_DATA: corpus_key, **data_tags}


def register_base(tracker: Tracker, cfg: FlywheelConfig, run: str, plan: RoundPlan, res: Any,
                  data_tags: dict[str, str]) -> Any:
    """The mid-trained checkpoint as a `<name>-base` version, tagged with its reference, base and data."""
    base_source = f"{base_model_name(cfg)} v{plan.base_version}" if plan.base_version else plan.base
    return register_checkpoint(
        tracker, model=base_model_name(cfg), checkpoint=res.checkpoint, run_id=run, round_n=plan.round,
        stage="midtrain", key=f"round{plan.round}-midtrain-{res.key}",
        tags={T_REFERENCE: reference_tag(plan), T_BASE_SOURCE: base_source, **data_tags})


def slice_tags(cfg: FlywheelConfig, corpus_key: str) -> dict[str, str]:
    """Which slice of the mixture's window stream an anneal read, where it lies in each source's epochs, and the
    commit each hub source was read at."""
    from flywheel.data.mixture import PackedCorpus, packed_folder

    corpus = PackedCorpus(packed_folder(cfg, corpus_key), corpus_key)
    sources = corpus.meta["sources"] if (corpus.folder / "meta.json").exists() else []
    epochs = "; ".join(f"{s['source']} epochs {s.get('epoch_from', 0):.2f}-{s.get('epoch_to', s['epochs']):.2f}"
                       for s in sources)
    revisions = "; ".join(f"{s['source']}@{s['revision']}" for s in sources if s.get("revision"))
    return {T_DATA_SLICE: str(cfg.data.slice), **({T_DATA_EPOCHS: epochs} if epochs else {}),
            **({T_DATA_REVISIONS: revisions} if revisions else {})}


def repeated_round(tracker: Tracker, cfg: FlywheelConfig, round_n: int, key: str) -> int | None:
    """The earliest earlier round whose mid-training had the same cache key (same inputs), if any."""
    for earlier in range(round_n):
        if find_version(tracker, base_model_name(cfg), f"round{earlier}-midtrain-{key}") is not None:
            return earlier
    return None


def _log_source(tracker: Tracker, run: str, cfg: FlywheelConfig, source: str, digest: str) -> None:
    from flywheel.refs import CORPUS_REF, as_ref, local_path

    ref = as_ref(source, CORPUS_REF)
    if ref.kind == "world":
        tracker.log_dataset(run, local_path(cfg, ref), source, digest)
    elif Path(source).exists():
        tracker.log_dataset(run, Path(source), source, digest)


def log_evaluation(tracker: Tracker, run: str, result: Any) -> None:
    """A fresh evaluation's metrics and its results and samples files on its run."""
    tracker.log_metrics(run, result.metrics)
    for path in (result.results_path, result.samples_path):
        if path is not None and Path(path).exists():
            tracker.log_artifact(run, Path(path), "eval")


def log_items(tracker: Tracker, run: str, items: str | None) -> str | None:
    """The per-item scores (what the next round's gate pairs with) as an artefact; returns its URI."""
    if not items or not Path(items).is_file():
        return None
    tracker.log_artifact(run, Path(items), "eval")
    return tracker.artifact_uri(run, f"eval/{Path(items).name}")


def log_posttrain(tracker: Tracker, cfg: FlywheelConfig, plan: RoundPlan, res: Any) -> list[str]:
    """One run per post-training stage with its history and timings; returns their run ids."""
    run_ids = []
    for st in res.stages:
        params = {"stage": cfg.posttrain.stages[st.index].model_dump(mode="json")}
        with tracker.stage_run(plan.round, f"posttrain/{st.kind}", params) as run:
            run_ids.append(run)
            tracker.log_history(run, st.log_history)
            tracker.log_metrics(run, {"seconds": st.seconds, "seconds_per_step": st.seconds_per_step,
                                      **{k: v for k, v in st.notes.items() if isinstance(v, int | float)}})
    return run_ids


def register_rl(tracker: Tracker, cfg: FlywheelConfig, run: str, plan: RoundPlan, res: Any,
                base: dict[str, Any]) -> Any:
    """The RL checkpoint as the `<name>-rl` candidate, tagged with the base version it was trained from."""
    return register_checkpoint(
        tracker, model=rl_model_name(cfg), checkpoint=res.checkpoint, run_id=run, round_n=plan.round,
        stage="posttrain", key=f"round{plan.round}-posttrain-{res.key}", candidate=True,
        tags={T_BASE_VERSION: base["version"], T_BASE_SOURCE: plan.base, T_REFERENCE: reference_tag(plan)})
