"""The whole study: plan, references, the base's scores, every cell, then the report.

The steps are plain functions so Prefect can run each (variant, seed) cell as its own task:
    plan = prepare_ablation(cfg, ...)      # resolve paths, size, variants, seeds (cheap)
    plan = resolve_references(plan)         # bootstrap missing references; open the MLflow parent run
    base = evaluate_base(plan)              # the 0-token point every curve starts from
    cell = run_cell(plan, variant, seed)    # one cell: mid-train, evaluate along, KL, post-train, evaluate
    report = finish_ablation(plan, base, cells)
`run_ablation` does all of it in one call, a crashed cell recorded as failed, not fatal.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from flywheel.ablation.cell import evaluate_base, evaluate_checkpoint, run_cell
from flywheel.ablation.plan import AblationPlan, cell_config, cell_seeds, prepare_ablation
from flywheel.ablation.references import resolve_references
from flywheel.ablation.report import result_lines, summarize, write_report
from flywheel.ablation.tracking import log_report
from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError


def failed_cell(variant: str, seed: int, error: BaseException | str) -> dict[str, Any]:
    """What a crashed cell leaves in the table: its name and why."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"variant": variant, "seed": seed, "failed": True, "error": text}


def finish_ablation(plan: AblationPlan, base: dict[str, Any], cells: list[dict[str, Any]],
                    echo: bool = True) -> dict[str, Any]:
    """Summarize, write JSON/markdown/PNG, log them to the parent run, print the headline."""
    cfg = cell_config(plan, "ntp", plan.seeds[0])
    # how good the guides are, scored like every post-trained model (zero-shot, chat template); reused by content
    refs = {role: evaluate_checkpoint(cfg, path, "post") for role, path in plan.references.items()
            if path and not role.startswith("oracle")}  # an oracle's weights are the RL reference's
    report = summarize(plan, {**base, "references": refs}, cells)
    write_report(report, Path(plan.out_dir))
    log_report(plan, report)
    if echo:  # what `flywheel ablate` prints: the headline and where the tables went
        print("\n".join(result_lines(report)))
    return report


def run_cells(plan: AblationPlan) -> list[dict[str, Any]]:
    """Every (variant, seed) cell in turn; a crash costs that cell only, a user error stops the study."""
    cells = []
    for variant in plan.variants:
        for seed in cell_seeds(plan, variant):
            try:
                cells.append(run_cell(plan, variant, seed))
            except FlywheelError:
                raise  # a user error fails every cell the same way: say it once
            except Exception as exc:
                traceback.print_exc()
                cells.append(failed_cell(variant, seed, exc))
    return cells


def run_ablation(cfg: FlywheelConfig, variants: list[str] | None = None, seeds: int | list[int] | None = None,
                 size: str = "config", reference: str | None = None, sft_reference: str | None = None,
                 weak_reference: str | None = None, fractions: tuple[float, ...] | None = None,
                 heldout: str | None = None, heldout_limit: int | None = None, threads: int | None = None,
                 echo: bool = True, dpo_reference: str | None = None, strong_reference: str | None = None,
                 study: str | None = None) -> dict[str, Any]:
    """The whole study without Prefect: every (variant, seed) cell in turn; a crash costs that cell only."""
    t0 = time.perf_counter()
    plan = prepare_ablation(cfg, variants, seeds, size, reference, sft_reference, weak_reference, fractions,
                            heldout, heldout_limit, threads, dpo_reference=dpo_reference,
                            strong_reference=strong_reference, study=study)
    plan = resolve_references(plan)
    base = evaluate_base(plan)
    report = finish_ablation(plan, base, run_cells(plan), echo=echo)
    report["seconds"] = time.perf_counter() - t0
    return report
