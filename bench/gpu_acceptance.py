"""GPU acceptance: one prepared run on a lent GPU machine that checks what a real anneal relies on.

Checks (one function each; each gives one or more rows of the table):
  1 loss kernels agree: fused and chunked against eager, loss and both gradients, ntp / remit / rho1, in
    float32 and bfloat16 (the logic of bench/gpu_loss_check.sh; fused is skipped, not failed, where it cannot run)
  2 speed: tokens/s and MFU (flywheel.perf) of NTP and of a cached-ReMiT anneal step through flywheel's own
    loss (`objective_parts`, the kernel `auto` picks), beside HF's own NTP loss and OLMo-core's published
    44,000 tokens/s per H100 for OLMo-2 1B; reported, never failed on speed (a non-finite loss fails)
  3 peak memory of the ReMiT step per loss kernel (GPU: max_memory_allocated above the start, and at full size
    chunked and fused must stay under eager; CPU: peak RSS above the start, in-process, reported only)
  4 precision policy: a bfloat16 checkpoint loaded by `load_model` trains float32 master weights on the device
    and AdamW keeps float32 moments; compute is bfloat16 autocast on a GPU, float32 on a CPU
  5 GRPO with vLLM generation: reported as skipped (vllm not installed / no GPU / not implemented here)
  6 lm-eval through flywheel.evaluation on the bundled world_mc task (its rows ship with the package, no world
    build needed), a tiny random OLMo-2 with a tokenizer trained on the task's text: runs, scores, seconds

Random weights in OLMo-2 1B's shape (allenai/OLMo-2-0425-1B: hidden 2048, 16 layers of 16 heads, MLP 8192,
vocabulary 100,352, 4,096 positions), random tokens, nothing downloaded. `--tiny` keeps the vocabulary (it is
what stresses the loss kernels) and shrinks the rest. The last stdout line is one JSON object whose "rows" are
the table ({check, measured, target, pass}; pass null: skipped or a reference row); a readable copy goes to
stderr; the exit status is 1 when any row failed, 2 without a CUDA device unless --cpu.

    bash bench/gpu_acceptance.sh                  # on the GPU machine, <= 8 minutes
    bash bench/gpu_acceptance.sh --cpu --tiny     # the CPU smoke run of tests/test_gpu_acceptance.py, <= 90 s
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make `flywheel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.env import apply_offline_env, keep_freed_memory  # noqa: E402
from flywheel.errors import FlywheelError  # noqa: E402

OBJECTIVES = ("ntp", "remit", "rho1")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # max |kernel - eager| / max |eager|, as bench/gpu_loss_check.sh
OLMO_CORE_TOKENS_PER_S = 44_000  # OLMo-core's README: OLMo-2 1B, seq 4096, bf16, per H100 (~40% MFU)
EVAL_TASK, EVAL_LIMIT = "world_mc", 8
CHECK_ERRORS = (RuntimeError, ValueError, OSError, ImportError, FlywheelError)  # CUDA OOM is a RuntimeError


@dataclass(frozen=True)
class Shape:
    """The model and batch of checks 2-3, and the loss problem of check 1 (rows, tokens, hidden; vocab shared)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    warmup: int
    steps: int
    loss_problem: tuple[int, int, int]


OLMO2_1B = Shape(2048, 16, 16, 8192, 100_352, 4096, batch=2, warmup=2, steps=8, loss_problem=(4, 512, 256))
TINY = Shape(64, 2, 4, 256, 100_352, 128, batch=2, warmup=1, steps=3, loss_problem=(2, 64, 32))


@dataclass
class Batch:
    ids: Any  # (B, T) random tokens
    mask: Any  # (B, T-1) valid targets
    ref: Any  # (B, T-1) reference log-probs, as the float16 cache supplies them
    doc_ids: Any  # (B, T-1) documents within a row, as packing gives them


