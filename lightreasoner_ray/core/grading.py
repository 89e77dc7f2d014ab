"""Answer extraction and mathematical-equivalence grading.

``extract_answer`` pulls the final answer out of a model completion (the boxed answer,
else "the answer is X", else the last inline maths or number; a choice letter for
multiple-choice benchmarks). ``is_equivalent`` decides whether two answers mean the
same thing, in four tiers of increasing cost:

1. normalised string equality, plain numbers (with a relative tolerance only where
   the reference is inexact), and exact rational arithmetic, all in-process;
2. a small LaTeX/plain-maths parser of our own that turns an answer into a syntax
   tree of lists (never ``eval``, never ``sympify``: model output is untrusted);
3. a sympy comparison of two trees (exact, numeric, or at random points for
   expressions with variables) in a separate worker process that is killed when it
   exceeds its time budget, so no input can hang or exhaust the caller;
4. for pairs the first three leave undecided (text our parser does not read:
   relations, inequalities against intervals, equations scaled or rearranged, sums,
   ``a=b=c`` chains), math-verify's parser and comparison, in the same worker.

Our tiers stay first because they are stricter where the benchmarks need it (exact
integers, tolerance only for inexact references, percentages only where written,
interval brackets and set/tuple kinds respected) and because they answer most
pairs without a process round trip. Tuples, intervals, sets, unions, matrices and
lists of answers are compared element by element (lists, sets and unions in any order).
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
from dataclasses import dataclass, replace
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
# Kept (math-verify's extraction needs its parser, so a worker round trip per completion):
# in-process regexes with the benchmarks' own rules (GSM8K's last number, MMLU's letter).
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

    Maths benchmarks: the boxed answer (the last ``\\boxed{}``, joined with the boxes
    just before it when only list words separate them: ``\\boxed{-2} or \\boxed{1}``
    gives ``-2, 1``), unless a later "the answer is" states it; else the text after the
    last "the answer is"; else (GSM8K-style benchmarks) the last number, or (the others)
    the last inline maths ``$...$`` / ``\\(...\\)`` holding the last number. Multiple
    choice (``mmlu_stem``): a letter A-D from a boxed letter, "answer is (B)", or a
    boxed choice text matching one of ``choices``; else the last "(B)"; else the last
    letter used as an answer ("Because B is valid").
    """
    if not text:
        return ""
    text = text[-MAX_COMPLETION_CHARS:]  # final answers are at the end; bounds the work
    if benchmark in CHOICE_BENCHMARKS:
        return _extract_choice(text, choices)
    boxes = _boxes(text)
    stated_at, stated = _stated_answer(text)
    if boxes and not (stated_at > boxes[-1][1] and re.search(r"[\d\\]", stated)):  # "our answer is correct" is no answer
        answer = _trailing_box_group(text, boxes)
        if answer:
            return answer
    if stated:
        return stated
    numbers = list(_LAST_NUMBER.finditer(text))
    if not numbers:
        return ""
    if benchmark not in LAST_NUMBER_BENCHMARKS:
        maths = _last_inline_maths(text, numbers[-1].start())
        if maths:
            return maths
    return numbers[-1].group().replace(",", "")


