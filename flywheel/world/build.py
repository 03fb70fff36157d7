"""`flywheel world build`: corpora, tokenizer and a pre-trained (pre-anneal) base, all offline.

Layout under `<home>/world/`:
    s<seed>-<data hash>/corpora/*.jsonl     every corpus (see corpora.py)
    s<seed>-<data hash>/tokenizer/          the HF fast tokenizer
    s<seed>-<data hash>/base-<size>-<hash>/ the pre-anneal base: a plain HF folder (safetensors)
Each folder is built under a temporary name and renamed when complete, so a rerun with the
same seed and settings reuses it and an interrupted build leaves nothing half-written. The base
carries a flywheel-manifest.json and is reused only when it verifies against it (else rebuilt).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.checkpoints import reuse_verified, write_manifest
from flywheel.config import FlywheelConfig
from flywheel.data.io import atomic_dir, read_jsonl, write_json

# The world's address book lives in flywheel/refs.py (the layers below the round resolve world: there);
# these names stay importable from here.
from flywheel.refs import WORLD_VERSION, WorldPaths, world_data_fields, world_paths, world_train_fields
from flywheel.refs import world_size as world_size

log = logging.getLogger("flywheel.world")


@dataclass
class BuildReport:
    """What a world build did, for the CLI's summary."""

    paths: WorldPaths
    reused_corpora: bool
    reused_base: bool
    counts: dict[str, int] = field(default_factory=dict)
    params: int = 0
    seconds: float = 0.0
    ladder: dict[int, float] = field(default_factory=dict)
    heldout_loss: float | None = None


def _pretrain(paths: WorldPaths, cfg: FlywheelConfig, out: Path) -> tuple[int, float]:
    """Pre-train a fresh model on the pre-training corpus with the HF Trainer; constant lr (no anneal)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from flywheel.data.packing import pack, tokenize_documents
    from flywheel.world.model import new_model

    w = cfg.world
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    docs = [r["text"] for r in read_jsonl(paths.corpus("pretrain"))]
    packed = pack(tokenize_documents(docs, tok), w.seq_len)
    rows = torch.from_numpy(packed.input_ids.astype("int64"))
    steps = max(1, math.ceil(w.pretrain_tokens / (w.pretrain_batch_size * w.seq_len)))

    model = new_model(paths.size, tok, seed=cfg.seed)
    args = TrainingArguments(
        output_dir=str(out / ".trainer"),
        max_steps=steps,
        per_device_train_batch_size=w.pretrain_batch_size,
        learning_rate=w.pretrain_lr,
        lr_scheduler_type="constant_with_warmup",  # the anneal (decay) is mid-training's job
        warmup_steps=min(20, steps // 10),
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": r} for r in rows],
        data_collator=lambda batch: {
            "input_ids": torch.stack([b["input_ids"] for b in batch]),
            "labels": torch.stack([b["input_ids"] for b in batch]),
        },
    )
    trainer.train()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    shutil.rmtree(out / ".trainer", ignore_errors=True)
    return sum(p.numel() for p in model.parameters()), trainer.state.log_history[-1].get("train_loss", float("nan"))


def heldout_loss(model_dir: Path | None, paths: WorldPaths, limit: int = 200, seed: int = 0) -> float:
    """Mean next-token loss on held-out pre-training text; `model_dir=None` scores a fresh model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.data.packing import pack, tokenize_documents
    from flywheel.world.model import new_model

    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir) if model_dir else new_model(paths.size, tok, seed=seed)
    docs = [r["text"] for r in read_jsonl(paths.corpus("pretrain_heldout"))][:limit]
    ids = torch.from_numpy(pack(tokenize_documents(docs, tok), 128).input_ids.astype("int64"))
    model.eval()
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


def build_world(cfg: FlywheelConfig, size: str | None = None, ladder: bool = True) -> BuildReport:
    """Build (or reuse) the corpora, tokenizer and pre-anneal base that `cfg` names."""
    from flywheel.world.corpora import write_corpora

    t0 = time.perf_counter()
    paths = world_paths(cfg, size)
    reused_corpora = paths.corpora.exists() and paths.tokenizer.exists()
    if not reused_corpora:
        from flywheel.world.tokenizer import save_tokenizer, train_tokenizer

        with atomic_dir(paths.root) as tmp:
            counts = write_corpora(tmp / "corpora", cfg.world, cfg.seed)
            texts = [r["text"] for name in ("pretrain", "midtrain") for r in read_jsonl(tmp / "corpora" / f"{name}.jsonl")]
            texts += [r["prompt"] + "\n" + r["completion"] for r in read_jsonl(tmp / "corpora" / "sft.jsonl")]
            save_tokenizer(train_tokenizer(texts, max_length=max(512, cfg.world.seq_len)), tmp / "tokenizer")
            write_json(tmp / "world.json", {"version": WORLD_VERSION, "seed": cfg.seed, "counts": counts,
                                            "settings": world_data_fields(cfg.world)})
    counts = json.loads((paths.root / "world.json").read_text())["counts"]

    reused_base = reuse_verified(paths.base, log)  # a truncated or hand-edited base is rebuilt, not trained on
    params = 0
    if not reused_base:
        with atomic_dir(paths.base) as tmp:
            params, train_loss = _pretrain(paths, cfg, tmp)
            write_json(tmp / "flywheel-base.json", {"size": paths.size, "seed": cfg.seed, "train_loss": train_loss,
                                                    "settings": world_train_fields(cfg.world), "params": params})
            write_manifest(tmp)  # last: reuse verifies against it
    report = BuildReport(paths, reused_corpora, reused_base, counts)
    report.params = json.loads((paths.base / "flywheel-base.json").read_text())["params"]
    if ladder:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from flywheel.world.score import greedy_accuracy

        model = AutoModelForCausalLM.from_pretrained(paths.base)
        tok = AutoTokenizer.from_pretrained(paths.base)
        report.ladder = greedy_accuracy(model, tok, read_jsonl(paths.corpus("eval")))
        report.heldout_loss = heldout_loss(paths.base, paths)
    report.seconds = time.perf_counter() - t0
    return report
