"""The model registry is the flywheel's state: versions, lineage tags, aliases, promotion.

Registered models: `<name>-base` (mid-trained bases) and `<name>-rl` (RL checkpoints).
Aliases: `<name>-rl@reference` is the current ReMiT reference; `@round-N` on both models;
`@candidate` on the newest RL version until promotion decides. A scheduled round reads
everything it needs from here (`next_round`), never from local files or flow parameters.
"""

from __future__ import annotations

import fcntl
import functools
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError
from flywheel.tracking.gate import NotComparable, PairedDelta, paired_delta, passes
from flywheel.tracking.store import Tracker, code_version

T_ROUND = "flywheel.round"
T_STAGE = "flywheel.stage"
T_REFERENCE = "flywheel.reference_version"
T_BASE_SOURCE = "flywheel.base_source"
T_BASE_VERSION = "flywheel.base_version"
T_DATA = "flywheel.data_fingerprint"
T_DATA_SLICE = "flywheel.data_slice"  # the slice of the mixture's window stream (data.slice) a base annealed on
T_DATA_REVISIONS = "flywheel.data_revisions"  # each hub source as id@commit, e.g. "allenai/dolmino-mix-1124@bb54cab..."
T_DATA_EPOCHS = "flywheel.data_epochs"  # where that slice lies in each source's epochs, e.g. "world:midtrain 0.38-0.76"
T_CONFIG = "flywheel.config_hash"
T_CODE = "flywheel.code_version"
T_RUN = "flywheel.run_id"
T_KEY = "flywheel.checkpoint_key"
T_PROMOTION = "flywheel.promotion"
T_METRIC_PREFIX = "flywheel.metric."
T_PREVIOUS = "flywheel.previous_reference"
T_ITEMS = "flywheel.eval_items"  # where the version's per-item evaluation scores are (an artefact URI)
T_GATE = "flywheel.promotion."  # + rule, delta, ci_low, ci_high, items, confidence: the paired gate's numbers
T_READINGS = "flywheel.promotion.readings"  # JSON {metric: {delta, low, high}}: the metric's and each guard's interval
T_RECOMMENDATION = "flywheel.promotion.recommendation"  # the gate's verdict while a person decides (approval)
T_APPROVAL = "flywheel.approval"  # awaiting | approved | rejected | timed out; .by, .at, .reason, .flow_run beside it
AWAITING = "awaiting"


def base_model_name(cfg: FlywheelConfig) -> str:
    return f"{cfg.name}-base"


def rl_model_name(cfg: FlywheelConfig) -> str:
    return f"{cfg.name}-rl"


