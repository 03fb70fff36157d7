"""A person in the loop: the round's evidence, a pause for the decision, and the round's outcome as a Prefect event.

With `promotion.approval: required`, once the gate has computed its recommendation the round publishes
the evidence (a markdown artefact: each metric with its paired interval, the recommendation and why,
where the MLflow runs are) and, on a Prefect server, pauses with a form (approve or reject, and a
reason). The decision goes through `tracking.approval.decide`, the same function `flywheel approve`
calls from a terminal. Without a server (a round run from the terminal on the temporary one) nobody
could reach the form: the round ends awaiting, and `flywheel approve` decides.

Every outcome is an event on the flywheel's resource (`flywheel.<name>`): `flywheel.round.promoted`,
`flywheel.round.rejected`, `flywheel.round.awaiting-approval`, for a team's notification automations.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from pydantic import Field

from flywheel.config import FlywheelConfig
from flywheel.console import tell
from flywheel.tracking.registry import T_METRIC_PREFIX, RoundPlan, rl_model_name
from flywheel.tracking.store import Tracker, open_tracker, tracking_uri

EVENT = "flywheel.round."  # + promoted | rejected | awaiting-approval
POLL_SECONDS = 5  # how often the paused round asks the server whether it was resumed


class Approval(RunInput):
    """The pause form: the person's decision on the round's candidate."""

    decision: Literal["approve", "reject"] = Field(description="approve moves @reference to the candidate")
    reason: str = Field(description="Why: recorded on the model version and the round run")
    by: str = Field("the Prefect UI", description="Who decides (recorded with the reason)")


def resource(cfg: FlywheelConfig) -> dict[str, str]:
    """The flywheel as a Prefect event resource: what an automation's trigger matches on."""
    return {"prefect.resource.id": f"flywheel.{cfg.name}", "prefect.resource.name": cfg.name}


def outcome(decision: dict[str, Any]) -> str:
    if decision.get("awaiting"):
        return "awaiting-approval"
    return "promoted" if decision.get("promoted") else "rejected"


def emit_outcome(cfg: FlywheelConfig, round_n: int, decision: dict[str, Any]) -> None:
    """The round's outcome as `flywheel.round.<outcome>` on the flywheel's resource."""
    from prefect.events import emit_event

    emit_event(event=EVENT + outcome(decision), resource=resource(cfg),
               payload={"round": round_n, "model": rl_model_name(cfg), "version": decision.get("version"),
                        "previous": decision.get("previous"), "reason": decision.get("reason")})


def _link(tracker: Tracker, run: str) -> str:
    uri = tracking_uri(tracker.cfg)
    if uri.startswith("http"):
        return f"[{run}]({uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{run})"
    return f"`{run}` (tracking URI `{uri}`)"


def evidence(tracker: Tracker, plan: RoundPlan, results: dict[str, Any]) -> str:
    """What a person reads before deciding: every paired metric, the recommendation and why, the runs."""
    from flywheel.metrics import higher_is_better

    cfg = tracker.cfg
    decision, metrics = results["decision"], results["post_eval"]["metrics"]
    model, prev = rl_model_name(cfg), decision.get("previous")
    reference = tracker.client.get_model_version(model, prev).tags if prev else {}
    rows = ["| metric | candidate | reference | Δ candidate − reference | interval | better |", "|---|---|---|---|---|---|"]
    for m, r in decision.get("readings", {}).items():
        ref = reference.get(T_METRIC_PREFIX + m)
        rows.append(f"| {m} | {metrics.get(m, float('nan')):.4f} | {'–' if ref is None else f'{float(ref):.4f}'} | "
                    f"{r['delta']:+.4f} | {r['confidence']:.0%} CI {r['low']:+.4f}..{r['high']:+.4f} "
                    f"({r['items']} items) | {'higher' if higher_is_better(m) else 'lower'} |")
    verdict = "promote" if decision["promoted"] else "reject"
    return "\n".join([
        f"# {cfg.name}: round {plan.round} awaits approval",
        f"Candidate `{model}` v{decision['version']}, reference {f'v{prev}' if prev else 'none yet'}. "
        f"The gate recommends **{verdict}**: {decision['reason']}.",
        "", *(rows if len(rows) > 2 else ["(no paired intervals: nothing to pair with)"]), "",
        "Decide on this flow run's **Resume** form (approve or reject, and why), or from a terminal: "
        f"`flywheel approve CONFIG --round {plan.round} --approve|--reject --reason \"...\"`. "
        f"It waits {cfg.promotion.approval_timeout} s, then {_on_timeout(cfg)}.",
        f"MLflow: round run {_link(tracker, tracker.round_run(plan.round))}.",
    ])


def _on_timeout(cfg: FlywheelConfig) -> str:
    if cfg.promotion.on_timeout == "reject":
        return "rejects the candidate (promotion.on_timeout: reject)"
    return "stops waiting in this run and leaves the decision to `flywheel approve` (promotion.on_timeout: wait)"


