"""The ablation harness: ReMiT against its baselines and its own knobs, on your base, reference and data.

Library entry point `run_ablation` (no Prefect needed); `flows/ablation.py` runs the same steps
with one Prefect task per (variant, seed) cell. Statistics in `stats`, tables and plot in `report`.
"""

from flywheel.ablation.harness import (
    SIZES,
    VARIANTS,
    cell_config,
    evaluate_base,
    finish_ablation,
    heldout_kl,
    prepare_ablation,
    resolve_references,
    run_ablation,
    run_cell,
)

__all__ = [
    "SIZES",
    "VARIANTS",
    "cell_config",
    "evaluate_base",
    "finish_ablation",
    "heldout_kl",
    "prepare_ablation",
    "resolve_references",
    "run_ablation",
    "run_cell",
]