def _not_found(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def get_alias(tracker: Tracker, model: str, alias: str) -> Any | None:
    """The version behind `model@alias`, or None when the model or alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_model_version_by_alias(model, alias)
    except MlflowException as exc:
        if _not_found(exc) or "alias" in str(exc).lower():
            return None
        raise


def _ensure_registered_model(tracker: Tracker, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.get_registered_model(name)
    except MlflowException:
        try:
            tracker.client.create_registered_model(name, tags={"flywheel": tracker.cfg.name})
        except MlflowException as exc:  # created concurrently
            if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc).lower():
                raise


def find_version(tracker: Tracker, model: str, key: str) -> Any | None:
    """The version registered earlier for the same checkpoint key (reruns never duplicate versions)."""
    from mlflow.exceptions import MlflowException

    try:
        found = tracker.client.search_model_versions(f"name = '{model}' and tags.`{T_KEY}` = '{key}'")
    except MlflowException:
        return None
    return found[0] if found else None


def register_checkpoint(tracker: Tracker, *, model: str, checkpoint: Path, run_id: str, round_n: int, stage: str,
                        key: str, tags: dict[str, str], candidate: bool = False) -> Any:
    """Create (once per checkpoint key) a version of `model` from a checkpoint folder and alias it `round-N`.

    With `tracking.register_by_reference` the version points at the folder where it already is;
    otherwise the folder is logged as the run's `checkpoint` artefact and the version points there.
    """
    existing = find_version(tracker, model, key)
    if existing is not None:
        return existing
    from flywheel.checkpoints import first_non_finite

    bad = first_non_finite(Path(checkpoint))
    if bad is not None:
        raise FlywheelError(f"{model}: refusing to register {checkpoint}: tensor '{bad}' has non-finite values; "
                            "the run diverged (lower the learning rate) and this checkpoint must not be used")
    _ensure_registered_model(tracker, model)
    if tracker.cfg.tracking.register_by_reference:
        source = Path(checkpoint).resolve().as_uri()
    else:
        tracker.log_artifact(run_id, Path(checkpoint), "checkpoint")
        source = tracker.artifact_uri(run_id, "checkpoint")
    all_tags = {T_ROUND: str(round_n), T_STAGE: stage, T_CONFIG: tracker.cfg.section_hash(),
                T_CODE: code_version(), T_RUN: run_id, T_KEY: key, **tracker.marks(), **tags}
    version = tracker.client.create_model_version(model, source, run_id=run_id, tags=all_tags)
    tracker.client.set_registered_model_alias(model, f"round-{round_n}", version.version)
    if candidate:
        tracker.client.set_registered_model_alias(model, "candidate", version.version)
    return version


def version_path(tracker: Tracker, version: Any) -> Path:
    """A local folder holding a version's checkpoint: in place when local, else downloaded once."""
    source = version.source
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        local = Path(unquote(urlparse(source).path))
        if local.is_dir():
            return local
    if Path(source).is_dir():
        return Path(source)
    import mlflow.artifacts

    dst = tracker.cfg.home / "cache" / "registry" / f"{version.name}-v{version.version}"
    if not (dst / "config.json").exists() and not any(dst.rglob("config.json")):
        dst.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                            tracking_uri=tracker.client._tracking_client.tracking_uri)
    configs = sorted(dst.rglob("config.json"))
    if not configs:
        raise FlywheelError(f"models:/{version.name}/{version.version}: no checkpoint (config.json) in its artefacts")
    return configs[0].parent


# --- promotion ---------------------------------------------------------------------------------


@dataclass
class PromotionDecision:
    promoted: bool
    candidate_version: str
    previous_version: str | None
    candidate_value: float
    previous_value: float | None
    reason: str
    interval: PairedDelta | None = None
    readings: dict[str, PairedDelta] = field(default_factory=dict)  # the metric's and each guard's paired interval
    awaiting: bool = False  # promotion.approval required: this is the gate's recommendation, a person decides
    blocked: bool = False  # the weights are not finite: no person can approve it either

    def gate_tags(self, rule: str) -> dict[str, str]:
        """`flywheel.promotion.<rule|delta|ci_low|ci_high|items|confidence|readings>`: what the decision rested on."""
        import json

        tags = {T_GATE + "rule": rule}
        if self.blocked:
            tags[T_GATE + "blocked"] = "true"
        if self.readings:
            tags[T_READINGS] = json.dumps({m: {"delta": round(r.delta, 6), "low": round(r.low, 6),
                                               "high": round(r.high, 6), "items": r.items}
                                           for m, r in self.readings.items()})
        if self.interval is not None:
            iv = self.interval
            tags |= {T_GATE + "delta": f"{iv.delta:.6f}", T_GATE + "ci_low": f"{iv.low:.6f}",
                     T_GATE + "ci_high": f"{iv.high:.6f}", T_GATE + "items": str(iv.items),
                     T_GATE + "confidence": f"{iv.confidence:g}"}
        return tags


@contextmanager
def _promotion_lock(cfg: FlywheelConfig):
    """Serialise promotions of one flywheel on this machine (MLflow aliases have no compare-and-set).

    Across machines, the Prefect flow's global concurrency limit runs one round at a time.
    """
    path = cfg.home / "locks" / f"promote-{cfg.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def version_metric(version: Any, metric: str) -> float | None:
    value = version.tags.get(T_METRIC_PREFIX + metric)
    return float(value) if value is not None else None


def load_items(tracker: Tracker, uri: str) -> dict[str, Any]:
    """A version's per-item scores from its artefact URI (downloaded from a remote store when needed)."""
    import json
    import tempfile

    local = Path(uri.removeprefix("file://"))
    if local.is_file():
        return json.loads(local.read_text())
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                  tracking_uri=tracker.client._tracking_client.tracking_uri)
        return json.loads(Path(got).read_text())


