"""The ablation's tables: per phase mean ± 95% CI over seeds, tokens-to-baseline, KL, tests, a plot.

`summarize` is pure (cells in, a JSON-able report out) so it can be checked on made-up cells;
`write_report` puts it on disk (`tracking.log_report` in MLflow).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.ablation.catalogue import baseline_of, contrast_of
from flywheel.ablation.stats import (
    Comparison,
    Estimate,
    compare,
    format_estimate,
    format_ratio,
    holm,
    mean_ci,
    tokens_ratio,
)
from flywheel.ablation.token_report import plot_token_curves, token_markdown, token_summary
from flywheel.data.io import write_json
from flywheel.metrics import AVG, PREFIX, by_task, primary_metric

if TYPE_CHECKING:
    from flywheel.ablation.plan import AblationPlan

PHASES = {"mid": "after mid-training", "post": "after post-training"}
BASELINE = "ntp"  # the variant whose final score the tokens-to-baseline ratio aims at
METHOD = "remit"  # the variant every other one is tested against


def table_metrics(metric_sets: list[dict[str, float]]) -> list[str]:
    """The columns: each task's primary metric, then the average."""
    seen: dict[str, set[str]] = {}
    for metrics in metric_sets:
        for task, values in by_task(metrics).items():
            seen.setdefault(task, set()).update(values)
    cols = [f"{PREFIX}{task}/{primary_metric(task, sorted(ms))}" for task, ms in sorted(seen.items())]
    return cols + ([AVG] if any(AVG in m for m in metric_sets) else [])


def _estimate(values: list[float]) -> Estimate | None:
    return mean_ci(values) if values else None


def _est_dict(est: Estimate | None) -> dict[str, Any] | None:
    return est.to_dict() if est else None


def _by_seed(cells: list[dict[str, Any]], variant: str) -> dict[int, dict[str, Any]]:
    return {c["seed"]: c for c in cells if c["variant"] == variant and not c.get("failed")}


def _curves(variants: list[str], base: dict[str, Any], cells: list[dict[str, Any]], metric: str
            ) -> dict[str, list[dict[str, Any]]]:
    """Per variant: score at 0 tokens (the base) and at every evaluated fraction, mean ± CI over seeds."""
    out: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        runs = list(_by_seed(cells, variant).values())
        if not runs:
            continue
        points = [{"tokens": 0, **(_est_dict(_estimate([base["metrics"][metric]])) or {})}] if metric in base[
            "metrics"] else []
        for i in range(min(len(r["curve"]) for r in runs)):
            values = [r["curve"][i]["metrics"][metric] for r in runs if metric in r["curve"][i]["metrics"]]
            tokens = sum(r["curve"][i]["tokens"] for r in runs) / len(runs)
            if values:
                points.append({"tokens": tokens, **(_est_dict(_estimate(values)) or {})})
        out[variant] = points
    return out


def _baseline(variant: str) -> str:
    """The NTP variant a variant is compared with: the one of the same anneal length."""
    return baseline_of(variant, BASELINE)


def _pairs(variants: list[str]) -> list[tuple[str, str]]:
    """What the paper's claims need: remit against every other variant, and every variant against its ntp."""
    pairs = [(METHOD, v) for v in variants if METHOD in variants and v != METHOD]
    pairs += [(v, _baseline(v)) for v in variants
              if _baseline(v) in variants and v not in (_baseline(v), METHOD)]
    pairs += [(v, c) for v in variants if (c := contrast_of(v)) in variants and (c, v) not in pairs]
    return pairs


def _compare(cells: list[dict[str, Any]], phase: str, a: str, b: str) -> Comparison | None:
    """avg of variant a against b in one phase: paired over the seeds both finished, else Welch's."""
    xa = {s: c[phase][AVG] for s, c in _by_seed(cells, a).items() if AVG in c[phase]}
    xb = {s: c[phase][AVG] for s, c in _by_seed(cells, b).items() if AVG in c[phase]}
    if not xa or not xb:
        return None
    common = sorted(set(xa) & set(xb))
    if len(common) >= 2:  # same seed = same data order: pair on the seeds both finished
        return compare([xa[s] for s in common], [xb[s] for s in common], paired=True, names=(a, b))
    return compare(list(xa.values()), list(xb.values()), paired=False, names=(a, b))


