"""Every corpus the flywheel reads, generated once per world build from the task generator.

Training corpora draw only problems whose identity is not held out; `eval`/`eval_mc` draw
only held-out identities (see `tasks.is_heldout`), so evaluation is disjoint by construction.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flywheel.config import WorldConfig
from flywheel.data.io import write_jsonl
from flywheel.world import tasks

# Pre-training: mostly easy problems among prose and facts, so the base knows the format
# but is weak at the hard levels. Mid-training: reasoning-heavy, harder levels weighted up.
PRETRAIN_MIX = {"prose": 0.35, "facts": 0.30, "problems": 0.35}
PRETRAIN_LEVELS = {1: 0.30, 2: 0.25, 3: 0.20, 4: 0.15, 5: 0.10}
MIDTRAIN_PROSE = 0.10
MIDTRAIN_LEVELS = {1: 0.10, 2: 0.20, 3: 0.20, 4: 0.25, 5: 0.25}


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


def _problems(rng: random.Random, levels: dict[int, float], n: int, seed: int, tag: str) -> list[tasks.Problem]:
    """n training problems with the level mix `levels`, deterministic for (seed, tag)."""
    counts = {lvl: 0 for lvl in levels}
    for lvl in rng.choices(list(levels), weights=list(levels.values()), k=n):
        counts[lvl] += 1
    out = [p for lvl, k in counts.items() if k for p in tasks.generate(lvl, k, seed=hash_seed(seed, tag), split="train")]
    rng.shuffle(out)
    return out


def hash_seed(seed: int, tag: str) -> int:
    """A per-corpus seed so two corpora never replay the same problem stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{tag}".encode()).digest()[:4], "little") % (2**31)


def _facts(rng: random.Random) -> str:
    return "\n".join(tasks.arithmetic_fact(rng) for _ in range(rng.randint(3, 8)))


def pretrain_docs(n: int, seed: int, tag: str = "pretrain") -> list[str]:
    """General text: template prose, arithmetic facts and (mostly easy) solved problems."""
    rng = _rng(seed, tag)
    kinds = rng.choices(list(PRETRAIN_MIX), weights=list(PRETRAIN_MIX.values()), k=n)
    problems = iter(_problems(rng, PRETRAIN_LEVELS, kinds.count("problems"), seed, tag))
    docs = []
    for kind in kinds:
        if kind == "prose":
            docs.append(tasks.prose(rng))
        elif kind == "facts":
            docs.append(_facts(rng))
        else:
            docs.append(next(problems).text)
    return docs


def midtrain_docs(n: int, seed: int) -> list[str]:
    """The reasoning-heavy anneal mix: ~10% prose, the rest problems weighted to the hard levels."""
    rng = _rng(seed, "midtrain")
    n_prose = int(n * MIDTRAIN_PROSE)
    docs = [tasks.prose(rng) for _ in range(n_prose)]
    docs += [p.text for p in _problems(rng, MIDTRAIN_LEVELS, n - n_prose, seed, "midtrain")]
    rng.shuffle(docs)
    return docs


def heldout_pretrain_docs(n: int, seed: int) -> list[str]:
    """Pre-training-style text for held-out loss: fresh prose/facts and held-out problems only."""
    rng = _rng(seed, "pretrain-heldout")
    docs = []
    held = [p for lvl in tasks.LEVELS for p in tasks.generate(lvl, max(1, n // 10), seed=seed + 1, split="eval")]
    for i in range(n):
        docs.append(tasks.prose(rng) if i % 3 == 0 else _facts(rng) if i % 3 == 1 else rng.choice(held).text)
    return docs


def heldout_midtrain_docs(n: int, seed: int) -> list[str]:
    """Text like the anneal mix (same prose share and level weights) whose problems are held out of training.

    For token-level measures on "the mid-training distribution": drawn from the held-out identities
    (`tasks.is_heldout`), so no training corpus contains them, with a stream of its own.
    """
    rng = _rng(seed, "midtrain-heldout")
    n_prose = int(n * MIDTRAIN_PROSE)
    counts = {lvl: 0 for lvl in MIDTRAIN_LEVELS}
    for lvl in rng.choices(list(MIDTRAIN_LEVELS), weights=list(MIDTRAIN_LEVELS.values()), k=n - n_prose):
        counts[lvl] += 1
    docs = [tasks.prose(rng) for _ in range(n_prose)]
    docs += [p.text for lvl, k in counts.items() if k
             for p in tasks.generate(lvl, k, seed=hash_seed(seed, "midtrain-heldout"), split="eval")]
    rng.shuffle(docs)
    return docs


def _mc_choices(p: tasks.Problem, rng: random.Random) -> tuple[list[str], int]:
    """The true answer among three near-miss distractors, in a seeded order."""
    wrong: set[int] = set()
    while len(wrong) < 3:
        cand = p.answer + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if cand >= 0 and cand != p.answer:
            wrong.add(cand)
    choices = [p.answer, *sorted(wrong)]
    rng.shuffle(choices)
    return [str(c) for c in choices], choices.index(p.answer)


def write_corpora(folder: Path, cfg: WorldConfig, seed: int) -> dict[str, int]:
    """Write every corpus as jsonl into `folder`; returns the row count of each."""
    rng = _rng(seed, "posttrain")
    counts: dict[str, int] = {}

    def put(name: str, rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> None:
        counts[name] = write_jsonl(folder / f"{name}.jsonl", rows)

    put("pretrain", ({"text": t} for t in pretrain_docs(cfg.pretrain_docs, seed)))
    put("pretrain_heldout", ({"text": t} for t in heldout_pretrain_docs(max(200, cfg.pretrain_docs // 50), seed)))
    put("midtrain", ({"text": t} for t in midtrain_docs(cfg.midtrain_docs, seed)))
    sft = _problems(rng, MIDTRAIN_LEVELS, cfg.sft_pairs, seed, "sft")
    put("sft", ({"id": p.key, "prompt": p.question, "completion": p.solution, "answer": str(p.answer), "level": p.level} for p in sft))
    dpo = _problems(rng, MIDTRAIN_LEVELS, cfg.dpo_pairs, seed, "dpo")
    put(
        "dpo",
        (
            {"id": p.key, "prompt": p.question, "chosen": p.solution, "rejected": tasks.corrupt(p, rng), "answer": str(p.answer),
             "level": p.level}
            for p in dpo
        ),
    )
    rl = _problems(rng, MIDTRAIN_LEVELS, cfg.rl_prompts, seed, "rl")
    put("rl", ({"id": p.key, "prompt": p.question, "answer": str(p.answer), "level": p.level} for p in rl))
    held = [p for lvl in tasks.LEVELS for p in tasks.generate(lvl, cfg.eval_per_level, seed=seed, split="eval")]
    put(
        "eval",
        ({"id": p.key, "level": p.level, "question": p.question, "solution": p.solution, "answer": str(p.answer)}
         for p in held),
    )
    mc_rows = []
    for p in held:
        choices, label = _mc_choices(p, rng)
        mc_rows.append({"id": p.key, "level": p.level, "question": p.question, "choices": choices, "label": label,
                        "answer": str(p.answer)})
    put("eval_mc", mc_rows)
    return counts
