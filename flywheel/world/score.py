"""A quick greedy accuracy check on held-out problems: the calibration ladder of `world build`.

The evaluation stage proper runs lm-eval; this is the in-process check that tells whether
the tiny world still carries signal (neither 0% nor 100% everywhere).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from flywheel.answers import first_answer, is_correct


@torch.inference_mode()
def greedy_accuracy(model: Any, tok: Any, rows: Sequence[dict[str, Any]], batch_size: int = 100,
                    max_new_tokens: int = 48) -> dict[int, float]:
    """Accuracy per level of greedy answers to `question\\n` prompts (the pre-training document format)."""
    model.eval()
    hits: dict[int, list[bool]] = defaultdict(list)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([r["question"] + "\n" for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, text in zip(chunk, texts, strict=True):
            hits[int(row["level"])].append(is_correct(first_answer(text), row["answer"]))
    return {lvl: sum(v) / len(v) for lvl, v in sorted(hits.items())}
