"""Multi-round dynamics: a round's weight statistics, and the KL of its RL model to its reference on held-out text."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.remit.dynamics import heldout_rows, kl_to_reference, round_weight_stats

from .conftest import small_config


def test_round_weight_stats_average_the_logged_steps_and_ntp_weighs_every_token_one():
    history = [{"loss": 3.0}, {"remit/weight_std": 0.1, "remit/clip_high": 0.2, "remit/clip_low": 0.0,
                               "remit/delta_mean": -1.0},
               {"remit/weight_std": 0.3, "remit/clip_high": 0.4, "remit/clip_low": 0.1, "remit/delta_mean": 1.0}]
    assert round_weight_stats(history, "remit") == pytest.approx(
        {"remit/weight_std": 0.2, "remit/clip_high": 0.3, "remit/clip_low": 0.05, "remit/delta_mean": 0.0})
    assert round_weight_stats([{"loss": 3.0}], "ntp") == {"remit/weight_std": 0.0, "remit/clip_high": 0.0,
                                                          "remit/clip_low": 0.0}
    assert round_weight_stats([{"loss": 3.0}], "kd") == {}  # no weights, and not all ones either


def test_kl_is_zero_to_itself_positive_to_another_model_on_held_out_rows_the_round_did_not_read(small_world, tmp_path):
    from transformers import AutoTokenizer

    from flywheel.data.mixture import build_mixture
    from flywheel.models import load_tokenizer, tokenizer_identity
    from flywheel.world.model import tiny_random_model

    cfg = small_config(small_world[0].home, name="dyn", data={"slice": 1},
                       midtrain={"token_budget": 2048, "seq_len": 64, "batch_size": 4})
    rows = heldout_rows(cfg, n=8)
    tok = load_tokenizer(cfg)
    own = np.asarray(build_mixture(cfg, tok, tokenizer_identity(tok)).load().input_ids[:])
    assert rows.shape == (8, 64)
    assert not {r.tobytes() for r in rows} & {r.tobytes() for r in own}  # slice 2's text, not slice 1's
    world_tok = AutoTokenizer.from_pretrained(small_world[1].paths.tokenizer)
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        tiny_random_model("llama", world_tok, seed=seed, hidden=32, layers=1).save_pretrained(folder)
        folders.append(folder)
    assert kl_to_reference(cfg, folders[0], folders[0], rows) == pytest.approx(0.0, abs=1e-6)
    assert kl_to_reference(cfg, folders[0], folders[1], rows) > 1e-3
