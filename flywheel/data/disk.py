"""What a run will write, estimated before any work, against the free space where it goes.

`flywheel prepare-data CONFIG --plan` prints it; a build refuses to start when a file system has less
free space than its share (one sentence with both numbers; `--force` builds anyway). Counted:

- the token store of every source still to build: estimated tokens x bytes per token (2 for a vocabulary
  up to 65,536, else 4) + 8 bytes per document end;
- the fetched hub files not yet in the Hugging Face cache (in the cache's file system);
- the reference cache: midtrain.token_budget x bytes of midtrain.cache_dtype, when the objective reads one;
- the checkpoints: parameters x (weight bytes + 8 bytes of AdamW state) x the 2 the Trainer keeps, plus the
  final weights, for the anneal and each post-training stage.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig

CHECKPOINTS_KEPT = 2  # the Trainer's save_total_limit in midtrain and post-training
OPTIMIZER_BYTES = 8  # AdamW's two float32 moments per parameter
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class SourceNeed:
    """One source of the mixture, before it is built: what it reads and what it will write."""

    index: int
    source: str
    how: str  # "local", "fetch", "stream" or "built"
    files: int | None  # None: a stream
    bytes: int | None  # on disk or on the hub, compressed as they are
    tokens: int | None  # estimated from a sample (a stream: its cap)
    tokens_per_second: float | None  # the tokenizer on the sample, one process
    store_bytes: int = 0
    fetch_bytes: int = 0  # still to download


@dataclass
class DataPlan:
    """Every source's need, the reference cache and the checkpoints, and where each lands."""

    home: Path
    hf_cache: Path
    workers: int
    sources: list[SourceNeed]
    cache_bytes: int
    checkpoint_bytes: int | None  # None: the model's size could not be read
    notes: list[str] = field(default_factory=list)

    def seconds(self, need: SourceNeed) -> float | None:
        """Estimated build time of one source with `workers` processes (from the sample's tokenizer speed)."""
        if not need.tokens or not need.tokens_per_second or need.how == "built":
            return None
        parallel = min(self.workers, need.files or 1) if need.how != "stream" else 1
        return need.tokens / (need.tokens_per_second * parallel)

    def by_file_system(self) -> dict[Path, int]:
        """Bytes needed per file system (keyed by an existing folder on it): home, and the HF cache if apart."""
        home_bytes = sum(s.store_bytes for s in self.sources) + self.cache_bytes + (self.checkpoint_bytes or 0)
        fetch = sum(s.fetch_bytes for s in self.sources)
        home, cache = _existing(self.home), _existing(self.hf_cache)
        if os.stat(home).st_dev == os.stat(cache).st_dev:
            return {home: home_bytes + fetch}
        return {home: home_bytes, **({cache: fetch} if fetch else {})}


def _existing(path: Path) -> Path:
    """The nearest existing folder at or above `path` (its file system is where `path` will be)."""
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def store_bytes(tokens: int, vocab: int, tokens_per_document: float) -> int:
    """A store's bytes on disk: its tokens at 2 or 4 bytes, and 8 bytes per document end."""
    return tokens * (2 if vocab <= 65536 else 4) + int(8 * tokens / max(1.0, tokens_per_document))


def reference_cache_bytes(cfg: FlywheelConfig) -> int:
    """The reference cache's bytes, when the objective reads one (cached ReMiT, Rho-1)."""
    from flywheel.remit.catalog import objective_named

    mt = cfg.midtrain
    if not objective_named(mt.objective).reads_cache(mt.reference_mode):
        return 0
    return mt.token_budget * (2 if mt.cache_dtype == "float16" else 4)


def model_parameters(cfg: FlywheelConfig) -> int | None:
    """The model's parameter count from its config alone (a meta-device model: no weights read); None if
    its config cannot be read here."""
    from flywheel.refs import model_location

    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(model_location(cfg, cfg.model.source), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError, KeyError, FlywheelError):
        return None


def checkpoint_bytes(cfg: FlywheelConfig, params: int | None) -> int | None:
    """The anneal's and every post-training stage's checkpoints: kept ones with optimizer state, and the final."""
    if params is None:
        return None
    weights = WEIGHT_BYTES.get(cfg.model.dtype or "float32", 4)
    per_stage = params * ((weights + OPTIMIZER_BYTES) * CHECKPOINTS_KEPT + weights)
    return per_stage * (1 + len(cfg.posttrain.stages))


def check_space(plan: DataPlan, force: bool = False) -> None:
    """Refuse (one sentence, both numbers, the way out) when a file system has less free space than needed."""
    for folder, needed in plan.by_file_system().items():
        free = shutil.disk_usage(folder).free
        if needed > free and not force:
            raise FlywheelError(f"{folder}: the run will write about {size_text(needed)} here (token store, fetched "
                                f"files, reference cache, checkpoints) but {size_text(free)} is free; free space or "
                                "point home elsewhere (`flywheel prepare-data CONFIG --plan` itemises it; "
                                "--force builds anyway)")


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"

