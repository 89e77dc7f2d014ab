"""Multi-step arithmetic word problems with chain-of-thought solutions.

A problem starts with a person holding some objects and applies ``level``
operations to that amount (``level`` is the difficulty, 1..``MAX_LEVEL``)::

    Mia has 3 boxes of 4 pens. She buys 5 more, then gives away 6.
    How many pens does Mia have now?

The solution is one arithmetic line per operation, each starting from the
previous result, and a final boxed answer::

    3 * 4 = 12
    12 + 5 = 17
    17 - 6 = 11
    The answer is \\boxed{11}.

Numbers stay small so that tiny models with small vocabularies can learn the
domain: added/removed amounts are 1..20, multiplications are "G containers of K"
(G 2..5, K 2..9) or "doubles/triples them", and every intermediate value lies in
``0..MAX_VALUE``.

Splits: a hash of a problem's question text puts it in one of three fixed buckets,
``validation`` (5% of the problem space), ``test`` (another 5%) or ``train`` (the
rest), so the splits are disjoint for any seeds, and each call's rows are free of
duplicates. Choices (learning rate, beta, steps) are made on ``validation``; the
held-out ``test`` split is only reported. (Until the validation split existed,
``test`` was the whole 10% bucket: ``train`` is unchanged by its introduction.)
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from typing import Callable, Iterable, NamedTuple, Sequence

from lightreasoner_ray.errors import LightReasonerError

MAX_LEVEL = 5
"""Most operations a problem can have."""

DEFAULT_LEVELS = (1, 2, 3, 4)
"""Difficulty levels generated when none are given."""

MAX_VALUE = 99
"""Upper bound for every quantity (start, operand, intermediate and final)."""

SPLITS = ("train", "validation", "test")
# Hash buckets (per mille of the problem space): [0, 50) validation, [50, 100) test,
# the rest train. train keeps exactly the bucket it had before validation was split
# off the held-out share, so models trained on it (the toy pair) stay valid.
_VALIDATION_PER_MILLE = 50
_HELD_OUT_PER_MILLE = 100

# (name, pronoun)
_PEOPLE = (
    ("Tom", "He"), ("Ben", "He"), ("Sam", "He"), ("Max", "He"), ("Leo", "He"),
    ("Jack", "He"), ("Ann", "She"), ("Mia", "She"), ("Eva", "She"),
    ("Lily", "She"), ("Zoe", "She"), ("Kate", "She"),
)
# (plural noun, edible)
_OBJECTS = (
    ("apples", True), ("cookies", True), ("candies", True), ("plums", True),
    ("pens", False), ("marbles", False), ("stickers", False), ("cards", False),
    ("shells", False), ("coins", False),
)
_CONTAINERS = ("bags", "boxes", "jars")
_ADD_PHRASES = ("buys {n} more", "gets {n} more", "finds {n} more")
_SUB_PHRASES = ("gives away {n}", "loses {n}", "sells {n}")
_EAT_PHRASE = "eats {n}"  # only for edible objects
_SCALE_PHRASES = {2: "doubles them", 3: "triples them"}

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}
_STEP_RE = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")
_FINAL_RE = re.compile(r"The answer is \\boxed\{(\d+)\}\.")
_BOXED_RE = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


class Step(NamedTuple):
    """One solution line ``a op b = c``."""

    a: int
    op: str
    b: int
    c: int

    def __str__(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.c}"


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


def _make_problem(rng: random.Random, level: int) -> tuple[str, list[Step]]:
    """Draw one problem with exactly ``level`` operations."""
    name, pronoun = rng.choice(_PEOPLE)
    noun, edible = rng.choice(_OBJECTS)
    steps: list[Step] = []

    # The opening sentence either states an amount or is itself a multiplication.
    if rng.random() < 0.3:
        groups, each = rng.randint(2, 5), rng.randint(2, 9)
        opening = f"{name} has {groups} {rng.choice(_CONTAINERS)} of {each} {noun}."
        steps.append(Step(groups, "*", each, groups * each))
        value = groups * each
    else:
        value = rng.randint(1, 20)
        opening = f"{name} has {value} {noun}."

    actions: list[str] = []
    while len(steps) < level:
        kinds = []
        if value < MAX_VALUE:
            kinds += ["+"] * 4
        if value >= 1:
            kinds += ["-"] * 4
        if value >= 2 and value * 2 <= MAX_VALUE:
            kinds += ["*"] * 2
        kind = rng.choice(kinds)
        if kind == "+":
            n = rng.randint(1, min(20, MAX_VALUE - value))
            actions.append(rng.choice(_ADD_PHRASES).format(n=n))
        elif kind == "-":
            n = rng.randint(1, min(20, value))
            phrases = _SUB_PHRASES + ((_EAT_PHRASE,) if edible else ())
            actions.append(rng.choice(phrases).format(n=n))
        else:
            n = 3 if value * 3 <= MAX_VALUE and rng.random() < 0.4 else 2
            actions.append(_SCALE_PHRASES[n])
        result = _OPS[kind](value, n)
        steps.append(Step(value, kind, n, result))
        value = result

    sentences = [opening]
    if actions:
        if len(actions) == 1:
            body = actions[0]
        else:
            body = ", ".join(actions[:-1]) + ", then " + actions[-1]
        sentences.append(f"{pronoun} {body}.")
    sentences.append(f"How many {noun} does {name} have now?")
    return " ".join(sentences), steps


def _split_of(question: str) -> str:
    """The split a question belongs to, fixed by a hash of its text."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    if bucket < _VALIDATION_PER_MILLE:
        return "validation"
    return "test" if bucket < _HELD_OUT_PER_MILLE else "train"


