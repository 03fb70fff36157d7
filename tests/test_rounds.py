"""The round's stage functions without Prefect, on the small test world."""

from __future__ import annotations

from dataclasses import replace

from flywheel.round.plan import RoundPlan, plan_round
from flywheel.round.report import round_report
from flywheel.round.stages import stage_midtrain
from flywheel.tracking.registry import T_DATA, T_DATA_EPOCHS, T_DATA_SLICE, base_model_name
from flywheel.tracking.store import open_tracker

from .conftest import small_config


def _two_rounds(home, name: str, per_round: str) -> tuple[RoundPlan, dict, dict, dict]:
    """Round 0 and round 1 mid-training (NTP both: no reference, so only the data can differ) and their versions."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the session world's home (its world is built there); the name keeps runs and registry apart
        cfg = small_config(home, name=name, data={"per_round": per_round},
                           midtrain={"objective": "ntp", "token_budget": 1024, "batch_size": 4, "seq_len": 64})
        p0 = plan_round(cfg)
        first = stage_midtrain(cfg, p0)
        again = stage_midtrain(cfg, replace(p0, round=1))
    finally:
        torch.set_num_threads(threads)
    client = open_tracker(cfg).client
    tags = [client.get_model_version(base_model_name(cfg), r["version"]).tags for r in (first, again)]
    return p0, first, again, {"cfg": cfg, "tags": tags}


def test_a_round_with_an_earlier_rounds_exact_inputs_says_the_flywheel_stands_still(small_world):
    """What a rejected round leaves behind under `data.per_round: same`: the next round has the same inputs.

    With an NTP objective every round has no reference, so round 1 repeats round 0 exactly: the
    same situation, made without depending on which way a promotion gate goes on tiny models.
    """
    p0, first, again, info = _two_rounds(small_world[0].home, "still", "same")
    assert p0.round == 0 and "note" not in first
    assert again["key"] == first["key"] and again["version"] != first["version"]  # its own registry version
    assert again["note"].startswith("round 1 has exactly the mid-training inputs of round 0")
    t0, t1 = info["tags"]
    assert t0[T_DATA] == t1[T_DATA] and t0[T_DATA_SLICE] == t1[T_DATA_SLICE] == "0"
    report = round_report(info["cfg"], replace(p0, round=1), {"metrics": {}}, {"metrics": {}},
                          {"promoted": False, "reason": "kept v1"}, note=again["note"])
    assert "the flywheel is standing still" in report


def test_consecutive_rounds_with_next_slice_anneal_on_different_slices_and_fingerprints(small_world):
    _, first, again, info = _two_rounds(small_world[0].home, "moving", "next_slice")
    t0, t1 = info["tags"]
    assert (t0[T_DATA_SLICE], t1[T_DATA_SLICE]) == ("0", "1")
    assert t0[T_DATA] != t1[T_DATA] and again["key"] != first["key"] and "note" not in again
    assert t0[T_DATA_EPOCHS].startswith("world:midtrain epochs 0.00-")
    assert t1[T_DATA_EPOCHS].split("epochs ")[1].split("-")[0] == t0[T_DATA_EPOCHS].split("-")[-1]  # reads on
