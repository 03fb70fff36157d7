"""ReMiT throughput: training tokens/s of every objective, reference-scoring tokens/s, and peak memory.

What it measures
    Same model size, batch and sequence length for every mode:
      ntp            plain next-token prediction (the baseline every ratio is taken against)
      remit_cached   ReMiT reading reference log-probs from a float16 cache (memory-mapped .npy)
      remit_online   ReMiT with a frozen same-size reference model run forward on every batch
      rho1_cached    Rho-1 selective LM from the same cache
      kd_online      knowledge distillation from the online reference (needs its whole distribution)
      scoring        the reference forward-only over packed rows, as `score_reference` does it
    Training uses the real `ReMiTTrainer` + `PackedDataset` + `default_data_collator` with the
    TrainingArguments `midtrain` uses (AdamW, grad clipping, linear decay; diagnostics on for
    remit/rho1, as in `midtrain`; `--no-diagnostics` turns them off).

How
    The parent trains a tokenizer on synthetic problems of the tiny world, packs real tokenized
    text into `batch * steps` rows, scores them once with the reference (seed 1) into a float16
    cache, and writes everything into a temporary folder. Each mode then runs in its own child
    process (`--child MODE`), so `ru_maxrss` at the end is that mode's peak RSS. The parent
    launches the children round-robin `--repeats` times (rotating the order each round), so drift
    from heat or other load hits every mode alike, and reports medians over the repeats.

    A training step is timed from one `on_step_end` to the next, so it includes fetching and
    collating the batch (where the cache is read), forward, loss, backward and the optimizer
    step. The first `--warmup` steps are dropped; a child reports the median of the rest. Scoring
    times `reference_logprobs` + clamp + float16 conversion per batch of `--score-batch` rows
    under `torch.inference_mode()`, after one warmup batch. Tokens/s = rows * seq_len / seconds.

    Peak RSS includes the Python/torch/transformers baseline every process pays, so the memory
    ratio is what a real run sees, not the increment of the mode alone (both are in `--json`).

Usage
    python bench/remit_throughput.py            # table (about 5 minutes on 2 CPU cores)
    python bench/remit_throughput.py --json     # one JSON object on stdout
    python bench/remit_throughput.py --quick    # smoke test: nano model, 2 repeats, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make `flywheel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.env import apply_offline_env  # noqa: E402

apply_offline_env()

TRAIN_MODES: dict[str, tuple[str, str | None]] = {  # mode -> (objective, reference: None / cached / online)
    "ntp": ("ntp", None),
    "remit_cached": ("remit", "cached"),
    "remit_online": ("remit", "online"),
    "rho1_cached": ("rho1", "cached"),
    "kd_online": ("kd", "online"),
}
MODES = (*TRAIN_MODES, "scoring")
MODEL_SEED, REFERENCE_SEED = 0, 1

# ratio name -> (how to compare, target); from the issue
TARGETS: dict[str, tuple[str, float]] = {
    "cached_over_ntp": (">=", 0.97),
    "online_over_ntp": (">=", 0.72),
    "scoring_over_ntp_train": (">=", 2.5),
    "cached_peak_rss_over_ntp": ("<=", 1.05),
}


@dataclass
class Settings:
    size: str = "mini"
    seq_len: int = 256
    batch: int = 8
    steps: int = 8
    warmup: int = 2
    repeats: int = 3
    score_batch: int = 32
    score_batches: int = 4
    diagnostics: bool = True

    @property
    def rows(self) -> int:
        """One epoch is exactly the run: every training row is seen once per child."""
        return self.batch * self.steps


# ---------------------------------------------------------------------------------------------------------
# shared inputs, built once by the parent


def prepare_inputs(s: Settings, workdir: Path) -> int:
    """Tokenizer, packed rows and the reference's float16 log-prob cache, written under `workdir`.

    Returns the parameter count of one model of the size (the reference has the model's size).
    """
    import numpy as np
    import torch

    from flywheel.data.packing import pack, tokenize_documents
    from flywheel.remit.scoring import FP16_MAX, reference_logprobs
    from flywheel.world.model import new_model
    from flywheel.world.tasks import LEVELS, generate
    from flywheel.world.tokenizer import train_tokenizer

    texts = [p.text for level in LEVELS for p in generate(level, 800, seed=0, split="train")]
    tok = train_tokenizer(texts[:3000])
    tok.save_pretrained(str(workdir / "tokenizer"))

    docs = tokenize_documents(texts, tok)
    while sum(len(d) for d in docs) < s.rows * s.seq_len:  # the bench may ask for more tokens than one pass gives
        docs = docs + docs
    packed = pack(docs, s.seq_len)
    input_ids, doc_ids = packed.input_ids[: s.rows], packed.doc_ids[: s.rows]
    np.save(workdir / "input_ids.npy", input_ids)
    np.save(workdir / "doc_ids.npy", doc_ids)

    reference = new_model(s.size, tok, seed=REFERENCE_SEED).eval()
    cache = np.empty(input_ids.shape, dtype=np.float16)
    with torch.inference_mode():
        for lo in range(0, s.rows, s.score_batch):
            ids = torch.from_numpy(input_ids[lo : lo + s.score_batch].astype(np.int64))
            cache[lo : lo + len(ids)] = reference_logprobs(reference, ids).clamp_(min=-FP16_MAX).numpy()
    np.save(workdir / "ref-chunk-00000.npy", cache)
    return sum(p.numel() for p in reference.parameters())


# ---------------------------------------------------------------------------------------------------------
# one mode in one process


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_training(mode: str, s: Settings, workdir: Path) -> dict[str, Any]:
    """Train `s.steps` optimizer steps with the real ReMiTTrainer; median seconds per step after warmup."""
    import numpy as np
    from transformers import PreTrainedTokenizerFast, TrainerCallback, TrainingArguments, default_data_collator

    from flywheel.data.packing import Packed
    from flywheel.remit.diagnostics import Diagnostics
    from flywheel.remit.scoring import ReferenceCache
    from flywheel.remit.trainer import PackedDataset, ReMiTTrainer
    from flywheel.world.model import new_model

    objective, reference_mode = TRAIN_MODES[mode]
    tok = PreTrainedTokenizerFast.from_pretrained(str(workdir / "tokenizer"))
    packed = Packed(np.load(workdir / "input_ids.npy"), np.load(workdir / "doc_ids.npy"))
    cache = None
    if reference_mode == "cached":  # what `open_cache` returns: memory-mapped float16 chunks
        chunk = np.load(workdir / "ref-chunk-00000.npy", mmap_mode="r")
        cache = ReferenceCache(folder=workdir, index={"rows_per_chunk": len(chunk)}, chunks=[chunk])
    model = new_model(s.size, tok, seed=MODEL_SEED)
    reference = new_model(s.size, tok, seed=REFERENCE_SEED) if reference_mode == "online" else None
    diagnostics = Diagnostics(tok, model.config.vocab_size) if s.diagnostics and objective in ("remit", "rho1") else None

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.ends.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(  # as `midtrain` sets them, minus checkpointing and logging
            output_dir=out,
            max_steps=s.steps,
            per_device_train_batch_size=s.batch,
            learning_rate=1e-4,
            lr_scheduler_type="linear",
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            average_tokens_across_devices=True,
        )
        trainer = ReMiTTrainer(
            model=model,
            args=args,
            train_dataset=PackedDataset(packed, cache),
            data_collator=default_data_collator,
            processing_class=tok,
            objective=objective,
            reference_model=reference,
            diagnostics=diagnostics,
            callbacks=[clock],
        )
        rss_before_train = _current_rss_mb()
        trainer.train()

    step_seconds = [b - a for a, b in zip(clock.ends[s.warmup - 1 : -1], clock.ends[s.warmup :], strict=True)]
    return {
        "mode": mode,
        "step_seconds": step_seconds,
        "seconds": statistics.median(step_seconds),
        "tokens": s.batch * s.seq_len,
        "rss_before_train_mb": rss_before_train,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_scoring(s: Settings, workdir: Path) -> dict[str, Any]:
    """`score_reference`'s inner loop over the packed rows; median seconds per batch after one warmup batch."""
    import numpy as np
    import torch
    from transformers import PreTrainedTokenizerFast

    from flywheel.remit.scoring import FP16_MAX, reference_logprobs
    from flywheel.world.model import new_model

    tok = PreTrainedTokenizerFast.from_pretrained(str(workdir / "tokenizer"))
    input_ids = np.load(workdir / "input_ids.npy")
    model = new_model(s.size, tok, seed=REFERENCE_SEED).eval().requires_grad_(False)
    out = np.empty((s.score_batch, s.seq_len), dtype=np.float16)
    rss_before = _current_rss_mb()
    seconds: list[float] = []
    with torch.inference_mode():
        for b in range(1 + s.score_batches):
            rows = [(b * s.score_batch + r) % len(input_ids) for r in range(s.score_batch)]  # cycle the corpus
            t0 = time.perf_counter()
            ids = torch.from_numpy(np.asarray(input_ids[rows], dtype=np.int64))
            lp = reference_logprobs(model, ids).clamp_(min=-FP16_MAX)
            out[:] = lp.numpy().astype(np.float16)
            seconds.append(time.perf_counter() - t0)
    return {
        "mode": "scoring",
        "step_seconds": seconds[1:],
        "seconds": statistics.median(seconds[1:]),
        "tokens": s.score_batch * s.seq_len,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------------------
# the parent: children round-robin, medians, table


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_child(mode: str, s: Settings, workdir: Path) -> dict[str, Any]:
    """One mode in a fresh process; also how much CPU other processes took meanwhile (foreign load)."""
    result_path = workdir / f"result-{mode}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--workdir", str(workdir),
           *settings_to_flags(s)]
    busy0, own0, t0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    busy, own, wall = _busy_cpu_seconds() - busy0, _children_cpu_seconds() - own0, time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    # share of the machine's CPU capacity used by processes other than this child (and this parent, ~idle)
    result["foreign_load"] = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    return result


def settings_to_flags(s: Settings) -> list[str]:
    flags = ["--size", s.size, "--seq-len", str(s.seq_len), "--batch", str(s.batch), "--steps", str(s.steps),
             "--warmup", str(s.warmup), "--repeats", str(s.repeats), "--score-batch", str(s.score_batch),
             "--score-batches", str(s.score_batches)]
    return flags if s.diagnostics else [*flags, "--no-diagnostics"]


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repeats and the ratios the issue asks for."""
    tps = {m: statistics.median(r["tokens"] / r["seconds"] for r in rs) for m, rs in runs.items()}
    rss = {m: statistics.median(r["peak_rss_mb"] for r in rs) for m, rs in runs.items()}
    ntp_tps, ntp_rss = tps["ntp"], rss["ntp"]
    return {
        "cached_over_ntp": tps["remit_cached"] / ntp_tps,
        "online_over_ntp": tps["remit_online"] / ntp_tps,
        "rho1_over_ntp": tps["rho1_cached"] / ntp_tps,
        "kd_over_ntp": tps["kd_online"] / ntp_tps,
        "scoring_over_ntp_train": tps["scoring"] / ntp_tps,
        "cached_peak_rss_over_ntp": rss["remit_cached"] / ntp_rss,
        "online_peak_rss_over_ntp": rss["remit_online"] / ntp_rss,
        "tokens_per_second": tps,
        "peak_rss_mb": rss,
        "rss_before_train_mb": {m: statistics.median(r["rss_before_train_mb"] for r in rs) for m, rs in runs.items()},
        "tokens_per_second_per_repeat": {m: [r["tokens"] / r["seconds"] for r in rs] for m, rs in runs.items()},
        "foreign_load_max": max(r["foreign_load"] for rs in runs.values() for r in rs),
    }


def verdicts(summary: dict[str, Any]) -> dict[str, bool]:
    return {k: (summary[k] >= t if op == ">=" else summary[k] <= t) for k, (op, t) in TARGETS.items()}


def print_table(summary: dict[str, Any], s: Settings, n_params: int, seconds: float) -> None:
    tps, rss = summary["tokens_per_second"], summary["peak_rss_mb"]
    print(f"ReMiT throughput: {s.size} ({n_params / 1e6:.1f}M params), batch {s.batch} x seq {s.seq_len} "
          f"(scoring batch {s.score_batch}), {s.steps - s.warmup} timed steps x {s.repeats} repeats, medians")
    print(f"{'mode':<14} {'tokens/s':>10} {'/ ntp':>7} {'peak RSS MB':>12} {'/ ntp':>7}")
    for m in MODES:
        print(f"{m:<14} {tps[m]:>10.0f} {tps[m] / tps['ntp']:>7.3f} {rss[m]:>12.0f} {rss[m] / rss['ntp']:>7.3f}")
    print()
    for key, ok in verdicts(summary).items():
        op, target = TARGETS[key]
        print(f"{key:<26} {summary[key]:6.3f}  target {op} {target:<5} {'PASS' if ok else 'MISS'}")
    load = summary["foreign_load_max"]
    if load > 0.1:
        print(f"\nWARNING: other processes used up to {load:.0%} of the CPUs during a run; the numbers are noisy")
    print(f"\nwall time {seconds:.0f} s")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    p.add_argument("--size", default=d.size, help="model size from flywheel.world.model.SIZES")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch", type=int, default=d.batch, help="training rows per optimizer step")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per child, warmup included")
    p.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=d.repeats, help="round-robin rounds over all modes")
    p.add_argument("--score-batch", type=int, default=d.score_batch, help="rows per reference-scoring forward")
    p.add_argument("--score-batches", type=int, default=d.score_batches, help="timed scoring batches per child")
    p.add_argument("--no-diagnostics", action="store_true", help="run remit/rho1 without midtrain's Diagnostics")
    p.add_argument("--quick", action="store_true", help="smoke test: nano, seq 128, 2 repeats, 4 steps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s = Settings(a.size, a.seq_len, a.batch, a.steps, a.warmup, a.repeats, a.score_batch, a.score_batches,
                 not a.no_diagnostics)
    if a.quick:
        s = Settings("nano", 128, 4, 4, 1, 2, 16, 2, s.diagnostics)
    if s.steps < s.warmup + 1 or s.warmup < 1:
        p.error("need --warmup >= 1 and --steps > --warmup")
    return a, s


def main(argv: list[str] | None = None) -> int:
    a, s = parse_args(argv)
    if a.child:
        result = run_scoring(s, a.workdir) if a.child == "scoring" else run_training(a.child, s, a.workdir)
        (a.workdir / f"result-{a.child}.json").write_text(json.dumps(result))
        return 0

    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="remit-bench-") as tmp:
        workdir = Path(tmp)
        print("preparing tokenizer, packed rows and reference cache ...", file=sys.stderr, flush=True)
        n_params = prepare_inputs(s, workdir)
        for r in range(s.repeats):
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]  # rotate so no mode always runs first
            for mode in order:
                res = run_child(mode, s, workdir)
                runs[mode].append(res)
                print(f"round {r + 1}/{s.repeats} {mode:<13} {res['tokens'] / res['seconds']:8.0f} tokens/s  "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB  other load {res['foreign_load']:.0%}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    summary = summarise(runs)
    if a.json:
        out = {**summary, "targets": {k: {"op": op, "value": v, "pass": verdicts(summary)[k]}
                                      for k, (op, v) in TARGETS.items()},
               "settings": asdict(s) | {"params": n_params, "torch_threads": _torch_threads()},
               "wall_seconds": seconds}
        print(json.dumps(out, indent=2))
    else:
        print_table(summary, s, n_params, seconds)
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
