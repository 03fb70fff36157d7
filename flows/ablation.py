"""Prefect flow `flywheel-ablation`: thin wiring over `flywheel.ablation`.

One task per (variant, seed) cell, each with retries and a cached result, run one after the
other (the cells share the machine): a crashed cell is recorded as failed and the table is
still written from the others; a rerun recomputes only what is missing. The plan crosses each
task boundary as JSON (`AblationPlan.to_json` / `from_json`).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.round import STAGE, LogProgress, _no_retry_on_user_error
from flywheel.ablation.cell import evaluate_base, run_cell
from flywheel.ablation.plan import AblationPlan, cell_seeds, prepare_ablation
from flywheel.ablation.references import resolve_references
from flywheel.ablation.study import failed_cell, finish_ablation
from flywheel.config import load_config

# Resolving references creates the study's MLflow parent run: never served from a stale Prefect cache.
UNCACHED = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _no_retry_on_user_error}


@task(name="ablation-plan")
def plan_task(config: str, variants: list[str] | None, seeds: int | list[int] | None, size: str,
              reference: str | None, sft_reference: str | None, weak_reference: str | None,
              threads: int | None, dpo_reference: str | None = None, strong_reference: str | None = None,
              study: str | None = None, heldout: str | None = None) -> dict[str, Any]:
    return prepare_ablation(load_config(config), variants, seeds, size, reference, sft_reference,
                            weak_reference, heldout=heldout, threads=threads, dpo_reference=dpo_reference,
                            strong_reference=strong_reference, study=study).to_json()


@task(name="ablation-references", **UNCACHED)
def references_task(plan: dict[str, Any]) -> dict[str, Any]:
    return resolve_references(AblationPlan.from_json(plan)).to_json()


@task(name="ablation-base-eval", **STAGE)
def base_task(plan: dict[str, Any]) -> dict[str, Any]:
    return evaluate_base(AblationPlan.from_json(plan))


@task(name="ablation-cell", task_run_name="{variant}/seed-{seed}", **STAGE)
def cell_task(plan: dict[str, Any], variant: str, seed: int) -> dict[str, Any]:
    return run_cell(AblationPlan.from_json(plan), variant, seed,
                    callbacks=[LogProgress(f"{variant}/seed-{seed} midtrain")])


@task(name="ablation-report")
def report_task(plan: dict[str, Any], base: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any]:
    return finish_ablation(AblationPlan.from_json(plan), base, cells, echo=False)


@flow(name="flywheel-ablation")
def flywheel_ablation(
    config: str = "configs/demo.yaml",
    variants: list[str] | None = None,
    seeds: int | list[int] | None = None,
    size: str = "config",
    reference: str | None = None,
    sft_reference: str | None = None,
    weak_reference: str | None = None,
    threads: int | None = None,
    dpo_reference: str | None = None,
    strong_reference: str | None = None,
    study: str | None = None,
    heldout: str | None = None,
) -> dict[str, Any]:
    """Mid-train every variant × seed from one base on the same data; evaluate along and after post-training.

    `size`: smoke (minutes), full (`make replicate`), or config (the config as written); `threads`
    overrides the size's torch thread count. `study`: a named set of variants (`dose`: the dose-response
    grid with its positive control), which sets the size to its own unless one is given. `heldout`: a .jsonl
    with a `text` field, held-out text of the mid-training distribution for KL and the token-level measures
    (the tiny world makes its own).
    """
    logger = get_run_logger()
    os.environ.setdefault("FLYWHEEL_HOME", str(load_config(config).home))
    plan = plan_task(config, variants, seeds, size, reference, sft_reference, weak_reference, threads,
                     dpo_reference, strong_reference, study, heldout)
    plan = references_task(plan)
    typed = AblationPlan.from_json(plan)
    logger.info("ablation %s: %s × seeds %s; references %s", typed.study, ", ".join(typed.variants),
                typed.seeds, typed.references)
    base = base_task(plan)
    cells = []
    for variant in typed.variants:
        for seed in cell_seeds(typed, variant):
            state = cell_task(plan, variant, seed, return_state=True)
            if state.is_completed():
                cells.append(state.result())
            else:
                logger.error("cell %s/seed-%s failed: %s", variant, seed, state.message)
                cells.append(failed_cell(variant, seed, state.message or state.name or "failed"))
    report = report_task(plan, base, cells)
    logger.info("ablation %s\n%s\nreport: %s", typed.study, report["markdown"], report["files"]["json"])
    create_markdown_artifact(report["markdown"], key=f"ablation-{typed.study}",
                             description=f"{typed.name} ablation {typed.study}")
    return report