@dataclass
class Bench:
    """Checks 2-3's model in the precision policy, its optimizer, one batch and the compute dtype."""

    model: Any
    optimizer: Any
    batch: Batch
    compute: str


@dataclass
class Run:
    """What the checks share: the shape, the device, a scratch folder and the measurements of checks 2-3."""

    shape: Shape
    device: Any
    peak_tflops: float | None
    tmp: Path
    tiny: bool = False
    bench: Bench | None = None
    measured: dict[tuple[str, str], dict] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def release(self) -> None:
        """Free checks 2-3's model before the checks that build their own."""
        import torch

        self.bench = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def row(check: str, measured: Any, target: str, ok: bool | None) -> dict[str, Any]:
    """One line of the table; `ok` None: skipped, or a reference that is not a check."""
    return {"check": check, "measured": measured, "target": target, "pass": ok}


def sig(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def olmo2_config(shape: Shape, vocab: int | None = None) -> Any:
    """OLMo-2 1B's architecture at `shape`'s size (untied head, rope theta 500,000, 4,096 positions)."""
    from transformers import Olmo2Config

    return Olmo2Config(vocab_size=vocab or shape.vocab, hidden_size=shape.hidden,
                       intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500_000.0,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, attn_implementation="sdpa")


def autocast(device: Any, compute: str) -> Any:
    """The Trainer's mixed precision: autocast to `compute` over float32 masters; off when computing in float32."""
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, compute), enabled=compute != "float32")


# ---------------------------------------------------------------------------------------------------------
# 1: loss kernels agree


def loss_and_grads(run: Run, kernel: str, objective: str, dtype: Any) -> tuple[Any, Any, Any]:
    """Loss, d loss / d states and d loss / d weight of one objective through one kernel, on seeded inputs."""
    import torch
    import torch.nn.functional as F

    from flywheel.remit.kernels import Hidden, objective_parts

    (B, T, H), V, dev = run.shape.loss_problem, run.shape.vocab, run.device
    g = torch.Generator(device=dev)
    s = (torch.randn(B, T, H, device=dev, generator=g.manual_seed(1)) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g.manual_seed(2)) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), device=dev, generator=g.manual_seed(3))
    mask = torch.rand(B, T, device=dev, generator=g.manual_seed(4)) > 0.1
    ref = -torch.rand(B, T, device=dev, generator=g.manual_seed(5)) * 10
    head = F.linear(s, w) if kernel == "eager" else Hidden(s, w)
    # half a row per chunk: ntp splits rows into token ranges, remit takes whole rows, rho1 reads then trains
    parts = objective_parts(kernel, objective, head, targets, mask, ref_logprobs=ref, rho1_keep=0.7,
                            chunk_tokens=max(1, T // 2))
    (parts.loss_sum / mask.sum()).backward()
    return parts.loss_sum.detach().float(), s.grad.float(), w.grad.float()


def fused_problem(run: Run) -> str | None:
    """Why Liger's fused kernel cannot run here, or None."""
    from flywheel.remit.kernels import _liger_problem

    return "; ".join(p for p in ("no CUDA device" if not run.cuda else None, _liger_problem()) if p) or None


def check_loss_agreement(run: Run) -> list[dict[str, Any]]:
    """Chunked and fused against eager: loss, gradient of the states and of the output weight."""
    import torch

    why_not_fused = fused_problem(run)
    kernels = ("chunked",) if why_not_fused else ("chunked", "fused")
    rows = []
    for dtype_name, tol in TOLERANCE.items():
        dtype = getattr(torch, dtype_name)
        for objective in OBJECTIVES:
            eager = loss_and_grads(run, "eager", objective, dtype)
            for kernel in kernels:
                got = loss_and_grads(run, kernel, objective, dtype)
                errs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                        for a, b in zip(got, eager, strict=True)]
                measured = dict(zip(("loss", "grad_states", "grad_weight"), map(sig, errs), strict=True))
                rows.append(row(f"1 {kernel} vs eager: {objective} {dtype_name}", measured,
                                f"max relative error <= {tol:g}", max(errs) <= tol))
    if why_not_fused:
        rows.append(row("1 fused vs eager", f"skipped: {why_not_fused}", "max relative error <= 1e-4 (float32), 2e-2 (bfloat16)", None))
    return rows


# ---------------------------------------------------------------------------------------------------------
# 2-3: speed and memory of anneal steps


def bench(run: Run) -> Bench:
    """OLMo-2 in the precision policy of a bfloat16 config (float32 masters), AdamW, a random batch; built once."""
    import torch
    from transformers import Olmo2ForCausalLM

    from flywheel.config import validate_config
    from flywheel.models import precision_of

    if run.bench is None:
        cfg = validate_config({"name": "acceptance", "home": str(run.tmp / "home"),
                               "model": {"dtype": "bfloat16"}})
        policy = precision_of(cfg)
        torch.manual_seed(0)
        with torch.device(run.device):
            model = Olmo2ForCausalLM(olmo2_config(run.shape)).to(getattr(torch, policy.master)).train()
        B, T, V = run.shape.batch, run.shape.seq, run.shape.vocab
        g = torch.Generator(device=run.device).manual_seed(0)
        ids = torch.randint(0, V, (B, T), device=run.device, generator=g)
        ref = -torch.rand(B, T - 1, device=run.device, generator=g) * 8
        docs = (torch.rand(B, T, device=run.device, generator=g) < 4 / T).cumsum(1)  # ~4 documents a row
        mask = torch.ones(B, T - 1, dtype=torch.bool, device=run.device)
        extra = {"fused": True} if run.cuda else {}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, **extra)
        run.bench = Bench(model, optimizer, Batch(ids, mask, ref, docs[:, 1:]), policy.compute)
    return run.bench


