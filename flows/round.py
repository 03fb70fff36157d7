"""Prefect flows: thin wiring over the round's stage table (`flywheel.round.table`).

`flywheel_round` runs one round (the registry says which) as one Prefect task per entry of the
stage table; `flywheel` runs rounds until N exist. Prefect gives the UI, schedules, retries, result
caching and a global concurrency limit per flywheel, so two triggers become two consecutive rounds,
never two copies of one.

No `log_prints`: Prefect's print patch bypasses `sys.stdout`, so dill's `nestedglobals` (used by
`datasets` to fingerprint `.map` functions) captured nothing and dumped bytecode into the run log.
Progress reaches the Prefect log through `LogProgress` and the tasks' own log lines instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.approval import await_approval, emit_outcome, server_url
from flywheel.config import FlywheelConfig, LaunchSpec, load_config, validate_config
from flywheel.console import stage_line, stage_log_path, stage_summary, tell, trainer_progress
from flywheel.errors import FlywheelError, is_permanent_os_error
from flywheel.launch import launched
from flywheel.round.checks import check_gate_metric
from flywheel.round.plan import RoundPlan, plan_round
from flywheel.round.report import round_report
from flywheel.round.settings import round_summary
from flywheel.round.table import STAGES, Results, Stage
from flywheel.safety import ProgressLog
from flywheel.slot import RoundSlot


def _no_retry_on_user_error(task, task_run, state) -> bool:  # noqa: ANN001
    """Retry transient failures; bad input, a full disk or a missing permission fail the same way every time."""
    try:
        state.result()
    except FlywheelError:
        return False
    except Exception as exc:
        return not is_permanent_os_error(exc)
    return True


# No Prefect result cache: every stage writes registry state, and a cached result naming a registry version
# outlives the store it names (a lost or replaced MLflow store). Reuse lives in the stages themselves, keyed
# by content: verified checkpoints, the reference cache, registration by checkpoint key, recorded verdicts.
STAGE = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _no_retry_on_user_error,
         "cache_policy": NO_CACHE}


class LogProgress(ProgressLog):
    """Training progress into the Prefect run log, about ten lines per stage, and onto the terminal's stage line."""

    def __init__(self, name: str):
        super().__init__(name, lambda message: get_run_logger().info(message))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer_progress(args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kwargs)
        trainer_progress(args, state, logs)


def _cfg(config: dict[str, Any]) -> FlywheelConfig:
    return validate_config(config)


def _launch(cfg: FlywheelConfig, stage: str) -> LaunchSpec:
    """The stage's launch. lm-eval shares requests over ranks on CUDA devices only: elsewhere it runs here."""
    spec = cfg.launch.for_stage(stage)
    if stage == "evaluate" and spec.kind != "local":
        import torch

        if not torch.cuda.is_available():
            get_run_logger().info("evaluate: lm-eval splits requests over ranks only on CUDA devices "
                                  "(lm_eval/models/huggingface.py checks torch.cuda.device_count() > 1); "
                                  "evaluating in this process")
            spec = LaunchSpec()
    return spec


