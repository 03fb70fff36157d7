"""The noise-aware promotion gate: a paired bootstrap of the promotion metric's difference, and the rules.

Two models scored on the same 178 items differ by a few points from the items' noise alone (a
standard error of 3–5 points per 100 items), so comparing their two means turns noise into
verdicts. Here the candidate and the reference are paired item by item: the metric's difference
is a weighted sum of per-task mean differences (`items.metric_terms`), and its interval comes from
resampling each task's items with replacement (stratified, so every resample keeps the task mix),
`resamples` times, taking the percentile interval at `confidence`.

Rules (promotion.rule): `noninferior` promotes when the interval's low end is above -min_delta,
`superior` when it is above 0, `point` when value >= reference - min_delta (intervals still shown).
A metric where lower is better (bits per byte, perplexity: `metrics.higher_is_better`) is judged
mirrored: its interval's high end below +min_delta (noninferior) or 0 (superior), or value <=
reference + min_delta (point). The difference shown is always candidate − reference, as measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flywheel.errors import FlywheelError
from flywheel.evaluation.items import metric_terms

BLOCK = 256  # resamples drawn at a time: bounds the index array at BLOCK × items


@dataclass(frozen=True)
class PairedDelta:
    """candidate − reference on the paired items: the point difference and its bootstrap interval."""

    delta: float
    low: float
    high: float
    items: int
    confidence: float
    resamples: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self) -> str:
        """`Δ +0.0120 ± 0.0431 (95% CI -0.0300..+0.0561, 356 items)` for verdicts and tables."""
        return (f"Δ {self.delta:+.4f} ± {self.half_width:.4f} ({self.confidence:.0%} CI {self.low:+.4f}..{self.high:+.4f}, "
                f"{self.items} items)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reading_text(delta: float, low: float, high: float) -> str:
    """`-0.0086 ± 0.0052 (1.66)`: a paired difference, its interval's half-width, and |Δ| over that half-width
    (above 1 the interval excludes zero: the metric tells the two models apart)."""
    half = (high - low) / 2
    return f"{delta:+.4f} ± {half:.4f} ({abs(delta) / half if half else float('inf'):.2f})"


class NotComparable(FlywheelError):
    """The two evaluations cannot be paired (other tasks, limit, prompts or items)."""


def check_comparable(candidate: Mapping[str, Any], reference: Mapping[str, Any], ref_name: str) -> None:
    """Refuse to pair results of different protocols: other tasks, limit, few-shot count, kind or task versions."""
    a, b = candidate.get("protocol", {}), reference.get("protocol", {})
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        what = "; ".join(f"{k} {b.get(k)!r} vs {a.get(k)!r} now" for k in differ)
        raise NotComparable(f"{ref_name} was evaluated under another protocol ({what}), so its items cannot be "
                            "paired with the candidate's; re-evaluate it under this evaluation section, or pass "
                            "force_promotion (promotion.force) to promote anyway")


def paired_delta(candidate: Mapping[str, Any], reference: Mapping[str, Any], metric: str, *,
                 confidence: float = 0.95, resamples: int = 2000, seed: int | list[int] = 0,
                 ref_name: str = "the reference") -> PairedDelta:
    """Bootstrap candidate − reference of `metric` over the items both answered (the same items, or refused)."""
    check_comparable(candidate, reference, ref_name)
    terms = metric_terms(candidate, metric)
    rng = np.random.default_rng(seed)
    point, total, boot = 0.0, 0, np.zeros(resamples)
    for (task, m), weight in sorted(terms.items()):
        cand = candidate["scores"][task][m]
        ref = reference.get("scores", {}).get(task, {}).get(m)
        if ref is None or set(ref) != set(cand):
            raise NotComparable(f"{ref_name} has no scores for the same {task} items ({m}) as the candidate; "
                                "re-evaluate it, or pass force_promotion (promotion.force) to promote anyway")
        ids = sorted(cand)
        diffs = np.array([cand[i] - ref[i] for i in ids])
        n = len(diffs)
        point += weight * float(diffs.mean())
        total += n
        for start in range(0, resamples, BLOCK):
            b = min(BLOCK, resamples - start)
            boot[start : start + b] += weight * diffs[rng.integers(0, n, size=(b, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(boot, [tail, 1 - tail]))
    return PairedDelta(point, low, high, total, confidence, resamples)


def passes(rule: str, min_delta: float, value: float, reference_value: float | None,
           interval: PairedDelta | None, ref_name: str = "reference", higher: bool = True) -> tuple[bool, str]:
    """Whether a candidate passes the rule, and the words that say why (`higher`: the metric's direction)."""
    direction = "" if higher else " (lower is better)"
    if rule == "point":
        if reference_value is None:
            return True, f"{value:.4f} ({ref_name} has no value to compare with)"
        if higher:
            ok = value >= reference_value - min_delta
            return ok, f"{value:.4f} {'>=' if ok else '<'} {ref_name} {reference_value:.4f} - min_delta {min_delta:g}"
        ok = value <= reference_value + min_delta
        return ok, (f"{value:.4f} {'<=' if ok else '>'} {ref_name} {reference_value:.4f} + min_delta {min_delta:g}"
                    f"{direction}")
    if interval is None:
        raise ValueError(f"rule {rule} needs the paired interval")
    margin = min_delta if rule == "noninferior" else 0.0
    if higher:
        ok = interval.low > -margin
        return ok, f"{interval.text()}: low end {'>' if ok else '<='} {-margin:+g} ({rule})"
    ok = interval.high < margin
    return ok, f"{interval.text()}: high end {'<' if ok else '>='} {margin:+g} ({rule}{direction})"
