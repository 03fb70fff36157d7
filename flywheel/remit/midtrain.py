"""The mid-training stage: `midtrain(cfg, base, reference) -> checkpoint`, the anneal with ReMiT or a baseline.

Short warmup, then the learning rate decays to zero over `token_budget` tokens. Output is a
plain HF folder (safetensors + tokenizer + flywheel-manifest.json) under
`home/runs/<name>/midtrain-<key>/model`, where the key hashes everything the result depends on:
a rerun with the same inputs returns the finished folder once it verifies against its manifest
(else it is rebuilt); a rerun after a crash or a SIGTERM resumes from the Trainer's last checkpoint.
A NaN/inf loss or gradient stops the stage before it reaches a checkpoint (flywheel/safety.py).
Works unchanged under `accelerate launch` (DDP/FSDP come from the Trainer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.checkpoints import publish_trained, reuse_verified
from flywheel.config import FlywheelConfig
from flywheel.data.io import fingerprint, last_complete_checkpoint, write_json
from flywheel.data.mixture import PackedCorpus, build_mixture
from flywheel.env import keep_freed_memory
from flywheel.errors import FlywheelError
from flywheel.launch import launch_kind
from flywheel.models import (
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    model_identity,
    precision_of,
    tokenizer_identity,
)
from flywheel.perf import speed_summary
from flywheel.refs import model_location
from flywheel.remit.catalog import Objective, objective_named
from flywheel.remit.frozen import FROZEN_VERSION

log = logging.getLogger("flywheel.midtrain")

MIDTRAIN_VERSION = 1
LATER_FIELDS = {"centring": "mean", "mapping": "sigmoid", "delta_base": "live"}  # midtrain fields added after MIDTRAIN_VERSION 1


@dataclass
class MidtrainResult:
    """Where the mid-trained base is and how it was made."""

    checkpoint: Path
    run_dir: Path
    key: str
    reused: bool = False
    resumed_from: str | None = None
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    html: Path | None = None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(cfg: FlywheelConfig, output_dir: Path | str, steps: int, logging_steps: int | None,
                       save: bool = True) -> Any:
    """The anneal's `TrainingArguments` (one place: `midtrain` and the throughput benchmark both use it).

    `logging_steps` None and `save` False turn logging and checkpoints off (what the benchmark times).
    """
    import torch
    from transformers import TrainingArguments

    mt, precision = cfg.midtrain, precision_of(cfg)  # float32 masters, autocast to model.dtype on a GPU
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=mt.batch_size,
        gradient_accumulation_steps=mt.grad_accum,
        learning_rate=mt.lr,
        lr_scheduler_type=mt.decay,  # linear / cosine: both reach zero at the last step
        warmup_steps=mt.warmup_ratio,
        weight_decay=mt.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        save_strategy="steps" if save else "no",
        save_steps=mt.checkpoint_every,
        save_total_limit=2,
        logging_strategy="steps" if logging_steps else "no",
        logging_steps=logging_steps or 500,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=precision.compute == "bfloat16" and precision.master != "bfloat16",  # autocast over float32 masters
        fp16=precision.compute == "float16" and precision.master != "float16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        average_tokens_across_devices=True,
        activation_checkpointing=mt.activation_checkpointing,
        torch_compile=cfg.model.compile,
        ddp_find_unused_parameters=False,
    )


def midtrain_key(cfg: FlywheelConfig, base_path: str, ref_path: str | None, corpus_key: str) -> str:
    """The stage's cache key: its config section, the base and reference weights, the data, the seed."""
    section = cfg.midtrain.model_dump(mode="json", exclude={"reference", "checkpoint_every", "checkpoint_fraction",
                                                             "checkpoint_minutes", "score_batch_size",
                                                             "loss_kernel", "loss_chunk_tokens",
                                                             "activation_checkpointing"})
    for name, default in LATER_FIELDS.items():  # in the key only when set, so older anneals stay reusable
        if section.get(name) == default:
            section.pop(name)
    ref_id = model_identity(ref_path) if ref_path and objective_named(cfg.midtrain.objective).needs_reference \
        else None
    precision = [cfg.model.precision] if cfg.model.dtype != "float32" else []  # float32 trains alike either way
    frozen = [f"frozen-{FROZEN_VERSION}"] if section.get("delta_base") == "frozen" else []  # how its weights are made
    return fingerprint(MIDTRAIN_VERSION, section, model_identity(base_path), ref_id, corpus_key, cfg.seed,
                       cfg.model.dtype, _world_size(), *precision, *frozen)


