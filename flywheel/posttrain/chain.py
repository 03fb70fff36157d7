"""The post-training stage: `posttrain(cfg, checkpoint) -> PosttrainResult`, TRL's SFT/DPO/GRPO in order.

Each stage starts from the previous stage's output and writes a plain HF folder (safetensors, tokenizer,
chat template) under `home/runs/<name>/posttrain-<key>/<i>-<kind>/model`; the last one is the round's RL
checkpoint. The key hashes the input checkpoint's weights, the stage list, the data and the seed: a rerun
skips finished stages (each verified against its flywheel-manifest.json, else rebuilt) and resumes the one
that crashed or got a SIGTERM from its last Trainer checkpoint. A NaN/inf loss or gradient stops a stage
before it reaches a checkpoint (flywheel/safety.py). Every stage's arguments and data are checked before
any stage trains, so a typo in stage 3 fails in seconds, not hours.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.checkpoints import publish_trained, reuse_verified
from flywheel.config import FlywheelConfig, PosttrainStage
from flywheel.data.io import (
    fingerprint,
    last_complete_checkpoint,
    read_jsonl,
    write_json,
    write_jsonl,
)
from flywheel.env import keep_freed_memory
from flywheel.errors import FlywheelError
from flywheel.launch import launch_kind
from flywheel.models import chat_template_text, load_model, load_tokenizer, model_identity, precision_of
from flywheel.perf import speed_summary
from flywheel.posttrain.data import StageData, load_stage_data
from flywheel.posttrain.rewards import NEEDS_COLUMNS, RewardFn, resolve_reward
from flywheel.posttrain.sandbox import Limits
from flywheel.refs import MODEL_REF, as_ref, model_location

log = logging.getLogger("flywheel.posttrain")

POSTTRAIN_VERSION = 1
# Our own keys in `stage.args`, popped before TRL sees the rest: name -> (type, default).
OWN_ARGS: dict[str, dict[str, tuple[type, Any]]] = {
    "sft": {"split": (str, "train"), "subset": (str, None)},
    "dpo": {"split": (str, "train"), "subset": (str, None), "on_policy": (bool, False),
            "samples_per_prompt": (int, 4), "sample_temperature": (float, 1.0),
            "sample_max_tokens": (int, 64), "on_policy_prompts": (int, None)},
    "grpo": {"split": (str, "train"), "subset": (str, None), "code_timeout": (float, 10.0),
             "code_memory_mb": (int, 1024), "code_max_processes": (int, 64)},
}
# TRL fields that a stage field already sets: one source for each fact.
STAGE_FIELDS = {"learning_rate": "lr", "max_steps": "max_steps", "per_device_train_batch_size": "batch_size",
                "output_dir": None, "reward_funcs": "rewards"}


@dataclass
class StageResult:
    """One finished stage: its checkpoint, its cost, and what the trainer logged."""

    index: int
    kind: str
    checkpoint: Path
    reused: bool = False
    resumed_from: str | None = None
    steps: int = 0
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)  # flywheel/perf.py speed_summary: tokens/s, MFU, ...


@dataclass
class PosttrainResult:
    """The round's RL checkpoint (the last stage's output) and every stage's result."""

    checkpoint: Path
    run_dir: Path
    key: str
    stages: list[StageResult]
    seconds: float = 0.0

    @property
    def reused(self) -> bool:
        return all(s.reused for s in self.stages)


