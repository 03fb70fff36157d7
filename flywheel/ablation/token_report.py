"""The token-level tables: held-out loss by token class and δ-third, and each variant against its NTP.

Pure like `report.summarize` (cells in, JSON-able dict out), so it is checked on made-up cells. Every
variant is paired with the NTP run of the same length (`Variant.baseline`), seed by seed (the same seed
is the same data order), and its δ-thirds are those of its own reference (NTP variants: the RL one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.ablation.catalogue import VARIANTS, Variant, baseline_of
from flywheel.ablation.stats import compare, mean_ci
from flywheel.ablation.tokens import BUCKETS, CLASSES
from flywheel.metrics import AVG

MEASURES = ("all", *CLASSES, *BUCKETS)
DIFF_MEASURES = ("avg", "answer", "result", "digit", "operator", "prose", "top", "bottom")


def _variant(name: str) -> Variant | None:
    return VARIANTS.get(name)


def role_of(variant: str, references: dict[str, Any]) -> str | None:
    """Whose δ-thirds a variant is read against: its own reference, else the RL one."""
    v = _variant(variant)
    role = v.reference if v is not None and v.reference else "rl"
    return role if references.get(role) else None


def value(point: dict[str, Any] | None, measure: str, role: str | None) -> float | None:
    """One measure of one evaluated point's `token_nll` (None when not measured)."""
    nll = (point or {}).get("token_nll") or {}
    if measure == "all":
        return nll.get("all")
    if measure in CLASSES:
        return (nll.get("classes") or {}).get(measure)
    return ((nll.get("buckets") or {}).get(role or "") or {}).get(measure)


def _cells(cells: list[dict[str, Any]], variant: str) -> dict[int, dict[str, Any]]:
    return {c["seed"]: c for c in cells if c["variant"] == variant and not c.get("failed")}


def _est(values: list[float]) -> dict[str, Any] | None:
    return mean_ci(values).to_dict() if values else None