def format_solution(steps: Sequence[Step]) -> str:
    """Render steps as the chain-of-thought solution text."""
    lines = [str(step) for step in steps]
    lines.append(f"The answer is \\boxed{{{steps[-1].c}}}.")
    return "\n".join(lines)


def generate_problems(
    n: int,
    seed: int = 0,
    split: str = "train",
    levels: Iterable[int] = DEFAULT_LEVELS,
) -> list[dict]:
    """Generate ``n`` distinct problems of ``split``, deterministically for ``seed``.

    Levels cycle through ``levels`` in the given order, so each level gets an
    equal share (up to rounding). Rows have ``id`` (``toy-<split>-<index>``),
    ``question``, ``solution``, ``answer`` (decimal string) and ``level``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LightReasonerError(f"toy domain: n must be a non-negative integer, got {n!r}")
    if split not in SPLITS:
        raise LightReasonerError(f"toy domain: split must be one of {SPLITS}, got {split!r}")
    levels = tuple(levels)
    if not levels or any(
        isinstance(lv, bool) or not isinstance(lv, int) or not 1 <= lv <= MAX_LEVEL
        for lv in levels
    ):
        raise LightReasonerError(
            f"toy domain: levels must be a non-empty list of integers in 1..{MAX_LEVEL}, "
            f"got {levels!r}"
        )

    rng = random.Random(f"lightreasoner-toy:{seed}:{split}")
    seen: set[str] = set()
    rows: list[dict] = []
    attempts, max_attempts = 0, 1000 * n + 10_000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise LightReasonerError(
                f"toy domain: could only find {len(rows)} of {n} distinct {split} "
                f"problems for levels {levels}; ask for fewer"
            )
        level = levels[len(rows) % len(levels)]
        question, steps = _make_problem(rng, level)
        if question in seen or _split_of(question) != split:
            continue
        seen.add(question)
        rows.append(
            {
                "id": f"toy-{split}-{len(rows):06d}",
                "question": question,
                "solution": format_solution(steps),
                "answer": str(steps[-1].c),
                "level": level,
            }
        )
    return rows


def hasty_solution(row: dict) -> str | None:
    """The row's solution with a known slip: it stops before a final doubling or tripling.

    For a problem of two or more steps whose last operation is "doubles/triples
    them", the hasty solution writes every line but that last one and boxes the
    value before it (a wrong answer); for any other problem it returns None. The
    demo's toy pair learns from data where some solutions are hasty, the expert
    from a share of them, the amateur from almost all, so that the expert shares a
    weakness with the amateur, only milder: the kind of weakness the contrast
    between them can point at.
    """
    steps = solution_steps(row)
    # Only the opening can be a multiplication besides "doubles/triples them", so a
    # multiplication after the first step is one of those.
    if len(steps) < 2 or steps[-1].op != "*":
        return None
    return format_solution(steps[:-1])


def hasty_answer(row: dict) -> str | None:
    """The answer of :func:`hasty_solution` (the value before the final doubling or tripling), or None."""
    hasty = hasty_solution(row)
    return None if hasty is None else str(parse_solution(hasty)[1])


def corpus_texts(rows: Iterable[dict]) -> list[str]:
    """Texts to train a tokenizer on: each row's question, then its solution."""
    texts: list[str] = []
    for row in rows:
        texts.append(row["question"])
        texts.append(row["solution"])
    return texts


# --------------------------------------------------------------------------
# Parsing and checking
# --------------------------------------------------------------------------


def parse_solution(text: str) -> tuple[list[Step], int]:
    """Parse a solution into its steps and boxed answer.

    Every line but the last must read ``a op b = c`` (op one of ``+ - *``) and
    the last ``The answer is \\boxed{N}.``; anything else raises
    :class:`LightReasonerError`. Results are *not* checked here.
    """
    lines = text.strip().split("\n")
    steps: list[Step] = []
    for number, line in enumerate(lines[:-1], start=1):
        match = _STEP_RE.fullmatch(line.strip())
        if match is None:
            raise LightReasonerError(f"solution line {number} is not 'a op b = c': {line!r}")
        a, op, b, c = match.groups()
        steps.append(Step(int(a), op, int(b), int(c)))
    final = _FINAL_RE.fullmatch(lines[-1].strip())
    if final is None:
        raise LightReasonerError(
            f"solution must end with 'The answer is \\boxed{{N}}.', got {lines[-1]!r}"
        )
    return steps, int(final.group(1))


def solution_steps(row: dict) -> list[Step]:
    """The arithmetic steps of ``row['solution']`` (see :func:`parse_solution`)."""
    return parse_solution(row["solution"])[0]


def boxed_answer(text: str) -> str | None:
    """The integer inside the last ``\\boxed{...}`` of ``text``, or None."""
    found = _BOXED_RE.findall(text)
    return str(int(found[-1])) if found else None


def check_solution(row: dict) -> bool:
    """True iff ``row['solution']`` is a correct chain ending in ``row['answer']``.

    Checks that the solution parses, has at least one step (exactly
    ``row['level']`` if present), every line's arithmetic holds, each line
    starts from the previous line's result, and the boxed answer equals both
    the last result and ``row['answer']``.
    """
    try:
        steps, boxed = parse_solution(row["solution"])
    except (LightReasonerError, KeyError, AttributeError):
        return False
    if not steps or ("level" in row and len(steps) != row["level"]):
        return False
    for i, step in enumerate(steps):
        if _OPS[step.op](step.a, step.b) != step.c:
            return False
        if i > 0 and step.a != steps[i - 1].c:
            return False
    return boxed == steps[-1].c and str(boxed) == str(row.get("answer", "")).strip()
