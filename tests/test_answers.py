from fractions import Fraction

import pytest

from flywheel.answers import answers_match, extract_answer, is_correct, parse_number

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
WENG = (
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n"
    "#### 10"
)
BETTY = (
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
    "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
    "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n"
    "#### 5"
)

EXTRACTIONS = [
    # GSM8K final lines
    (NATALIA, "72"),
    (WENG, "10"),
    (BETTY, "5"),
    ("#### 42", "42"),
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### $1,000,000", "1000000"),
    ("#### 72 clips", "72"),
    ("#### 3.50", "3.5"),
    ("#### 42.0", "42"),
    ("#### 007", "7"),
    ("#### 6/8", "3/4"),
    ("#### 4/2", "2"),
    ("#### 1\nsome more thinking\n#### 2", "2"),
    # LaTeX boxed
    ("So we get \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{\\dfrac{6}{8}}", "3/4"),
    ("\\boxed{-7}", "-7"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("The total is \\boxed{\\$1{,}500}", "1500"),
    # stated-answer phrases
    ("The answer is 42.", "42"),
    ("the final answer is $1,000.", "1000"),
    ("the final answer is: $1,234", "1234"),
    ("Answer: 0.5", "0.5"),
    ("ANSWER: -12", "-12"),
    ("I think the answer is 3. No wait, the answer is 4.", "4"),
    ("Answer: **17**", "17"),
    # priority: #### beats boxed beats phrases
    ("The answer is 3.\n#### 9", "9"),
    ("The answer is 3. So \\boxed{8}", "8"),
    # no stated answer
    ("There are 3 cats and 4 dogs, so 7 animals.", None),
    ("", None),
    ("The answer is unclear.", None),
    ("####", None),
    ("\\boxed{x + 1}", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTIONS)
def test_extract_answer_finds_the_stated_final_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_does_not_guess_from_the_last_number_in_free_text() -> None:
    assert extract_answer("48 / 2 = 24 and 48 + 24 = 72") is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("42", Fraction(42)),
        ("-5", Fraction(-5)),
        ("1,234", Fraction(1234)),
        ("$1,000.", Fraction(1000)),
        ("3.50", Fraction(7, 2)),
        ("6/8", Fraction(3, 4)),
        ("-1/2", Fraction(-1, 2)),
        (" 0.1 ", Fraction(1, 10)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("abc", None),
        ("", None),
        ("1/0", None),
        ("1/2/3", None),
        ("--5", None),
    ],
)
def test_parse_number_reads_numbers_exactly_and_rejects_non_numbers(raw: str, value: Fraction | None) -> None:
    assert parse_number(raw) == value


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("0.5", "1/2", True),
        ("1,000", 1000, True),
        ("42", "42.0", True),
        ("42", 42.0, True),
        ("0.1", 0.1, True),
        ("-3", -3, True),
        ("41", 42, False),
        ("3/4", "0.7", False),
        (None, 3, False),
        ("abc", 3, False),
        ("7", "Two steps.\n3 + 4 = 7\n#### 7", True),
        ("8", "Two steps.\n3 + 4 = 7\n#### 7", False),
        ("7", "no answer in here", False),
    ],
)
def test_answers_match_compares_by_exact_value(
    predicted: str | None, reference: str | int | float, expected: bool
) -> None:
    assert answers_match(predicted, reference) is expected


def test_is_correct_scores_a_completion_against_a_reference() -> None:
    assert is_correct("3 + 4 = 7\n#### 7", 7)
    assert is_correct("so \\boxed{\\frac{1}{2}}", "0.5")
    assert not is_correct("3 + 4 = 8\n#### 8", 7)
    assert not is_correct("3 + 4 = 7", 7)  # correct arithmetic but no stated answer earns nothing