def loss_function(objective: str, kernel: str) -> Any:
    """HF's own NTP loss (kernel "hf"), or flywheel's: the kernel's head, then `objective_parts` as the Trainer."""
    from flywheel.remit.kernels import KERNELS, objective_parts

    def hf(model: Any, b: Batch) -> Any:
        return model(input_ids=b.ids, labels=b.ids).loss

    def flywheel(model: Any, b: Batch) -> Any:
        _, head = KERNELS[kernel].forward(model, b.ids)
        parts = objective_parts(kernel, objective, head, b.ids[:, 1:], b.mask, ref_logprobs=b.ref,
                                doc_ids=b.doc_ids)
        return parts.loss_sum / b.mask.sum()

    return hf if kernel == "hf" else flywheel


def memory_start(run: Run) -> int | None:
    """Bytes in use now, with the peak mark reset to it (GPU: the allocator; CPU: RSS); None where it can't be."""
    import torch

    gc.collect()
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so RSS is what is in use
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return status_bytes("VmRSS")
    except OSError:
        return None


def status_bytes(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def memory_peak_gb(run: Run, start: int | None) -> float | None:
    import torch

    if start is None:
        return None
    peak = torch.cuda.max_memory_allocated() if run.cuda else status_bytes("VmHWM")
    return sig((peak - start) / 1e9)


def measure(run: Run, objective: str, kernel: str) -> dict[str, Any]:
    """Warm-up, then timed anneal steps (forward, loss, backward, clipping, AdamW): flywheel.perf's tokens/s and
    MFU, and the peak memory above the start of the timed steps. Measured once per (objective, kernel)."""
    import torch

    from flywheel.perf import SpeedMeter, device_peak_tflops, model_shape

    if (objective, kernel) in run.measured:
        return run.measured[objective, kernel]
    b, loss_of = bench(run), loss_function(objective, kernel)

    def step() -> Any:
        with autocast(run.device, b.compute):
            loss = loss_of(b.model, b.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.model.parameters(), 1.0)
        b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(run.shape.warmup):
        step()
    start = memory_start(run)
    meter = SpeedMeter(model_shape(b.model), device_peak_tflops(run.peak_tflops), world_size=1)
    for _ in range(run.shape.steps):
        loss = step()
        meter.add(run.shape.batch * run.shape.seq, run.shape.seq)
    loss = float(loss)  # waits for the device
    perf = meter.flush(run.shape.steps)
    run.measured[objective, kernel] = {
        "tokens_per_s": round(perf["perf/tokens_per_s"]), "step_s": sig(perf["perf/step_s"]),
        "mfu": sig(perf.get("perf/mfu")), "peak_gb": memory_peak_gb(run, start), "loss": sig(loss, 5)}
    return run.measured[objective, kernel]


def olmo_core_reference() -> dict[str, Any]:
    """OLMo-core's published speed for OLMo-2 1B, with its MFU counted by flywheel.perf's formula."""
    import torch
    from transformers import Olmo2ForCausalLM

    from flywheel.perf import PEAK_TFLOPS, flops_per_token, model_shape

    with torch.device("meta"):  # the shape only: no memory, no init
        params, layers, hidden = model_shape(Olmo2ForCausalLM(olmo2_config(OLMO2_1B)))
    flops = flops_per_token(params, 0, layers, hidden, 4096)
    mfu = OLMO_CORE_TOKENS_PER_S * flops / (PEAK_TFLOPS["H100"] * 1e12)
    return row("2 reference: OLMo-core, OLMo-2 1B, seq 4096, one H100 (published)",
               {"tokens_per_s": OLMO_CORE_TOKENS_PER_S, "mfu": sig(mfu)}, "a reference, not a check", None)


def check_speed(run: Run) -> list[dict[str, Any]]:
    """Tokens/s and MFU of NTP and of a cached-ReMiT step through flywheel's loss, beside HF NTP and OLMo-core."""
    from flywheel.remit.kernels import resolve

    target = ("reported, no pass/fail on speed (only a non-finite loss fails); MFU needs a known peak "
              "(flywheel.perf.PEAK_TFLOPS or --peak-tflops)")
    hf = measure(run, "ntp", "hf")
    rows = [row(f"2 NTP, HF's own loss, seq {run.shape.seq}", hf, target, math.isfinite(hf["loss"]))]
    for objective, label in (("ntp", "NTP"), ("remit", "cached ReMiT anneal step")):
        kernel = resolve("auto", objective, bench(run).model)
        m = measure(run, objective, kernel)
        measured = m | {"vs_hf": sig(m["tokens_per_s"] / hf["tokens_per_s"])}
        rows.append(row(f"2 {label}, flywheel's loss ({kernel} kernel), seq {run.shape.seq}", measured, target,
                        math.isfinite(m["loss"])))
    return [*rows, olmo_core_reference()]


def check_memory(run: Run) -> list[dict[str, Any]]:
    """Peak memory of the ReMiT step per loss kernel (and of HF's NTP for scale)."""
    what = "GB allocated above the start (torch.cuda.max_memory_allocated)" if run.cuda else \
        "GB of RSS above the start (in-process, indicative; n/a where /proc cannot say)"
    hf = measure(run, "ntp", "hf")
    rows = [row("3 peak memory: NTP, HF's own loss", {"peak_gb": hf["peak_gb"]}, f"reported: {what}", True)]
    eager = measure(run, "remit", "eager")
    rows.append(row("3 peak memory: ReMiT, eager kernel", {"peak_gb": eager["peak_gb"]}, f"reported: {what}", True))
    why_not_fused = fused_problem(run)
    for kernel in ("chunked", "fused"):
        if kernel == "fused" and why_not_fused:
            rows.append(row("3 peak memory: ReMiT, fused kernel", f"skipped: {why_not_fused}", "below eager's", None))
            continue
        peak = measure(run, "remit", kernel)["peak_gb"]
        if run.cuda and not run.tiny:  # the point of the kernel: no (B, T, V) logits held for backward
            rows.append(row(f"3 peak memory: ReMiT, {kernel} kernel", {"peak_gb": peak, "vs_eager":
                            sig(peak / eager["peak_gb"])}, f"{what}, below eager's", peak < eager["peak_gb"]))
        else:
            rows.append(row(f"3 peak memory: ReMiT, {kernel} kernel", {"peak_gb": peak}, f"reported: {what}", True))
    return rows


# ---------------------------------------------------------------------------------------------------------
# 4-6


def check_precision(run: Run) -> list[dict[str, Any]]:
    """A bfloat16 checkpoint through `load_model`: float32 masters on the device, float32 AdamW moments."""
    import torch
    from transformers import Olmo2ForCausalLM

    from flywheel.config import validate_config
    from flywheel.models import load_model, precision_of

    folder = run.tmp / "bf16-checkpoint"
    torch.manual_seed(0)
    Olmo2ForCausalLM(olmo2_config(TINY, vocab=1024)).to(torch.bfloat16).save_pretrained(folder)
    stored = json.loads((folder / "config.json").read_text()).get("dtype")
    cfg = validate_config({"name": "acceptance", "home": str(run.tmp / "home"),
                           "model": {"source": str(folder), "dtype": "bfloat16", "precision": "mixed"}})
    policy = precision_of(cfg, str(folder))
    model = load_model(cfg, str(folder)).to(run.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trained})
    devices = sorted({p.device.type for p in trained})
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(0, 1024, (2, 32), device=run.device)
    with autocast(run.device, policy.compute):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    moments = sorted({str(s["exp_avg"].dtype).removeprefix("torch.") for s in optimizer.state.values()})
    compute = "bfloat16" if run.cuda else "float32"
    logits = str(out.logits.dtype).removeprefix("torch.")
    return [
        row("4 checkpoint as saved", stored, "bfloat16 (what load_model must upcast)", stored == "bfloat16"),
        row(f"4 trainable parameters after load_model (model.dtype bfloat16, mixed), on {run.device.type}",
            {"dtypes": dtypes, "devices": devices}, f"float32 only, on {run.device.type}",
            dtypes == ["float32"] and devices == [run.device.type]),
        row("4 AdamW exp_avg after one step", moments, "float32 only", moments == ["float32"]),
        row("4 compute dtype (precision_of, and the logits under its autocast)", {"policy": policy.compute,
            "logits": logits}, compute, policy.compute == compute and logits == compute),
    ]


