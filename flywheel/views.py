"""What the CLI prints: each command's result as rich tables and lines, apart from the commands themselves.

Every function takes the result a library call returned and a `Console` to print on; none does work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.config import FlywheelConfig, config_summary


def config_table(console: Console, cfg: FlywheelConfig, title: str) -> None:
    """The config's summary: one row per part of the round."""
    table = Table(title=title, show_header=False, title_justify="left")
    for label, value in config_summary(cfg):
        table.add_row(label, value)
    console.print(table)


def world_report(console: Console, report: Any) -> None:
    """A world build (`flywheel.world.build.BuildReport`): folders, corpus sizes, the base and its ladder."""
    p = report.paths
    console.print(f"[bold]tiny world[/] {p.root}  ({'reused' if report.reused_corpora else 'built'})")
    console.print("  corpora: " + ", ".join(f"{k} {v:,}" for k, v in report.counts.items()))
    console.print(f"  base ({p.size}, {report.params / 1e6:.2f}M params): {p.base}  "
                  f"({'reused' if report.reused_base else 'pre-trained'})")
    if report.heldout_loss is not None:
        console.print(f"  held-out pre-training loss: {report.heldout_loss:.3f}")
    if report.ladder:
        _ladder(console, report.ladder)
    console.print(f"  took {report.seconds:.0f} s")


def _ladder(console: Console, ladder: dict[int, float]) -> None:
    from flywheel.world.tasks import LEVEL_NAMES

    table = Table(title="pre-anneal base, greedy accuracy on held-out problems", title_justify="left")
    table.add_column("level")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    for lvl, acc in ladder.items():
        table.add_row(f"L{lvl}", LEVEL_NAMES[lvl], f"{100 * acc:.0f}%")
    table.add_row("mean", "", f"{100 * sum(ladder.values()) / len(ladder):.1f}%")
    console.print(table)
    console.print("  Mid-training should raise the middle levels; the hardest should stay out of reach.")


