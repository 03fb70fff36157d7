"""One cell of the study: a variant × seed mid-trained, scored along the way, post-trained, scored again.

`run_cell` reads as the small round it is: set up → mid-train (saving points) → evaluate the points →
held-out measures → KL → post-train → evaluate → log. Mid-training, post-training and each evaluation are
single calls (`midtrain_with_points`, `posttrain`, `evaluate_checkpoint`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.ablation.catalogue import MINIPLM_KEEP, VARIANTS
from flywheel.ablation.measures import heldout_kl, heldout_texts, token_measures
from flywheel.ablation.miniplm import select_documents
from flywheel.ablation.oracle import ORACLE_ROLES, write_oracle_cache
from flywheel.ablation.plan import AblationPlan, cell_config, use_threads
from flywheel.ablation.tracking import log_cell
from flywheel.config import FlywheelConfig
from flywheel.data.io import atomic_dir
from flywheel.errors import FlywheelError


def evaluate_checkpoint(cfg: FlywheelConfig, checkpoint: str | Path, kind: str) -> dict[str, float]:
    """`evaluate`, reused when the same weights were already scored with the same settings."""
    from flywheel.evaluation import eval_dir, evaluate
    from flywheel.models import model_identity

    folder = eval_dir(cfg, model_identity(str(checkpoint)), kind)  # by content: a redone run is rescored
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())["metrics"]
    return evaluate(cfg, checkpoint, kind=kind, out_dir=folder).metrics  # type: ignore[arg-type]


# --- mid-training with points along the way -------------------------------------------------------


def snapshot_steps(total_steps: int, fractions: list[float]) -> dict[int, float]:
    """Optimizer step of each fraction of the budget (the last is the run's end), step -> fraction."""
    steps: dict[int, float] = {}
    for f in fractions:
        steps.setdefault(min(total_steps, max(1, round(f * total_steps))), f)
    steps.pop(total_steps, None)
    return dict(sorted(steps.items()))


def _snapshot_callback(folder: Path, steps: set[int], tok: Any) -> Any:
    """A TrainerCallback that saves the model at the given steps: the curve's intermediate points."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN202
            target = folder / f"step-{state.global_step}"
            if state.global_step in steps and state.is_world_process_zero and not target.exists():
                with atomic_dir(target) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
                    tok.save_pretrained(tmp)

    return Snapshots()


def _run_dir_and_steps(cfg: FlywheelConfig, base: str, reference: str | None) -> tuple[Path, int, int, Any]:
    """Where this cell's anneal lives (keyed like `midtrain`'s own folder), its steps and tokens per step."""
    from flywheel.data.mixture import build_mixture
    from flywheel.models import load_tokenizer, tokenizer_identity
    from flywheel.refs import model_location
    from flywheel.remit.catalog import objective_named
    from flywheel.remit.midtrain import _world_size, midtrain_key

    mt = cfg.midtrain
    tok = load_tokenizer(cfg, cfg.model.tokenizer or base)
    corpus = build_mixture(cfg, tok, tokenizer_identity(tok))
    guided = reference and objective_named(mt.objective).needs_reference
    ref_path = model_location(cfg, reference) if guided else None
    key = midtrain_key(cfg, model_location(cfg, base), ref_path, corpus.key)
    per_step = mt.batch_size * mt.grad_accum * _world_size() * mt.seq_len
    steps = max(1, math.ceil(mt.token_budget / per_step))
    return cfg.home / "runs" / cfg.name / "ablation" / f"midtrain-{key}", steps, per_step, tok


def midtrain_with_points(plan: AblationPlan, cfg: FlywheelConfig, base: str, reference: str | None,
                         callbacks: list | None = None) -> tuple[Any, list[tuple[int, int, Path]]]:
    """One anneal that also saves the model at the plan's fractions; (step, tokens, checkpoint) per point."""
    from flywheel.remit.midtrain import midtrain

    run_dir, total_steps, per_step, tok = _run_dir_and_steps(cfg, base, reference)
    steps = snapshot_steps(total_steps, plan.fractions)
    points_dir = run_dir / "points"
    cbs = [_snapshot_callback(points_dir, set(steps), tok), *(callbacks or [])]
    mid = midtrain(cfg, base, reference, run_dir=run_dir, callbacks=cbs)
    if any(not (points_dir / f"step-{s}").exists() for s in steps):  # finished before, without points: redo
        shutil.rmtree(run_dir)
        mid = midtrain(cfg, base, reference, run_dir=run_dir, callbacks=cbs)
    points = [(s, s * per_step, points_dir / f"step-{s}") for s in steps]
    return mid, points + [(total_steps, total_steps * per_step, mid.checkpoint)]


# --- one cell, step by step ------------------------------------------------------------------------


@dataclass
class _Stopwatch:
    """Seconds per step of a cell, in the order the steps ran."""

    start: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        t1 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t1


