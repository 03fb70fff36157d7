import random
import re

import pytest

from flywheel.answers import extract_answer, is_correct
from flywheel.world.tasks import (
    LEVEL_NAMES,
    LEVELS,
    Problem,
    arithmetic_fact,
    corrupt,
    generate,
    is_heldout,
    prose,
)

STEP = re.compile(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")


def parse_step(line: str) -> tuple[int, str, int, int]:
    """Split one worked line "a op b = c" into its parts."""
    m = STEP.match(line)
    assert m, f"not an 'a op b = c' line: {line!r}"
    return int(m[1]), m[2], int(m[3]), int(m[4])


def is_true(line: str) -> bool:
    """Whether one worked line is true arithmetic."""
    a, op, b, c = parse_step(line)
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


def check_step(line: str) -> int:
    """Assert one worked line is true arithmetic and return its result."""
    assert is_true(line), line
    return parse_step(line)[3]


@pytest.mark.parametrize("level", LEVELS)
def test_generate_is_deterministic_for_the_same_arguments(level: int) -> None:
    assert generate(level, 50, seed=3, split="train") == generate(level, 50, seed=3, split="train")
    assert generate(level, 20, seed=3, split="eval") == generate(level, 20, seed=3, split="eval")


@pytest.mark.parametrize("level", LEVELS)
def test_generate_differs_across_seeds(level: int) -> None:
    assert generate(level, 50, seed=1, split="train") != generate(level, 50, seed=2, split="train")


def test_generate_does_not_touch_global_random_state() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate(4, 100, seed=0, split="train")
    assert random.random() == expected


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_problem_has_true_steps_and_a_matching_final_answer(level: int, split: str) -> None:
    problems = generate(level, 300, seed=0, split=split)  # type: ignore[arg-type]
    assert problems
    for p in problems:
        assert p.level == level and p.key.startswith(f"L{level}:")
        results = [check_step(line) for line in p.steps]
        assert p.answer == results[-1] and p.answer >= 0
        assert p.solution.endswith(f"\n#### {p.answer}")
        assert p.text == f"{p.question}\n{p.solution}"
        assert extract_answer(p.text) == str(p.answer)
        assert is_correct(p.solution, p.answer)


def test_levels_have_the_documented_shapes() -> None:
    l1, l2, l3, l4, l5 = (generate(level, 200, seed=0, split="train") for level in LEVELS)
    assert all(len(p.steps) == 1 and " + " in p.steps[0] for p in l1)
    assert {p.steps[0].split()[1] for p in l2} == {"+", "-"}
    assert all(len(p.steps) == 2 and p.question.startswith("What is (") for p in l3)
    assert any(" * " in p.steps[0] for p in l4) and all(len(p.steps) == 2 for p in l4)
    assert len({p.key.split(":")[1] for p in l4}) >= 6  # at least six templates in use
    assert all(len(p.steps) == 3 and p.steps[0].split()[0].endswith("0") for p in l5)
    assert set(LEVEL_NAMES) == set(LEVELS)


def test_word_problem_keys_ignore_names_and_items() -> None:
    l4 = generate(4, 300, seed=0, split="train")
    assert all(not any(ch.isalpha() for ch in p.key.split(":", 2)[2]) for p in l4)
    for p in l4:
        for number in re.findall(r"\d+", p.key.split(":", 2)[2]):
            assert number in p.question


@pytest.mark.parametrize("level", LEVELS)
def test_eval_keys_are_disjoint_from_train_keys(level: int) -> None:
    train = generate(level, 300, seed=0, split="train")
    held = generate(level, 300, seed=0, split="eval")
    assert all(not is_heldout(p.key) for p in train)
    assert all(is_heldout(p.key) for p in held)
    assert not {p.key for p in train} & {p.key for p in held}


@pytest.mark.parametrize("level", LEVELS)
def test_eval_keys_are_distinct(level: int) -> None:
    held = generate(level, 300, seed=0, split="eval")
    assert len({p.key for p in held}) == len(held)


def test_l1_eval_returns_every_heldout_problem_and_stops_when_they_run_out() -> None:
    all_keys = {f"L1:{a}+{b}" for a in range(21) for b in range(10)}
    heldout = {k for k in all_keys if is_heldout(k)}
    assert 0 < len(heldout) < 300
    held = generate(1, 300, seed=0, split="eval")
    assert {p.key for p in held} == heldout


def test_is_heldout_is_stable_and_holds_out_about_the_requested_fraction() -> None:
    keys = [f"L2:{a}+{b}" for a in range(10, 100) for b in range(10, 100)]
    share = sum(is_heldout(k) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert 0.45 < sum(is_heldout(k, fraction=0.5) for k in keys) / len(keys) < 0.55
    assert is_heldout("L1:7+5") == is_heldout("L1:7+5")
    assert not any(is_heldout(k, fraction=0.0) for k in keys)


@pytest.mark.parametrize("level", LEVELS)
def test_corrupt_gives_a_wrong_final_answer(level: int) -> None:
    rng = random.Random(0)
    for p in generate(level, 300, seed=0, split="train"):
        bad = corrupt(p, rng)
        wrong = extract_answer(bad)
        assert wrong is not None and int(wrong) != p.answer and int(wrong) >= 0
        assert not is_correct(bad, p.answer)


@pytest.mark.parametrize("level", LEVELS)
def test_corrupt_slips_exactly_one_step_and_carries_the_error_through(level: int) -> None:
    rng = random.Random(1)
    for p in generate(level, 300, seed=1, split="train"):
        bad = corrupt(p, rng).split("\n")
        assert len(bad) == len(p.steps) + 1
        assert sum(not is_true(line) for line in bad[:-1]) == 1, bad  # later lines recomputed correctly
        assert bad[-1] == f"#### {parse_step(bad[-2])[3]}"
        # the untouched operands are the problem's own: same operator sequence, same first operand
        assert [parse_step(line)[1] for line in bad[:-1]] == [parse_step(line)[1] for line in p.steps]
        assert parse_step(bad[0])[0] == parse_step(p.steps[0])[0]


@pytest.mark.parametrize("level", LEVELS)
def test_corrupt_slips_every_step_position_sometimes(level: int) -> None:
    rng = random.Random(2)
    slipped = set()
    for p in generate(level, 300, seed=2, split="train"):
        bad = corrupt(p, rng).split("\n")[:-1]
        slipped.add(next(i for i, line in enumerate(bad) if not is_true(line)))
    assert slipped == set(range(len(p.steps)))  # e.g. L5's second partial product is carried into the sum


def test_prose_and_facts_use_a_small_vocabulary() -> None:
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(2000):
        words.update(re.findall(r"[A-Za-z]+", prose(rng)))
    for p in generate(4, 500, seed=0, split="train"):
        words.update(re.findall(r"[A-Za-z]+", p.question))
    assert 30 < len(words) < 300


def test_prose_has_one_to_three_sentences() -> None:
    rng = random.Random(0)
    counts = {prose(rng).count(". ") + 1 for _ in range(500)}
    assert counts == {1, 2, 3}


def test_arithmetic_facts_are_true_and_never_answer_heldout_questions() -> None:
    rng = random.Random(0)
    ops = set()
    for _ in range(2000):
        fact = arithmetic_fact(rng)
        check_step(fact)
        a, op, b = fact.split()[:3]
        ops.add(op)
        assert not any(is_heldout(f"L{level}:{a}{op}{b}") for level in (1, 2, 5))
    assert ops == {"+", "-", "*"}


def test_problem_is_immutable() -> None:
    p = Problem(1, "L1:1+1", "What is 1 + 1?", ("1 + 1 = 2",), 2)
    with pytest.raises(AttributeError):
        p.answer = 3  # type: ignore[misc]


def test_generate_rejects_unknown_levels_and_splits() -> None:
    with pytest.raises(ValueError):
        generate(6, 1, seed=0, split="train")
    with pytest.raises(ValueError):
        generate(1, 1, seed=0, split="test")  # type: ignore[arg-type]
