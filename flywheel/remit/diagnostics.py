"""What ReMiT emphasises, made visible: weight statistics while training, an HTML page at the end."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from flywheel.remit.objectives import LossParts
from flywheel.remit.weights import weight_stats

STAT_KEYS = ("weight_mean", "weight_std", "clip_high", "clip_low", "delta_mean")


class Diagnostics:
    """Accumulates per-step weight statistics, per-token-type weights and a few sample rows."""

    def __init__(self, tokenizer: Any, vocab_size: int, samples: int = 4):
        self.tok = tokenizer
        self.samples = samples
        self._since_log: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)
        self._updates = 0
        self.weight_sum = torch.zeros(vocab_size, dtype=torch.float64)
        self.delta_sum = torch.zeros(vocab_size, dtype=torch.float64)
        self.count = torch.zeros(vocab_size, dtype=torch.float64)
        self.first: list[tuple[list[int], list[float], list[float]]] = []
        self.last: list[tuple[list[int], list[float], list[float]]] = []

    @torch.no_grad()
    def update(self, targets: torch.Tensor, mask: torch.Tensor, parts: LossParts, epsilon: float | None) -> None:
        if parts.weights is None:
            return
        w = parts.weights.detach().float().cpu()
        m = mask.cpu()
        t = targets.cpu()
        d = parts.delta.detach().float().cpu() if parts.delta is not None else torch.zeros_like(w)
        stats = weight_stats(w, m, epsilon)
        self._since_log["weight_mean"] += stats["mean"]
        self._since_log["weight_std"] += stats["std"]
        self._since_log["clip_high"] += stats["clip_high"]
        self._since_log["clip_low"] += stats["clip_low"]
        self._since_log["delta_mean"] += float(d[m].mean()) if m.any() else 0.0
        self._updates += 1
        ids = t[m]
        self.weight_sum.index_add_(0, ids, w[m].double())
        self.delta_sum.index_add_(0, ids, d[m].double())
        self.count.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        rows = [(t[i][m[i]].tolist(), w[i][m[i]].tolist(), d[i][m[i]].tolist()) for i in range(min(self.samples, len(t)))]
        if not self.first:
            self.first = rows
        self.last = rows

    def flush(self) -> dict[str, float]:
        """Means since the last call, as `remit/<stat>` log entries (empty when nothing was recorded)."""
        if not self._updates:
            return {}
        out = {f"remit/{k}": v / self._updates for k, v in self._since_log.items()}
        self._since_log = dict.fromkeys(STAT_KEYS, 0.0)
        self._updates = 0
        return out

    def token_table(self, top: int = 20, min_count: int = 5) -> tuple[list[dict], list[dict]]:
        """Token types with the highest and lowest mean weight (seen at least `min_count` times)."""
        seen = self.count >= min_count
        mean_w = torch.where(seen, self.weight_sum / self.count.clamp(min=1), torch.nan)
        ids = torch.nonzero(seen).flatten()
        order = ids[torch.argsort(mean_w[ids], descending=True)]

        def row(i: int) -> dict:
            return {"token": self.tok.decode([i]), "id": i, "mean_weight": float(mean_w[i]),
                    "mean_delta": float(self.delta_sum[i] / self.count[i]), "count": int(self.count[i])}

        return [row(int(i)) for i in order[:top]], [row(int(i)) for i in order.flip(0)[:top]]

    def write_html(self, path: Path, title: str, epsilon: float | None) -> Path:
        """A page a person reads: sample sequences coloured by weight, and the most up/down-weighted tokens."""
        span = epsilon or 1.0

        def colour(w: float) -> str:
            a = min(1.0, abs(w - 1.0) / span)
            return f"rgba(0,150,60,{a:.2f})" if w >= 1 else f"rgba(200,30,30,{a:.2f})"

        def render(rows: list) -> str:
            parts = []
            for ids, ws, ds in rows:
                toks = []
                for i, w, d in zip(ids, ws, ds, strict=True):
                    text = html.escape(self.tok.decode([i])).replace("\n", "↵<br>")
                    toks.append(f'<span style="background:{colour(w)}" title="w={w:.3f} delta={d:+.3f}">{text}</span>')
                parts.append(f'<div class="seq">{"".join(toks)}</div>')
            return "\n".join(parts) or "<p>(no weighted tokens recorded)</p>"

        def table(rows: list[dict]) -> str:
            body = "".join(
                f"<tr><td><code>{html.escape(repr(r['token']))}</code></td><td>{r['mean_weight']:.3f}</td>"
                f"<td>{r['mean_delta']:+.3f}</td><td>{r['count']}</td></tr>"
                for r in rows
            )
            return f"<table><tr><th>token</th><th>mean weight</th><th>mean delta</th><th>count</th></tr>{body}</table>"

        up, down = self.token_table()
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}} .seq{{font-family:monospace;
white-space:normal;border:1px solid #ddd;padding:.5em;margin:.5em 0;line-height:1.8}}
table{{border-collapse:collapse;margin-right:2em}} td,th{{border:1px solid #ddd;padding:.2em .6em}}
.tables{{display:flex}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each target token is coloured by its ReMiT weight: green above 1 (the reference believes it more than
the model does), red below 1. Hover for the weight and delta = log p_ref - log p_model.</p>
<h2>Samples from the first training step</h2>{render(self.first)}
<h2>Samples from the last training step</h2>{render(self.last)}
<div class="tables"><div><h2>Most up-weighted token types</h2>{table(up)}</div>
<div><h2>Most down-weighted token types</h2>{table(down)}</div></div>
</body></html>"""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        return path
