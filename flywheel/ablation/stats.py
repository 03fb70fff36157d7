"""The ablation's statistics: mean ± 95% CI over seeds, a two-variant test, and tokens-to-baseline.

Few seeds (2–5) are the norm, so the interval uses Student's t, not the normal; with one seed
there is no interval and the table says "n/a" instead of pretending.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

LEVEL = 0.95
ALPHA = 0.05


@dataclass
class Estimate:
    """A mean over seeds with its 95% CI half-width (None with fewer than two seeds)."""

    mean: float
    ci95: float | None
    n: int
    values: list[float]

    @property
    def low(self) -> float | None:
        return None if self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        return None if self.ci95 is None else self.mean + self.ci95

    def to_dict(self) -> dict:
        return asdict(self) | {"low": self.low, "high": self.high}


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Mean and t-distribution CI half-width t_{(1+level)/2, n-1} * s / sqrt(n): honest with few seeds."""
    from scipy import stats

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, None, n, xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(mean, half, n, xs)


def format_estimate(est: Estimate | None, scale: float = 100.0, digits: int = 1) -> str:
    """`12.3 ± 4.5` (points by default); one seed gives `12.3 ± n/a`, a missing cell `–`."""
    if est is None:
        return "–"
    mean = f"{est.mean * scale:.{digits}f}"
    return f"{mean} ± n/a" if est.ci95 is None else f"{mean} ± {est.ci95 * scale:.{digits}f}"


@dataclass
class Comparison:
    """Whether variant `a` differs from `b`: the mean difference a − b, the test used and its p-value."""

    a: str
    b: str
    diff: float
    p_value: float | None
    significant: bool
    test: str
    n_a: int
    n_b: int


def compare(a: Sequence[float], b: Sequence[float], paired: bool, names: tuple[str, str] = ("a", "b"),
            alpha: float = ALPHA) -> Comparison:
    """Paired t-test when the seeds match (same data order per seed), else Welch's; no test below two each.

    Zero variance is decided directly (scipy returns nan there): no difference at all is p = 1,
    a constant non-zero difference is p = 0.
    """
    from scipy import stats

    xa, xb = [float(v) for v in a], [float(v) for v in b]
    diff = (sum(xa) / len(xa) - sum(xb) / len(xb)) if xa and xb else float("nan")
    out = Comparison(names[0], names[1], diff, None, False, "none (fewer than 2 seeds)", len(xa), len(xb))
    if paired and len(xa) == len(xb) and len(xa) >= 2:
        d = [x - y for x, y in zip(xa, xb, strict=True)]
        out.test = "paired t"
        if max(d) == min(d):
            out.p_value = 1.0 if d[0] == 0 else 0.0
        else:
            out.p_value = float(stats.ttest_rel(xa, xb).pvalue)
    elif len(xa) >= 2 and len(xb) >= 2:
        out.test = "Welch t"
        if max(xa) == min(xa) and max(xb) == min(xb):
            out.p_value = 1.0 if xa[0] == xb[0] else 0.0
        else:
            out.p_value = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
    if out.p_value is not None:
        out.significant = out.p_value < alpha
    return out


def holm(p_values: Sequence[float | None], alpha: float = ALPHA) -> list[tuple[float | None, bool]]:
    """Holm–Bonferroni over one family of tests: (adjusted p, significant) per input, None kept as None.

    A table that tests remit against ten variants at α = 0.05 expects a false "significant" about half the
    time under no effect at all; Holm keeps the chance of any false one at α without assuming independence.
    Adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the m real p-values sorted ascending.
    """
    real = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(real)
    out: list[tuple[float | None, bool]] = [(None, False)] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(real):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = (running, running < alpha)
    return out


def tokens_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Tokens at which a score-vs-tokens curve first reaches `target`, linear interpolation; None: never."""
    points = sorted(curve)
    for i, (tokens, score) in enumerate(points):
        if score >= target:
            if i == 0:
                return float(tokens)
            t0, s0 = points[i - 1]
            return float(t0 + (target - s0) / (score - s0) * (tokens - t0))
    return None


def tokens_ratio(curve: Sequence[tuple[float, float]], baseline: Sequence[tuple[float, float]]) -> dict:
    """Tokens `curve` needs to reach the baseline's final score, as a fraction of the baseline's tokens."""
    final_tokens, target = sorted(baseline)[-1]
    reached = tokens_to_reach(curve, target)
    return {"target": target, "baseline_tokens": final_tokens, "tokens": reached,
            "ratio": None if reached is None or final_tokens == 0 else reached / final_tokens,
            "reached": reached is not None}


def format_ratio(entry: dict) -> str:
    """`0.42× (126,000 of 300,000 tokens)` or `not reached`."""
    if not entry.get("reached"):
        return "not reached"
    return f"{entry['ratio']:.2f}× ({entry['tokens']:,.0f} of {entry['baseline_tokens']:,.0f} tokens)"