@dataclass
class StagePlan:
    """A checked stage: its TRL arguments, our own options, its data and its reward functions."""

    index: int
    stage: PosttrainStage
    own: dict[str, Any]
    trl_args: dict[str, Any]
    data: StageData
    rewards: list[RewardFn] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"posttrain.stages.{self.index}"

    @property
    def kind(self) -> str:
        return self.stage.kind


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def trl_config_class(kind: str) -> type:
    """The TRL config dataclass a stage kind maps to."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    return {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}[kind]


def split_args(stage: PosttrainStage, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate our own options from TRL's, and reject keys that neither knows, suggesting the closest."""
    cls = trl_config_class(stage.kind)
    trl_fields = {f.name for f in dataclasses.fields(cls)}
    own_spec = OWN_ARGS[stage.kind]
    own = {name: default for name, (_, default) in own_spec.items()}
    trl: dict[str, Any] = {}
    for key, value in stage.args.items():
        if key in own_spec:
            own[key] = _own_value(key, value, own_spec[key][0], where)
        elif key in STAGE_FIELDS:
            instead = STAGE_FIELDS[key]
            fix = f"set {where}.{instead} instead" if instead else "flywheel sets it; remove it"
            raise FlywheelError(f"{where}.args.{key}: {fix}")
        elif key in trl_fields:
            trl[key] = value
        else:
            close = difflib.get_close_matches(key, sorted(trl_fields | set(own_spec)), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise FlywheelError(f"{where}.args.{key}: not a field of TRL's {cls.__name__} nor a flywheel "
                                f"option for {stage.kind} stages{hint}")
    return own, trl


def _own_value(key: str, value: Any, kind: type, where: str) -> Any:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise FlywheelError(f"{where}.args.{key}: must be {kind.__name__} (got {value!r})")
    if kind in (int, float) and value <= 0:
        raise FlywheelError(f"{where}.args.{key}: must be > 0 (got {value!r})")
    return value


def _check_groups(stage: PosttrainStage, trl: dict[str, Any], where: str, world: int | None = None) -> None:
    """GRPO compares each prompt's completions as a group, so a batch must hold whole groups (over `world`
    processes; default: this job's)."""
    k = int(trl.get("num_generations", 8))
    per_step = stage.batch_size * (world or _world_size())
    batch = trl.get("generation_batch_size") or per_step * int(
        trl.get("steps_per_generation") or trl.get("gradient_accumulation_steps", 1))
    if k >= 2 and batch % k:
        better = max(k, round(batch / k) * k)
        raise FlywheelError(
            f"{where}.batch_size: GRPO scores the {k} completions of each prompt as one group, so the "
            f"generation batch ({batch}) must be a multiple of num_generations ({k}); use batch_size "
            f"{better} or set {where}.args.num_generations to a divisor of {batch}")


def plan_stages(cfg: FlywheelConfig) -> list[StagePlan]:
    """Check every stage's arguments, rewards and data before anything trains."""
    plans = []
    for i, stage in enumerate(cfg.posttrain.stages):
        where = f"posttrain.stages.{i}"
        own, trl = split_args(stage, where)
        rewards: list[RewardFn] = []
        needs: tuple[str, ...] = ()
        if stage.kind == "grpo":
            _check_groups(stage, trl, where)
            limits = Limits(timeout_s=own["code_timeout"], memory_bytes=own["code_memory_mb"] << 20,
                            max_processes=own["code_max_processes"])
            rewards = [resolve_reward(name, cfg.posttrain.allow_custom_rewards, f"{where}.rewards", limits)
                       for name in stage.rewards]
            needs = tuple(c for name in stage.rewards for c in NEEDS_COLUMNS.get(name, ()))
        data = load_stage_data(cfg, stage.data or "", stage.columns, stage.kind, where, needs,
                               on_policy=own.get("on_policy", False), split=own["split"],
                               subset=own["subset"])
        plans.append(StagePlan(i, stage, own, trl, data, rewards))
    return plans


def trl_config(cfg: FlywheelConfig, plan: StagePlan, output_dir: Path) -> Any:
    """Our stage as SFTConfig / DPOConfig / GRPOConfig, with defaults right for this machine; args win."""
    import torch

    stage, cuda, precision = plan.stage, torch.cuda.is_available(), precision_of(cfg)
    tiny = stage.ref is not None and stage.ref.kind == "world"  # the tiny world's problems fit in 128 tokens
    steps = stage.max_steps
    base: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "learning_rate": stage.lr,
        "per_device_train_batch_size": stage.batch_size,
        "save_strategy": "steps",
        "save_steps": stage.checkpoint_every,  # plus checkpoint_fraction / _minutes: see _trainer
        "save_total_limit": 2,
        "logging_steps": 1 if plan.kind == "grpo" else max(1, steps // 50),  # grpo: every flat batch is seen
        "report_to": "none",
        "use_cpu": not cuda,
        # autocast to model.dtype over float32 masters on a GPU (flywheel/models.py precision_of); TRL's own default,
        # bf16 everywhere, would be emulated (slow) on a CPU
        "bf16": precision.compute == "bfloat16" and precision.master != "bfloat16",
        "fp16": precision.compute == "float16" and precision.master != "float16",
        "gradient_checkpointing": cuda,  # TRL defaults to on; on CPU it only costs time
        "torch_compile": cfg.model.compile,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if plan.kind in ("sft", "dpo") and tiny:
        base["max_length"] = 128
    if plan.kind == "sft" and "messages" in plan.data.rows[0]:
        base["assistant_only_loss"] = True  # the chat template marks assistant turns with {% generation %}
    if plan.kind == "grpo":
        base.update(num_generations=8, temperature=1.0, beta=0.0, use_vllm=False)
        if tiny:
            base["max_completion_length"] = 48
    cls = trl_config_class(plan.kind)
    try:
        return cls(**(base | plan.trl_args))
    except (ValueError, TypeError) as exc:
        raise FlywheelError(f"{plan.where}.args: TRL's {cls.__name__} rejected these settings: "
                            f"{str(exc).splitlines()[0]}") from None


def posttrain_key(cfg: FlywheelConfig, checkpoint_path: str, plans: list[StagePlan]) -> str:
    """The chain's cache key: input weights, the stage list, every stage's data, the seed."""
    cadence = {"checkpoint_every", "checkpoint_fraction", "checkpoint_minutes"}  # when to save, not what
    stages = [s.model_dump(mode="json", exclude=cadence) for s in cfg.posttrain.stages]
    precision = [cfg.model.precision] if cfg.model.dtype != "float32" else []  # float32 trains alike either way
    template = [("chat_template", chat_template_text(cfg))] if cfg.posttrain.chat_template else []
    return fingerprint(POSTTRAIN_VERSION, model_identity(checkpoint_path), stages,
                       [p.data.fingerprint for p in plans], cfg.seed, cfg.model.dtype, _world_size(), *precision,
                       *template)


def check_chat_template(tok: Any, checkpoint: str) -> None:
    """Post-training trains and evaluates conversations: the tokenizer (or posttrain.chat_template) needs a template."""
    if not getattr(tok, "chat_template", None):
        raise FlywheelError(f"posttrain.chat_template: the tokenizer of {checkpoint} has no chat template and the "
                            "config names none; post-training trains and evaluates conversations, so set "
                            "posttrain.chat_template (tulu, or a .jinja file)")


def check_reply_markers(cfg: FlywheelConfig, plan: StagePlan, tok: Any) -> None:
    """SFT on `messages` trains on the replies only, which the template marks with {% generation %}."""
    if plan.kind == "sft" and "messages" in plan.data.rows[0] and "generation" not in (tok.chat_template or ""):
        named = f"'{cfg.posttrain.chat_template}'" if cfg.posttrain.chat_template else "the tokenizer's own"
        raise FlywheelError(f"posttrain.chat_template: {named} template has no {{% generation %}} markers, so "
                            f"{plan.where} (sft on messages) cannot train on the replies only; set "
                            "posttrain.chat_template: tulu (or a .jinja file whose replies are marked)")


def check_posttrain(cfg: FlywheelConfig) -> None:
    """What can be checked before a round trains anything: the chat template of the model's tokenizer and every
    stage's arguments (a misspelt TRL field, a GRPO batch that splits groups). The data is read at the stage."""
    tokenizer = cfg.model.tokenizer or cfg.model.source
    if as_ref(tokenizer, MODEL_REF).kind != "world":  # the tiny world's tokenizer is built with its template
        check_chat_template(load_tokenizer(cfg), tokenizer)
    spec = cfg.launch.for_stage("posttrain")
    world = 1 if spec.kind == "local" else (spec.nproc_per_node * spec.nnodes if spec.nproc_per_node else None)
    for i, stage in enumerate(cfg.posttrain.stages):
        _, trl = split_args(stage, f"posttrain.stages.{i}")
        if stage.kind == "grpo" and world is not None:  # accelerate's process count is in its file: checked at the stage
            _check_groups(stage, trl, f"posttrain.stages.{i}", world)


def posttrain(cfg: FlywheelConfig, checkpoint: str | Path, run_dir: Path | None = None,
              callbacks: list | None = None) -> PosttrainResult:
    """Run `cfg.posttrain.stages` in order from `checkpoint`; return the RL checkpoint and each stage's cost.

    `callbacks` are HF `TrainerCallback`s given to every stage (progress in flows, fault injection in tests).
    """
    t0 = time.perf_counter()
    checkpoint = str(checkpoint)
    source = model_location(cfg, checkpoint)
    tok = load_tokenizer(cfg, source)
    check_chat_template(tok, checkpoint)
    plans = plan_stages(cfg)
    key = posttrain_key(cfg, source, plans)
    run_dir = run_dir or cfg.home / "runs" / cfg.name / f"posttrain-{key}"
    for plan in plans:  # TRL's own checks (e.g. num_generations >= 2) before the first stage trains
        check_reply_markers(cfg, plan, tok)
        trl_config(cfg, plan, run_dir / f"{plan.index}-{plan.kind}" / "checkpoints")
    results = []
    for plan in plans:
        result = run_stage(cfg, plan, source, run_dir / f"{plan.index}-{plan.kind}", callbacks)
        done = "reused" if result.reused else f"{result.steps} steps"
        log.info("%s (%s): %s in %.1fs, %.3fs/step -> %s", plan.where, plan.kind, done, result.seconds,
                 result.seconds_per_step, result.checkpoint)
        results.append(result)
        source = str(result.checkpoint)
    return PosttrainResult(results[-1].checkpoint, run_dir, key, results, time.perf_counter() - t0)


def run_stage(cfg: FlywheelConfig, plan: StagePlan, source: str, stage_dir: Path,
              callbacks: list | None = None) -> StageResult:
    """Train one stage from `source` into `stage_dir/model`; reuse it if finished, resume it if it crashed."""
    import torch
    from accelerate import PartialState

    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        keep_freed_memory()  # as in midtrain: a launched posttrain job runs in a process of its own
    final = stage_dir / "model"
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # rank 0 verifies (and removes a bad folder) before the others look
        reuse = reuse_verified(final, log) if state.is_main_process else final.exists()
    if reuse:
        saved = stage_dir / "stage.json"
        done = json.loads(saved.read_text()) if saved.exists() else {}
        return StageResult(plan.index, plan.kind, final, reused=True, steps=done.get("steps", 0),
                           seconds_per_step=done.get("seconds_per_step", 0.0),
                           log_history=done.get("log_history", []), notes=done.get("notes", {}),
                           speed=done.get("speed", {}))
    from datasets import Dataset

    from flywheel.config import rewards_note

    if (rewarded := rewards_note(plan.stage)) is not None:
        log.info("%s (grpo): rewards %s", plan.where, rewarded)
    tok = load_tokenizer(cfg, source)
    model = load_model(cfg, source)
    rows, notes = plan.data.rows, {}
    if plan.kind == "dpo" and plan.own["on_policy"]:
        rows, notes = _on_policy_rows(cfg, plan, model, tok, stage_dir)
    args = trl_config(cfg, plan, stage_dir / "checkpoints")
    trainer = _trainer(plan, model, tok, args, Dataset.from_list(rows), callbacks,
                       cfg.launch.for_stage("posttrain").peak_tflops)
    resume = last_complete_checkpoint(stage_dir / "checkpoints")
    start_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    t_train = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)  # raises NonFiniteError / Preempted: nothing is published
    train_s = time.perf_counter() - t_train
    trainer.check_weights_finite(f"the weights after {plan.where} ({plan.kind})")  # every rank, before publishing
    steps = trainer.state.global_step - start_step
    history = trainer.state.log_history
    if plan.kind == "grpo":
        notes |= _zero_advantage_summary(history)
    result = StageResult(plan.index, plan.kind, final, resumed_from=resume, steps=steps,
                         seconds_per_step=train_s / max(1, steps), log_history=history, notes=notes,
                         speed=speed_summary(history))
    _publish(cfg, plan, trainer, tok, source, final)
    if trainer.is_world_process_zero():
        write_json(stage_dir / "stage.json", {"steps": steps, "seconds_per_step": result.seconds_per_step,
                                              "speed": result.speed, "log_history": history, "notes": notes})
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - t0
    return result


def _publish(cfg: FlywheelConfig, plan: StagePlan, trainer: Any, tok: Any, source: str, final: Path) -> None:
    """The stage's model in the published dtype, with its record (every rank: FSDP gathers here)."""
    precision = precision_of(cfg, source)
    publish_trained(trainer, tok, final, "flywheel-posttrain.json",
                    {"kind": plan.kind, "stage": plan.index, "source": source, "data": plan.data.source,
                     "steps": trainer.state.global_step, "world_size": trainer.args.world_size,
                     "launch": launch_kind(), "fsdp": bool(trainer.is_fsdp_enabled)} | precision.record(),
                    precision.published)


@functools.cache
def safe_trainer_class(kind: str) -> type:
    """TRL's trainer for `kind` with flywheel's `TrainingSafety` (NaN guard, cadence, SIGTERM) and `SpeedMonitor`
    (perf/... metrics) mixed in."""
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    from flywheel.perf import SpeedMonitor
    from flywheel.safety import TrainingSafety

    base = {"sft": SFTTrainer, "dpo": DPOTrainer, "grpo": GRPOTrainer}[kind]
    return type(f"Safe{base.__name__}", (SpeedMonitor, TrainingSafety, base), {"__module__": __name__})


def _trainer(plan: StagePlan, model: Any, tok: Any, args: Any, dataset: Any, callbacks: list | None,
             peak_tflops: float | None = None) -> Any:
    """The TRL trainer for a stage; DPO builds its own frozen reference copy of the input model."""
    from flywheel.posttrain.monitor import ZeroAdvantageMonitor

    callbacks = list(callbacks or [])
    stage = plan.stage
    safety = {"stage": f"{plan.where} ({plan.kind})", "lr_field": f"{plan.where}.lr",
              "restart_from": "the stage's input checkpoint", "checkpoint_fraction": stage.checkpoint_fraction,
              "checkpoint_minutes": stage.checkpoint_minutes, "failpoint": "posttrain-checkpoint",
              "peak_tflops": peak_tflops}
    cls = safe_trainer_class(plan.kind)
    if plan.kind == "sft":
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=callbacks,
                   **safety)
    if plan.kind == "dpo":
        return cls(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tok,
                   callbacks=callbacks, **safety)
    return cls(model=model, reward_funcs=plan.rewards, args=args, train_dataset=dataset, processing_class=tok,
               callbacks=[ZeroAdvantageMonitor(), *callbacks], **safety)


