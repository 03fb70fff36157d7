"""What a cell measures on held-out text: KL to the reference, and the loss by token class and δ-bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flywheel.ablation.tokens as tokens
from flywheel.ablation.oracle import ORACLE_ROLES, oracle_logprobs
from flywheel.ablation.plan import AblationPlan
from flywheel.config import FlywheelConfig
from flywheel.data.io import read_jsonl


def heldout_texts(plan: AblationPlan) -> list[str]:
    """Up to `heldout_limit` held-out texts spread evenly (the world's eval file is sorted by level)."""
    if not plan.heldout:
        return []
    rows = read_jsonl(Path(plan.heldout))
    texts = [r["text"] if "text" in r else f"{r['question']}\n{r['solution']}" for r in rows]
    n = min(len(texts), plan.heldout_limit)
    return [texts[i * len(texts) // n] for i in range(n)] if n else []


def heldout_kl(cfg: FlywheelConfig, model_path: str | Path, reference: str | Path, texts: list[str],
               batch: int = 32) -> float:
    """Mean per-token KL(model ‖ reference) of the next-token distributions over held-out texts.

    How far mid-training moved the model toward (or away from) the reference, on text neither trained on.
    """
    import torch

    from flywheel.models import load_model, load_tokenizer
    from flywheel.remit.dynamics import mean_kl

    tok = load_tokenizer(cfg, str(model_path))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batches():  # noqa: ANN202
        for b in range(0, len(texts), batch):
            encoded = tok(texts[b : b + batch], add_special_tokens=False)["input_ids"]
            ids = [x + [tok.eos_token_id] for x in encoded]
            width = max(len(x) for x in ids)
            yield (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                   torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))

    return mean_kl(load_model(cfg, str(model_path), for_training=False),
                   load_model(cfg, str(reference), for_training=False), batches())


# The held-out split and every reference's δ-buckets, computed once per study and process: each cell's
# points are scored against the same ones.
_TOKEN_CONTEXT: dict[str, tuple[Any, dict[str, Any], Path]] = {}


def _reference_logprobs(cfg: FlywheelConfig, plan: AblationPlan, role: str, held: Any, tok: Any,
                        cache: Path) -> list[Any]:
    """One reference's log-probs of the held-out tokens; an oracle's are the RL one's, certain where it is."""
    if role not in ORACLE_ROLES:
        return tokens.model_scores(cfg, plan.references[role], held, cache)
    table = tokens.pieces(tok)
    return [oracle_logprobs(lp, tokens.answer_mask(ids, table, ORACLE_ROLES[role])[1:])
            for lp, ids in zip(tokens.model_scores(cfg, plan.references["rl"], held, cache), held.ids, strict=True)]


def _token_context(plan: AblationPlan, cfg: FlywheelConfig) -> tuple[Any, dict[str, Any], Path]:
    """The held-out split with its token classes, and the δ-buckets of every reference; once per study."""
    key = f"{plan.study}:{plan.token_heldout}"
    if key in _TOKEN_CONTEXT:
        return _TOKEN_CONTEXT[key]
    from flywheel.models import load_tokenizer

    tok = load_tokenizer(cfg)
    held = tokens.heldout_tokens([r["text"] for r in read_jsonl(Path(plan.token_heldout))], tok)
    cache = cfg.home / "cache" / "heldout-scores"
    base_lp = tokens.model_scores(cfg, plan.base, held, cache)
    buckets = {role: tokens.delta_buckets(tokens.centred_delta(
                   _reference_logprobs(cfg, plan, role, held, tok, cache), base_lp))
               for role, path in plan.references.items() if path}
    _TOKEN_CONTEXT[key] = (held, buckets, cache)
    return _TOKEN_CONTEXT[key]


def token_measures(plan: AblationPlan, cfg: FlywheelConfig, checkpoint: str | Path) -> dict[str, Any] | None:
    """Held-out NLL of one checkpoint by token class and by each reference's δ-bucket (None: no held-out text)."""
    if not plan.token_heldout:
        return None
    held, buckets, cache = _token_context(plan, cfg)
    return tokens.measures(tokens.model_scores(cfg, checkpoint, held, cache), held, buckets)
