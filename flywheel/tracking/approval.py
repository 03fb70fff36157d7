"""A person's decisions on the registry: approve or reject a candidate that awaits approval, roll back @reference.

With `promotion.approval: required` the gate only recommends (registry.promote tags the version
`flywheel.approval=awaiting` and its recommendation); `decide` records the person's decision, who took it,
when and why on the version and the round run, then carries it out as the gate's own verdict would be
(`@reference` moves only on approve). `rollback` moves `@reference` back to the reference the current one
replaced (or to a named version) and records why on both versions; the next round plans with it.
Each takes the flywheel's promotion lock, so it cannot interleave with a round's promotion on this machine.
"""

from __future__ import annotations

import datetime as dt
import getpass
from dataclasses import dataclass
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.tracking.registry import (
    AWAITING,
    T_APPROVAL,
    T_GATE,
    T_PREVIOUS,
    T_PROMOTION,
    T_RECOMMENDATION,
    T_ROUND,
    PromotionDecision,
    _promotion_lock,
    carry_out,
    get_alias,
    recorded_decision,
    rl_model_name,
    rl_versions,
)
from flywheel.tracking.store import Tracker

T_BY, T_AT, T_REASON, T_FLOW_RUN = (f"{T_APPROVAL}.{k}" for k in ("by", "at", "reason", "flow_run"))
T_ROLLED_BACK = "flywheel.rolled_back"  # on the version @reference left: to which version, by whom, when, why
T_RESTORED = "flywheel.restored"  # on the version @reference came back to


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def who() -> str:
    """The person at this terminal, as a decision records it."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown user"


def awaiting(tracker: Tracker) -> Any | None:
    """The RL version that awaits a person's decision (at most one: its round holds up the next), or None."""
    for v in sorted(rl_versions(tracker), key=lambda v: int(v.version)):
        if v.tags.get(T_APPROVAL) == AWAITING and T_PROMOTION not in v.tags:
            return v
    return None


def round_version(tracker: Tracker, round_n: int) -> Any:
    """The RL version a round registered; one sentence when the round has none."""
    found = [v for v in rl_versions(tracker) if v.tags.get(T_ROUND) == str(round_n)]
    if not found:
        raise FlywheelError(f"--round: round {round_n} has no RL model in {rl_model_name(tracker.cfg)}; "
                            "`flywheel compare CONFIG` lists the rounds")
    return max(found, key=lambda v: int(v.version))


def decide(tracker: Tracker, round_n: int, approve: bool, reason: str, by: str) -> PromotionDecision:
    """Record a person's decision on the round's candidate and carry it out (idempotent once recorded)."""
    if not reason.strip():
        raise FlywheelError("--reason: say why (it is recorded on the version and the round run)")
    model, client = rl_model_name(tracker.cfg), tracker.client
    with _promotion_lock(tracker.cfg):
        version = client.get_model_version(model, round_version(tracker, round_n).version)
        v = str(version.version)
        if T_PROMOTION in version.tags:
            _check_same(version, round_n, approve, by)
        else:
            if version.tags.get(T_APPROVAL) != AWAITING:
                raise FlywheelError(f"round {round_n}: {model} v{v} does not await approval (its round has not "
                                    "reached the gate, or promotion.approval is auto)")
            if approve and version.tags.get(T_GATE + "blocked") == "true":
                raise FlywheelError(f"round {round_n}: {model} v{v} cannot be approved: "
                                    f"{version.tags.get(T_RECOMMENDATION, 'its weights are not finite')}")
            word = "approved" if approve else ("timed out" if by == "timeout" else "rejected")
            tags = {T_APPROVAL: word, T_BY: by, T_AT: now(), T_REASON: reason,
                    T_PROMOTION: f"{'promoted' if approve else 'rejected'}: {word} by {by}: {reason} "
                                 f"(gate recommended {version.tags.get(T_RECOMMENDATION, '?')})"}
            for k, value in tags.items():
                client.set_model_version_tag(model, v, k, value)
            version = client.get_model_version(model, v)
        gate = {k: x for k, x in version.tags.items() if k.startswith((T_GATE, T_APPROVAL))}
        decision = recorded_decision(tracker, version)
        carry_out(tracker, version, decision, version.tags[T_PROMOTION], gate, tracker.round_run(round_n))
    return decision


def _check_same(version: Any, round_n: int, approve: bool, by: str) -> None:
    """A decided round is carried out again only for the decision it has (a rerun, a resumed flow, a late timeout)."""
    verdict = version.tags[T_PROMOTION]
    if T_APPROVAL not in version.tags:
        raise FlywheelError(f"round {round_n}: {version.name} v{version.version} was decided by its gate "
                            f"({verdict}); only rounds run with promotion.approval: required await a person")
    if by != "timeout" and verdict.startswith("promoted") != approve:
        undo = ("to undo a promotion, `flywheel promote CONFIG --rollback --reason ...`" if verdict.startswith("promoted")
                else "a rejection stands; to promote it anyway, rerun the round with force_promotion")
        raise FlywheelError(f"round {round_n}: {version.name} v{version.version} was decided already ({verdict}); {undo}")


@dataclass(frozen=True)
class Rollback:
    model: str
    left: str  # the version @reference pointed to
    restored: str  # the version it points to now
    reason: str


def rollback(tracker: Tracker, reason: str, to: str | None = None, by: str | None = None) -> Rollback:
    """Move `@reference` back (to the reference the current one replaced, or to `to`); record why on both."""
    if not reason.strip():
        raise FlywheelError("--reason: say why (it is recorded on both versions)")
    model, client = rl_model_name(tracker.cfg), tracker.client
    with _promotion_lock(tracker.cfg):
        current = get_alias(tracker, model, "reference")
        if current is None:
            raise FlywheelError(f"{model} has no @reference yet; nothing to roll back")
        target = to or current.tags.get(T_PREVIOUS)
        if not target:
            raise FlywheelError(f"{model} v{current.version} replaced no earlier reference (it is the first); "
                                "pass --to VERSION")
        versions = {str(v.version): v for v in rl_versions(tracker)}
        if target not in versions:
            raise FlywheelError(f"--to: {model} has no version {target} (versions: {', '.join(sorted(versions, key=int))})")
        if target == str(current.version):
            raise FlywheelError(f"--to: {model} v{target} is the reference already")
        if not versions[target].tags.get(T_PROMOTION, "").startswith("promoted"):
            raise FlywheelError(f"--to: {model} v{target} was never promoted "
                                f"({versions[target].tags.get(T_PROMOTION, 'no verdict')}); roll back to a former reference")
        stamp = f"by {by or who()} at {now()}: {reason}"
        client.set_model_version_tag(model, str(current.version), T_ROLLED_BACK, f"to v{target} {stamp}")
        client.set_model_version_tag(model, target, T_RESTORED, f"from v{current.version} {stamp}")
        client.set_registered_model_alias(model, "reference", target)
    return Rollback(model, str(current.version), target, reason)
