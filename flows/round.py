"""Prefect flows: thin wiring over `flywheel.rounds` stage functions.

`flywheel_round` runs one round (the registry says which); `flywheel` runs rounds until N
exist. Prefect gives the UI, schedules, retries, result caching and a global concurrency
limit per flywheel, so two triggers become two consecutive rounds, never two copies of one.

No `log_prints`: Prefect's print patch bypasses `sys.stdout`, so dill's `nestedglobals` (used by
`datasets` to fingerprint `.map` functions) captured nothing and dumped bytecode into the run log.
Progress reaches the Prefect log through `LogProgress` and the tasks' own log lines instead.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.concurrency.sync import concurrency
from transformers import TrainerCallback

from flywheel import rounds
from flywheel.config import FlywheelConfig, load_config, validate_config
from flywheel.errors import FlywheelError

CACHED = INPUTS + TASK_SOURCE  # a task reruns only when its inputs or its code change


def _no_retry_on_user_error(task, task_run, state) -> bool:  # noqa: ANN001
    """Retry transient failures; a FlywheelError (bad config/data) fails the same way every time."""
    try:
        state.result()
    except FlywheelError:
        return False
    except Exception:
        return True
    return True


STAGE = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": _no_retry_on_user_error,
         "cache_policy": CACHED, "persist_result": True}


class LogProgress(TrainerCallback):
    """Training progress into the Prefect run log, about ten lines per stage."""

    def __init__(self, name: str):
        self.name = name

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        every = max(1, state.max_steps // 10)
        if logs and "loss" in logs and (state.global_step % every == 0 or state.global_step == state.max_steps):
            get_run_logger().info("%s step %d/%d loss %.4f", self.name, state.global_step, state.max_steps,
                                  logs["loss"])


def _cfg(config: dict[str, Any]) -> FlywheelConfig:
    return validate_config(config)


@task(name="plan-round")
def plan_round_task(config: dict[str, Any], round: int | None) -> dict[str, Any]:
    return rounds.plan_round(_cfg(config), round)


@task(name="score-reference", **STAGE)
def score_reference_task(config: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    return rounds.stage_score_reference(_cfg(config), plan)


@task(name="midtrain", **STAGE)
def midtrain_task(config: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    return rounds.stage_midtrain(_cfg(config), plan, callbacks=[LogProgress("midtrain")])


@task(name="evaluate", **STAGE)
def evaluate_task(config: dict[str, Any], plan: dict[str, Any], checkpoint: str, kind: str) -> dict[str, Any]:
    return rounds.stage_evaluate(_cfg(config), plan, checkpoint, kind)


@task(name="posttrain", **STAGE)
def posttrain_task(config: dict[str, Any], plan: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return rounds.stage_posttrain(_cfg(config), plan, base, callbacks=[LogProgress("posttrain")])


@task(name="promote", **STAGE)
def promote_task(config: dict[str, Any], plan: dict[str, Any], rl: dict[str, Any],
                 metrics: dict[str, float]) -> dict[str, Any]:
    return rounds.stage_promote(_cfg(config), plan, rl, metrics)


def concurrency_limit_name(cfg: FlywheelConfig) -> str:
    return f"flywheel-{cfg.name}"


def ensure_round_limit(cfg: FlywheelConfig) -> None:
    """One round at a time per flywheel: a global concurrency limit of 1 named after it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(concurrency_limit_name(cfg), 1)


def apply_overrides(cfg: FlywheelConfig, objective: str | None, token_budget: int | None,
                    epsilon: float | None, force_promotion: bool) -> FlywheelConfig:
    """The few fields the Prefect UI form can change for one run, validated like the YAML."""
    data = cfg.model_dump(mode="json")
    if objective is not None:
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
    objective: Literal["ntp", "remit", "kd", "rho1"] | None = None,
    token_budget: int | None = None,
    epsilon: float | None = None,
    force_promotion: bool = False,
) -> dict[str, Any]:
    """One flywheel round: score reference → mid-train → evaluate base → post-train → evaluate RL → promote.

    With no `round`, the registry decides (what a scheduled run does). The optional fields
    override the config file for this run only.
    """
    logger = get_run_logger()
    cfg = apply_overrides(load_config(config), objective, token_budget, epsilon, force_promotion)
    data = cfg.model_dump(mode="json")
    ensure_round_limit(cfg)
    # The next round is decided inside the slot. A short lease (renewed while the round runs) frees the slot
    # within a minute when a round is killed, instead of blocking the next trigger for the default 5 minutes.
    with concurrency(concurrency_limit_name(cfg), occupy=1, lease_duration=60):
        plan = plan_round_task(data, round)
        if plan["finished"]:
            logger.info("round %s is finished already (RL version %s); nothing to do", plan["round"],
                        plan["rl_version"])
            return plan
        logger.info("round %d: %s", plan["round"],
                    f"ReMiT guided by {plan['reference_version']}" if plan["reference_version"] else "NTP (round 0)")
        score_reference_task(data, plan)
        base = midtrain_task(data, plan)
        if base.get("note"):
            logger.warning(base["note"])
        base_eval = evaluate_task(data, plan, base["checkpoint"], "base")
        rl = posttrain_task(data, plan, base)
        post_eval = evaluate_task(data, plan, rl["checkpoint"], "post")
        decision = promote_task(data, plan, rl, post_eval["metrics"])
    report = rounds.round_report(cfg, plan, base_eval, post_eval, decision, note=base.get("note"))
    create_markdown_artifact(report, key=f"{cfg.name}-round-{plan['round']}".lower().replace("_", "-"),
                             description=f"{cfg.name} round {plan['round']}")
    logger.info("round %d done: %s", plan["round"], decision["reason"])
    return {**plan, "base": base, "rl": rl, "base_eval": base_eval, "post_eval": post_eval, "decision": decision}


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
        if next_round(open_tracker(cfg)).round <= upcoming:
            raise FlywheelError(f"round {upcoming} did not register an RL model; see the flow run's log")
    return results
