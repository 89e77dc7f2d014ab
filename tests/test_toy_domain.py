"""Tests for the toy arithmetic word-problem domain."""

import collections
import operator
import re

import pytest

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.toy import (
    DEFAULT_LEVELS,
    MAX_LEVEL,
    MAX_VALUE,
    Step,
    boxed_answer,
    check_solution,
    corpus_texts,
    generate_problems,
    hasty_answer,
    hasty_solution,
    parse_solution,
    solution_steps,
)

ALL_LEVELS = tuple(range(1, MAX_LEVEL + 1))


@pytest.fixture(scope="module")
def train_rows():
    return generate_problems(3000, seed=7, split="train", levels=ALL_LEVELS)


@pytest.fixture(scope="module")
def test_rows():
    return generate_problems(1000, seed=7, split="test", levels=ALL_LEVELS)


def independent_check(row):
    """Re-derive the answer from the solution text without the module's parser."""
    *lines, last = row["solution"].split("\n")
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    previous = None
    for line in lines:
        a, op, b, eq, c = line.split(" ")
        assert eq == "="
        a, b, c = int(a), int(b), int(c)
        assert ops[op](a, b) == c, line
        assert 0 <= c <= MAX_VALUE
        if previous is not None:
            assert a == previous
        previous = c
    assert last == f"The answer is \\boxed{{{previous}}}."
    assert row["answer"] == str(previous)
    assert len(lines) == row["level"]


def test_every_solution_is_correct(train_rows, test_rows):
    for row in train_rows + test_rows:
        independent_check(row)
        assert check_solution(row), row


def test_row_fields_and_sizes(train_rows):
    for row in train_rows:
        assert set(row) == {"id", "question", "solution", "answer", "level"}
        assert re.fullmatch(r"\d+", row["answer"]) and int(row["answer"]) >= 0
        assert str(int(row["answer"])) == row["answer"]
        assert len(row["question"].split()) <= 30
        assert len(row["solution"].split()) <= 40
        assert row["question"].endswith("have now?")


def test_deterministic_for_seed():
    assert generate_problems(200, seed=3) == generate_problems(200, seed=3)
    assert generate_problems(50, seed=3, split="test") == generate_problems(
        50, seed=3, split="test"
    )
    assert generate_problems(200, seed=3) != generate_problems(200, seed=4)
    # A shorter request is a prefix of a longer one.
    assert generate_problems(300, seed=3)[:200] == generate_problems(200, seed=3)


def test_train_and_test_are_disjoint(train_rows, test_rows):
    train_questions = {row["question"] for row in train_rows}
    assert not train_questions & {row["question"] for row in test_rows}
    # Disjoint even across seeds and level choices.
    other_test = generate_problems(1000, seed=99, split="test", levels=(1, 2))
    assert not train_questions & {row["question"] for row in other_test}
    other_train = generate_problems(2000, seed=99, split="train", levels=(1, 2))
    test_questions = {row["question"] for row in test_rows}
    assert not test_questions & {row["question"] for row in other_train}


def test_ids_and_questions_unique(train_rows, test_rows):
    for split, rows in (("train", train_rows), ("test", test_rows)):
        ids = [row["id"] for row in rows]
        assert len(set(ids)) == len(ids)
        assert ids[0] == f"toy-{split}-000000"
        assert all(re.fullmatch(rf"toy-{split}-\d{{6}}", i) for i in ids)
        assert len({row["question"] for row in rows}) == len(rows)


def test_level_distribution(train_rows):
    counts = collections.Counter(row["level"] for row in train_rows)
    assert counts == {level: 600 for level in ALL_LEVELS}
    default = generate_problems(400, seed=1)
    assert collections.Counter(r["level"] for r in default) == {
        level: 100 for level in DEFAULT_LEVELS
    }
    only_hard = generate_problems(100, seed=1, levels=[3, 4])
    assert {r["level"] for r in only_hard} == {3, 4}


def test_domain_has_variety(train_rows):
    solutions = "\n".join(row["solution"] for row in train_rows)
    for op in ("+", "-", "*"):
        assert f" {op} " in solutions
    answers = collections.Counter(row["answer"] for row in train_rows)
    assert len(answers) > 50
    assert answers.most_common(1)[0][1] < len(train_rows) * 0.1


def test_solution_steps_parse(train_rows):
    row = train_rows[0]
    steps = solution_steps(row)
    assert len(steps) == row["level"]
    assert all(isinstance(step, Step) for step in steps)
    assert "\n".join(str(step) for step in steps) in row["solution"]
    assert parse_solution("3 * 4 = 12\n12 - 5 = 7\nThe answer is \\boxed{7}.") == (
        [Step(3, "*", 4, 12), Step(12, "-", 5, 7)],
        7,
    )
    with pytest.raises(LightReasonerError):
        parse_solution("3 plus 4 is 7\nThe answer is \\boxed{7}.")
    with pytest.raises(LightReasonerError):
        parse_solution("3 + 4 = 7")


