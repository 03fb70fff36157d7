"""The one answer extractor and checker, shared by RL rewards, evaluation and the tiny world's ladder.

A solution states its final answer as a GSM8K `#### 42` line, a LaTeX `\\boxed{42}`, or a phrase such as
"The answer is 42." Anything else has no answer: we never guess from the last number in free text, because
a model must state its answer to be rewarded for it.
"""

from __future__ import annotations

import re
from fractions import Fraction

# a number as written in text: optional sign and dollar, digits with optional thousands commas, optional
# decimal part, optional "/denominator"
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = rf"[-+]?\s*(?:\\?\$\s*)?[-+]?(?:{_DIGITS})(?:/(?:{_DIGITS}))?"

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_LEADING_NUMBER = re.compile(rf"\s*({_NUMBER})")
_PHRASE = re.compile(rf"\banswer\s*(?:is\s*:?|:)[\s*]*({_NUMBER})", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
_PLAIN = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)


def _latex_fractions(s: str) -> str:
    """Rewrite \\frac{a}{b} and \\dfrac{a}{b} as a/b so the rest of the code sees plain fractions."""
    return _FRAC.sub(r"\1/\2", s)


def _clean(s: str) -> str:
    """Strip the decoration around a number: LaTeX, dollars, thousands commas, spaces, a trailing period."""
    s = _latex_fractions(s.replace("\u2212", "-"))
    s = _TEXT.sub("", s)
    for junk in ("{,}", "\\$", "$", "\\,", "\\!", "\\ ", ",", "{", "}"):
        s = s.replace(junk, "")
    s = "".join(s.split())
    return s.rstrip(".")


def _plain(s: str) -> Fraction | None:
    """Parse an unsigned int or decimal exactly; Fraction(str) avoids binary float error."""
    if not _PLAIN.fullmatch(s):
        return None
    return Fraction(s)


def parse_number(s: str) -> Fraction | None:
    """Parse a raw or normalised numeric string into an exact Fraction, so answers compare by value."""
    s = _clean(s)
    if s.startswith("+"):
        s = s[1:]
    negative = s.startswith("-")
    if negative:
        s = s[1:]
    parts = [_plain(part) for part in s.split("/")]
    if len(parts) > 2 or None in parts or (len(parts) == 2 and parts[1] == 0):
        return None
    value = parts[0] / parts[1] if len(parts) == 2 else parts[0]
    return -value if negative else value


def _format(value: Fraction, as_fraction: bool) -> str:
    """Write a value canonically: integers bare, fractions reduced as p/q, decimals without trailing zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    if as_fraction:
        return f"{value.numerator}/{value.denominator}"
    # a finite decimal has a denominator of 2s and 5s: scale by 10^k until it is an integer
    k = 0
    while (value * 10**k).denominator != 1:
        k += 1
        if k > 50:  # not a finite decimal after all (cannot happen for parsed decimals)
            return f"{value.numerator}/{value.denominator}"
    digits = str(abs(value * 10**k).numerator).rjust(k + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-k]}.{digits[-k:]}".rstrip("0")


def _normalise(token: str) -> str | None:
    """Turn a number token found in text into the canonical string, or None if it is not a number."""
    value = parse_number(token)
    if value is None:
        return None
    return _format(value, as_fraction="/" in _clean(token))


def _last_boxed(text: str) -> str | None:
    """Return the contents of the last \\boxed{...}, matching nested braces (for \\boxed{\\frac{3}{4}})."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j]
            return None  # unclosed brace: truncated output
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """Find the stated final answer of a solution as a normalised numeric string, or None if none is stated."""
    hashes = _HASHES.findall(text)
    if hashes:
        m = _LEADING_NUMBER.match(hashes[-1])
        answer = _normalise(m.group(1)) if m else None
        if answer is not None:
            return answer
    boxed = _last_boxed(text)
    if boxed is not None:
        answer = _normalise(boxed)
        if answer is not None:
            return answer
    phrases = _PHRASE.findall(_latex_fractions(text))
    if phrases:
        return _normalise(phrases[-1])
    return None


def answers_match(predicted: str | None, reference: str | int | float) -> bool:
    """Compare a predicted answer to a reference by exact value, so "0.5" equals "1/2" and "1,000" equals 1000."""
    if predicted is None:
        return False
    value = parse_number(predicted)
    if value is None:
        return False
    target = parse_number(str(reference))
    if target is None:
        extracted = extract_answer(str(reference))
        target = parse_number(extracted) if extracted is not None else None
    return target is not None and value == target


def is_correct(completion: str, reference: str | int | float) -> bool:
    """Score a model completion against a reference answer: the single correctness rule for rewards and evals."""
    return answers_match(extract_answer(completion), reference)


def first_answer(completion: str) -> str:
    """Cut a completion after its first `####` line, so a model that rambles on is scored on what it answered."""
    at = completion.find("####")
    if at < 0:
        return completion
    end = completion.find("\n", at)
    return completion if end < 0 else completion[:end]