def promote(tracker: Tracker, candidate: Any, metrics: dict[str, float], round_run_id: str | None = None,
            force: bool | None = None, items_uri: str | None = None) -> PromotionDecision:
    """Move `@reference` to the candidate when it passes `promotion.rule` against the current reference.

    `items_uri` names the candidate's per-item scores (evaluation/items.py); it is recorded on the
    version, so the next round's gate pairs its candidate with this one item by item.
    With `promotion.approval: required` (and no force) the gate's verdict is recorded as a recommendation
    and the version tagged awaiting: `@reference` stays until a person decides (tracking/approval.py).
    Re-entrant: the verdict is written on the version before the alias moves, and the round run's
    tag last, so a promote killed at any point finishes what it decided when the round is rerun.
    """
    cfg = tracker.cfg
    model = rl_model_name(cfg)
    metric = cfg.promotion.metric
    force = cfg.promotion.force if force is None else force
    if metric not in metrics:
        raise FlywheelError(f"promotion.metric: '{metric}' is not among the candidate's metrics "
                            f"({', '.join(sorted(metrics)) or 'none'}); pick one of those")
    client = tracker.client
    with _promotion_lock(cfg):
        candidate = client.get_model_version(model, str(candidate.version))  # fresh tags: a rerun sees the verdict
        recorded = candidate.tags.get(T_PROMOTION)
        if recorded is None or (force and not recorded.startswith("promoted")):  # force re-decides a rejection
            decision, gate = _judge(tracker, candidate, metrics, force, items_uri)
            if cfg.promotion.approval == "required" and not force:
                return _await_person(tracker, candidate, decision, gate, round_run_id)
            recorded = ("promoted: " if decision.promoted else "rejected: ") + decision.reason
            client.set_model_version_tag(model, str(candidate.version), T_PROMOTION, recorded)
        else:  # decided before a crash (or by a person): carry out the recorded verdict, never decide twice
            decision = recorded_decision(tracker, candidate)
            gate = {k: v for k, v in candidate.tags.items() if k.startswith(T_GATE)}
        carry_out(tracker, candidate, decision, recorded, gate, round_run_id)
    return decision


def _judge(tracker: Tracker, candidate: Any, metrics: dict[str, float], force: bool,
           items_uri: str | None) -> tuple[PromotionDecision, dict[str, str]]:
    """The gate on a fresh candidate: its metrics and items recorded on the version, then the decision's numbers."""
    model, version = rl_model_name(tracker.cfg), str(candidate.version)
    client = tracker.client
    for k, v in metrics.items():
        client.set_model_version_tag(model, version, T_METRIC_PREFIX + k, str(v))
    if items_uri:
        client.set_model_version_tag(model, version, T_ITEMS, items_uri)
        candidate = client.get_model_version(model, version)
    decision = _decide(tracker, candidate, float(metrics[tracker.cfg.promotion.metric]), force, metrics)
    gate = decision.gate_tags(tracker.cfg.promotion.rule)
    for k, v in gate.items():
        client.set_model_version_tag(model, version, k, v)
    client.set_model_version_tag(model, version, T_PREVIOUS, decision.previous_version or "")
    return decision, gate


def _await_person(tracker: Tracker, candidate: Any, decision: PromotionDecision, gate: dict[str, str],
                  round_run_id: str | None) -> PromotionDecision:
    """promotion.approval required: the gate's verdict becomes a recommendation; the version waits for a person."""
    model, version = rl_model_name(tracker.cfg), str(candidate.version)
    recommendation = ("promote: " if decision.promoted else "reject: ") + decision.reason
    tracker.client.set_model_version_tag(model, version, T_RECOMMENDATION, recommendation)
    tracker.client.set_model_version_tag(model, version, T_APPROVAL, AWAITING)
    if round_run_id:
        tracker.set_tags(round_run_id, {**gate, T_RECOMMENDATION: recommendation, T_APPROVAL: AWAITING})
    return replace(decision, awaiting=True)