def _with_holm(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each phase's comparisons are one family: add Holm-adjusted p-values and significance to every row."""
    for row, (p, significant) in zip(rows, holm([r["p_value"] for r in rows]), strict=True):
        row["p_holm"], row["significant_holm"] = p, significant
    return rows


def _phase_tables(variants: list[str], cells: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """Per phase and variant: the seeds that finished and each column's mean ± CI over them."""
    phases: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        phases[phase] = {}
        for variant in variants:
            runs = _by_seed(cells, variant)
            phases[phase][variant] = {
                "seeds": sorted(runs),
                **{m: _est_dict(_estimate([r[phase][m] for r in runs.values() if m in r[phase]]))
                   for m in columns},
            }
    return phases


def _tokens_to_baseline(curves: dict[str, list[dict[str, Any]]], notes: list[str]) -> dict[str, Any]:
    """Each variant's tokens to reach NTP's final avg, as a share of NTP's; a note when that says nothing."""
    ratios: dict[str, Any] = {}
    if BASELINE in curves and len(curves[BASELINE]) > 1:
        baseline = [(p["tokens"], p["mean"]) for p in curves[BASELINE]]
        if baseline[-1][1] <= baseline[0][1]:
            notes.append(f"{BASELINE} ended no better than where its curve began, so every variant 'reaches' "
                         "its final score at once; the tokens-to-baseline ratios say nothing here")
        for variant, points in curves.items():
            if variant != BASELINE and _baseline(variant) == BASELINE:
                ratios[variant] = tokens_ratio([(p["tokens"], p["mean"]) for p in points], baseline)
    return ratios


def summarize(plan: AblationPlan, base: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the study found, as one JSON-able dict (with its markdown rendering under `markdown`)."""
    variants = plan.variants
    columns = table_metrics([c[p] for c in cells if not c.get("failed") for p in PHASES])
    kl = {v: _est_dict(_estimate([r["kl"] for r in _by_seed(cells, v).values() if r["kl"] is not None]))
          for v in variants}
    curves = _curves(variants, base, cells, AVG)
    notes = list(plan.notes or [])
    ratios = _tokens_to_baseline(curves, notes)
    comparisons = {phase: _with_holm([vars(c) for a, b in _pairs(variants)
                                      if (c := _compare(cells, phase, a, b))]) for phase in PHASES}
    report = {
        "study": plan.study, "name": plan.name, "size": plan.size, "variants": variants,
        "seeds": plan.seeds, "fractions": plan.fractions, "columns": columns,
        "token_budget": plan.config["midtrain"]["token_budget"], "references": plan.references,
        "bootstrapped": plan.bootstrapped, "notes": notes, "base": base,
        "phases": _phase_tables(variants, cells, columns), "kl_to_reference": kl,
        "curves": {AVG: curves}, "tokens_to_baseline": ratios, "comparisons": comparisons,
        "cells": [{k: v for k, v in c.items() if k != "midtrain_config"} for c in cells],
        "failed": [c for c in cells if c.get("failed")],
        "plan": plan.to_json(),
        "cell_seconds": {v: _est_dict(_estimate([r["seconds"]["total"] for r in _by_seed(cells, v).values()]))
                         for v in variants},
        "evaluation_points": "checkpoints of the same run at the given fractions of the budget (one anneal "
                             "per cell; earlier points are mid-schedule, not separately annealed runs)",
        "tokens": token_summary(variants, plan.references, base, cells),
    }
    report["markdown"] = to_markdown(report)
    return report


def _short(metric: str) -> str:
    return "avg" if metric == AVG else metric.removeprefix(PREFIX)


def _head_md(report: dict[str, Any]) -> list[str]:
    """The title, what the numbers are, the notes, and the starting points (the base and the references)."""
    cols = report["columns"]
    lines = [f"# Ablation {report['study']} ({report['name']}, size {report['size']})", "",
             f"Seeds {', '.join(map(str, report['seeds']))}; {report['token_budget']:,} mid-training tokens; "
             "scores in points, mean ± 95% CI over seeds (t-distribution; one seed: n/a).", ""]
    lines += [f"- note: {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    base = report["base"]["metrics"]
    refs = report["base"].get("references") or {}
    lines += ["## Starting points", "", "| model | protocol | " + " | ".join(_short(c) for c in cols) + " |",
              "|" + "|".join(["---"] * (len(cols) + 2)) + "|",
              "| pre-anneal base | few-shot | " + " | ".join(_points(base.get(c)) for c in cols) + " |"]
    lines += [f"| {role} reference | zero-shot, chat | " + " | ".join(_points(m.get(c)) for c in cols) + " |"
              for role, m in refs.items()]
    return lines + [""]


def _phases_md(report: dict[str, Any]) -> list[str]:
    """One table per phase that has scores: each variant's seeds and columns (and KL after mid-training)."""
    cols, lines = report["columns"], []
    for phase, title in PHASES.items():
        if not any(row.get(c) for row in report["phases"][phase].values() for c in cols):
            continue  # a study that skips post-training has no such table
        kl_col = phase == "mid"
        head = ["variant", "seeds", *(_short(c) for c in cols)]
        head += ["KL(model‖ref), nats/token"] if kl_col else []
        lines += [f"## {title.capitalize()}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * len(head)) + "|"]
        for variant, row in report["phases"][phase].items():
            cells = [variant, str(len(row["seeds"]))]
            cells += [format_estimate(Estimate(**_plain(row[c])) if row[c] else None) for c in cols]
            if kl_col:
                kl = report["kl_to_reference"].get(variant)
                cells.append(format_estimate(Estimate(**_plain(kl)), scale=1.0, digits=3) if kl else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _curves_md(report: dict[str, Any]) -> list[str]:
    """avg at every evaluated token count, and the tokens each variant needs to reach NTP's final avg."""
    lines: list[str] = []
    curves = report["curves"].get(AVG, {})
    if curves:
        tokens = sorted({p["tokens"] for pts in curves.values() for p in pts})
        lines += ["## avg vs mid-training tokens", "",
                  "| variant | " + " | ".join(f"{t:,.0f}" for t in tokens) + " |",
                  "|" + "|".join(["---"] * (len(tokens) + 1)) + "|"]
        for variant, pts in curves.items():
            at = {p["tokens"]: p for p in pts}
            lines.append(f"| {variant} | " + " | ".join(
                format_estimate(Estimate(**_plain(at[t]))) if t in at else "–" for t in tokens) + " |")
        lines.append("")
    if report["tokens_to_baseline"]:
        lines += [f"## Tokens to reach {BASELINE}'s final avg", "",
                  f"| variant | tokens needed / {BASELINE}'s tokens |",
                  "|---|---|"]
        lines += [f"| {v} | {format_ratio(e)} |" for v, e in report["tokens_to_baseline"].items()]
        lines.append("")
    return lines


def _comparisons_md(report: dict[str, Any]) -> list[str]:
    """Each phase's differences in avg with their tests, Holm-adjusted over the phase's family."""
    lines: list[str] = []
    for phase, rows in report["comparisons"].items():
        if rows:
            lines += [f"## Differences in avg {PHASES[phase]} (α = 0.05; Holm over the {len(rows)} tests)", "",
                      "| comparison | difference (points) | test | p | p (Holm) | significant (Holm) |",
                      "|---|---|---|---|---|---|"]
            for r in rows:
                p = "–" if r["p_value"] is None else f"{r['p_value']:.3g}"
                ph = "–" if r.get("p_holm") is None else f"{r['p_holm']:.3g}"
                lines.append(f"| {r['a']} − {r['b']} | {r['diff'] * 100:+.1f} | {r['test']} | {p} | {ph} | "
                             f"{'yes' if r.get('significant_holm') else 'no'} |")
            lines.append("")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The tables a person reads: one per phase, the curve, tokens-to-baseline, significance, failures."""
    lines = [*_head_md(report), *_phases_md(report), *_curves_md(report), *_comparisons_md(report)]
    lines += token_markdown(report.get("tokens"))
    lines += [f"- failed: {f['variant']} seed {f['seed']}: {f['error']}" for f in report["failed"]]
    lines.append(f"Evaluation points: {report['evaluation_points']}.")
    return "\n".join(lines) + "\n"


def _method_vs_baseline(report: dict[str, Any]) -> str | None:
    """remit − ntp in avg after the last phase that compared them: the difference, its test, Holm's verdict."""
    for phase in reversed(PHASES):
        for row in report["comparisons"].get(phase, ()):
            if (row["a"], row["b"]) == (METHOD, BASELINE):
                p = "–" if row["p_value"] is None else f"{row['p_value']:.3g}"
                verdict = "significant" if row.get("significant_holm") else "not significant"
                return (f"{METHOD} − {BASELINE} in avg {PHASES[phase]}: {row['diff'] * 100:+.1f} points "
                        f"({row['test']}, p {p}; {verdict} after Holm)")
    return None


def _best_avg(report: dict[str, Any]) -> str | None:
    """The variant with the best mean avg after the last phase that has scores."""
    for phase in reversed(PHASES):
        scored = {v: row[AVG] for v, row in report["phases"][phase].items() if row.get(AVG)}
        if scored:
            best = max(scored, key=lambda v: scored[v]["mean"])
            return f"best avg {PHASES[phase]}: {best} {format_estimate(Estimate(**_plain(scored[best])))} points"
    return None


def headline(report: dict[str, Any]) -> str:
    """The study in one line: its size, remit − ntp (else the best variant) and how many cells failed."""
    about = (f"ablation {report['study']} ({report['name']}, size {report['size']}): {len(report['variants'])} "
             f"variant(s) × {len(report['seeds'])} seed(s)")
    found = _method_vs_baseline(report) or _best_avg(report) or "no scores"
    failed = f"; {len(report['failed'])} cell(s) failed" if report["failed"] else ""
    return f"{about}; {found}{failed}"


def result_lines(report: dict[str, Any]) -> list[str]:
    """What `flywheel ablate` prints: the headline and where the report went; its tables stay in the files."""
    files = report["files"]
    return [headline(report), f"report: {files['markdown']}",
            f"data: {files['json']}; plot: {files['plot']}"]


def _points(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}"


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """An estimate's stored dict back to `Estimate`'s fields."""
    return {k: d[k] for k in ("mean", "ci95", "n", "values")}


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    """avg vs mid-training tokens per variant with 95% CI bars; NTP's final score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*X"
    for i, (variant, pts) in enumerate(report["curves"].get(AVG, {}).items()):
        xs = [p["tokens"] for p in pts]
        ys = [p["mean"] * 100 for p in pts]
        err = [(p["ci95"] or 0.0) * 100 for p in pts]
        # tab20's ten dark shades first, then the light ones: eleven variants, eleven colours
        colour = colours[(2 * i) % len(colours) + (i // 10) % 2]
        focus = variant in (BASELINE, METHOD)  # the two lines the study is about, drawn bolder
        ax.errorbar(xs, ys, yerr=err, marker=markers[i % len(markers)], color=colour, capsize=3, label=variant,
                    linewidth=2.2 if focus else 1.0, alpha=1.0 if focus else 0.75)
    base = report["curves"].get(AVG, {}).get(BASELINE)
    if base:
        ax.axhline(base[-1]["mean"] * 100, color="grey", linestyle="--", linewidth=1,
                   label=f"{BASELINE} final")
    ax.set_xlabel("mid-training tokens")
    ax.set_ylabel("avg score (points)")
    seeds = len(report["seeds"])
    plural = "s" if seeds > 1 else ""
    ax.set_title(f"{report['name']}: score vs tokens (mean ± 95% CI over {seeds} seed{plural})")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """report.json, report.md, score_vs_tokens.png (and token_nll_vs_ntp.png) in `out_dir`; paths in the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md"),
             "plot": str(out_dir / "score_vs_tokens.png")}
    if report.get("tokens"):
        files["token_plot"] = str(plot_token_curves(report["tokens"], out_dir / "token_nll_vs_ntp.png"))
    report["files"] = files
    plot_curves(report, Path(files["plot"]))
    Path(files["markdown"]).write_text(report["markdown"], encoding="utf-8")
    write_json(Path(files["json"]), report)
    return files


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the parent run: `<phase>/<variant>/<metric>_mean|_ci95`, KL, tokens ratios."""
    out: dict[str, float] = {}
    for phase, rows in report["phases"].items():
        for variant, row in rows.items():
            for metric in report["columns"]:
                est = row.get(metric)
                if est:
                    name = f"{phase}/{variant}/{_short(metric)}"
                    out[f"{name}_mean"] = est["mean"]
                    if est["ci95"] is not None:
                        out[f"{name}_ci95"] = est["ci95"]
    for role, metrics in (report["base"].get("references") or {}).items():
        out.update({f"reference/{role}/{_short(m)}": v for m, v in metrics.items() if m in report["columns"]})
    for variant, est in report["kl_to_reference"].items():
        if est:
            out[f"mid/{variant}/kl_to_reference_mean"] = est["mean"]
    for variant, curve in ((report.get("tokens") or {}).get("curves") or {}).items():
        out.update({f"heldout_nll/{variant}/{m}_mean": est["mean"]
                    for m, est in curve["points"][-1].items() if m != "tokens" and est})
    for variant, entry in report["tokens_to_baseline"].items():
        if entry["ratio"] is not None and math.isfinite(entry["ratio"]):
            out[f"tokens_to_{BASELINE}/{variant}"] = entry["ratio"]
    return out
