"""How fast a training stage runs: tokens/s, step time, model FLOPs utilisation and peak memory.

Counted the way torchtitan and OLMo-core count them, so the anneal can be set beside their published
figures (OLMo-2 1B: ~44k tokens/s per H100, ~40% MFU):

    FLOPs per token = 6 * N + 12 * L * d * T        (forward and backward)

N: the parameters without the input embedding (a lookup, not a matmul; a tied output head is counted
once, as the matmul it is), L layers, d the hidden size, T the sequence length (the attention scores and
their weighted sum). MFU = tokens/s per device x FLOPs per token / the device's dense bf16 peak, from
PEAK_TFLOPS by the device's name or `launch.peak_tflops`; on a CPU without a declared peak, no MFU.

`SpeedMeter` is fed each micro-batch's tokens and read at every log line: the metrics go to the
Trainer's log history (perf/...), and from there to the stage's MLflow run and metrics.json.
"""

from __future__ import annotations

import time
from typing import Any

# dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0, "A6000": 155.0}


def device_peak_tflops(declared: float | None = None) -> float | None:
    """The device's dense bf16 peak: the declared value, else the table's entry for this GPU's name."""
    import torch

    if declared is not None:
        return declared
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(n_params: int, embedding_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder: 6 x non-embedding parameters + 12 x layers x hidden x seq_len."""
    return 6.0 * (n_params - embedding_params) + 12.0 * layers * hidden * seq_len


def model_shape(model: Any) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden size) of a loaded causal LM; a tied output head counts once,
    as the matmul it is."""
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    conf = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layer", 0)
    hidden = getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", 0)
    return params - (0 if tied else embedding), layers, hidden


class SpeedMeter:
    """Tokens, FLOPs and wall time between two log lines, turned into the perf/... metrics."""

    def __init__(self, shape: tuple[int, int, int], peak_tflops: float | None, world_size: int) -> None:
        self.shape, self.peak, self.world = shape, peak_tflops, max(1, world_size)
        self.tokens, self.flops, self.t0, self.step0 = 0, 0.0, time.perf_counter(), 0

    def add(self, tokens: int, seq_len: int) -> None:
        """One micro-batch on this process: its tokens, in sequences of `seq_len`."""
        params, layers, hidden = self.shape
        self.tokens += tokens
        self.flops += tokens * flops_per_token(params, 0, layers, hidden, seq_len)

    def flush(self, step: int) -> dict[str, float]:
        """The metrics since the last flush: tokens/s (all devices, per device), seconds per step, MFU, memory."""
        import torch

        seconds = max(1e-9, time.perf_counter() - self.t0)
        per_device = self.tokens / seconds
        out = {"perf/tokens_per_s": per_device * self.world, "perf/tokens_per_s_per_device": per_device,
               "perf/step_s": seconds / max(1, step - self.step0)}
        if self.peak:
            out["perf/mfu"] = self.flops / seconds / (self.peak * 1e12)
        if torch.cuda.is_available():
            out["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        self.tokens, self.flops, self.t0, self.step0 = 0, 0.0, time.perf_counter(), step
        return out


def batch_tokens(inputs: Any) -> tuple[int, int]:
    """(tokens, sequence length) of one micro-batch: its token-id tensors (input_ids; prompt and completion ids
    for GRPO, each id tensor counted once), padding included as the model computes it."""
    if not hasattr(inputs, "items"):  # GRPO's training_step gets the prompts, a list of rows
        return 0, 0
    ids = [v for k, v in inputs.items() if k.endswith("ids") and "doc" not in k and hasattr(v, "dim") and v.dim() == 2]
    return sum(int(v.numel()) for v in ids), sum(int(v.shape[-1]) for v in ids)


class SpeedMonitor:
    """Mixin for a Trainer (first in the bases): every training log line gets the perf/... metrics.

    Extra keyword argument: `peak_tflops` (launch.peak_tflops; None: the table's entry for this GPU).
    """

    def __init__(self, *args: Any, peak_tflops: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.speed = SpeedMeter(model_shape(self.model), device_peak_tflops(peak_tflops), self.args.world_size)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        tokens, seq_len = batch_tokens(inputs)  # GRPO's batch is prompts here: counted in compute_loss instead
        self._uncounted = tokens == 0
        if tokens:
            self.speed.add(tokens, seq_len)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_uncounted", False) and model.training:
            self.speed.add(*batch_tokens(inputs))
            self._uncounted = False
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.speed.flush(self.state.global_step))
        super().log(logs, start_time)


def speed_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """The stage's speed for its result line and metrics.json: the mean of its perf/... log lines after the
    first (the first holds start-up: compilation, allocator warm-up)."""
    rows = [h for h in history if "perf/tokens_per_s" in h]
    rows = rows[1:] or rows
    keys = {k for h in rows for k in h if k.startswith("perf/")}
    return {k.removeprefix("perf/"): sum(h[k] for h in rows if k in h) / sum(1 for h in rows if k in h)
            for k in sorted(keys)}