def token_summary(variants: list[str], references: dict[str, Any], base: dict[str, Any],
                  cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per variant the measures along the anneal (mean ± CI over seeds); per pair the paired differences."""
    if not any(p.get("token_nll") for c in cells if not c.get("failed") for p in c["curve"]):
        return None
    curves: dict[str, Any] = {}
    for variant in variants:
        runs = list(_cells(cells, variant).values())
        if not runs:
            continue
        role = role_of(variant, references)
        points = [{"tokens": 0, **{m: _est([x] if (x := value(base, m, role)) is not None else [])
                                   for m in MEASURES}}]
        for i in range(min(len(r["curve"]) for r in runs)):
            points.append({"tokens": sum(r["curve"][i]["tokens"] for r in runs) / len(runs),
                           **{m: _est([x for r in runs if (x := value(r["curve"][i], m, role)) is not None])
                              for m in MEASURES}})
        curves[variant] = {"role": role, "points": points}
    return {"curves": curves, "differences": differences(variants, references, cells),
            "classes": CLASSES, "buckets": BUCKETS}


def _pair_value(cell: dict[str, Any], measure: str, role: str | None, i: int) -> float | None:
    if measure == "avg":
        return cell["curve"][i]["metrics"].get(AVG) if i == len(cell["curve"]) - 1 else None
    return value(cell["curve"][i], measure, role)


def partners(variant: str, variants: list[str]) -> list[str]:
    """What a variant is paired with: its NTP of the same length, and the variant it contrasts (if run)."""
    v = _variant(variant)
    if v is None:
        return []
    return [p for p in (v.baseline, v.contrast) if p and p != variant and p in variants]


def differences(variants: list[str], references: dict[str, Any], cells: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """variant − each partner, paired by seed: avg at the end; each NLL measure at every point."""
    rows = []
    for variant in variants:
        for other in partners(variant, variants):
            row = _difference(variant, other, role_of(variant, references), cells)
            if row is not None:
                rows.append(row)
    return rows


def _difference(variant: str, other: str, role: str | None, cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One variant − another over the seeds both finished; None when they share none."""
    mine, theirs = _cells(cells, variant), _cells(cells, other)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    n_points = min(len(c["curve"]) for c in [*mine.values(), *theirs.values()])
    row: dict[str, Any] = {"variant": variant, "baseline": other, "role": role, "seeds": seeds, "points": []}
    for i in range(n_points):
        point: dict[str, Any] = {"tokens": mine[seeds[0]]["curve"][i]["tokens"]}
        for m in (*DIFF_MEASURES, "middle"):
            pairs = [(a, b) for s in seeds
                     if (a := _pair_value(mine[s], m, role, i)) is not None
                     and (b := _pair_value(theirs[s], m, role, i)) is not None]
            if not pairs:
                continue
            test = compare([a for a, _ in pairs], [b for _, b in pairs], paired=True, names=(variant, other))
            point[m] = {"diff": _est([a - b for a, b in pairs]), "p_value": test.p_value}
        row["points"].append(point)
    return row


# --- rendering ------------------------------------------------------------------------------------


def _fmt(est: dict[str, Any] | None, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    if not est:
        return "–"
    mean = f"{est['mean'] * scale:+.{digits}f}" if sign else f"{est['mean'] * scale:.{digits}f}"
    return mean if est["ci95"] is None else f"{mean} ± {est['ci95'] * scale:.{digits}f}"


def _fmt_diff(entry: dict[str, Any] | None, measure: str) -> str:
    if not entry:
        return "–"
    scale, digits = (100.0, 1) if measure == "avg" else (1.0, 3)
    p = entry["p_value"]
    return f"{_fmt(entry['diff'], scale, digits, sign=True)} (p {'–' if p is None else f'{p:.2g}'})"


def token_markdown(summary: dict[str, Any] | None) -> list[str]:
    """The held-out loss table at the end of the anneal, the answer-token curve, and the differences."""
    if not summary:
        return []
    head = ["variant", "δ of", *MEASURES]
    lines = ["## Held-out loss by token class and δ-third, end of anneal (nats/token, mean ± 95% CI)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for variant, curve in summary["curves"].items():
        end = curve["points"][-1]
        lines.append(f"| {variant} | {curve['role'] or '–'} | " + " | ".join(_fmt(end[m]) for m in MEASURES) + " |")
    lines += ["", "## Answer-token loss along the anneal (nats/token)", ""]
    for variant, curve in summary["curves"].items():
        lines.append(f"- {variant}: " + "; ".join(f"{p['tokens']:,.0f}: {_fmt(p['answer'])}" for p in curve["points"]))
    rows = summary["differences"]
    if rows:
        n_tests = sum(1 for r in rows for m in DIFF_MEASURES if r["points"][-1].get(m))
        lines += ["", "## Each variant − NTP of the same length (and − the variant it contrasts), end of anneal "
                  "(paired over seeds; "
                  f"Δavg in points, ΔNLL in nats/token; {n_tests} unadjusted tests)", "",
                  "| variant | − | seeds | " + " | ".join(f"Δ{m}" for m in DIFF_MEASURES) + " |",
                  "|" + "|".join(["---"] * (len(DIFF_MEASURES) + 3)) + "|"]
        for r in rows:
            end = r["points"][-1]
            lines.append(f"| {r['variant']} | {r['baseline']} | {len(r['seeds'])} | "
                         + " | ".join(_fmt_diff(end.get(m), m) for m in DIFF_MEASURES) + " |")
    lines.append("")
    return lines


def plot_token_curves(summary: dict[str, Any], path: Path) -> Path:
    """ΔNLL along the anneal, one panel per class and δ-third: against NTP of the same length (solid) or the
    variant a row contrasts (dashed, labelled `a − b`)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("answer", "result", "digit", "operator", "prose", "top", "middle", "bottom")
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5), sharex=True)
    colours = plt.get_cmap("tab20").colors
    for i, row in enumerate(summary["differences"]):
        colour = colours[(2 * i) % len(colours) + (i // 10) % 2]
        style = "-" if row["baseline"] == baseline_of(row["variant"], row["baseline"]) else "--"  # dashed: a contrast
        for ax, m in zip(axes.flat, panels, strict=True):
            pts = [(p["tokens"], p[m]["diff"]) for p in row["points"] if p.get(m)]
            if not pts:
                continue
            ax.errorbar([t for t, _ in pts], [d["mean"] for _, d in pts], yerr=[d["ci95"] or 0.0 for _, d in pts],
                        color=colour, linestyle=style, marker="o", markersize=3, capsize=2,
                        label=row["variant"] if style == "-" else f"{row['variant']} − {row['baseline']}")
    for ax, m in zip(axes.flat, panels, strict=True):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the points' own ticks only
        title = f"δ {m} third" if m in BUCKETS else f"{m} tokens"
        ax.set_title(f"{title}: ΔNLL (nats/token)", fontsize="medium")
    for ax in axes[1]:
        ax.set_xlabel("mid-training tokens")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="center right")
    fig.tight_layout(rect=(0, 0, 0.84 if max(map(len, labels), default=0) <= 24 else 0.74, 1))  # room for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
