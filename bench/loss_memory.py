"""Loss memory and speed at a real vocabulary: flywheel's loss kernels against HF's own NTP loss.

What it measures
    A 2-layer Olmo2-shaped model (hidden 256, OLMo-2's vocabulary of 100,352, so the step is almost all
    output layer: the worst case for any scheme that recomputes it) on a batch of 4 x 2,048 random
    tokens, one forward + loss + backward per step:
      hf_ntp          HF's own loss (`model(input_ids, labels=...)`): the baseline of every ratio
      ntp_eager       flywheel's ntp on the full logits (midtrain.loss_kernel: eager)
      remit_eager     ReMiT on the full logits, reference log-probs as from the cache
      ntp_chunked     ntp through the chunked kernel (flywheel/remit/kernels.py)
      remit_chunked   ReMiT through the chunked kernel: the issue's target row
      remit_fused     ReMiT through Liger's fused kernel: only on a CUDA machine with liger-kernel
    The flywheel modes call `ReMiTTrainer.compute_loss`, the code `midtrain` runs.

How
    Each mode runs in its own child process (`--child MODE`), which builds the model and the batch,
    tunes glibc malloc as `midtrain` does on CPU, records its RSS, resets the kernel's peak-RSS mark
    (/proc/self/clear_refs) and runs `--warmup` + `--steps` steps; "peak above start" is VmHWM minus
    that RSS, so the model, the batch and the import baseline are not counted. Step time is the
    median of the timed steps; tokens/s = batch * seq_len / step time. Modes run one after another in
    one invocation, so the ratios are measured side by side. On a GPU, peak memory is
    torch.cuda.max_memory_allocated above the start instead.

Targets (issue 18): remit_chunked peak / hf_ntp peak <= 0.5; remit_chunked tokens/s / hf_ntp >= 0.9.

Usage
    python bench/loss_memory.py               # table (about 6-8 minutes on 2 CPU cores)
    python bench/loss_memory.py --json        # one JSON line on stdout
    python bench/loss_memory.py --quick       # smoke run: vocab 8,192, 2 x 256 tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make `flywheel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("hf_ntp", "ntp_eager", "remit_eager", "ntp_chunked", "remit_chunked", "remit_fused")
BASELINE, TARGET = "hf_ntp", "remit_chunked"
MEMORY_TARGET, SPEED_TARGET = 0.5, 0.9


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(mode: str, vocab: int, batch: int, seq: int, hidden: int, warmup: int, steps: int) -> dict:
    import tempfile

    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM, TrainingArguments

    from flywheel.env import keep_freed_memory
    from flywheel.remit.trainer import ReMiTTrainer

    cuda = torch.cuda.is_available()
    if not cuda:
        keep_freed_memory()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).to(device)
    if cuda:
        model = model.to(torch.bfloat16)
    ids = torch.randint(3, vocab, (batch, seq), device=device)
    inputs = {"input_ids": ids, "labels": ids.clone(),
              "ref_logprobs": -torch.rand(batch, seq, device=device) * 8}  # what the float16 cache supplies
    trainer = None
    if mode != BASELINE:
        objective, kernel = mode.split("_")
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, report_to="none", use_cpu=not cuda, disable_tqdm=True)
            trainer = ReMiTTrainer(model=model, args=args, objective=objective, loss_kernel=kernel)

    def step() -> float:
        t0 = time.perf_counter()
        if trainer is None:
            loss = model(input_ids=ids, labels=inputs["labels"]).loss
        else:
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is this loop's
    times = [step() for _ in range(warmup + steps)][warmup:]
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")) - start
    seconds = statistics.median(times)
    return {"mode": mode, "peak_above_start_gb": peak / 1e9, "step_s": seconds,
            "tokens_per_s": batch * seq / seconds, "device": "cuda" if cuda else "cpu",
            "kernel": trainer.loss_kernel if trainer else "hf"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout")
    ap.add_argument("--quick", action="store_true", help="smoke run: small vocabulary and batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    a = ap.parse_args()
    vocab, batch, seq, hidden = (8192, 2, 256, 64) if a.quick else (100_352, 4, 2048, 256)
    if a.child:
        v, b, s, h = (int(x) for x in a.shape.split(","))
        print(json.dumps(child(a.child, v, b, s, h, a.warmup, a.steps)))
        return

    import torch

    from flywheel.remit.kernels import _liger_problem

    fused_ok = torch.cuda.is_available() and _liger_problem() is None
    rows = {}
    for mode in MODES:
        if mode == "remit_fused" and not fused_ok:
            continue
        print(f"== {mode}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--shape", f"{vocab},{batch},{seq},{hidden}",
                              "--steps", str(a.steps), "--warmup", str(a.warmup)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows[BASELINE]
    for r in rows.values():
        r["memory_ratio"] = r["peak_above_start_gb"] / base["peak_above_start_gb"]
        r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
    target = rows[TARGET]
    verdict = {"memory": target["memory_ratio"] <= MEMORY_TARGET, "speed": target["speed_ratio"] >= SPEED_TARGET}
    shape = {"vocab": vocab, "batch": batch, "seq_len": seq, "hidden": hidden, "steps": a.steps}
    if a.json:
        print(json.dumps({"shape": shape, "rows": rows, "targets_met": verdict,
                          "gpu_row": "measured" if "remit_fused" in rows else "unmeasured (no CUDA + liger-kernel)"}))
        return
    print(f"loss memory at vocab {vocab:,}, {batch} x {seq:,} tokens, hidden {hidden}, "
          f"median of {a.steps} steps ({base['device']})")
    print(f"{'mode':<15}{'kernel':>9}{'peak GB':>10}{'vs HF':>8}{'step s':>9}{'tok/s':>9}{'vs HF':>8}")
    for m, r in rows.items():
        print(f"{m:<15}{r['kernel']:>9}{r['peak_above_start_gb']:>10.2f}{r['memory_ratio']:>8.2f}"
              f"{r['step_s']:>9.2f}{r['tokens_per_s']:>9.0f}{r['speed_ratio']:>8.2f}")
    if "remit_fused" not in rows:
        print("remit_fused: unmeasured (needs a CUDA device and liger-kernel >= 0.8.2)")
    print(f"target {TARGET}: memory <= {MEMORY_TARGET} x HF: {'PASS' if verdict['memory'] else 'MISS'}; "
          f"tokens/s >= {SPEED_TARGET} x HF: {'PASS' if verdict['speed'] else 'MISS'}")


if __name__ == "__main__":
    main()
