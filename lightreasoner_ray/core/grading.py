"""Answer extraction and mathematical-equivalence grading.

``extract_answer`` pulls the final answer out of a model completion (the last
``\\boxed{}``, else "the answer is X", else the last number; a choice letter for
multiple-choice benchmarks). ``is_equivalent`` decides whether two answers mean the
same thing, in three tiers of increasing cost:

1. normalised string equality, plain numbers (with a relative tolerance), and
   exact rational arithmetic, all in-process;
2. a small LaTeX/plain-maths parser of our own that turns an answer into a syntax
   tree of lists (never ``eval``, never ``sympify``: model output is untrusted);
3. a sympy comparison of two trees (exact, numeric, or at random points for
   expressions with variables) in a separate worker process that is killed when it
   exceeds its time budget, so no input can hang or exhaust the caller.

Tuples, intervals, sets, unions, matrices and lists of answers are compared element
by element (bracket types respected; lists, sets and unions in any order).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

RELATIVE_TOLERANCE = Fraction(1, 10_000)  # only where the reference is inexact (a rounding)
EXACT_TOLERANCE = 1e-15  # for exact expressions evaluated to 30 digits
SYMBOLIC_TIMEOUT = 4.0  # seconds of symbolic work allowed per is_equivalent call

MAX_COMPLETION_CHARS = 200_000  # extraction reads at most this much of a completion's end
MAX_ANSWER_CHARS = 2_000  # longer answers are graded wrong without being read
MAX_EXPRESSION_CHARS = 500  # longer single expressions are not parsed
MAX_NESTING = 40  # bracket / exponent depth the parser accepts
MAX_ITEMS = 64  # elements of a tuple, list or matrix
MAX_POWER_BITS = 4_096  # size of an exact number a power may produce
MAX_EXPONENT = 1_000  # |exponent| allowed on a non-numeric base
MAX_SCI_EXPONENT = 400  # |e| in 1.5e-7 style literals
MAX_FACTORIAL = 500  # n! beyond this is refused (500! has ~3,800 bits)

CHOICE_BENCHMARKS = frozenset({"mmlu_stem", "mmlu"})
_CHOICE_LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------

_BRACES = re.compile(r"[{}]")
_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")
_FILLER_WORDS = re.compile(r"^(?:(?:therefore|thus|hence|so|then|simply|just|equal\s+to|:)\s*)+", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*", re.IGNORECASE)
_LAST_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?![\d])"
)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    starts = [match.end() for match in _BOXED_START.finditer(text)]
    if starts:
        closing = _closing_braces(text, starts[0] - 1)
        for start in reversed(starts):
            end = closing.get(start - 1)
            if end is not None:
                return text[start:end]
    bare = None
    for bare in _BOXED_BARE.finditer(text):
        pass
    return bare.group(1).rstrip(".,;") if bare else None


def _closing_braces(text: str, begin: int) -> dict[int, int]:
    """Position of each ``{`` from ``begin`` on -> position of its ``}``, in one pass."""
    closing, open_braces = {}, []
    for brace in _BRACES.finditer(text, begin):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    return closing


def _matching_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the group that opens just before ``start``."""
    depth = 1
    for position in range(start, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return position
    return None


def extract_answer(text: str, benchmark: str, choices: Sequence[str] | None = None) -> str:
    """The final answer of a model completion, or ``""`` when there is none.

    Maths benchmarks: the last ``\\boxed{}``, else the text after the last "the
    answer is", else the last number. Multiple choice (``mmlu_stem``): a letter A-D
    from a boxed letter, "answer is (B)", or a boxed choice text matching one of
    ``choices``; else the last "(B)" in the text.
    """
    if not text:
        return ""
    text = text[-MAX_COMPLETION_CHARS:]  # final answers are at the end; bounds the work
    if benchmark in CHOICE_BENCHMARKS:
        return _extract_choice(text, choices)
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    stated = _stated_answer(text)
    if stated:
        return stated
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else ""


def _stated_answer(text: str) -> str:
    """What follows the last "the answer is", up to the end of its line or sentence."""
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return ""
    rest = text[last.end() :].split("\n", 1)[0]
    rest = re.split(r"\.\s+(?=[A-Z])", rest, maxsplit=1)[0]  # "... is 5. So ..." keeps "5"
    rest = rest.rsplit("=", 1)[-1]  # "... is 3 * 4 = 12" keeps "12"
    rest = _FILLER_WORDS.sub("", rest.strip().strip("*").strip())
    return rest.rstrip(".").strip().strip("$").strip()


_CHOICE_WRAPPERS = re.compile(r"^(?:\s|[:*$({\[]|\\text(?:bf)?\s*\{|\\mathrm\s*\{|(?i:option|choice)\b)+")


def _leading_letter(text: str, letters: str) -> str:
    """``"(B) 42"`` -> ``B``; ``""`` when the text does not start with a choice letter."""
    stripped = _CHOICE_WRAPPERS.sub("", text)
    match = re.match(rf"([{letters}])(?![A-Za-z])", stripped)
    return match.group(1) if match else ""


def _extract_choice(text: str, choices: Sequence[str] | None) -> str:
    letters = _CHOICE_LETTERS[: len(choices)] if choices else _CHOICE_LETTERS
    boxed = last_boxed(text)
    if boxed is not None:
        letter = _leading_letter(boxed, letters)
        if letter:
            return letter
        if choices and len(boxed) <= MAX_ANSWER_CHARS:
            wanted = _casefold_key(boxed)
            for letter, choice in zip(letters, choices):
                if wanted and wanted == _casefold_key(choice):
                    return letter
    stated = None
    for stated in re.finditer(r"(?i:answer\s*(?:is|:))", text):
        pass
    if stated is not None:
        letter = _leading_letter(text[stated.end() : stated.end() + 40], letters)
        if letter:
            return letter
    parenthesised = re.findall(rf"\(([{letters}])\)", text)
    return parenthesised[-1] if parenthesised else ""


def _casefold_key(text: str) -> str:
    return re.sub(r"\s+", " ", normalize_answer(text)).strip().casefold()


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u22c5": r"\cdot ",
    "\u00f7": r"\div ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u221a": r"\sqrt", "\u00b0": "",
    "\uff0c": ",", "\uff1a": ":", "\u2019": "'",
}
_UNWRAP_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|textnormal|mbox|hbox|mathrm|mathbf|mathit|mathsf"
    r"|mathnormal|operatorname|boxed|fbox)\s*\{"
)
_THIN_SPACES = re.compile(r"(?<!\\)\\[!,]")  # also used as thousands separators: 10\!080
_SPACING = re.compile(r"(?<!\\)\\[;: ]|\\q?quad(?![A-Za-z])|~|\\displaystyle(?![A-Za-z])")
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])")
_LHS_PREFIX = re.compile(
    r"^(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z0-9, ]*\))?|\\[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?)"
    r"\s*(?:=|\\in(?![A-Za-z])|\\approx(?![A-Za-z]))\s*"
)
_UNIT_SPLIT = re.compile(
    r"(?P<number>[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
    r"(?:\s*\\times\s*10\^\{?[-+]?\d+\}?)?"
    r"|[-+]?\\frac\{[^{}]*\}\{[^{}]*\})(?P<space>\s*)(?P<unit>[A-Za-z](?:[A-Za-z/.' ]|\^\{?-?\d\}?)*)"
)
# Unit words compared case-insensitively; other words of 3+ letters after a space
# ("18 apples") count as units too. Single letters are variables unless spaced off
# and in the case-sensitive _UNIT_LETTERS ("2 n" is an expression, "5 m" a length).
_UNITS = frozenset(
    "cm mm km nm um sec ms min hr hrs kg mg lb lbs oz ft in yd mi mph kph kmh ml kj kw hz "
    "ev kev mev pa kpa atm mol rad sq cu".split()
)
_UNIT_LETTERS = frozenset("msghKJNWVL")
_PAREN_LETTER = re.compile(r"\(([A-J])\)")


