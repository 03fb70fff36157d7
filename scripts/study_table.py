"""The paired-difference table of docs/results.md from an ablation's report.json.

    python scripts/study_table.py HOME/reports/ablation-<study>/report.json

One row per (variant, partner) pair of the report's token differences (the partner is its NTP of the same
length, or the variant it contrasts), at the end of the anneal: Δavg in points and ΔNLL in nats/token on the
top and bottom δ-thirds of the variant's own reference and on result digits, mean ± 95% CI over the paired
seeds, then (p unadjusted; Holm-adjusted over every test of the table); bold where the CI excludes 0. The last
column is the difference of the two variants' mean held-out loss on all tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.ablation.stats import holm  # noqa: E402

TESTED = ("avg", "top", "bottom", "result")


def _cell(entry: dict, measure: str, p_holm: float) -> str:
    scale, digits = (100, 1) if measure == "avg" else (1, 3)
    d, half = entry["diff"], entry["diff"]["ci95"] or 0.0
    text = f"{d['mean'] * scale:+.{digits}f} ± {half * scale:.{digits}f}"
    bold = d["mean"] - half > 0 or d["mean"] + half < 0
    return f"{f'**{text}**' if bold else text} ({entry['p_value']:.2g}; {p_holm:.2g})"


def table(report: dict) -> list[str]:
    tokens = report["tokens"]
    rows = [(r["variant"], r["baseline"], r["points"][-1]) for r in tokens["differences"]]
    adjusted = iter(holm([end[m]["p_value"] for *_, end in rows for m in TESTED if end.get(m)]))
    mean_all = {v: c["points"][-1]["all"]["mean"] for v, c in tokens["curves"].items()}
    lines = ["| cell | − | Δavg | Δ top third | Δ bottom third | Δ result digits | Δ all tokens |",
             "|---|---|---|---|---|---|---|"]
    for variant, other, end in rows:
        cells = [_cell(end[m], m, next(adjusted)[0]) if end.get(m) else "–" for m in TESTED]
        lines.append(f"| {variant} | {other} | " + " | ".join(cells)
                     + f" | {mean_all[variant] - mean_all[other]:+.3f} |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/study_table.py REPORT.json")
    print("\n".join(table(json.loads(Path(sys.argv[1]).read_text()))))