def recorded_decision(tracker: Tracker, candidate: Any) -> PromotionDecision:
    """The verdict a version carries (T_PROMOTION), as a decision: what a rerun carries out."""
    metric = tracker.cfg.promotion.metric
    recorded = candidate.tags[T_PROMOTION]
    previous = candidate.tags.get(T_PREVIOUS) or None
    prev_value = None
    if previous:
        prev_value = version_metric(tracker.client.get_model_version(rl_model_name(tracker.cfg), previous), metric)
    return PromotionDecision(recorded.startswith("promoted"), str(candidate.version), previous,
                             version_metric(candidate, metric) or 0.0, prev_value, recorded.split(": ", 1)[-1])


def carry_out(tracker: Tracker, candidate: Any, decision: PromotionDecision, verdict: str, gate: dict[str, str],
              round_run_id: str | None) -> None:
    """What a recorded verdict does: the alias moves on promotion, @candidate goes, the round run is tagged and ends."""
    from flywheel.failpoints import failpoint

    model, client = rl_model_name(tracker.cfg), tracker.client
    failpoint("promote")  # crash test: killed between the recorded verdict and the alias move
    if decision.promoted:
        client.set_registered_model_alias(model, "reference", str(candidate.version))
    pending = get_alias(tracker, model, "candidate")
    if pending is not None and str(pending.version) == str(candidate.version):
        client.delete_registered_model_alias(model, "candidate")  # promotion has decided
    if round_run_id:
        tracker.set_tags(round_run_id, {**gate, T_PROMOTION: verdict, "flywheel.promoted": str(decision.promoted).lower()})
        client.set_terminated(round_run_id, "FINISHED")  # decided: a resumed round's run ends here too


def _interval(tracker: Tracker, candidate: Any, current: Any, metric: str | None = None) -> PairedDelta:
    """The paired bootstrap of candidate − reference on `metric` (default `promotion.metric`; NotComparable when it
    cannot be)."""
    cfg = tracker.cfg
    name = f"reference v{current.version}"
    for version, who in ((candidate, "the candidate"), (current, name)):
        if not version.tags.get(T_ITEMS):
            raise NotComparable(f"{who} has no per-item evaluation scores (evaluated before the paired gate, or "
                                "without its samples), so the two cannot be paired; set promotion.rule: point, "
                                "or pass force_promotion (promotion.force) to promote anyway")
    return paired_delta(load_items(tracker, candidate.tags[T_ITEMS]), load_items(tracker, current.tags[T_ITEMS]),
                        metric or cfg.promotion.metric, confidence=cfg.promotion.confidence,
                        resamples=cfg.promotion.resamples,
                        seed=[cfg.seed, int(candidate.version)], ref_name=name)