def _on_policy_rows(cfg: FlywheelConfig, plan: StagePlan, model: Any, tok: Any, stage_dir: Path
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs sampled from the stage's input model, written once so a resumed stage trains on the same ones."""
    import torch
    from accelerate import PartialState

    from flywheel.posttrain.onpolicy import on_policy_pairs

    pairs_file, stats_file = stage_dir / "pairs.jsonl", stage_dir / "pairs.json"
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        if not stats_file.exists():
            rows = plan.data.rows
            limit = plan.own["on_policy_prompts"] or plan.stage.max_steps * plan.stage.batch_size * 2
            own = plan.own
            pairs, stats = on_policy_pairs(model, tok, rows[:limit], own["samples_per_prompt"],
                                           own["sample_max_tokens"], own["sample_temperature"], cfg.seed)
            model.train()
            write_jsonl(pairs_file, pairs)
            write_json(stats_file, dataclasses.asdict(stats) | {"summary": stats.summary()})
    stats = json.loads(stats_file.read_text())
    if stats["pairs"] == 0:
        raise FlywheelError(
            f"{plan.where}: on-policy DPO found no pairs: {stats['summary']}; the model needs both right and "
            f"wrong answers to a prompt, so train it first (e.g. an sft stage before this one), raise "
            f"{plan.where}.args.samples_per_prompt, or use easier prompts")
    numbers = ("prompts", "pairs", "all_correct", "all_wrong", "accuracy")
    return read_jsonl(pairs_file), {f"on_policy_{k}": stats[k] for k in numbers}  # flat numbers, for MLflow


def _zero_advantage_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """How often GRPO had nothing to learn from: the mean share of flat groups and the all-flat log lines."""
    fracs = [h["posttrain/zero_advantage_groups"] for h in history if "posttrain/zero_advantage_groups" in h]
    if not fracs:
        return {}
    return {"zero_advantage_groups_mean": sum(fracs) / len(fracs),
            "zero_advantage_all_flat_logs": sum(f >= 1.0 for f in fracs), "logged_batches": len(fracs)}