def check_grpo_vllm(run: Run) -> list[dict[str, Any]]:
    """Two GRPO steps generating with vLLM: not implemented here; the row says why it did not run."""
    why = ("vllm not installed" if find_spec("vllm") is None else "no GPU" if not run.cuda
           else "two GRPO steps with vLLM are not implemented in this script")
    return [row("5 GRPO with vLLM generation, 2 steps", f"skipped: {why}", "2 steps with finite loss", None)]


def check_lm_eval(run: Run) -> list[dict[str, Any]]:
    """flywheel.evaluation (lm-eval) of a tiny random OLMo-2 on the bundled world_mc task, on this device."""
    from flywheel.config import validate_config
    from flywheel.data.io import read_jsonl
    from flywheel.evaluation.registry import TASKS_DIR
    from flywheel.evaluation.run import evaluate
    from flywheel.evaluation.world_data import EVAL_FILE, FEWSHOT_FILE
    from flywheel.world.model import tiny_random_model
    from flywheel.world.tokenizer import save_tokenizer, train_tokenizer

    docs = read_jsonl(TASKS_DIR / EVAL_FILE) + read_jsonl(TASKS_DIR / FEWSHOT_FILE)
    tok = train_tokenizer([f"{d['question']}\n{c}" for d in docs for c in d["choices"]])
    folder = run.tmp / "eval-model"
    tiny_random_model("olmo2", tok).save_pretrained(folder)
    save_tokenizer(tok, folder)
    cfg = validate_config({"name": "acceptance", "home": str(run.tmp / "home"),
                           "model": {"source": str(folder), "dtype": "bfloat16" if run.cuda else "float32"},
                           "evaluation": {"tasks": [EVAL_TASK], "limit": EVAL_LIMIT, "batch_size": 8}})
    t0 = time.perf_counter()
    result = evaluate(cfg, folder, kind="base", out_dir=run.tmp / "eval")
    seconds = time.perf_counter() - t0
    acc = result.metrics.get(f"eval/{EVAL_TASK}/acc")
    scored = sum(1 for line in result.samples_path.read_text().splitlines() if line.strip())
    ok = acc is not None and 0.0 <= acc <= 1.0 and scored == EVAL_LIMIT
    return [row(f"6 lm-eval {EVAL_TASK} (3-shot, {EVAL_LIMIT} documents), tiny random OLMo-2, {run.device.type}",
                {"seconds": sig(seconds), "acc": acc, "documents_scored": scored},
                f"runs and scores all {EVAL_LIMIT} documents (no accuracy target: random weights)", ok)]


