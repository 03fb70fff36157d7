"""ReMiT throughput: training tokens/s of every objective, reference-scoring tokens/s, and peak memory.

What it measures
    Same model size, batch and sequence length for every mode:
      ntp            plain next-token prediction (the baseline every ratio is taken against)
      remit_cached   ReMiT reading reference log-probs from a float16 cache (memory-mapped .npy)
      remit_frozen   ReMiT with δ against the frozen base (`midtrain.delta_base: frozen`): the weights
                     stored before training (float32) beside the reference's and the base's caches
      remit_online   ReMiT with a frozen same-size reference model run forward on every batch
      rho1_cached    Rho-1 selective LM from the same cache
      kd_online      knowledge distillation from the online reference (needs its whole distribution)
      scoring        the reference forward-only over packed rows, as `score_reference` does it
    Training uses the real `ReMiTTrainer` + `PackedDataset` + `default_data_collator` with the
    TrainingArguments `midtrain` uses (AdamW, grad clipping, linear decay) and, for remit/rho1,
    `midtrain`'s `Diagnostics` (`--no-diagnostics` turns them off). Children tune glibc malloc
    as `midtrain` and `score_reference` do on CPU (`--glibc-defaults` keeps glibc's thresholds).

How
    The parent trains a tokenizer on the tiny world's problems, packs their tokenized text into
    `batch * steps` rows of `seq_len`, scores them once with the reference (a second model of the
    same size, seed 1) into a float16 cache, and writes all of it to a temporary folder. Each
    mode then runs in its own child process (`--child MODE`), so `ru_maxrss` at its end is that
    mode's peak RSS. The parent launches the children round-robin `--repeats` times, rotating
    the order each round, so drift (heat, other load) hits every mode alike; it reports medians.

    A training step is timed from one `on_step_end` to the next, so it includes fetching and
    collating the batch (where the cache is read), forward, loss, backward and the optimizer
    step; the first `--warmup` steps are dropped. Scoring times `reference_logprobs` + clamp +
    float16 conversion per batch of `--score-batch` rows under `torch.inference_mode()`, after
    one warmup batch. Tokens/s = rows * seq_len / median seconds per step (or batch).

    The machine may be shared. For every timed step the child also measures how much CPU other
    processes used meanwhile (/proc/stat minus its own CPU time); steps where that exceeds
    `FOREIGN_LOAD_LIMIT` of the machine are left out of the median of a run when at least half
    of its steps (and two) are clean; the parent takes medians over the clean runs of each mode,
    and a target whose modes had no clean run is reported UNRELIABLE rather than PASS or MISS.

    Peak RSS includes the Python/torch/transformers baseline every process pays, so the memory
    ratio is what a real run sees, not the increment of the mode alone (both are in `--json`).

Usage
    python bench/remit_throughput.py            # table (about 4-5 minutes on 2 idle CPU cores)
    python bench/remit_throughput.py --json     # one JSON object on stdout (progress on stderr)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make `flywheel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.env import apply_offline_env  # noqa: E402

apply_offline_env()

TRAIN_MODES: dict[str, tuple[str, str | None]] = {  # mode -> (objective, reference: None / cached / frozen / online)
    "ntp": ("ntp", None),
    "remit_cached": ("remit", "cached"),
    "remit_frozen": ("remit", "frozen"),
    "remit_online": ("remit", "online"),
    "rho1_cached": ("rho1", "cached"),
    "kd_online": ("kd", "online"),
}
MODES = (*TRAIN_MODES, "scoring")
MODEL_SEED, REFERENCE_SEED = 0, 1
FOREIGN_LOAD_LIMIT = 0.05  # a step is "clean" when other processes used at most this share of all CPUs

# ratio -> (comparison, target, modes it compares), from the issue
TARGETS: dict[str, tuple[str, float, tuple[str, str]]] = {
    "cached_over_ntp": (">=", 0.97, ("remit_cached", "ntp")),
    "online_over_ntp": (">=", 0.72, ("remit_online", "ntp")),
    "scoring_over_ntp_train": (">=", 2.5, ("scoring", "ntp")),
    "cached_peak_rss_over_ntp": ("<=", 1.05, ("remit_cached", "ntp")),
    "frozen_over_cached": (">=", 0.97, ("remit_frozen", "remit_cached")),  # issue 34: stored weights cost nothing
}


@dataclass
class Settings:
    size: str = "mini"
    seq_len: int = 256
    batch: int = 8
    steps: int = 10
    warmup: int = 2
    repeats: int = 3
    score_batch: int = 32
    score_batches: int = 4
    diagnostics: bool = True
    malloc_tuning: bool = True  # what midtrain/score_reference do on CPU (flywheel.env.keep_freed_memory)

    @property
    def rows(self) -> int:
        """One epoch is exactly the run: a child sees every training row once."""
        return self.batch * self.steps

    def flags(self) -> list[str]:
        """These settings as command-line flags, for a child process."""
        out = ["--size", self.size, "--seq-len", str(self.seq_len), "--batch", str(self.batch),
               "--steps", str(self.steps), "--warmup", str(self.warmup), "--repeats", str(self.repeats),
               "--score-batch", str(self.score_batch), "--score-batches", str(self.score_batches)]
        out = out if self.diagnostics else [*out, "--no-diagnostics"]
        return out if self.malloc_tuning else [*out, "--glibc-defaults"]


# ---------------------------------------------------------------------------------------------------------
# measuring: wall time, other processes' CPU, memory


def _machine_busy_seconds() -> float:
    """CPU seconds all processes together have spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@dataclass