@dataclass
class AnnealInputs:
    """What the anneal reads, resolved and checked before any training."""

    objective: Objective
    base: str
    reference: str | None  # as asked for (logged), whether or not the objective reads one
    base_path: str
    ref_path: str | None  # the resolved reference, only where the objective reads one
    tokenizer: Any
    corpus: PackedCorpus
    packed: Any
    cache: Any  # the scored reference (`ReferenceCache`) where the objective trains from it, else None
    key: str
    frozen: Any = None  # `FrozenWeights` under midtrain.delta_base: frozen (flywheel/remit/frozen.py), else None


def midtrain(cfg: FlywheelConfig, base: str | None = None, reference: str | None = None,
             run_dir: Path | None = None, logging_steps: int | None = None,
             callbacks: list | None = None) -> MidtrainResult:
    """Anneal `base` on the mixture with `midtrain.objective`, guided by `reference` when it needs one.

    `callbacks` are HF `TrainerCallback`s (progress reporting in flows, fault injection in tests).
    """
    import torch

    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        keep_freed_memory()  # large activations reused, not page-faulted in every step (flywheel/env.py)
    inputs = anneal_inputs(cfg, base or cfg.model.source, reference or cfg.midtrain.reference)
    run_dir = run_dir or cfg.home / "runs" / cfg.name / f"midtrain-{inputs.key}"
    finished = _finished(run_dir, inputs.key)
    if finished is not None:
        return finished
    global_batch, steps = _schedule(cfg)
    trainer = _trainer(cfg, inputs, run_dir, steps, logging_steps or max(1, steps // 20), callbacks)
    resume = last_complete_checkpoint(Path(trainer.args.output_dir))
    trainer.train(resume_from_checkpoint=resume)  # raises NonFiniteError / Preempted: nothing is published
    trainer.check_weights_finite("the mid-trained weights")  # on every rank, before rank 0 publishes
    result = MidtrainResult(run_dir / "model", run_dir, inputs.key, resumed_from=resume)
    if trainer.is_world_process_zero():
        result.metrics = _metrics(cfg, inputs, trainer, resume, global_batch, steps)
        result.html = _weight_page(cfg, inputs.objective, trainer.diagnostics, run_dir, result.metrics)
    _publish(cfg, inputs, trainer, result)
    result.seconds = time.perf_counter() - t0
    return result


def anneal_inputs(cfg: FlywheelConfig, base: str, reference: str | None) -> AnnealInputs:
    """Check what the anneal needs before any work, then resolve it: models, tokenizer, mixture, cache, key."""
    from flywheel.models import check_midtrain_models
    from flywheel.remit.kernels import check_machine
    from flywheel.remit.scoring import score_reference

    mt = cfg.midtrain
    objective = objective_named(mt.objective)
    if objective.needs_reference and reference is None:
        raise FlywheelError(
            f"midtrain.reference: objective '{mt.objective}' needs a reference model; set midtrain.reference "
            "(a local folder or hub id), or run a flywheel round so the registry supplies it"
        )
    check_machine(mt.loss_kernel, objective)  # a fused kernel this machine cannot run: before any scoring
    base_path = model_location(cfg, base)
    guide = reference if objective.needs_reference else None
    # a folder that is not a model, or a seq_len longer than its positions: one sentence, before any work
    check_midtrain_models(cfg, base, guide)
    tok = load_tokenizer(cfg, cfg.model.tokenizer or base)
    ref_path = model_location(cfg, guide) if guide else None
    if ref_path:
        check_same_vocabulary(tok, load_tokenizer(cfg, reference), base, reference)

    # rank 0 builds the mixture while the others wait for it; then every rank scores its own chunks
    corpus = build_mixture(cfg, tok, tokenizer_identity(tok))
    cache = score_reference(cfg, reference).cache if objective.reads_cache(mt.reference_mode) else None
    packed = corpus.load()
    frozen = None
    if cache is not None and objective.follows_weight_settings and mt.delta_base == "frozen":
        from flywheel.remit.frozen import frozen_inputs

        frozen = frozen_inputs(cfg, base, cache, packed)  # the base scored like a reference, then the weights
    key = midtrain_key(cfg, base_path, ref_path, corpus.key)
    return AnnealInputs(objective, base, reference, base_path, ref_path, tok, corpus, packed, cache, key, frozen)


def _finished(run_dir: Path, key: str) -> MidtrainResult | None:
    """The result of an earlier run with the same key, if its model verifies against its manifest."""
    import torch
    from accelerate import PartialState

    final = run_dir / "model"
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # rank 0 verifies (and removes a bad folder) before the others look
        reuse = reuse_verified(final, log) if state.is_main_process else final.exists()
    if not reuse:
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    html = run_dir / "remit-weights.html"
    return MidtrainResult(final, run_dir, key, reused=True, metrics=metrics, html=html if html.exists() else None)


def _schedule(cfg: FlywheelConfig) -> tuple[int, int]:
    """(global batch in rows, optimizer steps) that spend `midtrain.token_budget`."""
    mt = cfg.midtrain
    global_batch = mt.batch_size * mt.grad_accum * _world_size()
    return global_batch, max(1, math.ceil(mt.token_budget / (global_batch * mt.seq_len)))


def _trainer(cfg: FlywheelConfig, inputs: AnnealInputs, run_dir: Path, steps: int, logging_steps: int,
             callbacks: list | None) -> Any:
    """The model, the reference where it runs beside it, the weight diagnostics and the data, as one Trainer."""
    from transformers import default_data_collator

    from flywheel.remit.diagnostics import Diagnostics
    from flywheel.remit.trainer import PackedDataset, ReMiTTrainer

    mt, objective = cfg.midtrain, inputs.objective
    model = load_model(cfg, inputs.base)
    reference_model = None
    if objective.loads_reference(mt.reference_mode):
        reference_model = load_model(cfg, inputs.reference, for_training=False)
    diagnostics = Diagnostics(inputs.tokenizer, model.config.vocab_size) if objective.token_weights else None
    return ReMiTTrainer(
        model=model,
        args=training_arguments(cfg, run_dir / "checkpoints", steps, logging_steps),
        train_dataset=PackedDataset(inputs.packed, inputs.cache, inputs.frozen),
        data_collator=default_data_collator,
        processing_class=inputs.tokenizer,
        objective=mt.objective,
        epsilon=mt.epsilon,
        centring=mt.centring,
        mapping=mt.mapping,
        reference_model=reference_model,
        rho1_keep=mt.rho1_keep,
        kd_temperature=mt.kd_temperature,
        kd_alpha=mt.kd_alpha,
        kd_top_k=mt.kd_top_k,
        loss_kernel=mt.loss_kernel,
        loss_chunk_tokens=mt.loss_chunk_tokens,
        diagnostics=diagnostics,
        callbacks=callbacks,
        stage="midtrain",
        lr_field="midtrain.lr",
        restart_from="the base",
        checkpoint_fraction=mt.checkpoint_fraction,
        checkpoint_minutes=mt.checkpoint_minutes,
        failpoint="midtrain-checkpoint",
        peak_tflops=cfg.launch.for_stage("midtrain").peak_tflops,
    )


def _metrics(cfg: FlywheelConfig, inputs: AnnealInputs, trainer: Any, resume: str | None, global_batch: int,
             steps: int) -> dict:
    """What the anneal did, for metrics.json and the tracker (rank 0)."""
    mt = cfg.midtrain
    return {"steps": steps, "tokens": steps * global_batch * mt.seq_len, "log_history": trainer.state.log_history,
            "objective": mt.objective, "base": inputs.base, "reference": inputs.reference,
            "corpus": inputs.corpus.key, "resumed_from": resume, "world_size": _world_size(),
            "launch": launch_kind(), "global_batch": global_batch, "loss_kernel": trainer.loss_kernel,
            "speed": speed_summary(trainer.state.log_history)}


def _weight_page(cfg: FlywheelConfig, objective: Objective, diagnostics: Any, run_dir: Path,
                 metrics: dict) -> Path | None:
    """The token-weight page of an objective that weighs tokens; its rule goes into `metrics`."""
    if diagnostics is None:
        return None
    from flywheel.remit.frozen import describe_base
    from flywheel.remit.weights import describe

    mt = cfg.midtrain
    rule = describe(mt.epsilon, mt.centring, mt.mapping) + describe_base(mt.delta_base) \
        if objective.follows_weight_settings else objective.weight_rule
    metrics["weight_rule"] = rule
    return diagnostics.write_html(run_dir / "remit-weights.html", f"{cfg.name}: {mt.objective} token weights, {rule}",
                                  mt.epsilon)


def _publish(cfg: FlywheelConfig, inputs: AnnealInputs, trainer: Any, result: MidtrainResult) -> None:
    """Write the model folder with its manifest (every rank: FSDP gathers here), then metrics.json (rank 0)."""
    precision = precision_of(cfg, inputs.base)
    record = {k: v for k, v in result.metrics.items() if k != "log_history"} | {
        "key": inputs.key, "fsdp": bool(trainer.is_fsdp_enabled), "attn_implementation": cfg.model.attn_implementation,
        "compile": cfg.model.compile, "activation_checkpointing": cfg.midtrain.activation_checkpointing} | precision.record()
    publish_trained(trainer, inputs.tokenizer, result.checkpoint, "flywheel-midtrain.json", record, precision.published)
    if trainer.is_world_process_zero():
        write_json(result.run_dir / "metrics.json", result.metrics)
        shutil.rmtree(result.run_dir / "checkpoints", ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