def normalize_answer(text: str) -> str:
    """Canonical text of an answer: LaTeX decorations, units, ``$``, ``x=`` removed."""
    answer = text.strip()
    for char, replacement in _UNICODE.items():
        answer = answer.replace(char, replacement)
    answer = _unwrap_commands(answer).replace("{,}", ",")
    answer = answer.replace(r"\left.", "").replace(r"\right.", "")
    answer = _SIZING.sub("", answer)
    answer = _THIN_SPACES.sub("", answer)
    answer = _SPACING.sub(" ", answer)
    answer = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", answer)
    answer = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", answer)
    answer = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", answer)
    answer = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", answer)
    answer = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", answer)
    answer = _DEGREES.sub("", answer)
    answer = answer.replace(r"\%", "").replace("%", "").replace(r"\$", "").replace("$", "")
    answer = re.sub(r"\s+", " ", answer).strip()
    answer = re.sub(r"(?:\\\\|[\s.,;:])+$", "", answer).lstrip(":= ")
    prefix = _LHS_PREFIX.match(answer)
    if prefix and "=" not in answer[prefix.end() :] and answer[prefix.end() :].strip():
        answer = answer[prefix.end() :]
    answer = _strip_unit(answer)
    letter = _PAREN_LETTER.fullmatch(answer)
    return letter.group(1) if letter else answer.strip()


def _unwrap_commands(text: str) -> str:
    r"""``\text{ cm}`` -> `` cm ``, for each wrapper in ``_UNWRAP_COMMANDS`` (nested too)."""
    for _ in range(len(text)):
        match = _UNWRAP_COMMANDS.search(text)
        if not match:
            break
        end = _matching_brace(text, match.end())
        if end is None:
            text = text[: match.start()] + text[match.end() :]
        else:
            text = f"{text[: match.start()]} {text[match.end() : end]} {text[end + 1 :]}"
    return text


def _strip_unit(answer: str) -> str:
    """``18 dollars`` -> ``18``; ``5 cm^2`` -> ``5``; ``7.6 Z`` (a variable) stays."""
    match = _UNIT_SPLIT.fullmatch(answer)
    if not match:
        return answer
    words = re.findall(r"[A-Za-z]+", match.group("unit"))
    spaced = bool(match.group("space"))

    def is_unit(word: str) -> bool:
        if len(word) == 1:
            return spaced and word in _UNIT_LETTERS
        return word.lower() in _UNITS or (spaced and len(word) >= 3)

    if all(is_unit(word) for word in words):
        return match.group("number").strip()
    return answer


def _has_percent(text: str) -> bool:
    return "%" in text or "percent" in text.lower()


def _spaceless(text: str) -> str:
    return re.sub(r"\s+", "", text)


