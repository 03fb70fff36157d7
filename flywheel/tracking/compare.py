"""Is the flywheel turning? Rounds × metrics with deltas, and a plot of each metric against the round."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.tracking.store import Tracker

PIPELINE = "pipeline/"  # a round run's scores along its pipeline: step 0 the mid-trained base, step 1 the RL model
PIPELINE_STEP = {"base": 0, "post": 1}


def log_round_metrics(tracker: Tracker, round_n: int, metrics: dict[str, float], kind: str) -> None:
    """Round-level metrics (`<kind>/<name>`, kind = base or post) on the round run and, with step=N, the summary run.

    The round run also gets `pipeline/<name>` at step 0 (base) and 1 (RL model): MLflow's compare charts
    draw lines only for curves (one point per run is drawn as isolated dots, or bars of zero width), so
    selecting the round runs draws one line per round, from its mid-trained base to its RL model.
    """
    log_round_values(tracker, round_n, {f"{kind}/{k}": v for k, v in metrics.items()})
    tracker.log_metrics(tracker.round_run(round_n), {f"{PIPELINE}{k}": v for k, v in metrics.items()},
                        step=PIPELINE_STEP[kind])


def log_round_values(tracker: Tracker, round_n: int, named: dict[str, float]) -> None:
    """Values that describe a round (its metrics, its weight statistics, its KL) at step=N on the round and summary runs."""
    tracker.log_metrics(tracker.round_run(round_n), named, step=round_n)
    summary = tracker.summary_run()
    tracker.log_metrics(summary, named, step=round_n)
    tracker.client.set_terminated(summary, "FINISHED")  # not left RUNNING between rounds (logging reopens nothing)


@dataclass
class Comparison:
    rounds: list[int]
    metrics: list[str]
    values: dict[int, dict[str, float]]
    text: str = ""
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _gate_cell(tags: dict[str, str]) -> str:
    """`+0.0120 ± 0.0431` from a round run's paired-gate tags (registry.T_GATE), `–` when it has none."""
    try:
        delta, low, high = (float(tags[f"flywheel.promotion.{k}"]) for k in ("delta", "ci_low", "ci_high"))
    except KeyError:
        return "–"
    return f"{delta:+.4f} ± {(high - low) / 2:.4f}"


def _readings(tags: dict[str, str]) -> dict[str, str]:
    """{metric: `+0.0120 ± 0.0431 (0.28)`} from a round run's `flywheel.promotion.readings` tag."""
    import json

    from flywheel.tracking.gate import reading_text

    readings = json.loads(tags.get("flywheel.promotion.readings", "{}"))
    return {m: reading_text(r["delta"], r["low"], r["high"]) for m, r in readings.items()}


def _gate_lines(tags: dict[int, dict[str, str]]) -> list[str]:
    """The gate's rows (each paired metric, |Δ| / half-width beside it) and each round's verdict."""
    readings = {n: _readings(t) for n, t in tags.items()}
    measured = list(dict.fromkeys(m for r in readings.values() for m in r))
    lines = [" | ".join([f"gate: {m} Δ ± half-width (ratio)", *(r.get(m, "–") for r in readings.values()), "–", "–"])
             for m in measured]  # the gate's metric and its guards'
    gate = [_gate_cell(t) for t in tags.values()]
    if not measured and any(c != "–" for c in gate):  # rounds decided before the gate recorded its readings
        lines.append(" | ".join(["gate: Δ vs reference ± CI half-width", *gate, "–", "–"]))
    lines += [f"round {n}: {t['flywheel.promotion']}" for n, t in tags.items() if t.get("flywheel.promotion")]
    return lines


def compare(tracker: Tracker, out_dir: Path | None = None, prefix: str | tuple[str, ...] = "") -> Comparison:
    """Read every round's metrics from MLflow, tabulate deltas vs the previous round and round 0, plot, log both."""
    runs = tracker.round_runs()
    values = {n: {k: v for k, v in r.data.metrics.items() if k.startswith(prefix) and not k.startswith(PIPELINE)}
              for n, r in sorted(runs.items())}
    rounds = sorted(values)
    metrics = sorted({k for vals in values.values() for k in vals})
    lines = []
    header = ["metric"] + [f"round {n}" for n in rounds] + ["Δ prev", "Δ round 0"]
    lines.append(" | ".join(header))
    lines.append(" | ".join("---" for _ in header))
    for m in metrics:
        row = [values[n].get(m) for n in rounds]
        last = row[-1] if row else None
        prev = row[-2] if len(row) > 1 else None
        first = row[0] if row else None
        d_prev = last - prev if last is not None and prev is not None else None
        d_first = last - first if last is not None and first is not None and len(row) > 1 else None
        lines.append(" | ".join([m, *(_fmt(v) for v in row), _fmt(d_prev, True), _fmt(d_first, True)]))
    lines += _gate_lines({n: runs[n].data.tags for n in rounds})
    result = Comparison(rounds, metrics, values, "\n".join(lines))
    if not rounds:
        result.text = "no rounds recorded yet"
        return result

    out_dir = out_dir or tracker.cfg.home / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in metrics:
        xs = [n for n in rounds if m in values[n]]
        if xs:
            ax.plot(xs, [values[n][m] for n in xs], marker="o", label=m)
    ax.set_xlabel("round")
    ax.set_ylabel("score")
    ax.set_xticks(rounds)
    ax.set_title(f"{tracker.cfg.name}: metrics by round")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    result.plot = out_dir / f"{tracker.cfg.name}-rounds.png"
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
    table = out_dir / f"{tracker.cfg.name}-rounds.md"
    table.write_text(result.text + "\n", encoding="utf-8")
    summary = tracker.summary_run()
    tracker.log_artifact(summary, result.plot, "comparison")
    tracker.log_artifact(summary, table, "comparison")
    return result
