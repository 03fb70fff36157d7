"""Same config, same seed, same machine: same numbers.

Two micro flywheels run the same config side by side, each in its own fresh process and its own empty home
(FLYWHEEL home, MLflow store, Prefect home, datasets cache; the session's tiny world copied in as an input).
Each runs round 0 (NTP) and round 1 (ReMiT guided by round 0's RL model: reference scoring, its cache, the
paired promotion gate), so every stage of the table runs. Then every metric of every MLflow run they made must
be equal bit for bit, at the same steps, and so must the registry's verdicts and the published weights.

The two processes differ in everything a long-lived worker (`flywheel serve`) may carry into a round and that
must not matter: the ambient `random`/numpy/torch RNG state and Python's string hash seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import SMALL_WORLD

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2  # round 0 is NTP; round 1 is the first that scores a reference (ReMiT) and pairs the gate's items
# Trainer checkpoints at the default share of each stage's steps (saving must not change a number), never on the
# wall clock (which steps save would then depend on the machine's load)
_OFF = {"checkpoint_minutes": None}
MICRO_ROUND = {
    "midtrain": {"token_budget": 2048, "seq_len": 64, "batch_size": 8, "score_batch_size": 16, **_OFF},
    "posttrain": {"stages": [
        {"kind": "sft", "max_steps": 1, "batch_size": 4, **_OFF},
        {"kind": "dpo", "max_steps": 1, "batch_size": 4, **_OFF},
        {"kind": "grpo", "max_steps": 1, "batch_size": 4, "lr": 5e-5, **_OFF,
         "args": {"num_generations": 2, "max_completion_length": 8}},
    ]},
    "evaluation": {"tasks": ["world"], "limit": 5, "batch_size": 16},
    # a guard on a continuous per-item score: the gate's seeded bootstrap gives an interval of real width
    # (accuracy on 10 items of two tiny models is often tied item by item, a zero-width interval)
    "promotion": {"guards": [{"metric": "eval/world_gsm/bpb", "max_drop": 1.0}]},
}

# Metrics that measure the clock, not the computation: the only ones left out of the comparison.
EXCLUDED = {
    "perf/tokens_per_s": "tokens over wall-clock seconds since the last log line (flywheel/perf.py)",
    "perf/tokens_per_s_per_device": "the same, per device (also the reference scoring's speed, records.log_scoring)",
    "perf/step_s": "wall-clock seconds per optimizer step (flywheel/perf.py)",
    "perf/mfu": "FLOPs over wall-clock seconds (logged only on a device with a known peak)",
    "train_runtime": "the HF Trainer's wall-clock duration of train()",
    "train_samples_per_second": "the HF Trainer's samples over train_runtime",
    "train_steps_per_second": "the HF Trainer's steps over train_runtime",
    "step_time": "TRL GRPO's wall-clock seconds per step",
    "seconds": "a post-training stage's wall-clock duration (records.log_posttrain)",
    "seconds_per_step": "the same over its steps",
    "tokens_per_second": "the reference scoring's tokens over wall-clock seconds (records.log_scoring)",
}
EXCLUDED_PREFIXES = {
    "system/": "MLflow's machine readings (CPU, memory, disk, network) sampled every 10 s of wall clock: "
               "whether a short stage gets a sample at all depends on its duration",
}
# Registry version tags that name a home or a run id (the comparison keeps every other tag)
EXCLUDED_TAGS = {
    "flywheel.run_id": "the MLflow run id of the version's run (random per store)",
    "flywheel.eval_items": "an artefact URI: the home's path and the evaluation run's id",
}

STAGE_RUNS = ("midtrain/midtrain", "evaluate/base/evaluate/base", "posttrain/sft/posttrain/sft",
              "posttrain/dpo/posttrain/dpo", "posttrain/grpo/posttrain/grpo", "evaluate/post/evaluate/post",
              "promote/promote")
EXPECTED_RUNS = {"round -/summary/flywheel-summary", "round 0/round/round-0", "round 1/round/round-1",
                 "round 1/score_reference/score_reference", *(f"round {n}/{s}" for n in range(ROUNDS) for s in STAGE_RUNS)}
# A few of the numbers the comparison must hold, so that it cannot pass by comparing nothing
CORE_METRICS = (("round 1/midtrain/midtrain", "loss"), ("round 1/midtrain/midtrain", "remit/weight_std"),
                ("round 1/posttrain/grpo/posttrain/grpo", "reward"), ("round 1/evaluate/post/evaluate/post", "eval/avg"),
                ("round 1/round/round-1", "dynamics/kl_to_reference"))

History = dict[str, dict[str, list[tuple[int, float]]]]  # run label -> metric key -> [(step, value)] in order


def excluded(key: str) -> bool:
    return key in EXCLUDED or key.startswith(tuple(EXCLUDED_PREFIXES))


def _bits(value: float) -> bytes:
    """A float's IEEE-754 bytes: equal only when bitwise equal (0.0 differs from -0.0, one ulp is a difference)."""
    return struct.pack(">d", value)