# --------------------------------------------------------------------------------------
# Structure: tuples, intervals, sets, unions, lists, matrices
# --------------------------------------------------------------------------------------

_OPENERS = "([{"
_CLOSERS = ")]}"
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_RATIO = re.compile(r"-?\d+(?:\.\d+)?(?::-?\d+(?:\.\d+)?)+")
_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.DOTALL)


@dataclass(frozen=True)
class _Structure:
    """A parsed answer: a scalar, or items with a kind (ordered or not)."""

    kind: str  # "scalar", "(]"-style brackets of a sequence, "set", "union", "matrix", "row", ":"
    text: str = ""
    items: tuple[_Structure, ...] = ()
    ordered: bool = True


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` where no bracket of any type is open."""
    parts, depth, start, position = [], 0, 0, 0
    while position < len(text):
        char = text[position]
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif depth == 0 and text.startswith(separator, position):
            if separator[0] != "\\" or not text[position + len(separator) : position + len(separator) + 1].isalpha():
                parts.append(text[start:position])
                start = position + len(separator)
                position = start
                continue
        position += 1
    parts.append(text[start:])
    return parts


def _enclosing_brackets(text: str) -> tuple[str, str] | None:
    """``("[", ")")`` when ``text`` is one bracketed group like ``[1, 2)``, else None."""
    opener = "\\{" if text.startswith("\\{") else text[:1]
    closer = "\\}" if text.endswith("\\}") else text[-1:]
    if not opener or opener[-1] not in _OPENERS or closer[-1:] not in tuple(_CLOSERS):
        return None
    depth = 0
    for position, char in enumerate(text):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth == 0 and position != len(text) - 1:
                return None  # "(1)(2)": the first group closes early
    return (opener, closer) if depth == 0 else None


def _structure(text: str, depth: int = 0) -> _Structure:
    """Parse an answer into nested sequences of normalised scalars."""
    text = normalize_answer(text) if depth else text
    if depth > MAX_NESTING:
        raise _ParseError("answer nested too deeply")
    if _THOUSANDS.fullmatch(text):
        return _Structure("scalar", text.replace(",", ""))
    if _RATIO.fullmatch(text):
        return _Structure(":", items=tuple(_Structure("scalar", part) for part in text.split(":")))
    matrix = _MATRIX.fullmatch(text)
    if matrix:
        rows = [row for row in matrix.group(2).split("\\\\") if row.strip()]
        return _Structure(
            "matrix", items=_items([_Structure("row", items=_items(row.split("&"), depth)) for row in rows], depth)
        )
    union = _split_top_level(text, "\\cup")
    if len(union) > 1:
        return _Structure("union", items=_items(union, depth), ordered=False)
    parts = _split_top_level(text, ",")
    if len(parts) > 1:  # a bare list of answers is compared as a set
        return _Structure("set", items=_items(parts, depth), ordered=False)
    brackets = _enclosing_brackets(text)
    if brackets:
        opener, closer = brackets
        inner = text[len(opener) : len(text) - len(closer)]
        inner_parts = _split_top_level(inner, ",")
        if opener == "\\{":
            return _Structure("set", items=_items(inner_parts, depth), ordered=False)
        if len(inner_parts) > 1:
            return _Structure(opener + closer, items=_items(inner_parts, depth))
        if opener + closer in ("()", "[]", "{}"):
            return _structure(inner, depth + 1)
    plus_minus = _split_top_level(text, "\\pm")
    if len(plus_minus) == 2 and all(part.strip() for part in plus_minus):
        base, offset = plus_minus
        both = [f"{base}+({offset})", f"{base}-({offset})"]
        return _Structure("set", items=_items(both, depth), ordered=False)
    return _Structure("scalar", text)


def _items(parts: Sequence[Any], depth: int) -> tuple[_Structure, ...]:
    if len(parts) > MAX_ITEMS:
        raise _ParseError("too many items")
    return tuple(part if isinstance(part, _Structure) else _structure(part, depth + 1) for part in parts)


def _structures_match(predicted: _Structure, reference: _Structure, scalars_equal: Callable[[str, str], bool]) -> bool:
    if predicted.kind != reference.kind or len(predicted.items) != len(reference.items):
        return False
    if predicted.kind == "scalar":
        return scalars_equal(predicted.text, reference.text)

    def equal(left: _Structure, right: _Structure) -> bool:
        return _structures_match(left, right, scalars_equal)

    if reference.ordered:
        return all(equal(left, right) for left, right in zip(predicted.items, reference.items))
    return _perfect_matching(predicted.items, reference.items, equal)


def _perfect_matching(left: Sequence[Any], right: Sequence[Any], equal: Callable[[Any, Any], bool]) -> bool:
    """True when every left item pairs with a distinct equal right item (augmenting paths)."""
    if all(equal(a, b) for a, b in zip(left, right)):
        return True
    cache: dict[tuple[int, int], bool] = {}

    def edge(i: int, j: int) -> bool:
        if (i, j) not in cache:
            cache[(i, j)] = equal(left[i], right[j])
        return cache[(i, j)]

    owner: dict[int, int] = {}

    def assign(i: int, seen: set[int]) -> bool:
        for j in range(len(right)):
            if j not in seen and edge(i, j):
                seen.add(j)
                if j not in owner or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(assign(i, set()) for i in range(len(left)))


# --------------------------------------------------------------------------------------
# Numbers: the fast path
# --------------------------------------------------------------------------------------

_DECIMAL = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
_PLAIN_DECIMAL = re.compile(_DECIMAL)
_PLAIN_RATIO = re.compile(rf"({_DECIMAL})/({_DECIMAL})")
_PLAIN_FRAC = re.compile(rf"([-+]?)\\frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}")
_MIXED_NUMBER = re.compile(r"([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_SCIENTIFIC = re.compile(rf"({_DECIMAL})(?:\\times|\\cdot|\*|x)10\^\{{?([-+]?\d{{1,3}})\}}?")


def _plain_number(text: str) -> Fraction | None:
    """The exact value of a plain numeric literal (``-1.5``, ``3/4``, ``\\frac{1}{2}``, ``2\\frac{1}{3}``)."""
    text = _spaceless(text)
    try:
        if _PLAIN_DECIMAL.fullmatch(text):
            return Fraction(text)
        if match := _PLAIN_RATIO.fullmatch(text):
            return _ratio(Fraction(match.group(1)), Fraction(match.group(2)))
        if match := _PLAIN_FRAC.fullmatch(text):
            value = _ratio(Fraction(match.group(2)), Fraction(match.group(3)))
            return -value if value is not None and match.group(1) == "-" else value
        if match := _MIXED_NUMBER.fullmatch(text):
            value = int(match.group(2)) + _ratio(Fraction(match.group(3)), Fraction(match.group(4)))
            return -value if match.group(1) == "-" else value
        if match := _SCIENTIFIC.fullmatch(text):
            return Fraction(match.group(1)) * Fraction(10) ** int(match.group(2))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def _ratio(numerator: Fraction, denominator: Fraction) -> Fraction | None:
    return numerator / denominator if denominator else None


_DECIMAL_LITERAL = re.compile(r"\d\.|\.\d|\d[eE][-+]?\d")
# A decimal point followed by a non-zero digit: "3.14", "0.3333", "2.50" (not "7.0", "12.00").
_ROUNDED_LITERAL = re.compile(r"\.\d*[1-9]")


def _is_inexact(text: str) -> bool:
    """Whether the text holds a decimal literal (``0.5``, ``7.0``, ``4.5e33``)."""
    return bool(_DECIMAL_LITERAL.search(text))


def _terminates(value: Fraction | None) -> bool:
    """Whether ``value`` has a finite decimal expansion (None: not a known rational)."""
    if value is None:
        return False
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _reference_is_inexact(reference: str, reference_value: Fraction | None, predicted: str) -> bool:
    """Whether the comparison gets the relative tolerance: only when the reference is inexact.

    The reference is inexact when it is itself a decimal rounding (a decimal literal with
    a non-zero fractional digit: ``3.14``, ``0.3333``), or when it has no finite decimal
    expansion (``\\frac{1}{3}``, ``\\sqrt{2}``, ``\\pi``) and the prediction is written as a
    decimal, which can then only be a rounding of it. An exact reference with a finite
    expansion (``7``, ``100000``, ``12.0``, ``\\frac{1}{4}``) must be matched exactly:
    ``7.0001`` is not ``7`` and ``70001`` is not ``70000``.
    """
    if _ROUNDED_LITERAL.search(reference):
        return True
    return _is_inexact(predicted) and not _terminates(reference_value)


def _numbers_close(left: Fraction, right: Fraction, inexact: bool) -> bool:
    if not inexact:
        return left == right
    return abs(left - right) <= RELATIVE_TOLERANCE * max(abs(left), abs(right))


def _numbers_equal(predicted: Fraction, reference: Fraction, percent: bool, inexact: bool) -> bool:
    if _numbers_close(predicted, reference, inexact):
        return True
    # "8%" may be answered "0.08" and "0.08" may be answered "8%".
    return percent and (
        _numbers_close(predicted * 100, reference, inexact) or _numbers_close(predicted, reference * 100, inexact)
    )


# --------------------------------------------------------------------------------------
# The safe parser: text -> syntax tree of JSON-able lists
# --------------------------------------------------------------------------------------


class _ParseError(ValueError):
    """Text this grader will not interpret (unsupported, ambiguous or too large)."""


_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho varrho "
    "sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Upsilon Phi Psi Omega "
    "hbar ell odot".split()
)
_FUNCTIONS = frozenset("sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh log ln exp".split())
_OPERATOR_COMMANDS = {"cdot": "*", "times": "*", "ast": "*", "div": "/"}
_CONSTANT_COMMANDS = {"pi": "pi", "infty": "oo", "infin": "oo"}
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_FLOOR_BRACKETS = {"lfloor": "open", "rfloor": "close", "lceil": "open", "rceil": "close"}
_NUMBER_TOKEN = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_SUBSCRIPT = re.compile(r"_(?:\{\s*([A-Za-z0-9\\ ]{1,20})\s*\}|([A-Za-z0-9]))")


def _tokenize(text: str) -> list[tuple[str, str]]:
    """Tokens ``(kind, value)``; kinds: num sym const func frac sqrt op open close _ ."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _ParseError("expression too long")
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
        elif char.isdigit() or (char == "." and text[position + 1 : position + 2].isdigit()):
            match = _NUMBER_TOKEN.match(text, position)
            literal = match.group(0)
            exponent = re.search(r"[eE]([-+]?\d+)$", literal)
            if exponent and abs(int(exponent.group(1))) > MAX_SCI_EXPONENT:
                raise _ParseError("number literal too large")
            position = match.end()
            if _SUBSCRIPT.match(text, position):  # 52_8: a numeral in another base, kept opaque
                name, position = _with_subscript(text, literal, position)
                tokens.append(("sym", name))
            else:
                tokens.append(("num", literal))
        elif char.isascii() and char.isalpha():
            name, position = _with_subscript(text, char, position + 1)
            tokens.append(_letter_token(name))
        elif char == "\\":
            match = _COMMAND.match(text, position)
            if not match:
                raise _ParseError(f"unsupported command at {position}")
            command, position = match.group(1), match.end()
            if command in ("frac", "sqrt", "binom"):
                tokens.append((command, command))
            elif command in _FLOOR_BRACKETS:
                tokens.append((_FLOOR_BRACKETS[command], command))
            elif command in _FUNCTIONS:
                tokens.append(("func", command))
            elif command in _OPERATOR_COMMANDS:
                tokens.append(("op", _OPERATOR_COMMANDS[command]))
            elif command in _CONSTANT_COMMANDS:
                tokens.append(("const", _CONSTANT_COMMANDS[command]))
            elif command in _GREEK:
                name, position = _with_subscript(text, command, position)
                tokens.append(("sym", name))
            else:
                raise _ParseError(f"unsupported command \\{command}")
        elif text.startswith("**", position):
            tokens.append(("op", "^"))
            position += 2
        elif char in "+-*/^=!":
            tokens.append(("op", char))
            position += 1
        elif char in "([{":
            tokens.append(("open", char))
            position += 1
        elif char in ")]}":
            tokens.append(("close", char))
            position += 1
        elif char == "_":
            tokens.append(("_", char))
            position += 1
        else:
            raise _ParseError(f"unexpected character {char!r}")
    return tokens


def _with_subscript(text: str, name: str, position: int) -> tuple[str, int]:
    """``x_{0}`` -> ``x_0``: a subscript is part of the symbol's name."""
    match = _SUBSCRIPT.match(text, position)
    if not match:
        return name, position
    subscript = re.sub(r"[\\ ]", "", match.group(1) or match.group(2))
    return f"{name}_{subscript}", match.end()


def _letter_token(name: str) -> tuple[str, str]:
    if name == "e":
        return ("const", "E")
    if name == "i":
        return ("const", "I")
    return ("sym", name)


_CLOSING = {"(": ")", "[": "]", "{": "}", "lfloor": "rfloor", "lceil": "rceil"}
_ROUNDING = {"lfloor": "floor", "lceil": "ceiling"}
_PRIMARY_STARTS = frozenset({"num", "sym", "const", "func", "frac", "sqrt", "binom", "open"})


class _Parser:
    """Recursive descent over tokens; builds ``["add", [...]]``-style trees.

    Grammar (implicit multiplication between adjacent factors, ``^`` right-assoc)::

        equation := expr ["=" expr]
        expr     := ["+"|"-"] term (("+"|"-") term)*
        term     := signed (("*"|"/") signed | factor)*
        signed   := ("+"|"-") signed | factor
        factor   := primary ["!"]* ["^" exponent]
        primary  := num | sym | const | (expr) | [expr] | {expr} | \\lfloor expr \\rfloor
                  | \\lceil expr \\rceil | \\frac arg arg | \\binom arg arg | \\sqrt[[n]] arg
                  | func[^exponent][_base] arg
    """

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.position = 0
        self.depth = 0

    def parse(self) -> list:
        tree = self.equation()
        if self.position != len(self.tokens):
            raise _ParseError(f"unexpected {self.peek()[1]!r}")
        return tree

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.position] if self.position < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "end":
            raise _ParseError("unexpected end of expression")
        self.position += 1
        return token

    def accept(self, kind: str, value: str | None = None) -> bool:
        token = self.peek()
        if token[0] == kind and (value is None or token[1] == value):
            self.position += 1
            return True
        return False

    def nested(self, parse: Callable[[], list]) -> list:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _ParseError("expression nested too deeply")
        try:
            return parse()
        finally:
            self.depth -= 1

    def equation(self) -> list:
        left = self.expr()
        if self.accept("op", "="):
            return ["eq", left, self.expr()]
        return left

    def expr(self) -> list:
        terms = [self.signed_term()]
        while self.peek() in (("op", "+"), ("op", "-")):
            terms.append(self.signed_term())
        return terms[0] if len(terms) == 1 else ["add", terms]

    def signed_term(self) -> list:
        if self.accept("op", "-"):
            return ["neg", self.term()]
        self.accept("op", "+")
        return self.term()

    def term(self) -> list:
        factors = [self.signed()]
        while True:
            kind, value = self.peek()
            if kind == "op" and value in "*/":
                self.take()
                operand = self.signed()
                factors.append(operand if value == "*" else ["div", ["num", "1"], operand])
            elif kind in _PRIMARY_STARTS:
                if kind == "num" and self.tokens[self.position - 1][0] == "num":
                    raise _ParseError("two numbers in a row")
                factor = self.factor()
                if _is_integer_literal(factors[-1]) and _is_fraction_literal(factor):
                    factors[-1] = ["add", [factors[-1], factor]]  # 1\frac{4}{5} is a mixed number
                else:
                    factors.append(factor)
            else:
                break
        return factors[0] if len(factors) == 1 else ["mul", factors]

    def signed(self) -> list:
        if self.accept("op", "-"):
            return ["neg", self.nested(self.signed)]
        if self.accept("op", "+"):
            return self.nested(self.signed)
        return self.factor()

    def factor(self) -> list:
        base = self.primary()
        while self.accept("op", "!"):
            base = ["factorial", base]
        if self.accept("op", "^"):
            return ["pow", base, self.exponent()]
        return base

    def exponent(self) -> list:
        def parse() -> list:
            if self.peek()[0] == "open":
                value = self.group()
            elif self.accept("op", "-"):
                return ["neg", self.exponent()]
            else:
                value = self.primary()
            if self.accept("op", "^"):
                return ["pow", value, self.exponent()]
            return value

        return self.nested(parse)

    def group(self) -> list:
        kind, opener = self.take()
        if kind != "open":
            raise _ParseError(f"expected a bracket, got {opener!r}")
        inner = self.nested(self.expr)
        if not self.accept("close", _CLOSING[opener]):
            raise _ParseError(f"unbalanced {opener!r}")
        if opener in _ROUNDING:
            return ["func", _ROUNDING[opener], inner, None]
        return inner

    def argument(self) -> list:
        """A LaTeX argument: a braced group or one token (``\\frac ab``)."""
        if self.peek() == ("open", "{"):
            return self.group()
        return self.primary()

    def primary(self) -> list:
        kind, value = self.peek()
        if kind == "open":
            return self.group()
        self.take()
        if kind == "num":
            return ["num", value]
        if kind == "sym":
            return ["sym", value]
        if kind == "const":
            return ["const", value]
        if kind == "frac":
            return ["div", self.nested(self.argument), self.nested(self.argument)]
        if kind == "binom":
            return ["binomial", self.nested(self.argument), self.nested(self.argument)]
        if kind == "sqrt":
            index = None
            if self.accept("open", "["):
                index = self.nested(self.expr)
                if not self.accept("close", "]"):
                    raise _ParseError("unbalanced root index")
            return ["sqrt", self.nested(self.argument), index]
        if kind == "func":
            return self.function(value)
        raise _ParseError(f"unexpected {value!r}")

    def function(self, name: str) -> list:
        power = base = None
        for _ in range(2):
            if self.accept("op", "^"):
                power = self.exponent()
            elif self.accept("_"):
                if name != "log":
                    raise _ParseError(f"subscript on \\{name}")
                base = self.nested(self.argument)
        argument = self.group() if self.peek()[0] == "open" else self.nested(self.signed)
        call = ["func", name, argument, base]
        return ["pow", call, power] if power is not None else call


def _is_integer_literal(tree: list) -> bool:
    return tree[0] == "num" and tree[1].isdigit()


def _is_fraction_literal(tree: list) -> bool:
    return tree[0] == "div" and _is_integer_literal(tree[1]) and _is_integer_literal(tree[2])


def parse_expression(text: str) -> list:
    """Parse one maths expression into a syntax tree (nested JSON-able lists).

    Raises ``ValueError`` for anything outside the supported grammar or limits.
    """
    return _Parser(_tokenize(text)).parse()


def _rational_value(tree: list) -> Fraction | None:
    """Exact value of a tree of rational arithmetic; None when it needs sympy."""
    kind = tree[0]
    if kind == "num":
        return Fraction(tree[1])
    if kind == "neg":
        value = _rational_value(tree[1])
        return None if value is None else -value
    if kind in ("add", "mul"):
        values = [_rational_value(item) for item in tree[1]]
        if any(value is None for value in values):
            return None
        return sum(values, Fraction(0)) if kind == "add" else math.prod(values, start=Fraction(1))
    if kind == "div":
        numerator, denominator = _rational_value(tree[1]), _rational_value(tree[2])
        if numerator is None or not denominator:
            return None
        return numerator / denominator
    if kind == "pow":
        base, exponent = _rational_value(tree[1]), _rational_value(tree[2])
        if base is None or exponent is None or exponent.denominator != 1 or (base == 0 and exponent < 0):
            return None
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if abs(exponent) * bits > MAX_POWER_BITS:
            return None
        return base ** int(exponent)
    return None


# --------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------


def is_equivalent(prediction: str, reference: str, *, timeout: float = SYMBOLIC_TIMEOUT) -> bool:
    """Whether ``prediction`` is mathematically the same answer as ``reference``.

    Numbers agree within a relative tolerance of 1e-4 only where the reference is
    inexact (itself a decimal rounding, or with no finite decimal expansion and
    answered with a decimal); otherwise exactly. Expressions are compared
    exactly or numerically through sympy in a worker process, spending at most
    ``timeout`` seconds (anything slower is graded not equivalent).
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        return False
    if not prediction.strip() or not reference.strip():
        return False
    if len(prediction) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    predicted_text, reference_text = normalize_answer(prediction), normalize_answer(reference)
    if _spaceless(predicted_text) == _spaceless(reference_text):
        return True
    try:
        predicted, expected = _structure(predicted_text), _structure(reference_text)
    except _ParseError:
        return False
    judge = _ScalarJudge(percent=_has_percent(prediction) or _has_percent(reference), timeout=timeout)
    return _structures_match(predicted, expected, judge)


_PROSE = re.compile(r"[A-Za-z][A-Za-z'. -]*")


class _ScalarJudge:
    """Compares two normalised scalars, cheapest test first, within a time budget."""

    def __init__(self, percent: bool, timeout: float):
        self.percent = percent
        self.deadline = time.monotonic() + timeout

    def __call__(self, predicted: str, reference: str) -> bool:
        if _spaceless(predicted) == _spaceless(reference):
            return True
        if _PROSE.fullmatch(reference) and re.search(r"[A-Za-z]{3}", reference):
            return _spaceless(predicted).casefold() == _spaceless(reference).casefold()
        if len(predicted) == len(reference) == 1 and (predicted in _CHOICE_LETTERS or reference in _CHOICE_LETTERS):
            return predicted.upper() == reference.upper()  # choice letters, whatever the case
        if len(reference) == 1 and reference in _CHOICE_LETTERS:
            return False
        predicted_number, reference_number = _plain_number(predicted), _plain_number(reference)
        if predicted_number is not None and reference_number is not None:
            inexact = _reference_is_inexact(reference, reference_number, predicted)
            return _numbers_equal(predicted_number, reference_number, self.percent, inexact)
        try:
            predicted_tree, reference_tree = parse_expression(predicted), parse_expression(reference)
        except (_ParseError, RecursionError):
            return False
        predicted_value, reference_value = _rational_value(predicted_tree), _rational_value(reference_tree)
        inexact = _reference_is_inexact(reference, reference_value, predicted)
        if predicted_value is not None and reference_value is not None:
            return _numbers_equal(predicted_value, reference_value, self.percent, inexact)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        return _symbolic_worker().compare(predicted_tree, reference_tree, inexact, remaining)


# --------------------------------------------------------------------------------------
# The symbolic worker process
# --------------------------------------------------------------------------------------

WORKER_STARTUP_TIMEOUT = 60.0
WORKER_MEMORY_LIMIT = 2 << 30  # bytes of address space for the worker


class _SymbolicWorker:
    """A long-lived child process running :func:`_serve_symbolic_requests`.

    One request at a time (a lock makes it safe from threads); a request that
    outlives its deadline gets the process killed, and the next one starts a fresh
    process. A subprocess (not fork) keeps this safe inside Ray actors, threads and
    daemonic processes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._owner_pid = os.getpid()
        self._buffer = b""
        self._unavailable = False  # set once start-up fails, so we do not retry per answer

    def compare(self, left: list, right: list, inexact: bool, timeout: float) -> bool:
        with self._lock:
            if self._unavailable:
                return False
            try:
                process = self._running_process()
            except (OSError, TimeoutError) as exc:
                self._unavailable = True
                logger.error(
                    "cannot start the symbolic grading worker (%s; is sympy installed?); "
                    "answers that need symbolic comparison will be graded wrong",
                    exc,
                )
                return False
            deadline = time.monotonic() + timeout  # the one-off start-up is not charged
            try:
                process.stdin.write(json.dumps([left, right, inexact]).encode() + b"\n")
                process.stdin.flush()
            except OSError:
                self._stop()
                return False
            reply = self._read_line(deadline)
            if reply is None:
                logger.warning("symbolic comparison exceeded %.2fs; worker killed and graded wrong", timeout)
            elif not reply:
                logger.warning("symbolic grading worker exited (code %s); graded wrong", process.poll())
            if not reply:
                self._stop()
                return False
            return reply.strip() == b"1"

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _running_process(self) -> subprocess.Popen:
        if self._owner_pid != os.getpid():  # forked: the process belongs to our parent
            self._process, self._buffer, self._owner_pid = None, b"", os.getpid()
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        package_parent = str(Path(__file__).resolve().parents[2])
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, environment.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable or "python3", "-c", f"from {__name__} import _serve_symbolic_requests as s; s()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=environment,
        )
        if self._read_line(time.monotonic() + WORKER_STARTUP_TIMEOUT) != b"ready\n":
            self._stop()
            raise TimeoutError("worker did not report ready")
        return self._process

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the worker; ``b""`` if it exited, None at the deadline."""
        assert self._process is not None
        descriptor = self._process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(descriptor, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return None
                chunk = os.read(descriptor, 65536)
                if not chunk:
                    return b""
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._process, self._buffer = None, b""


_worker_lock = threading.Lock()
_worker: _SymbolicWorker | None = None


def _symbolic_worker() -> _SymbolicWorker:
    # One worker per process, created on first use: a process-wide resource like a
    # connection pool, not configuration.
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _SymbolicWorker()
            atexit.register(_worker.close)
        return _worker


def _serve_symbolic_requests() -> None:
    """Worker main loop: read ``[tree, tree, inexact]`` lines, answer ``1`` (equal) or ``0``."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > WORKER_MEMORY_LIMIT:
            resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, hard))
    except (ImportError, ValueError, OSError):
        pass
    import sympy  # noqa: F401  (warm the import before reporting ready)

    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.buffer.flush()
    for line in sys.stdin.buffer:
        try:
            left, right, inexact = json.loads(line)
            equal = _symbolic_equal(left, right, EXACT_TOLERANCE if not inexact else float(RELATIVE_TOLERANCE))
        except Exception:  # any failure on untrusted input means "not shown equal"
            equal = False
        sys.stdout.buffer.write(b"1\n" if equal else b"0\n")
        sys.stdout.buffer.flush()


# ---- sympy side (runs only inside the worker) -----------------------------------------


def _to_sympy(tree: list) -> Any:
    """Build a sympy object from a parser tree with constructors only (no parsing of text)."""
    import sympy

    kind = tree[0]
    if kind == "num":
        value = Fraction(tree[1])
        return sympy.Rational(value.numerator, value.denominator)
    if kind == "sym":
        return sympy.Symbol(tree[1])
    if kind == "const":
        return {"pi": sympy.pi, "E": sympy.E, "I": sympy.I, "oo": sympy.oo}[tree[1]]
    if kind == "neg":
        return -_to_sympy(tree[1])
    if kind == "add":
        return sympy.Add(*[_to_sympy(item) for item in tree[1]])
    if kind == "mul":
        return sympy.Mul(*[_to_sympy(item) for item in tree[1]])
    if kind == "div":
        return _to_sympy(tree[1]) * _bounded_power(_to_sympy(tree[2]), sympy.Integer(-1))
    if kind == "pow":
        return _bounded_power(_to_sympy(tree[1]), _to_sympy(tree[2]))
    if kind == "sqrt":
        degree = sympy.Integer(2) if tree[2] is None else _to_sympy(tree[2])
        if not (degree.is_Integer and 2 <= degree <= 100):
            raise ValueError("unsupported root degree")
        return _bounded_power(_to_sympy(tree[1]), 1 / degree)
    if kind == "func":
        argument = _to_sympy(tree[2])
        if tree[1] == "log" and tree[3] is not None:
            return sympy.log(argument, _to_sympy(tree[3]))
        function = {"ln": sympy.log, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan}.get(tree[1])
        if tree[1] not in _FUNCTIONS and tree[1] not in _ROUNDING.values():
            raise ValueError(f"unknown function {tree[1]!r}")
        return (function or getattr(sympy, tree[1]))(argument)
    if kind == "factorial":
        argument = _to_sympy(tree[1])
        if argument.is_number and abs(complex(argument.evalf(15))) > MAX_FACTORIAL:
            raise ValueError("factorial too large")
        return sympy.factorial(argument)
    if kind == "binomial":
        top, bottom = _to_sympy(tree[1]), _to_sympy(tree[2])
        if top.is_number and abs(complex(top.evalf(15))) > MAX_POWER_BITS:
            raise ValueError("binomial too large")
        return sympy.binomial(top, bottom)
    if kind == "eq":
        return ("eq", _to_sympy(tree[1]), _to_sympy(tree[2]))
    raise ValueError(f"unknown node {kind!r}")


def _bounded_power(base: Any, exponent: Any) -> Any:
    """``base ** exponent``, refusing powers whose exact value would be huge."""
    import sympy

    if exponent.is_Number:
        size = abs(float(exponent))
    elif exponent.is_number:  # constant but irrational, e.g. 2^{\sqrt{2}}
        size = abs(complex(exponent.evalf(15)))
    else:
        size = 0.0  # a symbolic exponent stays unevaluated
    if base.is_Rational and base not in (0, 1, -1):
        bits = max(abs(base.p).bit_length(), abs(base.q).bit_length())
        if size * bits > MAX_POWER_BITS:
            raise ValueError("power too large")
    elif size > MAX_EXPONENT:
        raise ValueError("exponent too large")
    return sympy.Pow(base, exponent)


_SAMPLE_POINTS = 3


def _symbolic_equal(left_tree: list, right_tree: list, tolerance: float) -> bool:
    left, right = _to_sympy(left_tree), _to_sympy(right_tree)
    if isinstance(left, tuple) or isinstance(right, tuple):
        if not (isinstance(left, tuple) and isinstance(right, tuple)):
            return False
        left_side, right_side = left[1] - left[2], right[1] - right[2]
        return _expressions_equal(left_side, right_side, tolerance) or _expressions_equal(
            left_side, -right_side, tolerance
        )
    return _expressions_equal(left, right, tolerance)


def _expressions_equal(left: Any, right: Any, tolerance: float) -> bool:
    """Exact match, else agreement within the tolerance at a few random points."""
    import random

    import sympy

    undefined = (sympy.zoo, sympy.nan)
    if left.has(*undefined) or right.has(*undefined):
        return False
    if left == right:
        return True
    if left.has(sympy.oo, -sympy.oo) or right.has(sympy.oo, -sympy.oo):
        return False
    symbols = sorted(left.free_symbols | right.free_symbols, key=str)
    step_functions = (sympy.floor, sympy.ceiling, sympy.factorial, sympy.binomial)
    wanted = _SAMPLE_POINTS * (4 if left.has(*step_functions) or right.has(*step_functions) else 1)
    rng = random.Random(0)
    checked = 0
    for _ in range(4 * wanted):
        # Positive points away from 0 and 1, where textbook answers are defined.
        point = {symbol: sympy.Rational(rng.randint(1100, 9900), 1000) for symbol in symbols}
        left_value, right_value = _numeric_value(left, point), _numeric_value(right, point)
        if left_value is None or right_value is None:
            if not symbols:
                return False
            continue
        scale = sympy.Max(abs(left_value), abs(right_value))
        if bool(abs(left_value - right_value) > tolerance * scale):
            return False
        checked += 1
        if checked == wanted or not symbols:
            return True
    # Nowhere evaluable (e.g. undefined on the sample range): fall back to algebra.
    return sympy.simplify(left - right) == 0


def _numeric_value(expression: Any, point: dict) -> Any:
    """The value at ``point`` as a 30-digit sympy number, or None where undefined."""
    value = expression.evalf(30, subs=point)
    magnitude = abs(value)
    if not (magnitude.is_Number and magnitude.is_finite):
        return None
    return value
