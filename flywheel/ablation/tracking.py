"""The ablation in MLflow: one parent run per study, one child run per (variant, seed) cell, the report.

Runs are found again by their tags, so a rerun of the same study logs to the same parent and leaves a
finished cell's child as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.ablation.plan import AblationPlan
from flywheel.ablation.report import summary_metrics

ABLATION_TAG = "flywheel.ablation"
VARIANT_TAG = "flywheel.variant"
SEED_TAG = "flywheel.seed"


def open_study_tracker(plan: AblationPlan):  # noqa: ANN201 - Tracker, imported lazily
    """The tracker of the plan's config (its home's MLflow store)."""
    from flywheel.tracking.store import open_tracker

    return open_tracker(plan.flywheel_config())


def parent_run(plan: AblationPlan) -> str:
    """One parent run per study (found again on a rerun), its cells as children."""
    from flywheel.tracking.store import STAGE_TAG

    tracker = open_study_tracker(plan)
    found = tracker.client.search_runs([tracker.experiment_id],
                                       filter_string=f"tags.`{ABLATION_TAG}` = '{plan.study}' and "
                                                     f"tags.`{STAGE_TAG}` = 'ablation'", max_results=1)
    if found:
        return found[0].info.run_id
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"ablation-{plan.study[:8]}",
                                    tags={ABLATION_TAG: plan.study, STAGE_TAG: "ablation"})
    mt = plan.config["midtrain"]
    tracker.log_params(run.info.run_id, {
        "variants": ",".join(plan.variants), "seeds": ",".join(map(str, plan.seeds)),
        "size": plan.size,
        "fractions": ",".join(f"{f:.3f}" for f in plan.fractions), "token_budget": mt["token_budget"],
        "base": plan.base, "references": plan.references,
        "bootstrapped": ",".join(plan.bootstrapped) or "none",
        "posttrain": " -> ".join(s["kind"] for s in plan.config["posttrain"]["stages"]),
    })
    return run.info.run_id


def _finished_child(tracker, plan: AblationPlan, variant: str, seed: int) -> str | None:  # noqa: ANN001
    """The cell's child run if an earlier attempt finished it."""
    from flywheel.tracking.store import PARENT_TAG

    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{plan.parent_run}' and tags.`{VARIANT_TAG}` = '{variant}' "
                      f"and tags.`{SEED_TAG}` = '{seed}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def _point_scores(point: dict[str, Any]) -> dict[str, float]:
    """One curve point's metrics: its scores and its held-out loss by token class."""
    scores = {f"mid/{k}": v for k, v in point["metrics"].items()}
    nll = point.get("token_nll") or {}
    scores.update({f"heldout_nll/{k}": v for k, v in (nll.get("classes") or {}).items() if v is not None})
    if nll.get("all") is not None:
        scores["heldout_nll/all"] = nll["all"]
    return scores


def _log_cell_metrics(tracker, run_id: str, cell: dict[str, Any], history: list[dict[str, Any]]) -> None:  # noqa: ANN001
    """Scores at each point with step = tokens, post-training scores, KL, seconds and the training loss."""
    tracker.log_params(run_id, {"variant": cell["variant"], "seed": cell["seed"], "midtrain": cell["midtrain_config"],
                                "reference": cell["reference"], "data": cell["data"]})
    for point in cell["curve"]:
        tracker.log_metrics(run_id, _point_scores(point), step=point["tokens"])
    if cell["post"]:
        tracker.log_metrics(run_id, {f"post/{k}": v for k, v in cell["post"].items()})
    if cell["kl"] is not None:
        tracker.log_metrics(run_id, {"mid/kl_to_reference": cell["kl"]})
    tracker.log_metrics(run_id, {f"seconds/{k}": v for k, v in cell["seconds"].items()})
    tracker.log_history(run_id, history, prefix="train/")


def log_cell(plan: AblationPlan, cell: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """A child run per cell (an already finished one is kept); its run id."""
    from flywheel.tracking.store import PARENT_TAG, STAGE_TAG

    tracker = open_study_tracker(plan)
    variant, seed = cell["variant"], cell["seed"]
    done = _finished_child(tracker, plan, variant, seed)
    if done:
        return done
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"{variant}/seed-{seed}", tags={
        PARENT_TAG: plan.parent_run, ABLATION_TAG: plan.study, STAGE_TAG: "ablation-cell",
        VARIANT_TAG: variant, SEED_TAG: str(seed)})
    run_id = run.info.run_id
    try:
        _log_cell_metrics(tracker, run_id, cell, history)
    except BaseException:
        tracker.client.set_terminated(run_id, "FAILED")
        raise
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


def log_report(plan: AblationPlan, report: dict[str, Any]) -> None:
    """The summary numbers and the report's files on the study's parent run, which it then closes."""
    tracker, parent = open_study_tracker(plan), plan.parent_run
    tracker.log_metrics(parent, summary_metrics(report))
    for key in ("json", "markdown", "plot", "token_plot"):
        path = Path(report.get("files", {}).get(key, ""))
        if path.is_file():
            tracker.log_artifact(parent, path, "ablation")
    tracker.set_tags(parent, {"flywheel.ablation.failed_cells": len(report["failed"])})
    tracker.client.set_terminated(parent, "FAILED" if report["failed"] else "FINISHED")
