"""A seeded, deterministic generator of arithmetic reasoning problems with verifiable answers (GSM8K format).

Every problem has a `key`: its level plus its arithmetic content. A stable hash of the key decides once and for
all whether the problem is held out for evaluation, so training and evaluation sets are disjoint by problem
identity no matter which seeds or sizes anyone asks for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

LEVELS = (1, 2, 3, 4, 5)
LEVEL_NAMES = {
    1: "one-digit addition",
    2: "two-digit addition and subtraction",
    3: "three-number arithmetic",
    4: "two-step word problems",
    5: "two-digit by one-digit multiplication",
}

NAMES = {
    "Ann": "She",
    "Mia": "She",
    "Sara": "She",
    "Lily": "She",
    "Tom": "He",
    "Ben": "He",
    "Sam": "He",
    "Leo": "He",
}
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells")
COLOURS = ("red", "blue", "green", "yellow", "white", "black")
CONTAINERS = ("box", "bag", "basket", "jar", "cup")
FURNITURE = ("table", "door", "window", "bed", "chair", "shelf")
PLACES = ("park", "shop", "school", "garden", "river", "farm", "market", "library")


@dataclass(frozen=True)
class Problem:
    level: int  # 1..5
    key: str  # problem identity: level + arithmetic content, e.g. "L3:23+15-9"
    question: str
    steps: tuple[str, ...]  # worked solution lines, each "a op b = c"
    answer: int

    @property
    def solution(self) -> str:
        """The worked solution ending in the GSM8K final-answer line."""
        return "\n".join(self.steps) + f"\n#### {self.answer}"

    @property
    def text(self) -> str:
        """The whole GSM8K-style document: question then solution."""
        return f"{self.question}\n{self.solution}"


def _apply(a: int, op: str, b: int) -> int:
    """Evaluate one worked step; the only three operations the world uses."""
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    """Write one worked line "a op b = c" and return it with its result."""
    c = _apply(a, op, b)
    return f"{a} {op} {b} = {c}", c


def _parse_step(line: str) -> tuple[int, str, int, int]:
    """Split a worked line "a op b = c" back into its numbers, for corrupting it."""
    a, op, b, _, c = line.split()
    return int(a), op, int(b), int(c)


# ---------------------------------------------------------------------------------------------------------
# one builder per level: draw numbers from rng, return the Problem


def _level1(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 20), rng.randint(0, 9)
    line, c = _step(a, "+", b)
    return Problem(1, f"L1:{a}+{b}", f"What is {a} + {b}?", (line,), c)


def _level2(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    line, c = _step(a, op, b)
    return Problem(2, f"L2:{a}{op}{b}", f"What is {a} {op} {b}?", (line,), c)


def _level3(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = rng.randint(1, a + b)
    line1, s = _step(a, "+", b)
    line2, r = _step(s, "-", c)
    return Problem(3, f"L3:{a}+{b}-{c}", f"What is ({a} + {b}) - {c}?", (line1, line2), r)


# Word-problem templates: (question with {a} {b} {c} and name/item slots, first op, second op, draw numbers).
# The first step is "a op1 b", the second is "result op2 c". Draws keep every intermediate and answer >= 0.
_Template = tuple[str, str, str, Callable[[random.Random], tuple[int, int, int]]]


def _draw_add_sub(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 40), rng.randint(1, 20)
    return a, b, rng.randint(1, a + b)


def _draw_sub_add(rng: random.Random) -> tuple[int, int, int]:
    a = rng.randint(5, 40)
    return a, rng.randint(1, a), rng.randint(1, 20)


def _draw_sub_sub(rng: random.Random) -> tuple[int, int, int]:
    a = rng.randint(5, 50)
    b = rng.randint(1, a - 1)
    return a, b, rng.randint(1, a - b)


def _draw_add_add(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(2, 40), rng.randint(1, 20), rng.randint(1, 20)


def _draw_mul_sub(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, b, rng.randint(1, a * b)


def _draw_mul_add(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)


TEMPLATES: tuple[_Template, ...] = (
    (
        "{N} has {a} {items}. {P} buys {b} more. Then {p} gives {c} away. How many {items} does {N} have now?",
        "+", "-", _draw_add_sub,
    ),
    (
        "{N} has {a} {items}. {P} gives {b} to {M}. Then {p} finds {c} more. How many {items} does {N} have now?",
        "-", "+", _draw_sub_add,
    ),
    (
        "{N} has {a} {items} and {M} has {b} {items}. They put them together and give {c} away. "
        "How many {items} do they have left?",
        "+", "-", _draw_add_sub,
    ),
    (
        "{N} had {a} {items}. {P} lost {b} of them and then gave {c} to {M}. How many {items} does {N} have left?",
        "-", "-", _draw_sub_sub,
    ),
    (
        "There are {a} {items} in a box. {N} puts in {b} more and {M} puts in {c} more. "
        "How many {items} are in the box now?",
        "+", "+", _draw_add_add,
    ),
    (
        "{N} has {a} bags with {b} {items} each. {P} loses {c} {items}. How many {items} does {N} have now?",
        "*", "-", _draw_mul_sub,
    ),
    (
        "{N} has {a} boxes with {b} {items} in each box. {M} gives {N} {c} more {items}. "
        "How many {items} does {N} have now?",
        "*", "+", _draw_mul_add,
    ),
)  # fmt: skip


def _level4(rng: random.Random) -> Problem:
    t = rng.randrange(len(TEMPLATES))
    wording, op1, op2, draw = TEMPLATES[t]
    a, b, c = draw(rng)
    name, other = rng.sample(sorted(NAMES), 2)
    pronoun = NAMES[name]
    question = wording.format(
        N=name, M=other, P=pronoun, p=pronoun.lower(), items=rng.choice(ITEMS), a=a, b=b, c=c
    )
    line1, s = _step(a, op1, b)
    line2, r = _step(s, op2, c)
    return Problem(4, f"L4:t{t}:{a}{op1}{b}{op2}{c}", question, (line1, line2), r)


_L5_FIRST = [x for x in range(11, 100) if x % 10 != 0]


def _level5(rng: random.Random) -> Problem:
    a = rng.choice(_L5_FIRST)
    b = rng.randint(2, 9)
    tens, units = a - a % 10, a % 10
    line1, p1 = _step(tens, "*", b)
    line2, p2 = _step(units, "*", b)
    line3, r = _step(p1, "+", p2)
    return Problem(5, f"L5:{a}*{b}", f"What is {a} * {b}?", (line1, line2, line3), r)


_BUILDERS: dict[int, Callable[[random.Random], Problem]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
}


# ---------------------------------------------------------------------------------------------------------
# the train/eval split and the generator


def _stable_int(s: str) -> int:
    """A 64-bit integer from sha256 of a string: stable across processes, unlike Python's hash()."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def is_heldout(key: str, fraction: float = 0.1) -> bool:
    """Decide by a stable hash of the problem's identity whether it belongs to evaluation, never to training."""
    return _stable_int(key) / 2**64 < fraction


