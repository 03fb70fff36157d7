"""The round's stage functions without Prefect, on the small test world."""

from __future__ import annotations

from flywheel.rounds import plan_round, round_report, stage_midtrain

from .conftest import small_config


def test_a_round_with_an_earlier_rounds_exact_inputs_says_the_flywheel_stands_still(small_world):
    """What a rejected round leaves behind: the next round has the same base, reference and data.

    With an NTP objective every round has no reference, so round 1 repeats round 0 exactly: the
    same situation, made without depending on which way a promotion gate goes on tiny models.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the session world's home (its world is built there); the name keeps runs and registry apart
        cfg = small_config(small_world[0].home, name="still",
                           midtrain={"objective": "ntp", "token_budget": 1024, "batch_size": 4, "seq_len": 64})
        p0 = plan_round(cfg)
        first = stage_midtrain(cfg, p0)
        again = stage_midtrain(cfg, {**p0, "round": 1})
    finally:
        torch.set_num_threads(threads)
    assert p0["round"] == 0 and "note" not in first
    assert again["key"] == first["key"] and again["version"] != first["version"]  # its own registry version
    assert again["note"].startswith("round 1 has exactly the mid-training inputs of round 0")
    report = round_report(cfg, {**p0, "round": 1}, {"metrics": {}}, {"metrics": {}},
                          {"promoted": False, "reason": "kept v1"}, note=again["note"])
    assert "the flywheel is standing still" in report