@dataclass
class CellSetup:
    """What one cell trains on: its config (variant and seed applied), its reference and its data."""

    variant: str
    seed: int
    cfg: FlywheelConfig
    reference: str | None
    data: list[str]


def _setup(plan: AblationPlan, variant: str, seed: int, clock: _Stopwatch) -> CellSetup:
    """The cell's config and reference; a MiniPLM variant's data is first narrowed to its kept documents."""
    v = VARIANTS[variant]
    reference = plan.references[v.reference] if v.reference else None
    cfg = cell_config(plan, variant, seed)
    data = [s.source for s in cfg.data.sources]
    if v.miniplm:
        selection = select_documents(cfg, plan.base, plan.references["rl"], MINIPLM_KEEP)
        cfg = cell_config(plan, variant, seed, data_source=str(selection.path))
        data = [f"{selection.path} (kept {selection.kept} of {selection.documents} documents)"]
        clock.seconds["select"] = clock.elapsed()
    return CellSetup(variant, seed, cfg, reference, data)


def _anneal(plan: AblationPlan, cell: CellSetup, callbacks: list | None) -> tuple[Any, list[tuple[int, int, Path]]]:
    """The cell's mid-training; an oracle's reference cache is written first (the anneal reads it)."""
    role = VARIANTS[cell.variant].reference
    if role in ORACLE_ROLES:
        write_oracle_cache(cell.cfg, plan.references["rl"], cell.reference, ORACLE_ROLES[role])
    return midtrain_with_points(plan, cell.cfg, plan.base, cell.reference, callbacks)


def _score_points(plan: AblationPlan, cfg: FlywheelConfig, points: list[tuple[int, int, Path]]
                  ) -> list[dict[str, Any]]:
    """The curve: every point's accuracy (or the last one's only, as the study says)."""
    every_point = plan.accuracy_points == "all"
    return [{"step": step, "tokens": tokens, "checkpoint": str(path),
             "metrics": evaluate_checkpoint(cfg, path, "base") if every_point or i == len(points) - 1 else {}}
            for i, (step, tokens, path) in enumerate(points)]


def _kl_to_rl(plan: AblationPlan, cfg: FlywheelConfig, checkpoint: str | Path) -> float | None:
    """KL of the annealed model to the RL reference on held-out text (None: no text or no reference)."""
    texts = heldout_texts(plan)
    rl = plan.references["rl"]
    return heldout_kl(cfg, checkpoint, rl, texts) if texts and rl else None


def run_cell(plan: AblationPlan, variant: str, seed: int, callbacks: list | None = None) -> dict[str, Any]:
    """Mid-train one variant × seed, score it along the way, post-train it, score it again; log a child."""
    from flywheel.posttrain import posttrain

    if plan.parent_run is None:
        raise FlywheelError("run_cell: the plan has no study yet; call resolve_references(plan) first")
    use_threads(plan.threads)
    clock = _Stopwatch()
    cell = _setup(plan, variant, seed, clock)
    with clock.lap("midtrain"):
        mid, points = _anneal(plan, cell, callbacks)
    with clock.lap("evaluate_mid"):
        curve = _score_points(plan, cell.cfg, points)
    with clock.lap("token_measures"):
        for point in curve:
            point["token_nll"] = token_measures(plan, cell.cfg, point["checkpoint"])
    with clock.lap("kl"):
        kl = _kl_to_rl(plan, cell.cfg, mid.checkpoint)
    post, post_metrics = None, {}
    if plan.posttrain:
        with clock.lap("posttrain"):
            post = posttrain(cell.cfg, mid.checkpoint)
        with clock.lap("evaluate_post"):
            post_metrics = evaluate_checkpoint(cell.cfg, post.checkpoint, "post")
    clock.seconds["total"] = clock.elapsed()
    record = {
        "variant": variant, "seed": seed, "reference": cell.reference, "data": cell.data,
        "midtrain_config": cell.cfg.midtrain.model_dump(mode="json", exclude={"reference"}),
        "curve": curve, "mid": curve[-1]["metrics"], "post": post_metrics, "kl": kl,
        "midtrain_checkpoint": str(mid.checkpoint), "post_checkpoint": str(post.checkpoint) if post else None,
        "reused": bool(mid.reused and (post is None or post.reused)), "seconds": clock.seconds,
    }
    record["run_id"] = log_cell(plan, record, mid.metrics.get("log_history", []))
    return record


def evaluate_base(plan: AblationPlan) -> dict[str, Any]:
    """The pre-anneal base's scores: every variant's curve starts here at 0 tokens."""
    use_threads(plan.threads)
    t0 = time.perf_counter()
    cfg = cell_config(plan, "ntp", plan.seeds[0])
    metrics = evaluate_checkpoint(cfg, plan.base, "base")
    return {"tokens": 0, "metrics": metrics, "token_nll": token_measures(plan, cfg, plan.base),
            "seconds": time.perf_counter() - t0}