def test_corrupted_solutions_fail():
    good = {
        "question": "Tom has 7 apples. He buys 5 more, then gives away 3. "
        "How many apples does Tom have now?",
        "solution": "7 + 5 = 12\n12 - 3 = 9\nThe answer is \\boxed{9}.",
        "answer": "9",
        "level": 2,
    }
    assert check_solution(good)
    corruptions = {
        "wrong result": "7 + 5 = 13\n13 - 3 = 10\nThe answer is \\boxed{10}.",
        "wrong boxed": "7 + 5 = 12\n12 - 3 = 9\nThe answer is \\boxed{8}.",
        "broken chain": "7 + 5 = 12\n11 - 3 = 8\nThe answer is \\boxed{8}.",
        "missing step": "7 + 5 = 12\nThe answer is \\boxed{12}.",
        "no boxed": "7 + 5 = 12\n12 - 3 = 9\nThe answer is 9.",
        "prose step": "7 plus 5 is 12\n12 - 3 = 9\nThe answer is \\boxed{9}.",
        "empty": "",
    }
    for name, solution in corruptions.items():
        assert not check_solution({**good, "solution": solution}), name
    assert not check_solution({**good, "answer": "10"})
    assert not check_solution({"question": "?", "answer": "9"})


def test_corrupting_generated_rows_fails(train_rows):
    for row in train_rows[:200]:
        steps = solution_steps(row)
        bad = str(steps[0]).rsplit(" ", 1)[0] + f" {steps[0].c + 1}"
        corrupted = row["solution"].replace(str(steps[0]), bad, 1)
        assert not check_solution({**row, "solution": corrupted})
        assert not check_solution({**row, "answer": str(int(row["answer"]) + 1)})


def test_boxed_answer():
    assert boxed_answer("so \\boxed{3} then \\boxed{ 12 }") == "12"
    assert boxed_answer("The answer is \\boxed{007}.") == "7"
    assert boxed_answer("no answer") is None


def test_corpus_texts(train_rows):
    texts = corpus_texts(train_rows[:10])
    assert len(texts) == 20
    assert texts[0] == train_rows[0]["question"]
    assert texts[1] == train_rows[0]["solution"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1},
        {"n": 1.5},
        {"n": 3, "split": "valid"},
        {"n": 3, "levels": ()},
        {"n": 3, "levels": (0,)},
        {"n": 3, "levels": (MAX_LEVEL + 1,)},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(LightReasonerError):
        generate_problems(**kwargs)


def test_zero_rows():
    assert generate_problems(0) == []


def test_hasty_solution_stops_exactly_before_a_final_doubling_or_tripling(train_rows):
    hasty_rows = 0
    for row in train_rows:
        steps = solution_steps(row)
        question_ends_scaling = row["question"].split(" How many")[0].endswith(("doubles them.", "triples them."))
        hasty = hasty_solution(row)
        if hasty is None:
            assert not (len(steps) >= 2 and question_ends_scaling), row
            continue
        hasty_rows += 1
        assert question_ends_scaling and len(steps) >= 2, row
        # A correct chain of every step but the last, boxing the value before the scaling:
        # check it with the domain's own checker as a problem of one level less.
        shortened = dict(row, solution=hasty, answer=str(steps[-2].c), level=len(steps) - 1)
        assert check_solution(shortened), hasty
        assert hasty_answer(row) == str(steps[-2].c) != row["answer"]
        # The same text as the gold solution up to the scaling line.
        gold_lines = row["solution"].split("\n")
        assert hasty.split("\n")[:-1] == gold_lines[:-2]
    assert 0.05 < hasty_rows / len(train_rows) < 0.3


def _bucket(question: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 1000


def test_validation_split_is_disjoint_from_train_and_test(train_rows, test_rows):
    validation = generate_problems(600, seed=7, split="validation", levels=ALL_LEVELS)
    assert validation[0]["id"] == "toy-validation-000000"
    questions = {row["question"] for row in validation}
    assert len(questions) == 600
    assert not questions & {row["question"] for row in train_rows}
    assert not questions & {row["question"] for row in test_rows}
    assert not questions & {row["question"] for row in generate_problems(600, seed=8, split="test", levels=ALL_LEVELS)}
    # The buckets, recomputed here: validation [0, 50), test [50, 100), train the rest (as before
    # the validation split existed, so the toy pair's training problems did not change).
    assert all(_bucket(q) < 50 for q in questions)
    assert all(50 <= _bucket(row["question"]) < 100 for row in test_rows)
    assert all(_bucket(row["question"]) >= 100 for row in train_rows)