def _decide(tracker: Tracker, candidate: Any, value: float, force: bool,
            metrics: dict[str, float] | None = None) -> PromotionDecision:
    """The gate itself: non-finite weights never pass; otherwise compare with the current reference.

    The main metric is judged by `promotion.rule` on the paired interval (gate.py), in the metric's direction
    (lower bits per byte is better). A candidate that passes it is still rejected when a `promotion.guards`
    metric worsens by more than its max_drop from the reference's (point estimates), and the reason names
    that guard. Every guard's paired interval is measured too (`readings`), to be shown beside the metric's.
    """
    from flywheel.checkpoints import first_non_finite
    from flywheel.metrics import higher_is_better

    cfg = tracker.cfg
    metric, rule = cfg.promotion.metric, cfg.promotion.rule
    current = get_alias(tracker, rl_model_name(cfg), "reference")
    prev_value = version_metric(current, metric) if current is not None else None
    prev = str(current.version) if current is not None else None
    bad = first_non_finite(version_path(tracker, candidate))
    verdict = functools.partial(PromotionDecision, candidate_version=str(candidate.version), previous_version=prev,
                                candidate_value=value, previous_value=prev_value)
    if bad is not None:
        return verdict(False, reason=f"tensor '{bad}' has non-finite values; kept v{prev}", blocked=True)
    if current is not None and prev == str(candidate.version):
        return verdict(True, reason="already the reference")
    if current is None:
        return verdict(True, previous_version=None, previous_value=None, reason="first reference of this flywheel")
    readings, problem = _readings(tracker, candidate, current)
    interval = readings.get(metric)
    if force:
        shown = interval.text() if interval else f"{value:.4f} vs {prev_value}"
        return verdict(True, reason=f"forced (promotion.force); {metric} {shown}", interval=interval, readings=readings)
    if problem and rule != "point":
        return verdict(False, reason=f"cannot compare: {problem}; kept v{prev}")
    ok, why = passes(rule, cfg.promotion.min_delta, value, prev_value, interval, ref_name=f"reference v{prev}",
                     higher=higher_is_better(metric))
    if rule == "point":
        why = f"{metric} {why}" + (f"; {interval.text()}" if interval else "")
    else:
        shown = "(no value)" if prev_value is None else f"{prev_value:.4f}"
        margin = f", margin {cfg.promotion.min_delta:g}" if rule == "noninferior" else ""  # superior has none
        why = f"{metric} {value:.4f} vs reference v{prev} {shown}, {why}{margin}"
    if ok:
        for guard in cfg.promotion.guards:
            failed = _guard_problem(guard, metrics or {}, current, prev)
            if failed:
                return verdict(False, reason=f"{metric} {value:.4f} passed, but {failed}; kept v{prev}",
                               interval=interval, readings=readings)
        why += "".join(f"; guard {g.metric} held" for g in cfg.promotion.guards)
        return verdict(True, reason=why, interval=interval, readings=readings)
    return verdict(False, reason=f"{why}; kept v{prev}", interval=interval, readings=readings)


def _readings(tracker: Tracker, candidate: Any, current: Any) -> tuple[dict[str, PairedDelta], str | None]:
    """The paired interval of the promotion metric and of each guard that has per-item scores; why the metric has
    none (NotComparable's sentence) if it cannot be paired."""
    readings: dict[str, PairedDelta] = {}
    try:
        readings[tracker.cfg.promotion.metric] = _interval(tracker, candidate, current)
    except NotComparable as exc:
        return readings, str(exc)
    for guard in tracker.cfg.promotion.guards:
        try:
            readings[guard.metric] = _interval(tracker, candidate, current, guard.metric)
        except FlywheelError:  # NotComparable, or a guard with no per-item scores: judged on its point values only
            pass
    return readings, None


def _guard_problem(guard: Any, metrics: dict[str, float], current: Any, prev: str | None) -> str | None:
    """Why `guard` rejects the candidate (its metric worsened by more than max_drop, or cannot be compared)."""
    from flywheel.metrics import higher_is_better

    if guard.metric not in metrics:
        return f"guard {guard.metric} is not among the candidate's metrics (promotion.guards)"
    ref_value = version_metric(current, guard.metric)
    if ref_value is None:
        return (f"guard {guard.metric} has no value on reference v{prev} to compare with (promotion.guards; "
                "promotion.force overrides)")
    value = float(metrics[guard.metric])
    higher = higher_is_better(guard.metric)
    drop = ref_value - value if higher else value - ref_value
    if drop > guard.max_drop:
        return (f"guard {guard.metric} {'dropped' if higher else 'rose'} {drop:.4f} ({value:.4f} vs {ref_value:.4f}) "
                f"> max_drop {guard.max_drop:g}")
    return None


