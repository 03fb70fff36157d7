"""What do Prefect and the launcher cost a round? The same round three ways, side by side in one run.

1. the stage functions called directly (`run_round_direct`, no Prefect);
2. the Prefect flow, every stage in the flow's own process (`launch.kind: local`, the default);
3. the Prefect flow with every heavy stage launched as a job (`launch: {kind: torchrun,
   nproc_per_node: 1}`): a fresh process per stage under torchrun, input and result as JSON,
   logs copied to MLflow. One process, so the work is the same and only the launching differs.

All three run the very same `flywheel.round` stage table on the same world; each repeat uses
fresh flywheel names (nothing is reused from a cache), the paths are interleaved and medians
compared. `--size demo` (the default) is configs/demo.yaml's round on the demo world (its world is
copied from ./.flywheel when one was built there, else built: ~3 minutes); `--size tiny` is a
test-sized round. The Prefect server (embedded, ephemeral) is started once before timing.

    python bench/orchestration_overhead.py [--size demo|tiny] [--repeats 1] [--json]
Targets: flow overhead <= 5% and launch overhead <= 5% of the round's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.env import apply_offline_env  # noqa: E402

apply_offline_env()

TINY_WORLD = {"pretrain_tokens": 120_000, "pretrain_docs": 6_000, "midtrain_docs": 1_000, "sft_pairs": 200,
              "dpo_pairs": 100, "rl_prompts": 100, "eval_per_level": 20}
TINY_ROUND = {
    "midtrain": {"token_budget": 16_384, "seq_len": 128, "batch_size": 8},
    "posttrain": {"stages": [{"kind": "sft", "max_steps": 10, "batch_size": 8},
                             {"kind": "grpo", "max_steps": 3, "batch_size": 8, "lr": 5e-5,
                              "args": {"num_generations": 4, "max_completion_length": 16}}]},
    "evaluation": {"tasks": ["world"], "limit": 10, "batch_size": 16},
}
LAUNCHED = {"launch": {"kind": "torchrun", "nproc_per_node": 1}}
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("demo", "tiny"), default="demo")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import shutil

    import yaml

    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-orch-"))
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    from prefect import flow

    from flows.round import flywheel_round
    from flywheel.config import load_config
    from flywheel.round.direct import run_round_direct
    from flywheel.world.build import build_world

    if args.size == "demo":
        base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        base.pop("name", None)
        if (REPO / ".flywheel" / "world").is_dir():
            shutil.copytree(REPO / ".flywheel" / "world", home / "world")  # reused only if it matches
    else:
        base = {"world": TINY_WORLD, **TINY_ROUND}

    def config(name: str, **extra: object) -> Path:
        path = home / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "name": name, "home": str(home), **extra}))
        return path

    t0 = time.perf_counter()
    build_world(load_config(config("world")), ladder=False)
    world_s = time.perf_counter() - t0

    @flow
    def warm_up() -> int:
        return 1

    t0 = time.perf_counter()
    warm_up()
    startup = time.perf_counter() - t0

    direct, flowed, launched = [], [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        run_round_direct(load_config(config(f"direct{i}")))
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        flywheel_round(str(config(f"flow{i}")))
        flowed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        flywheel_round(str(config(f"launched{i}", **LAUNCHED)))
        launched.append(time.perf_counter() - t0)
    jobs = len(list((home / "launch").glob("launched*/round-0/*")))

    d, f, la = (statistics.median(x) for x in (direct, flowed, launched))
    result = {"size": args.size, "direct_s": d, "flow_s": f, "launched_s": la, "overhead_s": f - d,
              "overhead_fraction": (f - d) / d, "launch_overhead_s": la - f, "launch_overhead_fraction": (la - f) / f,
              "jobs_per_round": jobs / args.repeats, "prefect_startup_s": startup, "world_s": world_s,
              "repeats": args.repeats, "direct_all": direct, "flow_all": flowed, "launched_all": launched}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.size} round, median of {args.repeats}")
    print(f"{'path':<44}{'median s':>10}{'ratio':>8}")
    print(f"{'stage functions (direct)':<44}{d:>10.1f}{1:>8.3f}")
    print(f"{'Prefect flow, stages in-process':<44}{f:>10.1f}{f / d:>8.3f}")
    print(f"{'Prefect flow, stages launched (torchrun x1)':<44}{la:>10.1f}{la / d:>8.3f}")
    verdict = "PASS" if result["overhead_fraction"] <= 0.05 else "MISS"
    print(f"flow overhead: {f - d:+.1f} s = {100 * result['overhead_fraction']:+.1f}% of a round "
          f"(target <= 5%: {verdict})")
    verdict = "PASS" if result["launch_overhead_fraction"] <= 0.05 else "MISS"
    per_job = (la - f) / max(1.0, result["jobs_per_round"])
    print(f"launch overhead: {la - f:+.1f} s = {100 * result['launch_overhead_fraction']:+.1f}% of a round, "
          f"{result['jobs_per_round']:.0f} jobs, {per_job:.1f} s each (target <= 5%: {verdict})")
    if per_job > 0:
        print(f"each launched job costs ~{per_job:.0f} s of start-up (fresh interpreter, imports, loads): "
              f"<= 5% of a stage that runs >= {per_job / 0.05 / 60:.0f} min")
    print(f"one-time Prefect start-up (ephemeral server): {startup:.1f} s; world ready in {world_s:.0f} s")


if __name__ == "__main__":
    main()
