"""A flywheel's whole configuration: one YAML in, typed pydantic models out, clear errors.

Every default lives here. Sections: name, seed, home, world, model, data, midtrain,
posttrain, evaluation, tracking, promotion. `load_config(path)` is what every command calls
before doing any work; an invalid file raises `ConfigError` with one line per problem,
e.g. ``midtrain.epsilon: must be > 0 (got -0.1)``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.errors import ConfigError
from flywheel.refs import CORPUS_REF, DATA_REF, MODEL_REF, Ref, parse_ref

# it lives in flywheel/refs.py with the other reference names; the CLI imports it from here
from flywheel.refs import WORLD_SIZES as WORLD_SIZES
from flywheel.remit.catalog import NAMES as OBJECTIVE_NAMES
from flywheel.remit.catalog import objective_named

CHAT_TEMPLATES = ("tulu",)  # flywheel/chat_templates/<name>.jinja

POSTTRAIN_KINDS = ("sft", "dpo", "grpo")
BUILTIN_REWARDS = ("math_answer", "format", "code_exec")
DEFAULT_GRPO_REWARDS = ("math_answer", "format")  # a grpo stage without `rewards` uses these (and says so)
# Where each post-training stage reads its data unless the config says otherwise.
DEFAULT_STAGE_DATA = {"sft": "world:sft", "dpo": "world:dpo", "grpo": "world:rl"}
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_model_ref(ref: str) -> str:
    """A model is `world:<size>`, an existing local folder, or a hub id like `org/name` (see flywheel/refs.py)."""
    return parse_ref(ref, allowed=MODEL_REF).text


def _check_data_ref(ref: str) -> str:
    """A dataset is `world:<corpus>`, a local jsonl/json/parquet file, or a hub dataset id."""
    return parse_ref(ref, allowed=DATA_REF).text


class WorldConfig(Section):
    """The offline tiny world: how much of each corpus to generate and how long to pre-train."""

    pretrain_tokens: int = Field(2_000_000, gt=0)
    pretrain_lr: float = Field(2e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=16, le=4096)
    pretrain_docs: int = Field(60_000, ge=100)
    midtrain_docs: int = Field(20_000, ge=100)
    sft_pairs: int = Field(4_000, ge=10)
    dpo_pairs: int = Field(2_000, ge=10)
    rl_prompts: int = Field(2_000, ge=10)
    eval_per_level: int = Field(100, ge=5)


class ModelConfig(Section):
    """The pre-anneal base that every round mid-trains from."""

    source: str = "world:nano"
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # loaded to infer, computed in, published
    # mixed: train float32 master weights and AdamW state, computing in `dtype` (autocast) where the device can;
    # pure: train the weights in `dtype` as loaded (bfloat16 rounds away updates under ~1/256 of a weight: most
    # of an anneal's decaying tail); flywheel/models.py `precision_of`
    precision: Literal["mixed", "pure"] = "mixed"
    # attention kernel for training and scoring: sdpa (PyTorch's), flash_attention_2 (needs flash-attn), eager
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    compile: bool = False  # torch.compile the model for training (HF Trainer's torch_compile)
    trust_remote_code: bool = False
    revision: str | None = None

    @field_validator("source", "tokenizer")
    @classmethod
    def _model_ref(cls, v: str | None) -> str | None:
        return None if v is None else _check_model_ref(v)

    @property
    def ref(self) -> Ref:
        """`source` as a parsed reference."""
        return parse_ref(self.source, "model.source", MODEL_REF, strict=False)


class DataSource(Section):
    """One mid-training source and its share of the mixture."""

    source: str  # world:<corpus>, a .jsonl/.json/.parquet file (maybe compressed), a folder or glob of them, or a hub id
    weight: float = Field(1.0, gt=0)
    text_field: str = "text"  # other fields (Dolma's id, added, created, source, metadata) are ignored
    split: str = "train"
    subset: str | None = None
    # a folder's or hub dataset's files, chosen by path (relative to the folder / repo; fnmatch, `*` crosses folders)
    include: list[str] = Field(default_factory=list)  # empty: every data file
    exclude: list[str] = Field(default_factory=list)
    revision: str | None = None  # a hub dataset's commit or tag (None: main, resolved to its commit when fetched)

    @field_validator("source")
    @classmethod
    def _data_ref(cls, v: str) -> str:
        # a mid-training source may also be a folder or a glob of data files (the token store reads them all)
        return parse_ref(v, allowed=CORPUS_REF).text

    @property
    def ref(self) -> Ref:
        """`source` as a parsed reference (its field, data.sources.<i>.source, is the mixture's to name)."""
        return parse_ref(self.source, None, CORPUS_REF, strict=False)


class DataConfig(Section):
    """The mid-training mixture."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(source="world:midtrain")], min_length=1
    )
    workers: int | None = Field(None, ge=1)  # token-store build processes; None: one per CPU core
    # a hub source whose share is above this many tokens has its files fetched into the Hugging Face cache and
    # tokenized by every worker (flywheel/data/fetch.py); a smaller share is streamed by one task
    fetch_above_tokens: int = Field(50_000_000, ge=0)
    fetch_workers: int = Field(8, ge=1)  # parallel downloads
    # next_slice: round N anneals on the N-th budget-sized slice of the shuffled windows (fresh data each
    # round, wrapping into a new epoch when the store runs out); same: every round reads slice 0.
    per_round: Literal["next_slice", "same"] = "next_slice"
    slice: int = Field(0, ge=0)  # the slice this run reads; a round sets it under next_slice


class MidtrainConfig(Section):
    """The anneal: ReMiT or one of the paper's baselines, learning rate decayed to zero."""

    objective: Literal[OBJECTIVE_NAMES] = "remit"  # the objective table: flywheel/remit/catalog.py
    epsilon: float | None = Field(0.2, gt=0, le=1)  # None: no clip (for the ablation)
    centring: Literal["mean", "zscore"] = "mean"  # delta - mean (the paper's), or divided by its std too
    mapping: Literal["sigmoid", "exp", "linear"] = "sigmoid"  # 2*sigmoid (the paper's), exp, 1 + x; same clip
    # live: delta = log p_ref - log p_theta, theta the model being trained (the paper's formula); frozen: theta the
    # pre-anneal base, both log-probs cached, so the weights are fixed before training (flywheel/remit/frozen.py)
    delta_base: Literal["live", "frozen"] = "live"
    reference_mode: Literal["cached", "online"] = "cached"
    reference: str | None = None  # round 1's reference when the registry has none yet
    cache_dtype: Literal["float16", "float32"] = "float16"  # see remit/scoring.py for why not bfloat16
    token_budget: int = Field(300_000, gt=0)
    seq_len: int = Field(128, ge=16, le=131_072)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    score_batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    decay: Literal["linear", "cosine"] = "linear"
    start_from: Literal["pretrained", "previous"] = "pretrained"
    checkpoint_every: int = Field(200, ge=1)  # a Trainer checkpoint at every multiple of this many steps,
    checkpoint_fraction: float | None = Field(0.1, gt=0, le=1)  # and of this share of the run's steps,
    checkpoint_minutes: float | None = Field(30.0, gt=0)  # and at least this often (wall clock); None: off
    kd_temperature: float = Field(1.0, gt=0)
    kd_alpha: float = Field(0.5, ge=0, le=1)  # weight of the KL term; 1 - kd_alpha goes to CE
    kd_top_k: int | None = Field(None, ge=1)
    rho1_keep: float = Field(0.8, gt=0, le=1)
    loss_kernel: Literal["auto", "chunked", "fused", "eager"] = "auto"  # flywheel/remit/kernels.py
    loss_chunk_tokens: int = Field(2048, ge=1)  # tokens per output-layer chunk (chunked kernel, scoring)
    activation_checkpointing: bool = False  # recompute activations in the backward pass: memory for ~30% more time

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        return None if v is None else _check_model_ref(v)

    @model_validator(mode="after")
    def _kd_needs_online(self) -> MidtrainConfig:
        if objective_named(self.objective).uses_ref_distribution and self.reference_mode != "online":
            raise ValueError(
                f"midtrain.reference_mode: objective '{self.objective}' needs the reference's full distribution, "
                f"so set reference_mode: online (got '{self.reference_mode}')"
            )
        if self.delta_base == "frozen" and self.reference_mode != "cached":
            raise ValueError("midtrain.delta_base: frozen reads the cached log-probs of the reference and of the base, "
                             "so set reference_mode: cached (got 'online')")
        return self


class PosttrainStage(Section):
    """One TRL stage; `args` passes any further TRL config field through (checked at run time)."""

    kind: Literal["sft", "dpo", "grpo"]
    data: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    max_steps: int = Field(100, ge=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    rewards: list[str] = Field(default_factory=list)
    args: dict[str, Any] = Field(default_factory=dict)
    checkpoint_every: int = Field(200, ge=1)  # checkpoint cadence as in midtrain (args.save_steps overrides this)
    checkpoint_fraction: float | None = Field(0.1, gt=0, le=1)
    checkpoint_minutes: float | None = Field(30.0, gt=0)

    @field_validator("data")
    @classmethod
    def _data(cls, v: str | None) -> str | None:
        return None if v is None else _check_data_ref(v)

    @model_validator(mode="after")
    def _fill_and_check(self) -> PosttrainStage:
        if self.data is None:
            self.data = DEFAULT_STAGE_DATA[self.kind]
        if self.kind == "grpo" and not self.rewards:
            self.__dict__["rewards"] = list(DEFAULT_GRPO_REWARDS)
            self.__pydantic_fields_set__.discard("rewards")  # so rewards_note() can say they are the default
        if self.kind != "grpo" and self.rewards:
            raise ValueError(f"only grpo stages take rewards (this stage is {self.kind}); remove rewards")
        return self

    @property
    def ref(self) -> Ref | None:
        """`data` as a parsed reference (None only before validation fills the default)."""
        return None if self.data is None else parse_ref(self.data, None, DATA_REF, strict=False)


class PosttrainConfig(Section):
    """The ordered TRL chain that turns a mid-trained base into the round's RL checkpoint."""

    stages: list[PosttrainStage] = Field(
        default_factory=lambda: [PosttrainStage(kind="sft"), PosttrainStage(kind="grpo", lr=5e-5, max_steps=40)],
        min_length=1,
    )
    allow_custom_rewards: bool = False
    # The conversation format post-training and evaluation use, replacing the tokenizer's own: a bundled one by
    # name (tulu) or a .jinja file. Needed when the tokenizer has none, or none with {% generation %} markers
    # (SFT on `messages` trains on the replies only).
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _template_named(cls, value: str | None) -> str | None:
        if value is not None and value not in CHAT_TEMPLATES and not value.endswith(".jinja"):
            raise ValueError(f"posttrain.chat_template: '{value}' is neither a bundled template "
                             f"({', '.join(CHAT_TEMPLATES)}) nor a .jinja file")
        return value

    @model_validator(mode="after")
    def _rewards_known(self) -> PosttrainConfig:
        for i, stage in enumerate(self.stages):
            for name in stage.rewards:
                if name in BUILTIN_REWARDS:
                    continue
                dotted = re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", name)
                if dotted and self.allow_custom_rewards:
                    continue
                hint = (
                    "set posttrain.allow_custom_rewards: true to import it"
                    if dotted
                    else f"use one of {', '.join(BUILTIN_REWARDS)} or a dotted import path"
                )
                raise ValueError(f"posttrain.stages.{i}.rewards: unknown reward '{name}'; {hint}")
        return self


class EvaluationConfig(Section):
    """What lm-eval runs after mid-training and after post-training."""

    tasks: list[str] = Field(default_factory=lambda: ["world"], min_length=1)
    backend: Literal["hf", "vllm"] = "hf"  # lm-eval's model: hf (transformers), or vllm (data-parallel on the GPUs)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    # Bits per byte of the gold solution (eval/<task>/bpb) beside the score of each task that has one
    # (evaluation/likelihood.GOLD_TARGETS): one loglikelihood request per item, lower is better.
    likelihood: bool = True

    def cache_fields(self) -> dict:
        """The settings that decide the scores, for cache keys (backend only when not the default hf, likelihood
        only when on, so scores kept before either existed stay valid)."""
        exclude = ({"backend"} if self.backend == "hf" else set()) | (set() if self.likelihood else {"likelihood"})
        return self.model_dump(mode="json", exclude=exclude or None)


class TrackingConfig(Section):
    """MLflow: the embedded SQLite store under `home` unless a URI (or MLFLOW_TRACKING_URI) says otherwise."""

    uri: str | None = None
    register_by_reference: bool = False
    rehearsal: bool = False  # set by `flywheel rehearse`: every run and model version carries flywheel.rehearsal


class PromotionGuard(Section):
    """A regression guard: a candidate that improves the main metric may not drop this one by more than max_drop."""

    metric: str
    max_drop: float = Field(0.0, ge=0)


class PromotionConfig(Section):
    """The gate that decides whether a round's RL checkpoint becomes the next reference.

    The candidate and the reference are compared on the same evaluation items, paired: the
    difference of `metric` is bootstrapped over the items (flywheel/tracking/gate.py). `noninferior`
    promotes when the interval's lower end is above -min_delta (not shown worse by more than the
    margin), `superior` when it is above 0, `point` compares the two values as they are (value >=
    reference - min_delta), the rule before the gate knew the noise.
    """

    metric: str = "eval/avg"
    rule: Literal["noninferior", "superior", "point"] = "noninferior"
    min_delta: float = Field(0.02, ge=0)  # the margin on the metric's scale: 0.02 is 2 points of accuracy
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the bootstrap interval
    resamples: int = Field(2000, ge=100)  # bootstrap resamples of the items
    force: bool = False
    guards: list[PromotionGuard] = Field(default_factory=list)  # checked on point estimates, after the metric
    # auto: the gate's verdict moves @reference. required: the gate recommends, a person decides (the Prefect
    # UI's pause form, or `flywheel approve`); the round waits up to approval_timeout seconds, then on_timeout
    # rejects the candidate or leaves it waiting without a process (decided later with `flywheel approve`).
    approval: Literal["auto", "required"] = "auto"
    approval_timeout: int = Field(86400, ge=1)
    on_timeout: Literal["reject", "wait"] = "reject"

    @model_validator(mode="after")
    def _guards_differ(self) -> PromotionConfig:
        names = [g.metric for g in self.guards]
        if self.metric in names:
            raise ValueError(f"guards: '{self.metric}' is already the promotion metric; guard other metrics")
        if len(set(names)) != len(names):
            raise ValueError("guards: each metric may be guarded once")
        return self


LAUNCH_STAGES = ("score_reference", "midtrain", "posttrain", "evaluate")  # the stages a launcher can run


class LaunchSpec(Section):
    """How one stage's processes start: in the flow's own process, or as a torchrun / accelerate job."""

    kind: Literal["local", "torchrun", "accelerate"] = "local"
    nproc_per_node: int | None = Field(None, ge=1)  # processes per node (one per GPU); None: 1, or accelerate's file
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous (node 0) when nnodes > 1
    config_file: str | None = None  # accelerate: its config file, e.g. deploy/accelerate/fsdp.yaml
    grace_seconds: float = Field(60.0, gt=0)  # after SIGTERM, how long every rank has to save before SIGKILL
    timeout_minutes: float | None = Field(None, gt=0)  # the stage is stopped (SIGTERM, then SIGKILL) after this
    # the device's dense bf16 peak in TFLOP/s, for MFU (flywheel/perf.py); None: from its table of known GPUs
    peak_tflops: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _coherent(self) -> LaunchSpec:
        if self.kind == "local" and ((self.nproc_per_node or 1) > 1 or self.nnodes > 1):
            raise ValueError("kind local runs one process in the flow's own process; set kind: torchrun (or "
                             "accelerate) to start nproc_per_node × nnodes processes")
        if self.kind == "accelerate" and not self.config_file:
            raise ValueError("kind accelerate needs config_file (e.g. deploy/accelerate/fsdp.yaml)")
        if self.kind != "accelerate" and self.config_file:
            raise ValueError("config_file is read by kind accelerate only; remove it or set kind: accelerate")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes {self.nnodes} needs rdzv_endpoint (host:port of node 0, reachable from "
                             "every node)")
        if self.rdzv_endpoint and not re.fullmatch(r"[\w.-]+:\d{1,5}", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be host:port (got '{self.rdzv_endpoint}')")
        return self


class LaunchConfig(LaunchSpec):
    """The launcher of every heavy stage, with per-stage changes under `stages` (fields not set there are kept).

    For example `launch: {kind: torchrun, nproc_per_node: 8, stages: {evaluate: {nproc_per_node: 1}}}`.
    """

    stages: dict[Literal[LAUNCH_STAGES], dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _stages_valid(self) -> LaunchConfig:
        for name in self.stages:
            try:
                self.for_stage(name)
            except ValidationError as exc:
                raise ValueError("; ".join(_launch_problem(name, e) for e in exc.errors())) from None
        return self

    def for_stage(self, stage: str) -> LaunchSpec:
        """The launch of `stage`: the top-level fields with that stage's own fields on top."""
        base = self.model_dump(exclude={"stages"})
        change = self.stages.get(stage, {})
        if change.get("kind") == "local" and not {"nproc_per_node", "nnodes"} & change.keys():
            base.update(nproc_per_node=None, nnodes=1, rdzv_endpoint=None)  # `{kind: local}` alone means one process
        if "kind" in change and change["kind"] != "accelerate" and "config_file" not in change:
            base["config_file"] = None
        return LaunchSpec.model_validate({**base, **change})


def _launch_problem(stage: str, err: dict[str, Any]) -> str:
    where = ".".join(["launch.stages", stage, *map(str, err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field (allowed: {', '.join(f for f in LaunchSpec.model_fields)})"
    if err["type"] == "value_error":
        return f"{where}: {err['ctx'].get('error', err['msg'])}"
    return f"{where}: {err['msg'].replace('Input should be', 'must be')} (got {_short(err.get('input'))})"


def _default_home() -> Path:
    return Path(os.environ.get("FLYWHEEL_HOME", "./.flywheel"))


class FlywheelConfig(Section):
    """A whole flywheel."""

    name: Annotated[str, Field(pattern=_NAME_RE, max_length=64)]
    seed: int = Field(0, ge=0)
    home: Path = Field(default_factory=_default_home)
    world: WorldConfig = Field(default_factory=WorldConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    midtrain: MidtrainConfig = Field(default_factory=MidtrainConfig)
    posttrain: PosttrainConfig = Field(default_factory=PosttrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @field_validator("home")
    @classmethod
    def _home(cls, v: Path) -> Path:
        v = v.expanduser()
        if v.exists() and not v.is_dir():
            raise ValueError("exists and is not a folder; point home at a folder")
        return v.resolve()

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of some sections: the config part of a stage's cache key."""
        dump = self.model_dump(mode="json", include=set(sections) if sections else None)
        dump.pop("home", None)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]

    def uses_world(self) -> bool:
        """True when any part of the config reads from the tiny world (so `world build` must run first)."""
        refs = [self.model.ref, *(s.ref for s in self.data.sources), *(s.ref for s in self.posttrain.stages)]
        return any(r is not None and r.kind == "world" for r in refs)


# --- error messages ---------------------------------------------------------------------------


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated/list, so error paths can be walked."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _unwrap(a)]
    return [tp]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at an error's location, to list the fields it allows."""
    current: Any = FlywheelConfig
    for part in loc:
        if isinstance(part, int):
            continue
        candidates = [t for t in _unwrap(current) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not candidates or part not in candidates[0].model_fields:
            return None
        ann = candidates[0].model_fields[part].annotation
        inner = [a for t in _unwrap(ann) for a in (typing.get_args(t) or [t]) if typing.get_origin(t) is list]
        current = inner[0] if inner else ann
    found = [t for t in _unwrap(current) if isinstance(t, type) and issubclass(t, BaseModel)]
    return found[0] if found else None


def _short(value: Any) -> str:
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith(("/", "~", "./", "../"))):
        return repr(str(value))  # a path reads as '/x', not PosixPath('/x'), and in full: it says where to look
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: dict[str, Any]) -> str:
    """One line for one pydantic error: `field.path: what is allowed (got value)`."""
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc if p != "[key]") or "(top level)"  # a bad dict key: its own path
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    got = f" (got {_short(value)})"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{path}: unknown field{hint} (allowed: {', '.join(allowed)})" if allowed else f"{path}: unknown field"
    if kind == "missing":
        return f"{path}: required field is missing"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"{path}: must be {bounds[kind]} {limit}{got}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')}{got}"
    if kind in ("too_short", "too_long"):
        bound = "at least" if kind == "too_short" else "at most"
        limit = ctx.get("min_length" if kind == "too_short" else "max_length")
        return f"{path}: must have {bound} {limit} item(s) (got {ctx.get('actual_length')})"
    if kind == "string_pattern_mismatch":
        return f"{path}: use letters, digits, '_', '.', '-' and start with a letter or digit{got}"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if re.match(r"^[\w.]+: ", msg):  # the validator already named its own field path
            return msg
        return f"{path}: {msg}" + ("" if isinstance(value, (dict, list)) else got)
    msg = err["msg"].replace("Input should be", "must be")
    return f"{path}: {msg[0].lower() + msg[1:]}{got}"


def validate_config(data: Any, source: str | None = None) -> FlywheelConfig:
    """Turn a parsed YAML document into a config, or raise ConfigError listing every problem."""
    if data is None:
        raise ConfigError(["the file is empty; a config needs at least `name:`"], source)
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections (got {type(data).__name__})"], source)
    try:
        return FlywheelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()], source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not "the last wins"."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, ())
        return super().construct_document(node)


class _DuplicateKey(Exception):
    def __init__(self, key: str, where: tuple[str, ...], line: int, first_line: int):
        super().__init__(key, where, line, first_line)
        self.key, self.where, self.line, self.first_line = key, where, line, first_line


def _check_unique_keys(node: yaml.Node, where: tuple[str, ...], seen: set[int] | None = None) -> None:
    """Walk the composed document; merge keys (`<<: *anchor`) may be overridden on purpose, literal twins not."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias points back at a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                raise _DuplicateKey(key_node.value, where, line, first[key_node.value])
            first[key_node.value] = line
            _check_unique_keys(value_node, (*where, key_node.value), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, (*where, str(i)), seen)


def _parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`; syntax errors and repeated keys name the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        field = ".".join((*dup.where, dup.key))
        raise ConfigError([f"{field}: given twice, at lines {dup.first_line} and {dup.line}; YAML would "
                           "silently keep only the last, so remove one"], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error{where}: {problem}"], source) from None


def check_home_writable(cfg: FlywheelConfig) -> None:
    """Fail before any work when `home` (or the folder it would be made in) cannot be written."""
    home = cfg.home
    existing = next((p for p in (home, *home.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # the validator already said "not a folder"; nothing more to check here
    if os.access(existing, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    why = "is on a read-only file system" if read_only else "is not writable for this user"
    what = f"{home} {why}" if existing == home else f"{home} cannot be created ({existing} {why})"
    fix = "" if read_only else "fix its permissions or "
    raise ConfigError([f"home: {what}; {fix}point home (or FLYWHEEL_HOME) at a folder you can write"])


def config_home(path: str | Path) -> Path | None:
    """The home a config file names, or None when it does not load (the command reports why itself)."""
    try:
        return load_config(path).home
    except Exception:  # noqa: BLE001 - only used to word another error; never the one reported
        return None


def load_config(path: str | Path) -> FlywheelConfig:
    """Read and validate a config file; every command calls this before doing any work."""
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"config file not found; check the path (cwd is {Path.cwd()})"], str(path))
    if path.is_dir():
        raise ConfigError(["is a folder; pass a YAML config file"], str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"is not UTF-8 text at line {line} (byte 0x{raw[exc.start:exc.start + 1].hex()} at byte "
                           f"offset {exc.start}); save it as UTF-8"], str(path)) from None
    if not text.strip():
        raise ConfigError(["the file is empty; a config needs at least `name:`"], str(path))
    data = _parse_yaml(text, str(path))
    return validate_config(data, str(path))


def rewards_note(stage: PosttrainStage) -> str | None:
    """What a grpo stage rewards, and whether that is the default: for the summary and the stage log."""
    if stage.kind != "grpo":
        return None
    names = ", ".join(stage.rewards)
    return names if "rewards" in stage.model_fields_set else f"{names} (the default: rewards is not set)"


def _launch_summary(launch: LaunchConfig) -> str:
    def one(spec: LaunchSpec) -> str:
        if spec.kind == "local":
            return "in the flow's process"
        if spec.kind == "torchrun":
            return f"torchrun ({spec.nproc_per_node or 1} × {spec.nnodes} node(s))"
        return f"accelerate {spec.config_file}"

    parts = [one(launch.for_stage("midtrain"))]
    parts += [f"{stage}: {one(launch.for_stage(stage))}" for stage in launch.stages if stage != "midtrain"]
    if "midtrain" in launch.stages:
        parts[0] = f"midtrain: {parts[0]}; others: {one(launch)}"
    return "; ".join(parts)


def _rule_summary(p: PromotionConfig) -> str:
    from flywheel.metrics import higher_is_better

    higher = higher_is_better(p.metric)
    approval = "" if p.approval == "auto" else f"; approval required (timeout {p.approval_timeout} s: {p.on_timeout})"
    if p.rule == "point":
        return f"point estimates, min_delta {p.min_delta:g}{approval}"
    margin = p.min_delta if p.rule == "noninferior" else 0.0
    end = "low end >" if higher else "high end <"
    bound = f"{-margin if higher else margin:+g}" if margin else "0"
    return f"{p.rule}: {p.confidence:.0%} paired-bootstrap interval's {end} {bound}{approval}"


def config_summary(cfg: FlywheelConfig) -> list[tuple[str, str]]:
    """The few facts a person checks first, as (label, value) rows."""
    mt = cfg.midtrain
    eps = "no clip" if mt.epsilon is None else f"ε={mt.epsilon}"
    if objective_named(mt.objective).follows_weight_settings and (mt.centring, mt.mapping) != ("mean", "sigmoid"):
        eps += f", {mt.centring} centring, {mt.mapping} mapping"
    mix = ", ".join(f"{s.source}{'@' + s.revision[:7] if s.revision else ''}"
                    f"{' ' + '+'.join(s.include) if s.include else ''}×{s.weight:g}" for s in cfg.data.sources)
    chain = " → ".join(s.kind for s in cfg.posttrain.stages)
    chain += "".join(f"; stage {i} rewards: {rewards_note(s)}" for i, s in enumerate(cfg.posttrain.stages)
                     if s.kind == "grpo")
    return [
        ("name", cfg.name),
        ("home", str(cfg.home)),
        ("base model", f"{cfg.model.source} ({cfg.model.dtype})"),
        ("mid-training", f"{mt.objective} ({eps}, reference {mt.reference_mode}"
                         f"{', δ against the frozen base' if mt.delta_base == 'frozen' else ''}), "
                         f"{mt.token_budget:,} tokens"),
        ("data mix", mix),
        ("post-training", chain),
        ("evaluation", ", ".join(cfg.evaluation.tasks)),
        ("promotion", f"{cfg.promotion.metric}, {_rule_summary(cfg.promotion)}"
                      + "".join(f"; guard {g.metric} max_drop {g.max_drop:g}" for g in cfg.promotion.guards)),
        ("tracking", cfg.tracking.uri or "embedded MLflow (SQLite under home)"),
        ("launch", _launch_summary(cfg.launch)),
    ]
