"""What the evaluate stage remembers by content, so a resumed round does not recompute it.

Keys are checkpoint manifests (sizes and checksums of the files), so rebuilt weights are measured again.
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.config import FlywheelConfig
from flywheel.data.io import file_fingerprint, fingerprint, write_json
from flywheel.round.settings import round_config
from flywheel.tracking.registry import RoundPlan

MANIFEST = "flywheel-manifest.json"


def _verified(cfg: FlywheelConfig, key: str) -> Path:
    return cfg.home / "evals" / "verified" / (key + ".json")


def evaluation_memo(cfg: FlywheelConfig, checkpoint: str, kind: str) -> Path | None:
    """Where the scores of this checkpoint's evaluation are remembered (None for a folder without a manifest)."""
    manifest = Path(checkpoint) / MANIFEST
    if not manifest.exists():
        return None
    return _verified(cfg, fingerprint(file_fingerprint(manifest), kind, cfg.model.dtype,
                                      cfg.evaluation.cache_fields()))


def round_kl(cfg: FlywheelConfig, plan: RoundPlan, checkpoint: str) -> dict[str, float]:
    """`dynamics/kl_to_reference`: KL(RL model ‖ the round's reference) per token on held-out mid-training text.

    Remembered per (checkpoint manifest, reference, held-out slice).
    """
    from flywheel.remit.dynamics import heldout_rows, kl_to_reference

    rcfg = round_config(cfg, plan)
    reference = str(plan.reference_path)
    manifest, ref_manifest = Path(checkpoint) / MANIFEST, Path(reference) / MANIFEST
    memo = None
    if manifest.exists() and ref_manifest.exists():
        memo = _verified(cfg, fingerprint(
            "kl", file_fingerprint(manifest), file_fingerprint(ref_manifest), rcfg.data.model_dump(mode="json"),
            rcfg.midtrain.seq_len, rcfg.midtrain.token_budget))  # the data section holds the slice
        if memo.exists():
            return json.loads(memo.read_text())
    out = {"dynamics/kl_to_reference": kl_to_reference(cfg, checkpoint, reference, heldout_rows(rcfg))}
    if memo is not None:
        write_json(memo, out)
    return out