def compare_histories(a: History, b: History) -> list[str]:
    """Every difference between two runs' metric histories, one line each: run/metric/step: a vs b."""
    out = [f"{run}: only in {side}" for side, mine, other in (("a", a, b), ("b", b, a)) for run in sorted(mine)
           if run not in other]
    for run in sorted(set(a) & set(b)):
        ka = {k for k in a[run] if not excluded(k)}
        kb = {k for k in b[run] if not excluded(k)}
        out += [f"{run}/{k}: only in a" for k in sorted(ka - kb)]
        out += [f"{run}/{k}: only in b" for k in sorted(kb - ka)]
        for key in sorted(ka & kb):
            ha, hb = a[run][key], b[run][key]
            if [s for s, _ in ha] != [s for s, _ in hb]:
                out.append(f"{run}/{key}: steps {[s for s, _ in ha]} vs {[s for s, _ in hb]}")
                continue
            out += [f"{run}/{key}/step {s}: {va!r} vs {vb!r}"
                    for (s, va), (_, vb) in zip(ha, hb, strict=True) if _bits(va) != _bits(vb)]
    return out


def assert_same_histories(a: History, b: History) -> None:
    diffs = compare_histories(a, b)
    assert not diffs, f"{len(diffs)} metric difference(s) between two runs of the same config:\n" + "\n".join(diffs)


# --- one run: a fresh process in a fresh home --------------------------------------------------------------


def run_rounds(config: str, out: str, noise: int) -> None:
    """The child process: `ROUNDS` rounds through the real stage table, in this process, their results to `out`.

    `noise` perturbs what a worker that ran other rounds before would carry (the global RNGs); the flywheel must
    seed everything it draws from.
    """
    import random

    import numpy as np
    import torch

    from flywheel.config import load_config
    from flywheel.round.direct import run_round_direct

    torch.set_num_threads(1)  # two runs share the machine's cores; a fixed thread count is part of "same machine"
    random.seed(noise)
    np.random.seed(noise)
    torch.manual_seed(noise)
    cfg = load_config(config)
    Path(out).write_text(json.dumps([run_round_direct(cfg) for _ in range(ROUNDS)]))


def _start(home: Path, world: Path, noise: int) -> subprocess.Popen:
    home.mkdir(parents=True)
    shutil.copytree(world, home / "world" / world.name)  # the input world, copied: nothing of the other run is reachable
    doc = {"name": "det", "seed": 0, "home": str(home), "world": dict(SMALL_WORLD), **MICRO_ROUND}
    (home / "config.yaml").write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                            "PREFECT_API_URL")}
    env.update(FLYWHEEL_HOME=str(home), PREFECT_HOME=str(home / "prefect"), HF_DATASETS_CACHE=str(home / "datasets"),
               PYTHONHASHSEED=str(noise), OMP_NUM_THREADS="1")
    code = (f"from tests.test_determinism import run_rounds; "
            f"run_rounds({str(home / 'config.yaml')!r}, {str(home / 'results.json')!r}, {noise})")
    log = open(home / "run.log", "w")  # noqa: SIM115 - the child holds it; closed when it exits
    try:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()


def _finish(proc: subprocess.Popen, home: Path) -> list[dict[str, Any]]:
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    log = (home / "run.log").read_text()
    assert proc.returncode == 0, f"the run in {home} failed ({proc.returncode}):\n{log[-4000:]}"
    return json.loads((home / "results.json").read_text())


def _tracker(home: Path):  # noqa: ANN202 - a Tracker
    from flywheel.config import load_config
    from flywheel.tracking.store import open_tracker

    return open_tracker(load_config(home / "config.yaml"))


def histories(home: Path) -> tuple[History, dict[str, Any]]:
    """Every metric of every run in a home's MLflow store, by run label (round/stage), and the runs by label."""
    from flywheel.tracking.store import ROUND_TAG, STAGE_TAG

    tracker = _tracker(home)
    client = tracker.client
    runs = client.search_runs([tracker.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    out: History = {}
    by_label: dict[str, Any] = {}
    for run in runs:
        label = f"round {run.data.tags.get(ROUND_TAG, '-')}/{run.data.tags.get(STAGE_TAG)}/{run.info.run_name}"
        assert label not in by_label, f"two runs labelled {label} in {home}"
        by_label[label] = run
        out[label] = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                              key=lambda m: m.step)]
                      for key in run.data.metrics}
    return out, by_label


