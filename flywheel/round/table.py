"""The one table of a round's stages, in the order they run.

Each entry says what the stage is called (its result line and log, its Prefect task), which function
does it, which earlier results it reads, whether a launcher can run it as a job, and whether it applies
to the round at all. The Prefect flow (flows/round.py), `direct.run_round_direct` and the launched-stage
worker (flywheel/launch/worker.py) all run this table: adding a stage is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flywheel.config import LAUNCH_STAGES, FlywheelConfig
from flywheel.errors import FlywheelError
from flywheel.round.settings import needs_scoring
from flywheel.round.stages import (
    stage_evaluate,
    stage_midtrain,
    stage_posttrain,
    stage_promote,
    stage_score_reference,
)
from flywheel.tracking.registry import RoundPlan

Results = dict[str, dict[str, Any]]  # each stage's result under its `key`


@dataclass(frozen=True)
class Stage:
    """One stage of a round.

    `name`: its result line, log file and job folder (evaluate/base); `task`: the Prefect task name;
    `key`: where its result goes among the round's results; `needs`: the keys of earlier results it reads,
    passed by name unless `inputs` turns them into its arguments; `launch`: the name a launcher runs it
    under (`launch.stages`, `flywheel stage NAME`), None when it always runs in the round's process;
    `trains`: it takes Trainer callbacks (progress); `applies`: whether the round needs it, else its
    result is `skipped`.
    """

    name: str
    task: str
    key: str
    run: Callable[..., dict[str, Any]]
    needs: tuple[str, ...] = ()
    inputs: Callable[[Results], dict[str, Any]] | None = None
    launch: str | None = None
    trains: bool = False
    applies: Callable[[FlywheelConfig, RoundPlan], bool] | None = None
    skipped: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Its name as a folder name (evaluate-base)."""
        return self.name.replace("/", "-")

    def applies_to(self, cfg: FlywheelConfig, plan: RoundPlan) -> bool:
        return self.applies is None or self.applies(cfg, plan)

    def arguments(self, results: Results) -> dict[str, Any]:
        """The stage's arguments beyond (cfg, plan), from the earlier stages' results it needs."""
        got = {key: results[key] for key in self.needs}
        return self.inputs(got) if self.inputs is not None else got

    def call(self, cfg: FlywheelConfig, plan: RoundPlan, arguments: dict[str, Any],
             callbacks: list | None = None) -> dict[str, Any]:
        """Run the stage here (callbacks reach only a stage that trains)."""
        return self.run(cfg, plan, **arguments, **({"callbacks": callbacks} if self.trains else {}))


def _evaluate(model: str, kind: str) -> Callable[[Results], dict[str, Any]]:
    """Evaluate's arguments: the checkpoint of the earlier result `model`, evaluated as `kind`."""
    return lambda got: {"checkpoint": got[model]["checkpoint"], "kind": kind}


STAGES: tuple[Stage, ...] = (
    Stage("score_reference", "score-reference", "reference_cache", stage_score_reference, launch="score_reference",
          applies=needs_scoring, skipped={"cache": None}),
    Stage("midtrain", "midtrain", "base", stage_midtrain, launch="midtrain", trains=True),
    Stage("evaluate/base", "evaluate", "base_eval", stage_evaluate, needs=("base",), inputs=_evaluate("base", "base"),
          launch="evaluate"),
    Stage("posttrain", "posttrain", "rl", stage_posttrain, needs=("base",), launch="posttrain", trains=True),
    Stage("evaluate/post", "evaluate", "post_eval", stage_evaluate, needs=("rl",), inputs=_evaluate("rl", "post"),
          launch="evaluate"),
    Stage("promote", "promote", "decision", stage_promote, needs=("rl", "post_eval")),
)


def launchable(name: str, stages: Iterable[Stage] | None = None) -> Stage:
    """The stage a launcher runs as `flywheel stage NAME` (evaluate/base and evaluate/post share `evaluate`)."""
    for stage in STAGES if stages is None else stages:
        if stage.launch == name:
            return stage
    raise FlywheelError(f"stage: unknown stage '{name}' (one of {', '.join(LAUNCH_STAGES)})")


def run_stages(cfg: FlywheelConfig, plan: RoundPlan, stages: Iterable[Stage] | None = None) -> Results:
    """Every stage in this process, in order; each result is kept under the stage's key for the ones after it."""
    results: Results = {}
    for stage in STAGES if stages is None else stages:
        applies = stage.applies_to(cfg, plan)
        results[stage.key] = stage.call(cfg, plan, stage.arguments(results)) if applies else dict(stage.skipped)
    return results
