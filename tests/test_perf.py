"""The speed monitor's arithmetic: FLOPs per token against a hand count, MFU from tokens/s and a declared peak."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flywheel.perf import SpeedMeter, batch_tokens, flops_per_token, model_shape, speed_summary

# a Llama of 2 layers, hidden 64, MLP 128, vocabulary 300, counted by hand:
#   per layer: q, k, v, o 4 x 64 x 64 = 16,384; gate, up, down 3 x 64 x 128 = 24,576; two RMSNorms 128 -> 41,088
#   2 layers 82,176 + final norm 64 + output head 300 x 64 = 19,200 -> 101,440 non-embedding parameters
#   FLOPs per token at T = 128: 6 x 101,440 + 12 x 2 layers x 64 x 128 = 608,640 + 196,608 = 805,248
HAND_PARAMS, HAND_FLOPS_128 = 101_440, 805_248


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_match_a_hand_count_with_the_output_head_counted_once(tied):
    conf = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied)
    shape = model_shape(LlamaForCausalLM(conf))
    assert shape == (HAND_PARAMS, 2, 64)
    assert flops_per_token(*shape[:1], 0, *shape[1:], seq_len=128) == HAND_FLOPS_128


def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_declared_peak():
    meter = SpeedMeter((HAND_PARAMS, 2, 64), peak_tflops=0.5, world_size=4)
    for _ in range(3):
        meter.add(*batch_tokens({"input_ids": torch.zeros(8, 128, dtype=torch.long),
                                 "doc_ids": torch.zeros(8, 128, dtype=torch.long)}))  # doc ids are not tokens
    out = meter.flush(step=3)
    assert out["perf/tokens_per_s"] == pytest.approx(4 * out["perf/tokens_per_s_per_device"])
    assert out["perf/mfu"] == pytest.approx(out["perf/tokens_per_s_per_device"] * HAND_FLOPS_128 / 0.5e12)
    assert out["perf/step_s"] > 0 and meter.tokens == 0  # flushed: the next line counts afresh


def test_grpo_batches_count_prompt_and_completion_ids_and_the_summary_skips_the_warm_up_line():
    batch = {"prompt_ids": torch.zeros(4, 10, dtype=torch.long), "completion_ids": torch.zeros(4, 6, dtype=torch.long),
             "advantages": torch.zeros(4)}
    assert batch_tokens(batch) == (64, 16)
    assert batch_tokens([{"prompt": "2+2="}]) == (0, 0)  # GRPO's training_step sees prompt rows: counted later
    history = [{"loss": 1.0, "perf/tokens_per_s": 10.0}, {"loss": 0.9, "perf/tokens_per_s": 100.0},
               {"loss": 0.8, "perf/tokens_per_s": 200.0, "perf/mfu": 0.2}]
    assert speed_summary(history) == {"tokens_per_s": 150.0, "mfu": 0.2}
