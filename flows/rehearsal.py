"""The `flywheel-rehearsal` flow: a rehearsal's rounds through the round's own stage table and Prefect tasks,
each stage's outcome kept for the checklist instead of stopping at the first exception.

`flywheel rehearse CONFIG` prepares the rehearsal (flywheel/round/rehearsal.py) and runs this flow on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from flows.round import plan_round_task, stage_task
from flywheel.config import FlywheelConfig, load_config
from flywheel.errors import FlywheelError
from flywheel.round.table import STAGES
from flywheel.slot import RoundSlot


@dataclass
class Check:
    """One line of the checklist: a stage of a round (or a step before the rounds) and how it went."""

    round: int | None
    stage: str
    status: str  # passed | failed | skipped
    seconds: float
    detail: str = ""


def first_sentence(exc: BaseException) -> str:
    """A failure as one sentence: a FlywheelError is one already (it names its field); anything else is its
    type and first line, which the checklist shows beside the stage it came from."""
    text = str(exc).strip()
    if isinstance(exc, FlywheelError):
        return text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0]}"


def _detail(stage: Any, applies: bool, result: dict[str, Any]) -> str:
    """What the checklist says beside a stage that ran: the gate's reason, the evaluation's average, the model."""
    from flywheel.metrics import AVG

    if not applies:
        return "not needed this round"
    if "reason" in result:
        return ("promoted: " if result.get("promoted") else "not promoted: ") + str(result["reason"])
    if AVG in result.get("metrics", {}):
        return f"{AVG} {result['metrics'][AVG]:.3f} on {stage.name.split('/')[-1]}"
    return f"registry version {result['version']}" if result.get("version") else ""


@flow(name="flywheel-rehearsal")
def rehearsal_rounds(config: str, rounds: int = 2) -> list[dict[str, Any]]:
    """Run `rounds` rounds of the rehearsal's config; one Check per stage run, ending at the first failure."""
    cfg = load_config(config)
    data = cfg.model_dump(mode="json")
    checks: list[Check] = []
    for _ in range(rounds):
        with RoundSlot(cfg):
            t0 = time.perf_counter()
            try:
                plan = plan_round_task(data, None)
            except Exception as exc:  # noqa: BLE001 - the checklist reports any failure, with its stage
                checks.append(Check(None, "plan", "failed", time.perf_counter() - t0, first_sentence(exc)))
                break
            if not _round(cfg, data, plan, checks):
                break
    return [asdict(c) for c in checks]


def _round(cfg: Any, data: dict[str, Any], plan: Any, checks: list[Check]) -> bool:
    """The stage table once, as the round flow runs it (no retries: a rehearsal reports, it does not insist)."""
    results: dict[str, Any] = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        try:
            results[stage.key] = stage_task(stage).with_options(retries=0)(data, plan, stage.arguments(results))
        except Exception as exc:  # noqa: BLE001 - the checklist reports any failure, with its stage
            checks.append(Check(plan.round, stage.name, "failed", time.perf_counter() - t0, first_sentence(exc)))
            return False
        applies = stage.applies_to(cfg, plan)
        checks.append(Check(plan.round, stage.name, "passed" if applies else "skipped", time.perf_counter() - t0,
                            _detail(stage, applies, results[stage.key])))
    return True


@dataclass
class RehearsalOutcome:
    """What `flywheel rehearse` prints: what was replaced, which tasks were out of reach, and the checklist."""

    checks: list[Check]
    replaced: list[str]
    unreachable: list[str]
    config: str | None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.status != "failed" for c in self.checks)

    @property
    def first_error(self) -> str | None:
        return next((c.detail for c in self.checks if c.status == "failed"), None)


def rehearse(cfg: FlywheelConfig, rounds: int, rows: int, steps: int) -> RehearsalOutcome:
    """Prepare the rehearsal (models, samples, its config), check what a round checks and what post-training
    would check later, then run the rounds; a failure anywhere becomes the checklist's failed line."""
    from flywheel.console import quiet_step
    from flywheel.round.rehearsal import fresh_home, preflight, prepare, rehearsal_name

    home, name, t0 = fresh_home(cfg), rehearsal_name(cfg), time.perf_counter()
    try:
        with quiet_step(home, name, "prepare"):  # the libraries' output into its log
            reh = prepare(cfg, rows, steps)
    except Exception as exc:  # noqa: BLE001 - the checklist reports any failure, with its step
        return RehearsalOutcome([Check(None, "prepare", "failed", time.perf_counter() - t0, first_sentence(exc))],
                                [], [], None)
    checks = [Check(None, "prepare", "passed", time.perf_counter() - t0,
                    f"models at vocabulary {_vocab(reh.cfg)}, first {rows} rows of every source")]
    outcome = RehearsalOutcome(checks, reh.replaced, reh.unreachable, str(reh.path))
    t0 = time.perf_counter()
    try:
        with quiet_step(home, name, "check"):
            checks.append(Check(None, "check", "passed", time.perf_counter() - t0, preflight(reh.cfg)))
    except Exception as exc:  # noqa: BLE001 - as above
        checks.append(Check(None, "check", "failed", time.perf_counter() - t0, first_sentence(exc)))
        return outcome
    checks += [Check(**c) for c in rehearsal_rounds(str(reh.path), rounds)]
    return outcome


def _vocab(cfg: FlywheelConfig) -> int:
    return int(json.loads((Path(cfg.model.source) / "config.json").read_text()).get("vocab_size", 0))