def mixture_report(console: Console, cfg: FlywheelConfig, corpus: Any) -> None:
    """A built mixture (`flywheel.data.mixture.PackedCorpus`): per source its store, windows and epochs."""
    meta = corpus.meta
    table = Table(title=f"mixture {corpus.folder}", title_justify="left")
    for col in ("source", "documents", "tokens", "windows", "epochs", "bytes on disk"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in meta["sources"]:
        table.add_row(s["source"], f"{s['documents']:,}", f"{s['store_tokens']:,}", f"{s['windows']:,}",
                      f"{s['epochs']:.2f}", f"{s['bytes'] / 2**20:,.1f} MiB")
    console.print(table)
    built = {b.store.key: b for b in corpus.builds}
    for s in meta["sources"]:
        b = built.get(s["store"])
        state = f"built in {b.seconds:.1f} s ({s['store_tokens'] / max(b.seconds, 1e-9):,.0f} tokens/s)" if b else "reused"
        console.print(f"  {s['source']}: store {s['store']} {state}")
    console.print(f"  {meta['rows']:,} windows x {meta['seq_len']} = {meta['tokens']:,} tokens "
                  f"(midtrain.token_budget {cfg.midtrain.token_budget:,})")


@contextmanager
def build_progress(console: Console, cfg: FlywheelConfig) -> Iterator[tuple[Callable, Callable]]:
    """A progress bar per source of a mixture build: (on_source(i, estimated tokens), on_tokens(n))."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f} tokens"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task: dict[str, Any] = {"id": None}

        def on_source(i: int, estimate: int | None) -> None:
            task["id"] = bar.add_task(f"data.sources.{i} {cfg.data.sources[i].source}", total=estimate, rate="")
            task["t0"] = time.perf_counter()

        def on_tokens(n: int) -> None:
            rate = n / max(1e-9, time.perf_counter() - task["t0"])
            bar.update(task["id"], completed=n, rate=f"{rate:,.0f} tokens/s")

        yield on_source, on_tokens


def _or_dash(value: Any, text: Callable[[Any], str]) -> str:
    return "-" if value is None else text(value)


def data_plan_report(console: Console, cfg: FlywheelConfig, plan: Any) -> None:
    """`prepare-data --plan` (`flywheel.data.disk.DataPlan`): per source what it reads and writes; the totals
    against the free space."""
    import shutil

    from flywheel.data.disk import size_text

    table = Table(title=f"data plan for {cfg.name} ({plan.workers} workers)", title_justify="left")
    for col in ("source", "how", "files", "bytes", "est. tokens", "est. build", "store", "to fetch"):
        table.add_column(col, justify="left" if col in ("source", "how") else "right")
    for need in plan.sources:
        sub = cfg.data.sources[need.index]
        name = escape(need.source + (f" [{', '.join(sub.include)}]" if sub.include else ""))
        table.add_row(name, need.how, _or_dash(need.files, "{:,}".format), _or_dash(need.bytes, size_text),
                      _or_dash(need.tokens, "{:,}".format), _or_dash(plan.seconds(need), _duration),
                      size_text(need.store_bytes), size_text(need.fetch_bytes))
    console.print(table)
    console.print(f"  reference cache {size_text(plan.cache_bytes)}; checkpoints "
                  f"{_or_dash(plan.checkpoint_bytes, size_text)}"
                  + ("" if plan.checkpoint_bytes is not None else " (the model's config is not readable here)"))
    for folder, needed in plan.by_file_system().items():
        free = shutil.disk_usage(folder).free
        verdict = "fits" if needed <= free else "does NOT fit (prepare-data refuses; --force builds anyway)"
        console.print(f"  {folder}: needs {size_text(needed)}, {size_text(free)} free: {verdict}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def reference_cache_report(console: Console, rep: Any) -> None:
    """A scored reference (`flywheel.remit.scoring.ScoreReport`): where the cache is, what was computed."""
    meta = rep.corpus.meta
    state = f"scored {len(rep.computed_chunks)} chunk(s)" if rep.computed_chunks else "reused"
    speed = f", {rep.tokens_per_second:,.0f} tokens/s" if rep.tokens_per_second else ""
    console.print(f"reference cache {rep.cache.folder} ({state}{speed})")
    console.print(f"  corpus {rep.corpus.folder}: {meta['rows']:,} rows × {meta['seq_len']} = {meta['tokens']:,} tokens")


def speed_line(speed: dict[str, float]) -> str:
    """A stage's speed (flywheel/perf.py speed_summary) in one line: tokens/s, per device, MFU, memory."""
    parts = [f"{speed['tokens_per_s']:,.0f} tokens/s ({speed['tokens_per_s_per_device']:,.0f} per device)"]
    if "mfu" in speed:
        parts.append(f"MFU {100 * speed['mfu']:.1f}%")
    if "peak_memory_gb" in speed:
        parts.append(f"peak {speed['peak_memory_gb']:.1f} GB")
    return ", ".join(parts)


def midtrain_report(console: Console, res: Any) -> None:
    """A mid-training result: the checkpoint, reused / resumed / trained, and the token-weight page."""
    state = "reused" if res.reused else (f"resumed from {res.resumed_from}" if res.resumed_from else "trained")
    console.print(f"mid-trained checkpoint: {res.checkpoint} ({state}, {res.seconds:.0f} s)")
    speed = res.metrics.get("speed")
    if speed:
        console.print(f"speed: {speed_line(speed)}")
    if res.html:
        console.print(f"token weights page: {res.html}")


def posttrain_report(console: Console, res: Any) -> None:
    """A post-training chain: one row per TRL stage, then the RL checkpoint."""
    table = Table(title="post-training", title_justify="left")
    for col in ("stage", "kind", "steps", "s/step", "speed", "state"):
        table.add_column(col)
    for st in res.stages:
        state = "reused" if st.reused else (f"resumed from {st.resumed_from}" if st.resumed_from else "trained")
        table.add_row(str(st.index), st.kind, str(st.steps), f"{st.seconds_per_step:.2f}",
                      speed_line(st.speed) if st.speed else "-", state)
    console.print(table)
    console.print(f"RL checkpoint: {res.checkpoint}")


def round_outcome(console: Console, result: dict[str, Any]) -> None:
    """One round's verdict line (or that a round awaits approval) and, when the flywheel stood still, the note."""
    if "awaiting_approval" in result:  # nothing started: the flow said which round waits and how to decide
        return
    decision = result.get("decision") or {}
    verdict = decision.get("reason", "already finished")
    if decision.get("awaiting"):
        verdict = (f"awaits approval (the gate recommends {'promote' if decision['promoted'] else 'reject'}: "
                   f"{verdict})")
    console.print(f"round {result['round']}: {verdict}", soft_wrap=True)
    notes(console, [result])


def notes(console: Console, results: list[dict[str, Any]]) -> None:
    for r in results:
        if (r.get("base") or {}).get("note"):
            console.print(f"note: {r['base']['note']}", soft_wrap=True)


ROUND_TABLE = ("post/", "remit/", "dynamics/")  # the RL model's scores, the weights of its anneal, its KL to the guide


def comparison(console: Console, cfg: FlywheelConfig, prefix: str | tuple[str, ...] = ROUND_TABLE) -> None:
    """The rounds table (RL-model metrics and the guidance's dynamics by default; "" for every metric), its plot."""
    from flywheel.tracking.compare import compare
    from flywheel.tracking.store import open_tracker

    result = compare(open_tracker(cfg), prefix=prefix)
    console.print(result.text, markup=False, highlight=False, soft_wrap=True)  # a table row is one line
    if result.plot:
        console.print(f"plot: {result.plot}")


def ablation_report(console: Console, report: dict[str, Any]) -> None:
    """`flywheel ablate`'s ending: the headline and where the report went; its tables stay in the files."""
    from flywheel.ablation.report import result_lines

    for line in result_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def checklist(console: Console, outcome: Any) -> None:
    """`flywheel rehearse`'s ending: what was replaced for the CPU, the tasks out of reach, one line per stage run,
    and the first error as its sentence."""
    for line in outcome.replaced:
        console.print(f"replaced  {line}", markup=False, highlight=False, soft_wrap=True)
    if outcome.unreachable:
        console.print(f"not reached  evaluation tasks {', '.join(outcome.unreachable)} (their data is neither "
                      "cached nor reachable from here)", markup=False, highlight=False, soft_wrap=True)
    table = Table(title="rehearsal checklist", title_justify="left")
    for col in ("round", "stage", "result", "time", "detail"):
        table.add_column(col, justify="right" if col == "time" else "left", overflow="fold")
    for c in outcome.checks:
        mark = {"passed": "[green]passed[/]", "failed": "[red]FAILED[/]"}.get(c.status, c.status)
        table.add_row("-" if c.round is None else str(c.round), c.stage, mark, f"{c.seconds:.0f} s",
                      escape(c.detail))
    console.print(table)
    if outcome.first_error:
        console.print(f"first error: {outcome.first_error}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(f"every stage passed; the rehearsal's config: {outcome.config}", markup=False,
                      highlight=False, soft_wrap=True)