def generate(level: int, n: int, seed: int, split: Literal["train", "eval"]) -> list[Problem]:
    """Make n problems of one level, deterministic in (level, n, seed, split), drawn only from that split's keys."""
    if level not in _BUILDERS:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(_stable_int(f"{seed}:{level}:{split}"))
    want_heldout = split == "eval"
    problems: list[Problem] = []
    seen: set[str] = set()
    # rejection sampling; the bound stops small levels (L1 has ~21 held-out keys) from looping forever
    for _ in range(50 * n + 20_000):
        if len(problems) >= n:
            break
        problem = _BUILDERS[level](rng)
        if is_heldout(problem.key) != want_heldout:
            continue
        if want_heldout:  # evaluation problems are distinct; training may repeat
            if problem.key in seen:
                continue
            seen.add(problem.key)
        problems.append(problem)
    return problems


def corrupt(problem: Problem, rng: random.Random) -> str:
    """Write a plausible but wrong solution (one slipped step, carried through) as a DPO "rejected" answer."""
    steps = [_parse_step(line) for line in problem.steps]
    for _ in range(100):
        i = rng.randrange(len(steps))
        true_value = steps[i][3]
        slips = [-3, -2, -1, 1, 2, 3] + [s * 10**k for k in range(1, len(str(true_value))) for s in (-1, 1)]
        wrong = true_value + rng.choice(slips)  # off by a little, or one digit slipped by one
        lines, final = _carry(steps, i, wrong)
        if wrong >= 0 and final >= 0 and final != problem.answer:
            return "\n".join(lines) + f"\n#### {final}"
    # unreachable in practice: raising the last step by one always changes the answer
    lines, final = _carry(steps, len(steps) - 1, problem.answer + 1)
    return "\n".join(lines) + f"\n#### {final}"


def _carry(steps: list[tuple[int, str, int, int]], i: int, wrong: int) -> tuple[list[str], int]:
    """Replace step i's result with a wrong value and recompute later steps that use it, consistently.

    A later step uses an earlier result through its left operand (chains like L3/L4) or, failing that, its
    right operand (L5's final sum of partial products); left is checked first so "38 - 38" changes only once.
    """
    changed: dict[int, int] = {}
    lines: list[str] = []
    result = 0
    for j, (a, op, b, c) in enumerate(steps):
        if j == i:
            result = wrong
        elif j > i:
            if a in changed:
                a = changed[a]
            elif b in changed:
                b = changed[b]
            result = _apply(a, op, b)
        else:
            result = c
        if result != c:
            changed[c] = result
        lines.append(f"{a} {op} {b} = {result}")
    return lines, result


# ---------------------------------------------------------------------------------------------------------
# pre-training text: short prose and bare arithmetic facts, from a deliberately tiny vocabulary


def prose(rng: random.Random) -> str:
    """Make one to three short plain sentences so the pre-training corpus has language, not only sums."""
    name, other = rng.sample(sorted(NAMES), 2)
    pronoun = NAMES[name]
    possessive = "her" if pronoun == "She" else "his"
    colour, container, thing = rng.choice(COLOURS), rng.choice(CONTAINERS), rng.choice(FURNITURE)
    items, place = rng.choice(ITEMS), rng.choice(PLACES)
    sentences = [
        f"The {colour} {container} is {rng.choice(('next to', 'under', 'on', 'behind', 'near'))} the {thing}.",
        f"{name} keeps {possessive} {items} in the {colour} {container}.",
        f"{name} and {other} walk to the {place}.",
        f"It is a {rng.choice(('sunny', 'cold', 'warm', 'rainy', 'quiet'))} day at the {place}.",
        f"{name} likes {colour} {items}.",
        f"{name} has {rng.randint(2, 12)} {items}.",
        f"{pronoun} gives some {items} to {other}.",  # never first: it needs "{name}" before it
    ]
    start = rng.randrange(len(sentences) - 1)
    count = rng.randint(1, 3)
    return " ".join(sentences[(start + k) % len(sentences)] for k in range(count))


def arithmetic_fact(rng: random.Random) -> str:
    """Make one bare true fact like "8 + 7 = 15", never one that answers a held-out L1/L2/L5 question."""
    while True:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 9)
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "-" and a < b:
                a, b = b, a
        if not any(is_heldout(f"L{level}:{a}{op}{b}") for level in (1, 2, 5)):
            return _step(a, op, b)[0]