def _stage(config: dict[str, Any], stage: Stage, plan: RoundPlan, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run a stage in this process (launch kind local) or as a launched job whose result is read back.

    Under `flywheel demo | round | run` the terminal shows the stage's live line, then its result line."""
    cfg = _cfg(config)
    log = stage_log_path(cfg.home, cfg.name, plan.round, stage.name)
    with stage_line(plan.round, stage.name, stage_summary(cfg, stage.name), log=log) as line:
        if not stage.applies_to(cfg, plan):  # e.g. nothing to score (an NTP round, online mode): no job to launch
            return line.done(dict(stage.skipped))
        spec = _launch(cfg, stage.launch) if stage.launch else LaunchSpec()
        if spec.kind == "local":
            return line.done(stage.call(cfg, plan, arguments, callbacks=[LogProgress(stage.name)]))
        say = line.say(get_run_logger().info)
        return line.done(launched(cfg, stage.launch, plan, arguments, spec, say, label=stage.label))


@task(name="plan-round")
def plan_round_task(config: dict[str, Any], round: int | None) -> RoundPlan:
    return plan_round(_cfg(config), round)


def stage_task(stage: Stage):  # noqa: ANN201 - a prefect Task
    """The stage as a Prefect task, named as the UI shows it (score-reference, midtrain, evaluate, ...)."""

    def run_stage(config: dict[str, Any], plan: RoundPlan, arguments: dict[str, Any]) -> dict[str, Any]:
        return _stage(config, stage, plan, arguments)

    return task(name=stage.task, **STAGE)(run_stage)


def concurrency_limit_name(cfg: FlywheelConfig) -> str:
    return f"flywheel-{cfg.name}"


LEASE_SECONDS = 60  # a dead remote holder's slot comes back within this plus the server's 15 s lease scan


@contextmanager
def server_slot(cfg: FlywheelConfig, slot: RoundSlot, say: Callable[[str], None],
                say_every: float = 60.0) -> Iterator[None]:
    """On a Prefect server, also hold its global concurrency limit: one round at a time across machines.

    The lease is taken and renewed here (not with `prefect.concurrency`) so its id goes into the
    trigger's record, and the next trigger on this host releases a dead holder's lease at once.
    The embedded temporary server never reclaims expired leases, so it relies on the lock alone.
    """
    if server_url() is None:
        yield
        return
    import httpx
    from prefect.client.orchestration import get_client

    name = concurrency_limit_name(cfg)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
        t0 = last = time.monotonic()
        while True:
            try:
                resp = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", LEASE_SECONDS)
                lease_id = resp.json()["lease_id"]
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
            if time.monotonic() - last >= say_every:
                say(f"waiting for the server slot {name} (held by a round on another host); "
                    f"waited {time.monotonic() - t0:.0f} s")
                last = time.monotonic()
            time.sleep(2)
    slot.update(lease_id=str(lease_id))
    stop = threading.Event()

    def renew() -> None:
        with get_client(sync_client=True) as c:
            while not stop.wait(LEASE_SECONDS / 3):
                try:
                    c.renew_concurrency_lease(lease_id, LEASE_SECONDS)
                except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; the lease outlives two
                    say(f"renewing the server slot {name} failed ({exc}); retrying")

    keeper = threading.Thread(target=renew, name="flywheel-slot-lease", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id)


def clean_up_after(stale: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    """Triggers that died on this host: crash their flow runs (still shown Running) and free their server lease."""
    if not stale:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for rec in stale:
            what = f"pid {rec.get('pid')} (flow run {rec.get('flow_run_id') or '-'})"
            if rec.get("lease_id") and server_url() is not None:
                try:
                    client.release_concurrency_slots_with_lease(rec["lease_id"])
                except Exception:  # noqa: BLE001 - already expired and reclaimed by the server
                    pass
            if rec.get("flow_run_id"):
                try:
                    run = client.read_flow_run(rec["flow_run_id"])
                except Exception:  # noqa: BLE001 - a run of another (lost) Prefect database
                    run = None
                if run is not None and run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(rec["flow_run_id"], Crashed(
                        message=f"its process ({what}) died without finishing; found by the next trigger"),
                        force=True)
            say(f"a previous trigger died without finishing: {what}; its round is resumed")


AS_CONFIGURED = "as configured"  # the form's first choice: keep the config file's value
Objective = Literal["as configured", "ntp", "remit", "kd", "rho1"]  # a list to pick from, not a free text box


def apply_overrides(cfg: FlywheelConfig, objective: str | None, token_budget: int | None,
                    epsilon: float | None, force_promotion: bool) -> FlywheelConfig:
    """The few fields the Prefect UI form can change for one run, validated like the YAML."""
    data = cfg.model_dump(mode="json")
    if objective not in (None, AS_CONFIGURED):
        data["midtrain"]["objective"] = objective
    if token_budget is not None:
        data["midtrain"]["token_budget"] = token_budget
    if epsilon is not None:
        data["midtrain"]["epsilon"] = epsilon
    if force_promotion:
        data["promotion"]["force"] = True
    return validate_config(data, "flow parameters")


@flow(name="flywheel-round")
def flywheel_round(
    config: str = "configs/demo.yaml",
    round: int | None = None,
    objective: Objective = AS_CONFIGURED,
    token_budget: int | None = None,
    epsilon: float | None = None,
    force_promotion: bool = False,
) -> dict[str, Any]:
    """One flywheel round: score reference → mid-train → evaluate base → post-train → evaluate RL → promote.

    With no `round`, the registry decides (what a scheduled run does). The other fields
    override the config file for this run only, validated like the file.

    Args:
        config: The flywheel's YAML config, as a path on the machine that runs the round.
        round: Which round to run; empty runs the next one, as the registry says.
        objective: The mid-training objective of this run; "as configured" keeps the config's.
        token_budget: Mid-training tokens of this run; empty keeps the config's midtrain.token_budget.
        epsilon: ReMiT's clip of this run (weights in [1-ε, 1+ε]); empty keeps the config's midtrain.epsilon.
        force_promotion: Promote this round's RL model whatever the promotion gate decides.
    """
    logger = get_run_logger()
    cfg = apply_overrides(load_config(config), objective, token_budget, epsilon, force_promotion)
    data = cfg.model_dump(mode="json")
    check_gate_metric(cfg)  # before waiting for the slot, before any work
    if (waiting := awaiting_approval(cfg)) is not None:
        return waiting
    from prefect.runtime import flow_run

    # The next round is decided inside the slot, so two triggers become two rounds and a rerun after a kill
    # re-enters the killed round.
    with RoundSlot(cfg, flow_run_id=str(flow_run.id) if flow_run.id else None, say=tell(logger.info)) as slot:
        clean_up_after(slot.stale, tell(logger.warning))  # first: frees a dead holder's server lease at once
        with server_slot(cfg, slot, tell(logger.info)):
            return _round_in_slot(cfg, data, round)


def _round_in_slot(cfg: FlywheelConfig, data: dict[str, Any], round: int | None) -> dict[str, Any]:
    """The stages of one round, run while this trigger holds the flywheel's slot."""
    logger = get_run_logger()
    plan = plan_round_task(data, round)
    if plan.finished:
        tell(logger.info)("round %s is finished already (RL version %s); nothing to do", plan.round,
                          plan.rl_version)
        return plan.to_json()
    if (waiting := awaiting_approval(cfg)) is not None:  # the round ahead was left waiting while this one queued
        return waiting
    tell(logger.info)("round %d%s: %s", plan.round, " (resumed)" if plan.resumed else "", round_summary(cfg, plan))
    results = run_table(data, plan)
    if results["decision"].get("awaiting"):
        results["decision"] = await_approval(cfg, plan, results, server=server_url() is not None)
    else:
        emit_outcome(cfg, plan.round, results["decision"])
    decision = results["decision"]
    report = round_report(cfg, plan, results["base_eval"], results["post_eval"], decision,
                          note=results["base"].get("note"))
    create_markdown_artifact(report, key=f"{cfg.name}-round-{plan.round}".lower().replace("_", "-"),
                             description=f"{cfg.name} round {plan.round}")
    logger.info("round %d done: %s", plan.round, decision["reason"])
    return {**plan.to_json(), **results}


def awaiting_approval(cfg: FlywheelConfig) -> dict[str, Any] | None:
    """A round whose candidate awaits a person's decision holds up the next: say so, and start nothing."""
    from flywheel.tracking.approval import awaiting
    from flywheel.tracking.registry import T_ROUND
    from flywheel.tracking.store import open_tracker

    version = awaiting(open_tracker(cfg))
    if version is None:
        return None
    n = version.tags.get(T_ROUND)
    tell(get_run_logger().warning)(
        "round %s awaits approval of %s v%s; decide on its Resume form in the Prefect UI or with `flywheel approve "
        "CONFIG --round %s --approve|--reject --reason ...`; no new round starts on the old reference",
        n, version.name, version.version, n)
    return {"awaiting_approval": int(n), "version": str(version.version)}


def run_table(data: dict[str, Any], plan: RoundPlan) -> Results:
    """The stage table in order, one task each; every stage gets the earlier results it needs.

    A stage's note (the flywheel standing still) becomes a warning in the run log."""
    logger = get_run_logger()
    results: Results = {}
    for stage in STAGES:
        results[stage.key] = stage_task(stage)(data, plan, stage.arguments(results))
        if results[stage.key].get("note"):
            logger.warning(results[stage.key]["note"])
    return results


@flow(name="flywheel")
def flywheel(config: str = "configs/demo.yaml", rounds_total: int = 3) -> list[dict[str, Any]]:
    """Build the tiny world if the config needs it, then run rounds until `rounds_total` exist."""
    cfg = load_config(config)
    if cfg.uses_world():
        from flywheel.world.build import build_world

        build_world(cfg, ladder=False)
    from flywheel.tracking.registry import next_round
    from flywheel.tracking.store import open_tracker

    results = []
    while (upcoming := next_round(open_tracker(cfg)).round) < rounds_total:
        results.append(flywheel_round(config))
        if "awaiting_approval" in results[-1] or (results[-1].get("decision") or {}).get("awaiting"):
            break  # a person decides before the next round (promotion.approval: required)
        if next_round(open_tracker(cfg)).round <= upcoming:
            raise FlywheelError(f"round {upcoming} did not register an RL model; see the flow run's log")
    return results
