"""GRPO reward functions, in TRL's signature `fn(completions, **columns) -> list[float]`, chosen by name.

Completions arrive as plain strings (standard prompts) or as `[{"role": "assistant", "content": ...}]`
(conversational prompts); every reward here accepts both. Dataset columns (`answer`, `tests`, ...) arrive
as keyword lists, one value per completion.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flywheel.answers import extract_answer, first_answer, is_correct
from flywheel.errors import FlywheelError
from flywheel.posttrain.sandbox import Limits, run_tests

RewardFn = Callable[..., list[float]]

# a `#### 42` line (the answer line the tiny world and GSM8K use) and an `a op b = c` working line
_HASH_LINE = re.compile(r"^\s*####[ \t]*\S")
_EQUATION = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*[-+*/x×]\s*-?\d+(?:\.\d+)?\s*=\s*-?\d+(?:\.\d+)?\s*$")
_FENCED = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The text of a completion, whether TRL passes a string or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    replies = (m for m in completion if m.get("role", "assistant") == "assistant")
    return "".join(str(m.get("content") or "") for m in replies)


def math_answer(completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when the first stated answer equals the `answer` column by value, else 0.0 (the evaluation's rule).

    Cut at the first `####` line (as the world's ladder scores) so a model cannot hedge with several answers.
    """
    return [float(is_correct(first_answer(completion_text(c)), ref))
            for c, ref in zip(completions, answer, strict=True)]


def format_score(text: str) -> float:
    """0.5 for a `#### <number>` line, plus up to 0.25 for the share of working lines shaped `a op b = c`."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if _HASH_LINE.match(ln)), None)
    has_answer = at is not None and extract_answer(lines[at]) is not None
    work = lines[:at] if at is not None else lines
    equations = sum(bool(_EQUATION.match(ln)) for ln in work) / len(work) if work else 0.0
    return 0.5 * has_answer + 0.25 * equations


def format_reward(completions: Sequence[Any], **_: Any) -> list[float]:
    """A small shaped reward for the expected answer form, so a weak model that is never right gets signal."""
    return [format_score(completion_text(c)) for c in completions]


def extract_code(text: str) -> str:
    """The first ```python fenced block of a completion, or the whole text when it has none."""
    m = _FENCED.search(text)
    return m.group(1) if m else text


def split_tests(tests: str | Sequence[str], entry_point: str | None = None) -> list[str]:
    """MBPP lists its asserts; HumanEval gives one `check(candidate)` program, run as a single test."""
    if isinstance(tests, str):
        program = tests
        if entry_point and "def check(" in program:
            program += f"\ncheck({entry_point})\n"
        return [program]
    return [str(t) for t in tests]


def make_code_exec(limits: Limits = Limits(), workers: int = 4) -> RewardFn:
    """A code_exec reward with its own sandbox limits (stage args set them)."""

    def code_exec(completions: Sequence[Any], tests: Sequence[Any], entry_point: Sequence[Any] | None = None,
                  **_: Any) -> list[float]:
        """Fraction of the `tests` column's asserts that the completion's code passes, run in the sandbox."""
        entries = entry_point if entry_point is not None else [None] * len(completions)
        jobs = [(extract_code(completion_text(c)), split_tests(t, e))
                for c, t, e in zip(completions, tests, entries, strict=True)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return [r.score for r in pool.map(lambda job: run_tests(job[0], job[1], limits), jobs)]

    return code_exec


code_exec = make_code_exec()

BUILTIN: dict[str, RewardFn] = {"math_answer": math_answer, "format": format_reward, "code_exec": code_exec}
# the dataset columns each built-in reward reads (checked before training starts)
NEEDS_COLUMNS: dict[str, tuple[str, ...]] = {"math_answer": ("answer",), "format": (),
                                             "code_exec": ("tests",)}


def resolve_reward(name: str, allow_custom: bool, where: str, limits: Limits | None = None) -> RewardFn:
    """A reward by config name: a built-in, or `package.module.function` when custom rewards are allowed."""
    if name == "code_exec" and limits is not None:
        fn = make_code_exec(limits)
    elif name in BUILTIN:
        fn = BUILTIN[name]
    elif not allow_custom:
        raise FlywheelError(f"{where}: '{name}' is not a built-in reward; set "
                            "posttrain.allow_custom_rewards: true to import it")
    else:
        module, _, attr = name.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise FlywheelError(f"{where}: cannot import reward '{name}' ({exc}); check the dotted path"
                                ) from None
        if not callable(fn):
            raise FlywheelError(f"{where}: '{name}' is not callable; point it at a function "
                                "fn(completions, **columns) -> list[float]")
        return fn

    def named(*args: Any, **kwargs: Any) -> list[float]:
        return fn(*args, **kwargs)

    named.__name__ = name  # TRL logs rewards/<__name__>/mean: use the name the config says
    named.__doc__ = fn.__doc__
    return named
