"""`ReMiTTrainer`: the HF Trainer with ReMiT (or a baseline) as its loss, and flywheel's training safety.

Checkpointing, logging, resume, gradient accumulation and accelerate/DDP/FSDP all stay the
Trainer's; `TrainingSafety` (flywheel/safety.py) adds the NaN/inf guard, the checkpoint cadence and
save-and-stop on SIGTERM, the same mixin the post-training stages use. The loss is the global mean over valid target tokens (the paper's Eq. 6): the
Trainer counts the valid labels of every micro-batch in the optimizer step across devices
(`num_items_in_batch`), we divide the weighted sum by that count, and scale by the number
of processes because DDP averages gradients. `loss_kernel` (flywheel/remit/kernels.py) decides
whether the loss starts from the model's logits (eager) or from its last hidden states in chunks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Trainer

from flywheel.data.packing import Packed
from flywheel.perf import SpeedMonitor
from flywheel.remit import kernels
from flywheel.remit.catalog import objective_named
from flywheel.remit.diagnostics import Diagnostics
from flywheel.remit.frozen import FrozenWeights
from flywheel.remit.objectives import LossContext
from flywheel.remit.scoring import ReferenceCache, reference_logprobs
from flywheel.safety import TrainingSafety


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows as Trainer inputs; with a cache, each row carries its reference log-probs.

    With `frozen` (midtrain.delta_base: frozen) a row also carries its stored ReMiT weights and the
    pre-anneal base's log-probs they were computed from.
    """

    def __init__(self, packed: Packed, cache: ReferenceCache | None = None, frozen: FrozenWeights | None = None):
        self.packed, self.cache, self.frozen = packed, cache, frozen

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.packed.input_ids[i], dtype=np.int64))
        item = {
            "input_ids": ids,
            "labels": ids.clone(),
            "doc_ids": torch.from_numpy(np.asarray(self.packed.doc_ids[i], dtype=np.int64)),
        }
        if self.cache is not None:
            item["ref_logprobs"] = torch.from_numpy(np.asarray(self.cache.rows(i), dtype=np.float32))
        if self.frozen is not None:
            # a copy: the stored float32 rows are a read-only memory map, which torch must not alias
            item["frozen_weights"] = torch.from_numpy(np.array(self.frozen.weights.rows(i), dtype=np.float32))
            item["base_logprobs"] = torch.from_numpy(np.asarray(self.frozen.base.rows(i), dtype=np.float32))
        return item


class ReMiTTrainer(SpeedMonitor, TrainingSafety, Trainer):
    """Trainer whose `compute_loss` is one of ntp / remit / kd / rho1 (safety keywords: see `TrainingSafety`)."""

    loss_is_scaled_for_ga = True  # our loss is already divided by the step's global token count

    def __init__(
        self,
        *args: Any,
        objective: str = "remit",
        epsilon: float | None = 0.2,
        centring: str = "mean",
        mapping: str = "sigmoid",
        reference_model: torch.nn.Module | None = None,
        rho1_keep: float = 0.8,
        kd_temperature: float = 1.0,
        kd_alpha: float = 0.5,
        kd_top_k: int | None = None,
        loss_kernel: str = "auto",
        loss_chunk_tokens: int = 2048,
        diagnostics: Diagnostics | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.spec = objective_named(objective)  # the catalog entry: what the objective reads and logs
        self.objective = objective
        self.epsilon = epsilon
        self.centring, self.mapping = centring, mapping
        self.rho1_keep = rho1_keep
        self.kd = {"temperature": kd_temperature, "alpha": kd_alpha, "top_k": kd_top_k}
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)
            reference_model.to(self.args.device)
        self.diagnostics = diagnostics
        self.loss_kernel = kernels.resolve(loss_kernel, objective, self.model, reference_model)  # eager/chunked/fused
        self.loss_chunk_tokens = loss_chunk_tokens
        # We divide by the valid-token count ourselves, so ask the Trainer to count labels for every step.
        self.model_accepts_loss_kwargs = True

    def _reference_logprobs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cached (from the batch) or online (frozen reference forward, no grad), aligned to inputs."""
        if "ref_logprobs" in inputs:
            return inputs["ref_logprobs"]
        if self.reference_model is None:
            raise RuntimeError("objective needs reference log-probs: pass a cache or a reference_model")
        with torch.no_grad():
            return reference_logprobs(self.reference_model, inputs["input_ids"], self.loss_kernel,
                                      self.loss_chunk_tokens)

    def _reference_head(self, input_ids: torch.Tensor) -> torch.Tensor | kernels.Hidden:
        """The reference's logits (eager) or its `Hidden`, for an objective that reads its whole distribution."""
        if self.reference_model is None:
            raise RuntimeError(f"{self.spec.name} needs an online reference model")
        with torch.no_grad():
            return kernels.KERNELS[self.loss_kernel].forward(self.reference_model, input_ids)[1]

    def _loss_context(self, inputs: dict[str, torch.Tensor]) -> LossContext:
        """What the objective reads beside the model (the reference, the documents) and its settings."""
        ref_logprobs = ref_head = None
        if self.spec.uses_ref_logprobs:
            ref_logprobs = self._reference_logprobs(inputs)[:, 1:]
        elif self.spec.uses_ref_distribution:  # online only (the config enforces it)
            ref_head = self._reference_head(inputs["input_ids"])
        doc_ids = inputs["doc_ids"][:, 1:] if "doc_ids" in inputs else None
        frozen = (inputs["frozen_weights"][:, 1:], inputs["base_logprobs"][:, 1:]) if "frozen_weights" in inputs \
            else None  # midtrain.delta_base: frozen, for an objective that weighs by the ReMiT rule
        return LossContext(ref_logprobs, ref_head, doc_ids, self.epsilon, self.centring, self.mapping,
                           self.rho1_keep, self.kd, self.loss_chunk_tokens, frozen)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        targets = inputs["labels"][:, 1:]
        mask = targets != -100
        kernel = kernels.KERNELS[self.loss_kernel]
        out, head = kernel.forward(model, inputs["input_ids"], inputs.get("attention_mask"),
                                   unwrapped=self.accelerator.unwrap_model(model) if kernel.from_hidden else None)
        parts = kernel.parts(self.spec, head, targets, mask, self._loss_context(inputs))

        count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = parts.loss_sum / count
        if self.accelerator.num_processes > 1 and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it to get the global mean
        if self.diagnostics is not None and model.training:
            self.diagnostics.update(targets, mask, parts, self.epsilon if self.spec.follows_weight_settings else None)
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the weight diagnostics accumulated since the last log line to every training log."""
        if self.diagnostics is not None and "loss" in logs:
            logs.update(self.diagnostics.flush())
        super().log(logs, start_time)