# Benchmarks whose answers are plain numbers: without a box or a stated answer, the
# last number in the text is the answer (as the benchmarks' own protocols read them).
LAST_NUMBER_BENCHMARKS = frozenset({"gsm8k", "svamp", "asdiv", "mawps"})
# What may separate boxes that together form one answer: list words and punctuation,
# maths delimiters, and a "x =" label ("x = \boxed{-2} or x = \boxed{1}").
MAX_BOX_GAP = 80
_BOX_SEPARATOR = re.compile(
    r"(?:\s|[$,;]|\\[(),;:!]|\\q?quad|\\text\s*\{\s*(?:or|and)?\s*\}|\b(?:or|and)\b"
    r"|[A-Za-z](?:_\{?\w+\}?)?\s*=)*",
    re.IGNORECASE,
)


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, content)`` of every closed ``\\boxed{...}`` / ``\\fbox{...}``."""
    starts = [match for match in _BOXED_START.finditer(text)]
    if not starts:
        bare = None
        for bare in _BOXED_BARE.finditer(text):  # "\\boxed 7."
            pass
        return [(bare.start(), bare.end(), bare.group(1).rstrip(".,;"))] if bare else []
    closing = _closing_braces(text, starts[0].end() - 1)
    found = []
    for match in starts:
        end = closing.get(match.end() - 1)
        if end is not None and not (found and match.start() < found[-1][1]):  # skip boxes nested in boxes
            found.append((match.start(), end + 1, text[match.end() : end].strip()))
    return found


def _trailing_box_group(text: str, boxes: list[tuple[int, int, str]]) -> str:
    """The last box's content, joined (``a, b``) with the boxes before it that only list words separate."""
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        gap = text[box[1] : group[0][0]]
        if len(gap) > MAX_BOX_GAP or not _BOX_SEPARATOR.fullmatch(gap):
            break
        group.insert(0, box)
    return ", ".join(content for _, _, content in group if content)


_INLINE_MATHS = re.compile(
    rf"\${{1,2}}([^$]{{1,{MAX_EXPRESSION_CHARS}}})\${{1,2}}|\\\((.{{1,{MAX_EXPRESSION_CHARS}}}?)\\\)", re.DOTALL
)


def _last_inline_maths(text: str, last_number_at: int) -> str:
    """The last ``$...$`` or ``\\(...\\)`` of the text when it holds the last number."""
    last = None
    for last in _INLINE_MATHS.finditer(text):  # from the start, so "$" pairs are read as written
        pass
    if last is None or not (last.start() < last_number_at < last.end()):
        return ""
    return _result_side((last.group(1) or last.group(2)).strip())


def _result_side(maths: str) -> str:
    """``3 + 4 = 7`` -> ``7`` (arithmetic ending in a number); other maths (``5x + 4 = 0``) as written."""
    sides = maths.split("=")
    if len(sides) > 1 and _LAST_NUMBER.fullmatch(sides[-1].strip()) and not re.search(r"[A-Za-z]", maths):
        return sides[-1].strip().replace(",", "")
    return maths


def _stated_answer(text: str) -> tuple[int, str]:
    """Where the last "the answer is" ends, and what follows it up to the end of its line or sentence."""
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return -1, ""
    rest = text[last.end() :].split("\n", 1)[0]
    rest = re.split(r"\.\s+(?=[A-Z])", rest, maxsplit=1)[0]  # "... is 5. So ..." keeps "5"
    rest = _FILLER_WORDS.sub("", rest.strip().strip("*").strip())
    rest = rest.rstrip(".").strip()
    delimited = re.fullmatch(r"\$+(.*?)\$+|\\\((.*)\\\)|\\\[(.*)\\\]", rest, re.DOTALL)  # $..$, \(..\), \[..\]
    if delimited:  # maths written as such: "$f(n)=n, g(n)=1$" stays whole
        rest = _result_side(next(group for group in delimited.groups() if group is not None))
    else:
        rest = rest.rsplit("=", 1)[-1]  # "... is 3 * 4 = 12" keeps "12"
    return last.end(), _FILLER_WORDS.sub("", rest.strip().strip("$").strip())


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
    if parenthesised:
        return parenthesised[-1]
    # No cue: a capital letter used as an answer ("Because B is valid", "so C."),
    # not the article "A" ("A cell divides").
    named = re.findall(rf"(?<![\w'])([{letters}])(?=\s+(?:is|was|must|should|would|fits|matches)\b|[.,;:!)]|\s*$)", text)
    return named[-1] if named else ""


def _casefold_key(text: str) -> str:
    return re.sub(r"\s+", " ", normalize_answer(text)).strip().casefold()