# --- reading the state -------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """What a round does: its number, reference and base, read from the registry; and how planning ended.

    `finished`: the round was decided already (`rl_version` is its RL model); `resumed`: the round was
    started before and is re-entered with the plan it recorded then. The plan stays this object from
    planning to the promotion; `to_json` / `from_json` are for the boundaries (a launched job's input file,
    a round's result).
    """

    round: int
    reference_version: str | None = None
    reference_path: Path | None = None
    base: str | None = None
    base_version: str | None = None
    finished: bool = False
    resumed: bool = False
    rl_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        path = self.reference_path
        return {**asdict(self), "reference_path": str(path) if path is not None else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundPlan:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        path = values.get("reference_path")
        return cls(**{**values, "reference_path": Path(path) if path else None})


def rl_versions(tracker: Tracker) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(tracker.client.search_model_versions(f"name = '{rl_model_name(tracker.cfg)}'"))
    except MlflowException:
        return []


def next_round(tracker: Tracker) -> RoundPlan:
    """The round to run next (one past the newest round with an RL version), its reference and base."""
    cfg = tracker.cfg
    versions = rl_versions(tracker)
    undecided = [int(v.tags.get(T_ROUND, -1)) for v in versions if T_PROMOTION not in v.tags]
    rounds = [int(v.tags.get(T_ROUND, -1)) for v in versions]
    # A registered candidate without a verdict is the round in progress, not a finished round.
    n = min(undecided) if undecided else (max(rounds) + 1 if rounds else 0)
    ref = get_alias(tracker, rl_model_name(cfg), "reference")
    ref_path = version_path(tracker, ref) if ref is not None else None
    base, base_version = cfg.model.source, None
    if cfg.midtrain.start_from == "previous" and n > 0:
        prev = get_alias(tracker, base_model_name(cfg), f"round-{n - 1}")
        if prev is not None:
            base, base_version = str(version_path(tracker, prev)), str(prev.version)
    return RoundPlan(n, f"{rl_model_name(cfg)}/{ref.version}" if ref else None, ref_path, base, base_version)


def lineage(tracker: Tracker, version: str | None = None) -> list[str]:
    """The chain behind an RL version: RL vN ← base vM (round k, guided by RL vK) ← … ← the pre-anneal base."""
    cfg = tracker.cfg
    client = tracker.client
    rl, base = rl_model_name(cfg), base_model_name(cfg)
    if version is None:
        cur = get_alias(tracker, rl, "reference")
        if cur is None:
            raise FlywheelError(f"{rl}: no @reference yet; run a round first (or pass --version)")
        version = str(cur.version)
    lines: list[str] = []
    seen: set[str] = set()
    from mlflow.exceptions import MlflowException

    while version and version not in seen:
        seen.add(version)
        try:
            v = client.get_model_version(rl, version)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            raise FlywheelError(f"{rl}: version {version} does not exist; run `flywheel lineage CONFIG` without "
                                "--version for the current reference's chain") from None
        rnd = v.tags.get(T_ROUND, "?")
        promo = v.tags.get(T_PROMOTION, "not yet decided")
        lines.append(f"{rl} v{version} (round {rnd}; {promo})")
        lines += [f"  {what} {v.tags[tag]}" for tag, what in (("flywheel.restored", "restored as @reference"),
                                                               ("flywheel.rolled_back", "rolled back")) if tag in v.tags]
        base_v = v.tags.get(T_BASE_VERSION)
        if not base_v:
            lines.append(f"  ← {v.tags.get(T_BASE_SOURCE, 'unknown base')}")
            break
        b = client.get_model_version(base, base_v)
        ref = b.tags.get(T_REFERENCE, "none")
        guided = "NTP, no reference" if ref in ("none", "") else f"guided by {rl} v{ref}"
        data = f"data {b.tags.get(T_DATA, '?')}"
        if T_DATA_SLICE in b.tags:
            data += f", slice {b.tags[T_DATA_SLICE]}" + (f" ({b.tags[T_DATA_EPOCHS]})" if b.tags.get(T_DATA_EPOCHS) else "")
        lines.append(f"  ← {base} v{base_v} (round {b.tags.get(T_ROUND, '?')}, {guided}; {data})")
        if ref in ("none", ""):
            lines.append(f"  ← pre-anneal base {b.tags.get(T_BASE_SOURCE, '?')}")
            break
        version = ref
    return lines


def load_reference_model(tracker: Tracker):  # noqa: ANN201 - a transformers model
    """`<name>-rl@reference` as a model, the way a round (or a user) loads it."""
    from transformers import AutoModelForCausalLM

    ref = get_alias(tracker, rl_model_name(tracker.cfg), "reference")
    if ref is None:
        raise FlywheelError(f"{rl_model_name(tracker.cfg)}@reference does not exist yet; run round 0 first")
    return AutoModelForCausalLM.from_pretrained(version_path(tracker, ref), use_safetensors=True)
