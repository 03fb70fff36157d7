"""On-policy DPO pairs: sample k answers per prompt from the current model, pair a right one with a wrong one.

Users without preference data get DPO from any verifiable prompt+answer data (e.g. `world:rl`); the
verifier is the shared `is_correct` rule, so "right" means exactly what the evaluation and GRPO mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flywheel.posttrain.rewards import completion_text, math_answer

log = logging.getLogger("flywheel.posttrain")


@dataclass
class PairStats:
    """How many prompts gave a pair, and why the others were dropped."""

    prompts: int = 0
    pairs: int = 0
    all_correct: int = 0
    all_wrong: int = 0
    samples_per_prompt: int = 0
    accuracy: float = 0.0  # share of all samples that were right: the sampled policy's accuracy
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        dropped = self.prompts - self.pairs
        return (f"{self.pairs} pairs from {self.prompts} prompts x {self.samples_per_prompt} samples "
                f"(sample accuracy {self.accuracy:.1%}); dropped {dropped}: {self.all_correct} all right, "
                f"{self.all_wrong} all wrong")


def pair_samples(prompt: Any, answer: Any, samples: list[str]) -> dict[str, Any] | None:
    """One DPO pair from k samples: the first right answer as chosen, the first wrong one as rejected."""
    right = math_answer(samples, [answer] * len(samples))
    chosen = next((s for s, r in zip(samples, right, strict=True) if r == 1.0), None)
    rejected = next((s for s, r in zip(samples, right, strict=True) if r == 0.0), None)
    if chosen is None or rejected is None:
        return None
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def build_pairs(rows: list[dict[str, Any]], samples: list[list[str]]
                ) -> tuple[list[dict[str, Any]], PairStats]:
    """Pairs for every prompt whose samples were mixed; the rest are counted, not silently lost."""
    stats = PairStats(prompts=len(rows), samples_per_prompt=len(samples[0]) if samples else 0)
    pairs, right_total = [], 0
    for row, group in zip(rows, samples, strict=True):
        right = sum(math_answer(group, [row["answer"]] * len(group)))
        right_total += int(right)
        pair = pair_samples(row["prompt"], row["answer"], group)
        if pair is not None:
            pairs.append(pair)
        elif right == len(group):
            stats.all_correct += 1
        else:
            stats.all_wrong += 1
    stats.pairs = len(pairs)
    stats.accuracy = right_total / max(1, sum(len(g) for g in samples))
    return pairs, stats


def sample_completions(model: Any, tok: Any, prompts: list[Any], k: int, max_new_tokens: int = 64,
                       temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> list[list[str]]:
    """k sampled replies per chat prompt, decoded without special tokens (what the chat user would see)."""
    import torch

    torch.manual_seed(seed)
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right
    model.eval()
    out: list[list[str]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                     num_return_sequences=k, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [[t.strip() for t in texts[j : j + k]] for j in range(0, len(texts), k)]
    finally:
        tok.padding_side = side
    return out


def on_policy_pairs(model: Any, tok: Any, rows: list[dict[str, Any]], k: int, max_new_tokens: int,
                    temperature: float, seed: int) -> tuple[list[dict[str, Any]], PairStats]:
    """Sample from the model, verify, pair; logs how many prompts were dropped and why."""
    prompts = [r["prompt"] for r in rows]
    samples = sample_completions(model, tok, prompts, k, max_new_tokens, temperature, seed)
    pairs, stats = build_pairs(rows, [[completion_text(s) for s in g] for g in samples])
    log.info("on-policy DPO: %s", stats.summary())
    return pairs, stats