# --------------------------------------------------------------------------------------
# Normalisation
# Kept: units, percentages, degrees and labels are stripped the way the benchmarks
# write their references; math-verify's normaliser is looser on units and percentages.
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
# "10{,}000", "14 {, }916", "11,\\! 111": a comma written to group digits.
_COMMA_GROUP = re.compile(r"(?<=\d)\s*(?:\{\s*,\s*\}|,\\!)\s*(?=\d)|\{,\}")
_THIN_SPACES = re.compile(r"(?<!\\)\\[!,]")  # also used as thousands separators: 10\!080
_SPACING = re.compile(r"(?<!\\)\\[;: ]|\\q?quad(?![A-Za-z])|~|\\displaystyle(?![A-Za-z])")
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])")
_LHS_PREFIX = re.compile(
    r"^(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z0-9, ]*\))?|\\[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?"
    r"|[A-Z]{2,3}|\(\s*[A-Za-z](?:_\{?\w+\}?)?(?:\s*,\s*[A-Za-z](?:_\{?\w+\}?)?)+\s*\))"  # AB = 4, (p, q) = (3, 2)
    r"\s*(?:=|\\in(?![A-Za-z])|\\approx(?![A-Za-z]))\s*"
)
# A label that is one symbol (``x``, ``x_1``, ``\\theta``), not a function or a segment.
_LONE_SYMBOL = re.compile(
    r"((?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?)\s*(?:=|\\in(?![A-Za-z])|\\approx(?![A-Za-z]))\s*"
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
    return _normalize_with_label(text)[0]


def _normalize_with_label(text: str) -> tuple[str, str | None]:
    """:func:`normalize_answer` and the lone symbol it removed (``x`` of ``x = 3``), if any."""
    answer, prefix = _normalize_with_prefix(text)
    symbol = _LONE_SYMBOL.fullmatch(prefix) if prefix else None
    return answer, (re.sub(r"[\s{}]", "", symbol.group(1)) if symbol else None)


def _tuple_label(text: str) -> tuple[str, tuple[str, ...]] | None:
    """``(x, y) = (1, 2)`` -> ``("(1, 2)", ("x", "y"))``: the value and the lone symbols labelling it."""
    answer, prefix = _normalize_with_prefix(text)
    names = re.fullmatch(r"\(\s*(.*?)\s*\)\s*=\s*", prefix or "")
    if not names:
        return None
    symbols = [re.sub(r"[\s{}]", "", name) for name in names.group(1).split(",")]
    return answer, tuple(symbols)


def _normalize_with_prefix(text: str) -> tuple[str, str | None]:
    """:func:`normalize_answer` and the label prefix it removed (``x = ``, ``(p, q) = ``), if any."""
    answer = text.strip()
    for char, replacement in _UNICODE.items():
        answer = answer.replace(char, replacement)
    answer = _COMMA_GROUP.sub(",", _unwrap_commands(answer))
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
    label = None
    if prefix and "=" not in answer[prefix.end() :] and answer[prefix.end() :].strip():
        label = prefix.group()
        answer = answer[prefix.end() :]
    answer = _strip_unit(answer)
    letter = _PAREN_LETTER.fullmatch(answer)
    return (letter.group(1) if letter else answer.strip()), label


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
# Kept: stricter than math-verify on kinds (it equates the interval (1, 2) with the
# set {1, 2}) and lets each element use our numeric rules; decides most lists in-process.
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
    label: str | None = None  # the lone symbol it was stated for: ``x`` of ``x = 1`` in ``x = 1, y = 2``


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


_LIST_WORD = re.compile(r"\s+(?:or|and)\s+|\s*;\s*", re.IGNORECASE)


def _split_list(text: str) -> list[str]:
    """Split a list of answers at top-level ``,`` / ``;``, and at " or " / " and " between maths (not prose)."""
    if re.search(r"\d", text):
        text = _LIST_WORD.sub(";", text)
    parts = []
    for part in _split_top_level(text, ","):
        parts.extend(_split_top_level(part, ";"))
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
    """Parse an answer into nested sequences of normalised scalars, keeping each member's label."""
    if not depth:
        return _unlabelled_structure(text, depth)
    text, label = _normalize_with_label(text)
    structure = _unlabelled_structure(text, depth)
    return replace(structure, label=label) if label else structure


def _unlabelled_structure(text: str, depth: int) -> _Structure:
    if depth > MAX_NESTING:
        raise _TooLarge("answer nested too deeply")
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
    parts = _split_list(text)
    if len(parts) > 1:  # a bare list of answers ("1, 2", "1; 2", "1 or 2") is compared as a set
        return _Structure("set", items=_items(parts, depth), ordered=False)
    brackets = _enclosing_brackets(text)
    if brackets:
        opener, closer = brackets
        inner = text[len(opener) : len(text) - len(closer)]
        inner_parts = _split_top_level(inner, ",")
        if opener in ("\\{", "{"):  # {2, 3, 5} is a set, braces escaped or not
            return _Structure("set", items=_items(inner_parts, depth), ordered=False)
        if len(inner_parts) > 1:
            return _Structure(opener + closer, items=_items(inner_parts, depth))
        if opener + closer in ("()", "[]", "{}"):
            return _structure(inner, depth + 1)
    plus_minus = _split_top_level(text, "\\pm")
    if len(plus_minus) == 2 and plus_minus[1].strip():
        base, offset = plus_minus  # "\\pm 3" (no base) is 3 and -3
        both = [f"{base}+({offset})", f"{base}-({offset})"]
        return _Structure("set", items=_items(both, depth), ordered=False)
    return _Structure("scalar", text)


def _items(parts: Sequence[Any], depth: int) -> tuple[_Structure, ...]:
    if len(parts) > MAX_ITEMS:
        raise _TooLarge("too many items")
    return tuple(part if isinstance(part, _Structure) else _structure(part, depth + 1) for part in parts)


def _structures_match(predicted: _Structure, reference: _Structure, scalars_equal: Callable[[str, str], bool]) -> bool:
    if predicted.kind != reference.kind or len(predicted.items) != len(reference.items):
        return False
    if predicted.label and reference.label and predicted.label != reference.label:
        return False  # "x = 1, y = 2" is not "x = 2, y = 1": members pair by label where both state one
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
# Kept: exact integers and tolerance only where the reference is inexact (math-verify
# rounds both sides to a fixed number of decimals), without leaving the process.
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
# Kept: bounds every number, power and factorial before sympy sees it (math-verify would
# try them until killed), runs in-process for the exact rational fast path, and tells
# which answers are ours to decide and which go to math-verify.
# --------------------------------------------------------------------------------------


class _ParseError(ValueError):
    """Text this grader will not interpret (unsupported, ambiguous or too large)."""


class _TooLarge(_ParseError):
    """Text beyond a size or depth bound: graded wrong, never handed on to math-verify."""


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
        raise _TooLarge("expression too long")
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
                raise _TooLarge("number literal too large")
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
        tree = self.expr()  # equations ("=") are math-verify's: it compares them scaled and rearranged
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
            raise _TooLarge("expression nested too deeply")
        try:
            return parse()
        finally:
            self.depth -= 1

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
    (predicted_text, predicted_label), (reference_text, reference_label) = map(_normalize_with_label, (prediction, reference))
    if predicted_label and reference_label and predicted_label != reference_label:
        return False  # "y = 6" is not "x = 6": a statement about another unknown
    if _spaceless(predicted_text) == _spaceless(reference_text):
        return True
    percent = _has_percent(prediction) or _has_percent(reference)
    judge = _ScalarJudge(percent=percent, timeout=timeout)
    predicted_text = _decimal_comma(predicted_text, reference_text)
    try:
        predicted, expected = _structure(predicted_text), _structure(reference_text)
        predicted, expected = _with_label(predicted, predicted_label, predicted_text), _with_label(expected, reference_label, reference_text)
        predicted, expected = _labelled_tuple_as_list(prediction, predicted, expected), _labelled_tuple_as_list(reference, expected, predicted)
    except _TooLarge:
        return False
    except _ParseError:
        judge.undecided = True
    else:
        if _structures_match(predicted, expected, judge):
            return True
        if predicted.kind == "set" and expected.kind != "set" and not _enclosing_brackets(predicted_text):
            # The same answer boxed in several forms ("15\\frac{39}{40}, or \\frac{639}{40}"):
            # right only if every one of them is; many different candidates never are.
            return all(_structures_match(item, expected, judge) for item in predicted.items)
        if (predicted.kind == "scalar") != (expected.kind == "scalar"):
            scalar = predicted if predicted.kind == "scalar" else expected
            judge.undecided = not _parses(scalar.text)  # "0<x<1" against "(0, 1)": not ours to decide
    if not judge.undecided or percent:  # our rules decided (exact numbers, tolerance, percentages, choices)
        return False
    if _EXPENSIVE.search(prediction) or _EXPENSIVE.search(reference):
        return False
    remaining = judge.deadline - time.monotonic()
    return remaining > 0 and _symbolic_worker().verify_latex(prediction, reference, remaining)


# Text math-verify would spend its whole budget on (towers of numeric powers, factorials
# and sums or products of huge ranges): refused up front rather than killed after the
# timeout, which also saves restarting the worker. Answers our parser reads never get here.
_EXPENSIVE = re.compile(r"\^\s*\{?\s*\d+\s*\^|\d{3,}\s*\}?\s*\)?\s*!|\\(?:sum|prod)_\{[^{}]*\}\^\s*\{[^{}]*\d{4,}")


def _with_label(structure: _Structure, label: str | None, text: str) -> _Structure:
    """The answer stated for ``label``: in ``x = 1, 2`` (a bare list) each unlabelled member is a value of ``x``."""
    if not label:
        return structure
    if structure.kind == "set" and not _enclosing_brackets(text):
        return replace(structure, items=tuple(item if item.label else replace(item, label=label) for item in structure.items))
    return replace(structure, label=label)


def _labelled_tuple_as_list(answer: str, structure: _Structure, other: _Structure) -> _Structure:
    """``(x, y) = (1, 2)`` as the labelled list ``x = 1, y = 2`` when ``other`` is such a list, else ``structure``."""
    if structure.kind != "()" or other.kind != "set" or not all(item.label for item in other.items):
        return structure
    labelled = _tuple_label(answer)
    if labelled is None or len(labelled[1]) != len(structure.items) or not all(_LONE_SYMBOL.fullmatch(f"{name}=") for name in labelled[1]):
        return structure
    return _Structure("set", items=tuple(replace(item, label=name) for item, name in zip(structure.items, labelled[1])), ordered=False)


def _parses(text: str) -> bool:
    try:
        parse_expression(text)
    except (_ParseError, RecursionError):
        return False
    return True


def _decimal_comma(predicted: str, reference: str) -> str:
    """``1000,99`` -> ``1000.99`` when the reference is a decimal with that many fractional digits."""
    comma = re.fullmatch(r"(-?\d+),(\d+)", predicted)
    point = re.fullmatch(r"-?\d+\.(\d+)", reference)
    if comma and point and len(comma.group(2)) == len(point.group(1)) != 3:
        return f"{comma.group(1)}.{comma.group(2)}"
    return predicted


_PROSE = re.compile(r"[A-Za-z][A-Za-z'. -]*")


class _ScalarJudge:
    """Compares two normalised scalars, cheapest test first, within a time budget."""

    def __init__(self, percent: bool, timeout: float):
        self.percent = percent
        self.deadline = time.monotonic() + timeout
        self.undecided = False  # set when a comparison fell outside our parser

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
        except _TooLarge:
            return False
        except (_ParseError, RecursionError):
            self.undecided = True
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
# Kept: the safety envelope (time and memory caps, kill and restart) for our sympy
# comparison and for math-verify, whose own timeouts need signals on a main thread.
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
        """Our sympy comparison of two parser trees."""
        return self._request([left, right, inexact], timeout)

    def verify_latex(self, prediction: str, reference: str, timeout: float) -> bool:
        """math-verify's comparison of two answers as written (see :func:`_math_verify_equal`)."""
        return self._request(["latex", prediction, reference], timeout)

    def _request(self, request: list, timeout: float) -> bool:
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
                process.stdin.write(json.dumps(request).encode() + b"\n")
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

    try:  # optional: without it, pairs our rules leave undecided are graded wrong
        import math_verify  # noqa: F401
    except ImportError:
        pass

    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.buffer.flush()
    for line in sys.stdin.buffer:
        try:
            left, right, inexact = json.loads(line)
            if left == "latex":
                equal = _math_verify_equal(right, inexact)
            else:
                equal = _symbolic_equal(left, right, EXACT_TOLERANCE if not inexact else float(RELATIVE_TOLERANCE))
        except Exception:  # any failure on untrusted input means "not shown equal"
            equal = False
        sys.stdout.buffer.write(b"1\n" if equal else b"0\n")
        sys.stdout.buffer.flush()


# ---- sympy side (runs only inside the worker) -----------------------------------------
# Kept beside math-verify: exact comparison or random-point evaluation with our
# tolerance rule, on trees whose sizes the parser has already bounded.

MATH_VERIFY_FLOAT_ROUNDING = 10  # math-verify's default (6) accepts 7.0000001 for 7


def _math_verify_equal(prediction: str, reference: str) -> bool:
    """math-verify on two answers: relations, inequalities against intervals, equation
    forms, sums and the rest of its LaTeX grammar that our parser does not read.

    LaTeX extraction only: its plain-expression extraction hands text to sympy's
    ``parse_expr``, which evaluates Python. Its signal-based timeouts are off (this
    runs on the worker's main thread, but our parent's kill is the one deadline).
    """
    import logging as worker_logging

    from math_verify import LatexExtractionConfig, parse, verify

    worker_logging.getLogger("math_verify").setLevel(worker_logging.ERROR)
    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def parsed(answer: str) -> list:
        return parse(f"${answer}$" if "$" not in answer else answer, extraction_config=config, parsing_timeout=None)

    gold, target = parsed(reference), parsed(prediction)
    if not gold or not target:
        return False
    if _is_equation(gold[0]) != _is_equation(target[0]):
        # math-verify would compare the equation's right side alone ("2x = 6" against "6"):
        # an equation answers a bare value only as a label ("x = 3", "3 = x", "f(x) = ...").
        value = _labelled_value(gold[0] if _is_equation(gold[0]) else target[0])
        if value is None:
            return False
        if _is_equation(gold[0]):
            gold = [value]
        else:
            target = [value]
    return verify(
        gold,
        target,
        float_rounding=MATH_VERIFY_FLOAT_ROUNDING,
        strict=True,
        allow_set_relation_comp=True,
        timeout_seconds=None,
    )


def _is_equation(expr: Any) -> bool:
    """An equation or a chain of them (``a = b = 3``), as math-verify parses it."""
    import sympy

    if isinstance(expr, sympy.Eq):
        return True
    return isinstance(expr, sympy.And) and all(isinstance(arg, sympy.Eq) for arg in expr._unsorted_args)


def _labelled_value(equation: Any) -> Any:
    """The value an equation labels: the far side of a lone symbol or function name
    (``x = 3``, ``3 = x``, ``f(x) = 2x``, ``x = 1 + 2 = 3``); None for any other equation."""
    import sympy
    from sympy.core.function import AppliedUndef

    def lone(side: Any) -> bool:
        return side.is_Symbol or (isinstance(side, AppliedUndef) and all(arg.is_Symbol for arg in side.args))

    links = list(equation._unsorted_args) if isinstance(equation, sympy.And) else [equation]
    if lone(links[0].lhs):
        return links[-1].rhs
    if lone(links[-1].rhs):
        return links[0].lhs
    return None


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
    return _expressions_equal(_to_sympy(left_tree), _to_sympy(right_tree), tolerance)


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
