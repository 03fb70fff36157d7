"""The round's markdown summary (a Prefect artifact)."""

from __future__ import annotations

from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.tracking.registry import RoundPlan
from flywheel.tracking.store import open_tracker, tracking_uri


def round_report(cfg: FlywheelConfig, plan: RoundPlan, base_eval: dict, post_eval: dict, decision: dict[str, Any],
                 note: str | None = None) -> str:
    """The round's metrics table, promotion decision, and where the MLflow runs are."""
    tracker = open_tracker(cfg)
    rows = ["| metric | mid-trained base | RL model |", "|---|---|---|"]
    for k in sorted(set(base_eval["metrics"]) | set(post_eval["metrics"])):
        b, r = base_eval["metrics"].get(k), post_eval["metrics"].get(k)
        rows.append(f"| {k} | {'' if b is None else f'{b:.4f}'} | {'' if r is None else f'{r:.4f}'} |")
    guide = plan.reference_version or "none (NTP round)"
    run = tracker.round_run(plan.round)
    verdict = "promoted" if decision["promoted"] else "kept the reference"
    if decision.get("awaiting"):
        verdict = f"awaits approval (the gate recommends {'promote' if decision['promoted'] else 'reject'})"
    return "\n".join([
        f"# {cfg.name}: round {plan.round}",
        f"Reference: `{guide}`. Promotion: **{verdict}** — {decision['reason']}.",
        *([f"Note: {note}."] if note else []),
        "", *rows, "", *_readings(decision.get("readings") or {}),
        f"MLflow: experiment `{cfg.name}`, round run `{run}` (tracking URI `{tracking_uri(cfg)}`).",
    ])


def _readings(readings: dict[str, dict[str, Any]]) -> list[str]:
    """The gate's paired intervals (the promotion metric's and each guard's), with |Δ| over the half-width: above 1
    the interval excludes zero, so the gate can tell the two models apart on that metric."""
    if not readings:
        return []
    from flywheel.tracking.gate import reading_text

    rows = ["| gate reading | Δ candidate − reference ± half-width (\\|Δ\\| / half-width) |", "|---|---|"]
    rows += [f"| {m} | {reading_text(r['delta'], r['low'], r['high'])} |" for m, r in readings.items()]
    return [*rows, ""]
