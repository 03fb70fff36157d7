"""What does Prefect cost a round? One tiny round through the flow vs the same stage functions called directly.

Both paths run the very same `flywheel.rounds` stage functions on the same tiny world; each
repeat uses fresh flywheel names (so nothing is reused from a cache) and the two paths are
interleaved, then medians are compared. The Prefect server (the embedded, ephemeral one) is
started once before timing by a trivial flow, and its start-up is reported separately: a
team's server is already running when a round is triggered.

    python bench/orchestration_overhead.py [--repeats 2] [--json]
Target: flow overhead <= 5% of the round's wall time.
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

WORLD = {"pretrain_tokens": 120_000, "pretrain_docs": 6_000, "midtrain_docs": 1_000, "sft_pairs": 200,
         "dpo_pairs": 100, "rl_prompts": 100, "eval_per_level": 20}
ROUND = {
    "midtrain": {"token_budget": 16_384, "seq_len": 128, "batch_size": 8},
    "posttrain": {"stages": [{"kind": "sft", "max_steps": 10, "batch_size": 8},
                             {"kind": "grpo", "max_steps": 3, "batch_size": 8, "lr": 5e-5,
                              "args": {"num_generations": 4, "max_completion_length": 16}}]},
    "evaluation": {"tasks": ["world"], "limit": 10, "batch_size": 16},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import yaml

    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-orch-"))
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    from prefect import flow

    from flows.round import flywheel_round
    from flywheel.config import load_config
    from flywheel.rounds import run_round_direct
    from flywheel.world.build import build_world

    def config(name: str) -> Path:
        path = home / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "home": str(home), "world": WORLD, **ROUND}))
        return path

    build_world(load_config(config("world")), ladder=False)

    @flow
    def warm_up() -> int:
        return 1

    t0 = time.perf_counter()
    warm_up()
    startup = time.perf_counter() - t0

    direct, flowed = [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        run_round_direct(load_config(config(f"direct{i}")))
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        flywheel_round(str(config(f"flow{i}")))
        flowed.append(time.perf_counter() - t0)

    d, f = statistics.median(direct), statistics.median(flowed)
    result = {"direct_s": d, "flow_s": f, "overhead_s": f - d, "overhead_fraction": (f - d) / d,
              "prefect_startup_s": startup, "repeats": args.repeats, "direct_all": direct, "flow_all": flowed}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'path':<28}{'median s':>10}")
    print(f"{'stage functions (direct)':<28}{d:>10.1f}")
    print(f"{'Prefect flow':<28}{f:>10.1f}")
    verdict = "PASS" if result["overhead_fraction"] <= 0.05 else "MISS"
    print(f"flow overhead: {f - d:+.1f} s = {100 * result['overhead_fraction']:+.1f}% of a round "
          f"(target <= 5%: {verdict})")
    print(f"one-time Prefect start-up (ephemeral server): {startup:.1f} s")


if __name__ == "__main__":
    main()
