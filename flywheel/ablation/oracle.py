"""The positive control's reference: the RL reference, made certain of every final answer.

An "oracle" is not a model anyone trained: it is the RL reference's log-probs with the answer tokens
(flywheel/ablation/tokens.py: after `####`, to the end of the line) set to log 1 = 0, as a verifier
that knows the correct answer would score them. ReMiT reads reference log-probs from a cache
(flywheel/remit/scoring.py), so the oracle is that cache, written under the key of an oracle *folder*:
the RL reference's weights with `flywheel_oracle` in its config.json, so its identity (and every key
built on it) differs from the RL reference's. Scoring that folder with the model itself would give
the RL reference's numbers, so `write_oracle_cache` must run before the anneal that reads it; the
cell (flywheel/ablation/cell.py) does that for every `oracle` variant.

The control (declared before any number was seen): at ε = none, ReMiT guided by the oracle must lower
the held-out answer-token loss faster than NTP. If it does not, the weights do not reach the tokens
they are computed for, and nothing else in the study can be read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.data.io import atomic_dir
from flywheel.errors import FlywheelError

ORACLE_KEY = "flywheel_oracle"
ANSWER_LOGPROB = 0.0
# the ablation's reference roles that are oracles, and what each is certain of (tokens.CERTAIN_OF)
ORACLE_ROLES = {"oracle": "answers", "oracle_results": "results"}


def oracle_folder(cfg: FlywheelConfig, reference: str, certain_of: str = "answers") -> Path:
    """The oracle's folder for this RL reference (its weights, marked as an oracle); made once."""
    from flywheel.models import model_identity
    from flywheel.refs import model_location

    ref_path = Path(model_location(cfg, reference))
    ident = model_identity(str(ref_path))
    final = cfg.home / "cache" / "oracle" / (ident if certain_of == "answers" else f"{ident}-{certain_of}")
    if (final / "config.json").exists():
        return final
    with atomic_dir(final) as tmp:
        for f in ref_path.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        config = json.loads((tmp / "config.json").read_text())
        config[ORACLE_KEY] = {"of": ident, "answer_logprob": ANSWER_LOGPROB,
                              "about": "RL reference with log p = 0 on every final-answer token"}
        if certain_of != "answers":  # the first oracle's identity stays as it was made
            config[ORACLE_KEY].update(certain_of=certain_of, about="RL reference with log p = 0 on every final-answer "
                                                                   "token and every computed value (digits right of =)")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return final


def oracle_logprobs(lp: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """The oracle's log-probs: the reference's, with the answer tokens certain."""
    out = np.array(lp, copy=True)
    out[answers] = ANSWER_LOGPROB
    return out


def write_oracle_cache(cfg: FlywheelConfig, reference: str, oracle: str | Path, certain_of: str = "answers") -> Path:
    """The reference cache ReMiT will read for `oracle` on this config's mixture (reused when present)."""
    from flywheel.ablation.tokens import answer_mask, pieces
    from flywheel.models import load_tokenizer, tokenizer_identity
    from flywheel.remit.scoring import cache_key, open_cache, score_reference, write_derived_cache

    if cfg.midtrain.reference_mode != "cached":
        raise FlywheelError("the oracle reference exists only as a cache; set midtrain.reference_mode: cached")
    tok = load_tokenizer(cfg)
    source = score_reference(cfg, reference)  # the RL reference's own cache for this mixture
    packed = source.corpus.load()
    key = cache_key(cfg, str(oracle), tokenizer_identity(tok), source.corpus.key)
    final = cfg.home / "cache" / "reference" / key
    rows, seq_len = len(packed), cfg.midtrain.seq_len
    if (final / "index.json").exists():
        open_cache(final, key, rows, seq_len)
        return final
    table = pieces(tok)
    answers = 0

    def certain(c: int, lp: np.ndarray) -> np.ndarray:
        nonlocal answers
        lo, arr = c * source.cache.rows_per_chunk, np.array(lp, copy=True)
        for r in range(len(arr)):
            mask = answer_mask(np.asarray(packed.input_ids[lo + r]), table, certain_of)
            answers += int(mask.sum())
            arr[r][mask] = ANSWER_LOGPROB
        return arr

    def index_fields() -> dict:
        if not answers:
            raise FlywheelError("the oracle reference: the mid-training data has no answer tokens (text after "
                                "`####` on a line), so an oracle would equal the RL reference; use GSM-style data")
        from flywheel.models import model_identity

        return {"reference": str(oracle), "oracle_of": reference, "answer_tokens": answers,
                "certain_of": certain_of, "reference_identity": model_identity(str(oracle))}

    write_derived_cache(source.cache, final, key, certain, index_fields)
    return final