class Clock:
    """Ticks at step boundaries; each interval gets its wall seconds and the other processes' CPU share."""

    ticks: list[tuple[float, float, float]] = field(default_factory=list)  # (wall, machine busy, own cpu)

    def tick(self) -> None:
        self.ticks.append((time.perf_counter(), _machine_busy_seconds(), _own_cpu_seconds()))

    def intervals(self, skip: int) -> tuple[list[float], list[float]]:
        """(seconds, foreign load) of every interval after the first `skip` ones."""
        cpus = os.cpu_count() or 1
        seconds, loads = [], []
        for (w0, b0, o0), (w1, b1, o1) in zip(self.ticks[skip:-1], self.ticks[skip + 1 :], strict=True):
            jiffy_slack = 2 / os.sysconf("SC_CLK_TCK")  # /proc/stat counts whole ticks, rusage microseconds
            seconds.append(w1 - w0)
            loads.append(max(0.0, (b1 - b0) - (o1 - o0) - jiffy_slack) / ((w1 - w0) * cpus))
        return seconds, loads


def timing_result(mode: str, clock: Clock, skip: int, tokens: int, rss_before_mb: float) -> dict[str, Any]:
    """Median seconds per step over the clean steps; the run is clean when at least half its steps (>= 2) are."""
    seconds, loads = clock.intervals(skip)
    clean = [t for t, load in zip(seconds, loads, strict=True) if load <= FOREIGN_LOAD_LIMIT]
    run_is_clean = len(clean) >= max(2, (len(seconds) + 1) // 2)
    return {
        "mode": mode,
        "tokens": tokens,
        "seconds": statistics.median(clean if run_is_clean else seconds),
        "clean": run_is_clean,
        "step_seconds": seconds,
        "step_foreign_load": loads,
        "clean_steps": len(clean),
        "rss_before_timed_mb": rss_before_mb,
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------------------
# shared inputs, built once by the parent


def prepare_inputs(s: Settings, workdir: Path) -> int:
    """Write tokenizer, packed rows and the reference's float16 log-prob cache; return the model's parameters."""
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
    while sum(map(len, docs)) < s.rows * s.seq_len:  # big settings may want more tokens than one pass has
        docs = docs + docs
    packed = pack(docs, s.seq_len)
    input_ids = packed.input_ids[: s.rows]
    np.save(workdir / "input_ids.npy", input_ids)
    np.save(workdir / "doc_ids.npy", packed.doc_ids[: s.rows])

    from flywheel.config import MidtrainConfig
    from flywheel.remit.frozen import weights_of_rows

    caches = {}
    for name, seed in (("ref", REFERENCE_SEED), ("base", MODEL_SEED)):  # the base: the model trained, at step 0
        model = new_model(s.size, tok, seed=seed).eval()
        cache = np.empty(input_ids.shape, dtype=np.float16)
        with torch.inference_mode():
            for lo in range(0, s.rows, s.score_batch):
                ids = torch.from_numpy(input_ids[lo : lo + s.score_batch].astype(np.int64))
                cache[lo : lo + len(ids)] = reference_logprobs(model, ids).clamp_(min=-FP16_MAX).numpy()
        np.save(workdir / f"{name}-chunk-00000.npy", cache)
        caches[name] = cache
    weights = weights_of_rows(MidtrainConfig(), caches["ref"], caches["base"], packed.doc_ids[: s.rows])
    np.save(workdir / "weights-chunk-00000.npy", weights)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# one mode in one process


def run_training(mode: str, s: Settings, workdir: Path) -> dict[str, Any]:
    """`s.steps` optimizer steps of the real ReMiTTrainer, timed step by step."""
    import numpy as np
    from transformers import PreTrainedTokenizerFast, TrainerCallback, default_data_collator

    from flywheel.config import validate_config
    from flywheel.data.packing import Packed
    from flywheel.remit.diagnostics import Diagnostics
    from flywheel.remit.frozen import FrozenWeights
    from flywheel.remit.midtrain import training_arguments
    from flywheel.remit.scoring import ReferenceCache
    from flywheel.remit.trainer import PackedDataset, ReMiTTrainer
    from flywheel.world.model import new_model

    objective, reference_mode = TRAIN_MODES[mode]
    tok = PreTrainedTokenizerFast.from_pretrained(str(workdir / "tokenizer"))
    packed = Packed(np.load(workdir / "input_ids.npy"), np.load(workdir / "doc_ids.npy"))
    def opened(name: str) -> ReferenceCache:  # what `open_cache` gives training: memory-mapped chunks
        chunk = np.load(workdir / f"{name}-chunk-00000.npy", mmap_mode="r")
        return ReferenceCache(folder=workdir, index={"rows_per_chunk": len(chunk)}, chunks=[chunk])

    cache = opened("ref") if reference_mode in ("cached", "frozen") else None
    frozen = FrozenWeights(opened("weights"), opened("base"), computed=False) if reference_mode == "frozen" else None
    model = new_model(s.size, tok, seed=MODEL_SEED)
    reference = new_model(s.size, tok, seed=REFERENCE_SEED) if reference_mode == "online" else None
    use_diagnostics = s.diagnostics and objective in ("remit", "rho1")
    diagnostics = Diagnostics(tok, model.config.vocab_size) if use_diagnostics else None

    clock = Clock()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            clock.tick()

    with tempfile.TemporaryDirectory() as out:
        # the product's own arguments, minus checkpointing and logging
        cfg = validate_config({"name": "bench", "home": out, "midtrain": {
            "objective": "ntp", "batch_size": s.batch, "seq_len": s.seq_len, "lr": 1e-4, "warmup_ratio": 0.0}})
        args = training_arguments(cfg, out, s.steps, logging_steps=None, save=False)
        trainer = ReMiTTrainer(
            model=model,
            args=args,
            train_dataset=PackedDataset(packed, cache, frozen),
            data_collator=default_data_collator,
            processing_class=tok,
            objective=objective,
            reference_model=reference,
            diagnostics=diagnostics,
            callbacks=[StepClock()],
        )
        rss_before = _current_rss_mb()
        trainer.train()
    # ticks[k] ends step k+1; the interval ending step warmup+1 is the first timed one
    return timing_result(mode, clock, s.warmup - 1, s.batch * s.seq_len, rss_before)


def run_scoring(s: Settings, workdir: Path) -> dict[str, Any]:
    """`score_reference`'s inner loop, cycling over the packed rows, timed batch by batch."""
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
    clock = Clock()
    clock.tick()
    with torch.inference_mode():
        for b in range(1 + s.score_batches):  # the first batch is warmup
            rows = [(b * s.score_batch + r) % len(input_ids) for r in range(s.score_batch)]
            ids = torch.from_numpy(np.asarray(input_ids[rows], dtype=np.int64))
            out[:] = reference_logprobs(model, ids).clamp_(min=-FP16_MAX).numpy().astype(np.float16)
            clock.tick()
    return timing_result("scoring", clock, 1, s.score_batch * s.seq_len, rss_before)


# ---------------------------------------------------------------------------------------------------------
# the parent: children round-robin, medians, report


def run_child(mode: str, s: Settings, workdir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--workdir", str(workdir), *s.flags()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((workdir / f"result-{mode}.json").read_text())


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repeats (over the clean runs when there are any) and the ratios the issue asks for."""

    def chosen(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rs if r["clean"]] or rs

    tps = {m: statistics.median(r["tokens"] / r["seconds"] for r in chosen(rs)) for m, rs in runs.items()}
    rss = {m: statistics.median(r["peak_rss_mb"] for r in rs) for m, rs in runs.items()}
    return {
        "cached_over_ntp": tps["remit_cached"] / tps["ntp"],
        "frozen_over_ntp": tps["remit_frozen"] / tps["ntp"],
        "frozen_over_cached": tps["remit_frozen"] / tps["remit_cached"],
        "online_over_ntp": tps["remit_online"] / tps["ntp"],
        "rho1_over_ntp": tps["rho1_cached"] / tps["ntp"],
        "kd_over_ntp": tps["kd_online"] / tps["ntp"],
        "scoring_over_ntp_train": tps["scoring"] / tps["ntp"],
        "cached_peak_rss_over_ntp": rss["remit_cached"] / rss["ntp"],
        "online_peak_rss_over_ntp": rss["remit_online"] / rss["ntp"],
        "tokens_per_second": tps,
        "peak_rss_mb": rss,
        "rss_before_timed_mb": {m: statistics.median(r["rss_before_timed_mb"] for r in rs) for m, rs in runs.items()},
        "tokens_per_second_per_run": {m: [r["tokens"] / r["seconds"] for r in rs] for m, rs in runs.items()},
        "peak_rss_mb_per_run": {m: [r["peak_rss_mb"] for r in rs] for m, rs in runs.items()},
        "clean_runs": {m: sum(r["clean"] for r in rs) for m, rs in runs.items()},
        "steps_left_out": sum(len(r["step_seconds"]) - r["clean_steps"] for rs in runs.values() for r in rs),
    }


def verdicts(summary: dict[str, Any]) -> dict[str, str]:
    """PASS / MISS per target; UNRELIABLE when a timed mode it compares never ran without other load."""
    out = {}
    for key, (op, target, modes) in TARGETS.items():
        timed = "rss" not in key
        if timed and any(summary["clean_runs"][m] == 0 for m in modes):
            out[key] = "UNRELIABLE"
        else:
            out[key] = "PASS" if (summary[key] >= target if op == ">=" else summary[key] <= target) else "MISS"
    return out


def print_report(summary: dict[str, Any], s: Settings, n_params: int, seconds: float) -> None:
    tps, rss, clean = summary["tokens_per_second"], summary["peak_rss_mb"], summary["clean_runs"]
    print(f"ReMiT throughput: {s.size} ({n_params / 1e6:.1f}M params), batch {s.batch} x seq {s.seq_len} "
          f"(scoring batch {s.score_batch}), {s.steps - s.warmup} timed steps x {s.repeats} repeats, medians; "
          f"malloc {'tuned as midtrain does' if s.malloc_tuning else 'glibc defaults'}")
    print(f"{'mode':<14} {'tokens/s':>9} {'/ ntp':>7} {'peak RSS MB':>12} {'/ ntp':>7} {'clean runs':>11}")
    for m in MODES:
        print(f"{m:<14} {tps[m]:>9.0f} {tps[m] / tps['ntp']:>7.3f} {rss[m]:>12.0f} {rss[m] / rss['ntp']:>7.3f} "
              f"{clean[m]:>7}/{s.repeats}")
    print()
    for key, verdict in verdicts(summary).items():
        op, target, _ = TARGETS[key]
        print(f"{key:<26} {summary[key]:6.3f}  target {op} {target:<5} {verdict}")
    if summary["steps_left_out"] or min(clean.values()) < s.repeats:
        print(f"\nnote: other processes loaded the CPUs: {summary['steps_left_out']} step(s) left out of the "
              f"medians; a run with under half its steps clean counts only when its mode has no clean run")
    print(f"wall time {seconds:.0f} s")


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
    p.add_argument("--no-diagnostics", action="store_true", help="remit/rho1 without midtrain's Diagnostics")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="children keep glibc's malloc thresholds instead of midtrain's keep_freed_memory()")
    p.add_argument("--quick", action="store_true", help="smoke test: nano, seq 128, batch 4, 2 repeats")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        s = Settings("nano", 128, 4, 5, 1, 2, 16, 3, not a.no_diagnostics, not a.glibc_defaults)
    else:
        s = Settings(a.size, a.seq_len, a.batch, a.steps, a.warmup, a.repeats, a.score_batch, a.score_batches,
                     not a.no_diagnostics, not a.glibc_defaults)
    if s.warmup < 1 or s.steps < s.warmup + 2 or s.score_batches < 2:
        p.error("need --warmup >= 1, --steps >= --warmup + 2 and --score-batches >= 2")
    return a, s


def main(argv: list[str] | None = None) -> int:
    a, s = parse_args(argv)
    if a.child:
        if s.malloc_tuning:
            from flywheel.env import keep_freed_memory

            keep_freed_memory()
        result = run_scoring(s, a.workdir) if a.child == "scoring" else run_training(a.child, s, a.workdir)
        (a.workdir / f"result-{a.child}.json").write_text(json.dumps(result))
        return 0

    import torch

    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="remit-bench-") as tmp:
        workdir = Path(tmp)
        print("preparing tokenizer, packed rows and reference cache ...", file=sys.stderr, flush=True)
        n_params = prepare_inputs(s, workdir)
        for r in range(s.repeats):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # rotate: no mode always runs first
            for mode in order:
                res = run_child(mode, s, workdir)
                runs[mode].append(res)
                print(f"round {r + 1}/{s.repeats} {mode:<13} {res['tokens'] / res['seconds']:8.0f} tokens/s  "
                      f"peak RSS {res['peak_rss_mb']:5.0f} MB  clean steps {res['clean_steps']}/"
                      f"{len(res['step_seconds'])}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    summary = summarise(runs)
    if a.json:
        verdict = verdicts(summary)
        print(json.dumps({
            **summary,
            "targets": {k: {"op": op, "target": v, "verdict": verdict[k]} for k, (op, v, _) in TARGETS.items()},
            "settings": asdict(s) | {"params": n_params, "torch_threads": torch.get_num_threads(),
                                     "cpus": os.cpu_count(), "foreign_load_limit": FOREIGN_LOAD_LIMIT},
            "wall_seconds": seconds,
        }, indent=2))
    else:
        print_report(summary, s, n_params, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