def registry(home: Path) -> dict[str, Any]:
    """Each registered model's aliases and each version's tags, less the tags that name a run or a path."""
    client = _tracker(home).client
    return {m.name: {"aliases": dict(m.aliases),
                     "versions": {v.version: {k: t for k, t in v.tags.items() if k not in EXCLUDED_TAGS}
                                  for v in client.search_model_versions(f"name = '{m.name}'")}}
            for m in client.search_registered_models()}


def weights(checkpoint: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(checkpoint).glob("*.safetensors"))}


def _recomputed(home: Path, results: list[dict[str, Any]], runs: dict[str, Any]) -> str:
    """Everything in this run was computed here, from nothing: no stage reused a checkpoint, a score or a cache.

    Returns the reference cache's folder name (a content key: the same in both homes, so a shared cache would
    have been found)."""
    for res in results:
        assert not res["base"]["reused"] and not res["rl"]["reused"], res
    cache = Path(results[1]["reference_cache"]["cache"])
    assert cache.is_relative_to(home) and cache.is_dir(), cache
    computed = runs["round 1/score_reference/score_reference"].data.metrics["computed_chunks"]
    assert computed > 0, "round 1 read its reference scores instead of computing them"
    for label, run in runs.items():
        assert run.info.status == "FINISHED" or "/round/" in label or "/summary/" in label, (label, run.info.status)
        assert "flywheel.reused" not in run.data.tags, f"{label} reused {run.data.tags['flywheel.reused']}"
    return cache.name


@pytest.mark.slow
def test_the_same_config_and_seed_give_bitwise_the_same_rounds_metrics_verdicts_and_weights(small_world, tmp_path):
    from flywheel.refs import world_paths

    cfg, _ = small_world
    world = world_paths(cfg).root  # the session's world (corpora, tokenizer, base): an input, copied into each home
    homes = (tmp_path / "a", tmp_path / "b")
    procs = [_start(home, world, noise) for home, noise in zip(homes, (1, 2), strict=True)]  # side by side
    try:
        results = [_finish(proc, home) for proc, home in zip(procs, homes, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    (ha, runs_a), (hb, runs_b) = histories(homes[0]), histories(homes[1])
    caches = [_recomputed(home, res, runs) for home, res, runs in zip(homes, results, (runs_a, runs_b), strict=True)]
    assert set(runs_a) == EXPECTED_RUNS, sorted(runs_a)  # every stage of both rounds ran, once
    for label, key in CORE_METRICS:
        assert ha[label].get(key), f"{label} logged no {key}: the comparison would be vacuous"
    assert_same_histories(ha, hb)
    # one content key in both homes: had the second run seen the first's reference cache, it would have read it
    assert caches[0] == caches[1], caches
    decisions = [[json.dumps(r["decision"], sort_keys=True) for r in res] for res in results]
    assert decisions[0] == decisions[1]
    assert registry(homes[0]) == registry(homes[1])
    for ra, rb in zip(*results, strict=True):
        for key in ("base", "rl"):
            assert weights(ra[key]["checkpoint"]) == weights(rb[key]["checkpoint"]), (ra["round"], key)
            assert weights(ra[key]["checkpoint"]), ra[key]["checkpoint"]


def test_the_comparison_reports_every_difference_down_to_one_ulp_in_one_message():
    x = 2.345678901234567
    a: History = {"round 0/midtrain/midtrain": {"loss": [(1, x), (2, 0.5)], "perf/step_s": [(1, 0.1)],
                                                "grad_norm": [(1, 1.0)], "system/cpu_utilization_percentage": [(0, 3.0)]},
                  "round 0/promote/promote": {}}
    b: History = {"round 0/midtrain/midtrain": {"loss": [(1, math.nextafter(x, math.inf)), (2, 0.5)],
                                                "perf/step_s": [(1, 0.2)], "learning_rate": [(1, 0.001)],
                                                "grad_norm": [(1, 1.0), (2, 1.0)]},
                  "round 0/evaluate/base/evaluate/base": {"eval/avg": [(0, 0.25)]}}
    assert compare_histories(a, a) == []
    assert compare_histories(a, b) == [
        "round 0/promote/promote: only in a",
        "round 0/evaluate/base/evaluate/base: only in b",
        "round 0/midtrain/midtrain/learning_rate: only in b",
        "round 0/midtrain/midtrain/grad_norm: steps [1] vs [1, 2]",
        f"round 0/midtrain/midtrain/loss/step 1: {x!r} vs {math.nextafter(x, math.inf)!r}",
    ]  # the clock's perf/step_s and the machine's system/ readings differ or are missing: not differences
    assert compare_histories({"r": {"m": [(0, 0.0)]}}, {"r": {"m": [(0, -0.0)]}}) == ["r/m/step 0: 0.0 vs -0.0"]
    with pytest.raises(AssertionError) as caught:
        assert_same_histories(a, b)
    message = str(caught.value)
    assert message.startswith("5 metric difference(s)") and "only in a" in message and "loss/step 1" in message
