"""A wrong answer close to a benchmark's reference, shared by the grading benchmark and its tests."""

from __future__ import annotations

import re
from fractions import Fraction


def perturbed(answer: str, benchmark: str) -> str:
    """A wrong answer close to the reference: next letter, number + 1, first integer + 1."""
    if benchmark == "mmlu_stem":
        return "ABCD"[("ABCD".index(answer) + 1) % 4]
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", answer):
        value = Fraction(answer) + 1
        return str(value.numerator) if value.denominator == 1 else str(float(value))
    digits = re.search(r"\d+", answer)
    if digits:
        return answer[: digits.start()] + str(int(digits.group()) + 1) + answer[digits.end() :]
    return answer + "+1"