# ---------------------------------------------------------------------------------------------------------
# the run


CHECKS = ((1, "loss kernels agree", check_loss_agreement), (2, "speed", check_speed),
          (3, "peak memory", check_memory), (4, "precision policy", check_precision),
          (5, "GRPO with vLLM", check_grpo_vllm), (6, "lm-eval", check_lm_eval))


def run_checks(run: Run, budget: float, t0: float) -> list[dict[str, Any]]:
    """Every check in order while the budget lasts; a check that raises, or that the budget leaves out, fails."""
    rows: list[dict[str, Any]] = []
    for number, title, check in CHECKS:
        spent = time.perf_counter() - t0
        print(f"== {number} {title} ({spent:.0f} s spent of {budget:.0f})", file=sys.stderr, flush=True)
        if spent > budget:
            rows.append(row(f"{number} {title}", f"not run: the {budget:.0f} s budget was spent", "runs", False))
            continue
        try:
            rows += check(run)
        except CHECK_ERRORS as exc:
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            rows.append(row(f"{number} {title}", f"error: {type(exc).__name__}: {first}", "runs", False))
        if number == 3:
            run.release()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The table for a person, on stderr (stdout's last line is the JSON)."""
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[r["pass"]]
        print(f"{verdict}  {r['check']}\n      measured {json.dumps(r['measured'])}; target {r['target']}",
              file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (CUDA devices are hidden)")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, seq 128, a few steps; vocabulary kept")
    p.add_argument("--budget", type=float,
                   help="seconds for all checks; a check not started by then fails (default 480; 300 with --tiny)")
    p.add_argument("--batch", type=int, help="rows per step in checks 2-3 (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on a CPU (default 1: two threads on two busy cores run at half the speed)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU where flywheel has none")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch loads: policy, kernels and lm-eval all see a CPU
    apply_offline_env()
    import torch

    t0 = time.perf_counter()
    shape = replace(TINY if args.tiny else OLMO2_1B, **({"batch": args.batch} if args.batch else {}))
    budget = args.budget if args.budget is not None else (300.0 if args.tiny else 480.0)  # a guard: --tiny takes ~1/4 of it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.cpu:
        rows = [row("0 device", "no CUDA device is visible", "a CUDA device (or --cpu)", False)]
    else:
        if device.type == "cpu":  # as `midtrain` runs on a CPU: large buffers reused, not page-faulted every step
            torch.set_num_threads(args.threads)
            keep_freed_memory()
        with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as tmp:
            rows = run_checks(Run(shape, device, args.peak_tflops, Path(tmp), args.tiny), budget, t0)
    print_table(rows)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"device": name, "torch": torch.__version__, "shape": asdict(shape), "tiny": args.tiny,
                      "seconds": sig(time.perf_counter() - t0), "budget_s": budget, "rows": rows}), flush=True)
    if any(r["pass"] is False for r in rows):
        return 2 if rows[0]["check"] == "0 device" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
