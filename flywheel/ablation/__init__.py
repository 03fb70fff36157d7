"""The ablation: ReMiT against its baselines and its own knobs, on your base, reference and data.

Library entry point `run_ablation` (no Prefect needed); `flows/ablation.py` runs the same steps with one
Prefect task per (variant, seed) cell. By concern: `catalogue` (variants, studies, sizes), `plan` (the typed
study plan), `references` (bootstrapped references, the study key), `cell` (one variant × seed),
`measures` (held-out KL and token loss), `tracking` (MLflow), `study` (the whole run); statistics in
`stats`, tables and plot in `report` and `token_report`.
"""

from flywheel.ablation.catalogue import SIZES, STUDIES, VARIANTS
from flywheel.ablation.cell import evaluate_base, run_cell
from flywheel.ablation.measures import heldout_kl
from flywheel.ablation.plan import AblationPlan, cell_config, cell_seeds, prepare_ablation
from flywheel.ablation.references import resolve_references
from flywheel.ablation.study import failed_cell, finish_ablation, run_ablation

__all__ = [
    "SIZES",
    "STUDIES",
    "VARIANTS",
    "AblationPlan",
    "cell_config",
    "cell_seeds",
    "evaluate_base",
    "failed_cell",
    "finish_ablation",
    "heldout_kl",
    "prepare_ablation",
    "resolve_references",
    "run_ablation",
    "run_cell",
]