def await_approval(cfg: FlywheelConfig, plan: RoundPlan, results: dict[str, Any], server: bool) -> dict[str, Any]:
    """Publish the evidence, then (on a server) pause for the form and carry out the person's decision.

    Returns the round's decision: decided, or still awaiting (no server, or timed out with on_timeout wait)."""
    from prefect.runtime import flow_run

    from flywheel.round.stages import decision_result
    from flywheel.tracking.approval import T_FLOW_RUN, decide

    decision, say, tracker = results["decision"], tell(get_run_logger().info), open_tracker(cfg)
    create_markdown_artifact(evidence(tracker, plan, results), key=f"{cfg.name}-round-{plan.round}-approval".lower()
                             .replace("_", "-"), description=f"{cfg.name} round {plan.round}: evidence for approval")
    emit_outcome(cfg, plan.round, decision)
    how = f"`flywheel approve CONFIG --round {plan.round} --approve|--reject --reason ...`"
    if not server:
        say(f"round {plan.round} awaits approval (no Prefect server to pause on); decide with {how}")
        return decision
    tracker.client.set_model_version_tag(rl_model_name(cfg), decision["version"], T_FLOW_RUN, str(flow_run.id))
    say(f"round {plan.round} awaits approval: the Resume form of flow run {flow_run.name}, or {how}")
    answer = _pause(str(flow_run.id), cfg.promotion.approval_timeout, f"approval-round-{plan.round}")
    if answer.by == TIMED_OUT and cfg.promotion.on_timeout == "wait":
        say(f"round {plan.round}: no decision within {cfg.promotion.approval_timeout} s; it keeps waiting for {how}")
        return decision
    by = "timeout" if answer.by == TIMED_OUT else answer.by
    decided = decision_result(decide(tracker, plan.round, answer.decision == "approve", answer.reason, by))
    emit_outcome(cfg, plan.round, decided)
    return decided


TIMED_OUT = "the approval timeout (promotion.on_timeout)"  # the answer given when nobody answered in time
GRACE_SECONDS = 300  # the server's own expiry of the pause comes this long after ours: ours always decides first


def _pause(flow_run_id: str, seconds: int, key: str) -> Approval:
    """Pause for the form; after `seconds` a watchdog answers it itself (by TIMED_OUT).

    Prefect's server fails a pause whose timeout passed (its FailExpiredPauses service), racing the flow's own
    timeout; so the pause is given `GRACE_SECONDS` more and the round's timeout is this watchdog's answer, which
    goes through the same resume as a person's (whichever lands first is the answer)."""
    import threading

    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    stop = threading.Event()

    def watchdog() -> None:
        if not stop.wait(seconds):
            try:
                resume_paused(flow_run_id, False, f"no decision within {seconds} s", TIMED_OUT)
            except Exception:  # noqa: BLE001 - a person's answer landed first: the run is no longer paused
                pass

    threading.Thread(target=watchdog, name="flywheel-approval-timeout", daemon=True).start()
    try:
        return pause_flow_run(wait_for_input=Approval, timeout=seconds + GRACE_SECONDS, poll_interval=POLL_SECONDS,
                              key=key)
    except FlowPauseTimeout:  # the watchdog could not resume it either (the server was away): decide anyway
        _running_again(flow_run_id)
        return Approval(decision="reject", reason=f"no decision within {seconds} s", by=TIMED_OUT)
    finally:
        stop.set()


def _running_again(flow_run_id: str) -> None:
    """After its pause expired the server fails the run on its next state; the round still finishes (it records the
    timeout's outcome), so it is set running again."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(message="approval timed out; recording the outcome"),
                                  force=True)


def resume_paused(flow_run_id: str, approve: bool, reason: str, by: str) -> bool:
    """Resume a round paused for approval with the same answer the form would give; False when it is not paused."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    if run.state is None or not run.state.is_paused():
        return False
    resume_flow_run(flow_run_id, run_input={"decision": "approve" if approve else "reject", "reason": reason,
                                            "by": by})
    return True


def decide_from_terminal(cfg: FlywheelConfig, round_n: int, approve: bool, reason: str) -> str:
    """`flywheel approve`: record the decision, then resume the round if it is paused on a server (it carries the
    decision out and emits the event) or emit the event here; the verdict line."""
    from flywheel.tracking.approval import T_FLOW_RUN, decide, round_version, who

    server = server_url() is not None
    tracker = open_tracker(cfg)
    by = who()
    flow_run_id = round_version(tracker, round_n).tags.get(T_FLOW_RUN)
    decision = decide(tracker, round_n, approve, reason, by)
    resumed = server and flow_run_id is not None and resume_paused(flow_run_id, approve, reason, by)
    if server and not resumed:
        from flywheel.round.stages import decision_result

        emit_outcome(cfg, round_n, decision_result(decision))
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
    where = f"; its paused flow run {flow_run_id} resumed" if resumed else ""
    return f"round {round_n}: {'promoted' if decision.promoted else 'rejected'}: {decision.reason}{where}"


def server_url() -> str | None:
    """The Prefect server this process talks to; None on the temporary one a flow starts by itself."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None
