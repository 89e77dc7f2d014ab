"""Answer formats real models write, graded as a mathematician would.

Each category has answers that must be accepted (in both argument orders, unless the
case is about a prediction-only form) and near misses that must be rejected. The
relation, inequality, equation and sum cases go through math-verify in the grading
worker; the rest through our own rules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightreasoner_ray.core import grading
from lightreasoner_ray.core.grading import extract_answer, is_equivalent

REPO = Path(__file__).resolve().parents[1]


def _both_ways(prediction: str, reference: str) -> tuple[bool, bool]:
    return is_equivalent(prediction, reference), is_equivalent(reference, prediction)


# ---- relations and inequalities --------------------------------------------------------------

RELATIONS_EQUAL = [
    (r"x \leq 5", r"5 \geq x"),
    (r"x \geq 5", r"x \ge 5"),
    (r"x < 3", r"3 > x"),
    (r"0<f(x)<1", "(0,1)"),
    (r"0 < x < 1", r"x \in (0, 1)"),
    (r"x < 5", r"(-\infty, 5)"),
    (r"-2 \le x \le 7", "[-2, 7]"),
]
RELATIONS_DIFFERENT = [
    (r"x \leq 5", r"x \geq 5"),  # the wrong direction
    (r"x < 5", r"x \leq 5"),  # strict against non-strict
    (r"0 < x \leq 1", "(0,1)"),  # a closed end against an open one
    (r"-2 \le x < 7", "[-2, 7]"),
    ("5", r"x \leq 5"),  # a number is not a relation
    (r"x < 6", r"(-\infty, 5)"),
]


@pytest.mark.parametrize("prediction,reference", RELATIONS_EQUAL)
def test_relations_and_inequalities_written_differently_are_equal(prediction, reference):
    assert _both_ways(prediction, reference) == (True, True)


@pytest.mark.parametrize("prediction,reference", RELATIONS_DIFFERENT)
def test_different_relations_are_not_equal(prediction, reference):
    assert _both_ways(prediction, reference) == (False, False)


# ---- several boxes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,expected",
    [
        (r"So $x = \boxed{-2}$ or $x = \boxed{1}$.", "-2, 1"),
        (r"The roots are \boxed{-2} and \boxed{1}.", "-2, 1"),
        (r"\boxed{3}; \boxed{5}", "3, 5"),
        (r"\boxed{7} ... checking again, \boxed{7}", "7"),  # a repeated box is one answer
        (r"first \boxed{3}, then the area is \boxed{12}", "12"),  # prose between: only the last
        (r"The sum is \boxed{5}. \boxed{7}", "7"),  # a sentence break ends the group
    ],
)
def test_boxes_that_form_one_answer_are_read_together(completion, expected):
    assert extract_answer(completion, "math500") == expected


def test_two_boxes_graded_as_the_list_they_state():
    answer = extract_answer(r"Hence $x=\boxed{-2}$ \text{ or } $x=\boxed{1}$.", "math500")
    assert is_equivalent(answer, "1, -2")
    assert not is_equivalent(answer, "1, 2")
    assert not is_equivalent(answer, "1")  # a second, different root is not the one answer


def test_the_same_answer_boxed_in_two_forms_is_right():
    answer = extract_answer(r"$d = \boxed{15\frac{39}{40}},$ or $\boxed{\frac{639}{40}}$ inches.", "math500")
    assert is_equivalent(answer, r"\frac{639}{40}")
    assert not is_equivalent(answer, r"\frac{641}{40}")


@pytest.mark.parametrize("gold", ["7", "3", "1, -2", "(3, 4)", r"\frac{1}{2}"])
def test_boxing_many_candidates_to_fish_for_a_match_is_wrong(gold):
    fishing = ", ".join(rf"\boxed{{{value}}}" for value in ["-2", "1", "3", "4", "7", r"\frac{1}{2}", "(3, 4)", "9", "10", "11"])
    answer = extract_answer(f"It is one of {fishing}", "math500")
    assert len(answer.split(",")) >= 10
    assert not is_equivalent(answer, gold)


# ---- labelled answers --------------------------------------------------------------------------

LABELLED_EQUAL = [
    ("(p,q)=(3,2)", "(3,2)"),
    ("(a, b) = (1, -4)", "(1,-4)"),
    ("AB=4, CD=5", "4, 5"),
    (r"x_1 = 2, x_2 = 3", "2, 3"),
    ("y = 3, x = 1", "1, 3"),
]
LABELLED_DIFFERENT = [
    ("(p,q)=(2,3)", "(3,2)"),
    ("AB=4, CD=6", "4, 5"),
    ("(p,q)=(3,2)", r"\{3, 2\}"),
]


@pytest.mark.parametrize("prediction,reference", LABELLED_EQUAL)
def test_labelled_answers_equal_their_values(prediction, reference):
    assert _both_ways(prediction, reference) == (True, True)


@pytest.mark.parametrize("prediction,reference", LABELLED_DIFFERENT)
def test_labelled_answers_with_other_values_differ(prediction, reference):
    assert _both_ways(prediction, reference) == (False, False)


# Lists labelled on both sides pair their members by label; an unlabelled member
# pairs with any label, and "x = 1, 2" states two values of x.
LABELLED_LISTS_EQUAL = [
    ("x=1, y=2", "y=2, x=1"),  # the order of labelled members does not matter
    (r"$x=\frac12$, $y=2$", "y = 2, x = 0.5"),
    ("x=1 or x=2", "x=2, x=1"),  # a label may repeat: two roots
    ("x = 1, 2", "x=2 or x=1"),
    (r"x=\pm 3", "x=3, x=-3"),
    ("1, y=2", "x=1, y=2"),  # a missing label contradicts nothing
    ("(x,y)=(1,2)", "x=1, y=2"),
    ("(x, y) = (1, 2)", "y=2, x=1"),
]
LABELLED_LISTS_DIFFERENT = [
    ("x=1, y=2", "x=2, y=1"),  # the same values given to the other unknowns
    ("x=1, y=2", "x=1, z=2"),  # another unknown
    ("x=1, x=2", "x=1, y=2"),
    ("x = 1, 2", "x=1, y=2"),  # 2 is stated as a value of x
    ("2, y=1", "x=1, y=2"),
    (r"x=\pm 3", "x=3, y=-3"),
    (r"x_1 = 2, x_2 = 3", r"x_1 = 3, x_2 = 2"),  # indexed labels name distinct unknowns
    ("(x,y)=(2,1)", "x=1, y=2"),
    ("(p,q)=(1,2)", "x=1, y=2"),
    ("x=3, y=3", "x=3"),  # every boxed form must answer for x
]


@pytest.mark.parametrize("prediction,reference", LABELLED_LISTS_EQUAL)
def test_labelled_lists_pair_members_by_label(prediction, reference):
    assert _both_ways(prediction, reference) == (True, True)


@pytest.mark.parametrize("prediction,reference", LABELLED_LISTS_DIFFERENT)
def test_labelled_lists_with_values_under_other_labels_differ(prediction, reference):
    assert _both_ways(prediction, reference) == (False, False)


def test_a_labelled_list_against_bare_values_ignores_the_labels():
    # One side unlabelled: only the values are compared, as for "y = 3, x = 1" against "1, 3".
    assert _both_ways("x=2, y=1", "1, 2") == (True, True)
    assert _both_ways("x=2, y=1", "1, 3") == (False, False)


# ---- list syntax ---------------------------------------------------------------------------------

LISTS_EQUAL = [
    ("2; 3", "3, 2"),
    (r"2 \text{ or } 3", "2, 3"),
    (r"-1 \text{ and } 4", "4, -1"),
    ("{2,3,5}", r"\{5, 3, 2\}"),
    ("{2,3,5}", "5, 2, 3"),
    (r"\pm 3", "3, -3"),
    (r"\pm\sqrt{2}", r"-\sqrt{2}, \sqrt{2}"),
]
LISTS_DIFFERENT = [
    ("2; 4", "3, 2"),  # a wrong member
    ("2; 3; 4", "3, 2"),  # an extra member
    ("{2,3,5}", "{2,3,6}"),
    ("{2,3,5}", "(2,3,5)"),  # a set is not an ordered triple
    (r"\pm 3", "3"),
    (r"\pm 3", "3, 3"),
]


@pytest.mark.parametrize("prediction,reference", LISTS_EQUAL)
def test_list_syntax_variants_are_equal(prediction, reference):
    assert _both_ways(prediction, reference) == (True, True)


@pytest.mark.parametrize("prediction,reference", LISTS_DIFFERENT)
def test_lists_with_a_wrong_member_differ(prediction, reference):
    assert _both_ways(prediction, reference) == (False, False)


def test_words_in_prose_answers_do_not_split_them():
    assert is_equivalent("black and white", "Black and white")
    assert not is_equivalent("black and white", "white")


# ---- extraction without a box -------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,benchmark,expected",
    [
        ("So the point where they meet is $(7, 6)$.", "math500", "(7, 6)"),
        (r"The final answer is \((-6, 10)\).", "math500", "(-6, 10)"),
        (r"The final answer is \[x^2+1\]", "math500", "x^2+1"),
        (r"so $3 + 4 = 7$ apples", "math500", "7"),
        # GSM8K-style benchmarks keep their last-number rule.
        ("So the point is $(7, 6)$.", "gsm8k", "6"),
        # A later stated answer beats earlier intermediate boxes...
        (r"Step: \boxed{10} and \boxed{455}. So the final answer is $10,455$.", "math500", "10,455"),
        # ...but a later sentence without maths in it does not.
        (r"Thus \boxed{44}. We may check: so our answer is correct.", "math500", "44"),
    ],
)
def test_extraction_without_a_box(completion, benchmark, expected):
    assert extract_answer(completion, benchmark) == expected


def test_a_stated_answer_after_intermediate_boxes_grades_right():
    completion = r"First \boxed{10}, then \boxed{455}. Therefore, the final answer is $10,455$."
    assert is_equivalent(extract_answer(completion, "math500"), "10455")
    assert not is_equivalent(extract_answer(completion, "math500"), "455")


# ---- equation forms ------------------------------------------------------------------------------

EQUATIONS_EQUAL = [
    ("a=b=5", "5"),
    (r"2x+4y-3=0", r"y=-\frac12x+\frac34"),
    ("x + y = 1", "2x + 2y = 2"),
    ("y = 2x + 1", "2x - y + 1 = 0"),
]
EQUATIONS_DIFFERENT = [
    (r"2x+4y+3=0", r"y=-\frac12x+\frac34"),
    ("x + y = 1", "x - y = 1"),
    ("y = 2x + 1", "y = 2x + 2"),
    ("a=b=6", "5"),
]


@pytest.mark.parametrize("prediction,reference", EQUATIONS_EQUAL)
def test_equation_forms_are_equal(prediction, reference):
    assert is_equivalent(prediction, reference)


# An equation answers a bare value only as a label: one side a lone symbol or function name.
LABEL_AGAINST_VALUE_EQUAL = [
    ("x=3", "3"),
    ("3=x", "3"),
    (r"\theta = \frac{\pi}{2}", r"\frac{\pi}{2}"),
    ("f(x)=2x+1", "2x+1"),
    ("x = 1 + 2 = 3", "3"),
    ("x_1 = 3", "x_{1} = 3"),
]
EQUATION_AGAINST_VALUE_DIFFERENT = [
    ("2x=6", "6"),  # x is 3, not 6
    (r"\frac{x}{2}=3", "3"),  # x is 6
    ("x+y=6", "6"),
    ("x^2=4", "4"),
    ("2+3=6", "6"),  # a false statement
    ("2x=6", "3"),  # states the problem, not the answer
    ("y=6", "x=6"),  # a value of another unknown
    (r"\alpha = 2", r"\beta = 2"),
    ("f(x)=2x", "2t"),
]


@pytest.mark.parametrize("prediction,reference", LABEL_AGAINST_VALUE_EQUAL)
def test_a_labelled_value_equals_the_value_on_either_side(prediction, reference):
    assert _both_ways(prediction, reference) == (True, True)


@pytest.mark.parametrize("prediction,reference", EQUATION_AGAINST_VALUE_DIFFERENT)
def test_an_equation_is_not_its_right_hand_side(prediction, reference):
    assert _both_ways(prediction, reference) == (False, False)


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [("2x=6", "6", False), ("6", "2x=6", False), ("x+y=6", "6", False), ("3=x", "3", True), ("3", "3=x", True)],
)
def test_the_math_verify_tier_itself_unwraps_only_labels(prediction, reference, expected):
    pytest.importorskip("math_verify")
    assert grading._math_verify_equal(prediction, reference) is expected


@pytest.mark.parametrize("prediction,reference", EQUATIONS_DIFFERENT)
def test_unrelated_equations_differ(prediction, reference):
    assert _both_ways(prediction, reference) == (False, False)


# ---- number formats, choice letters, sums --------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,reference",
    [
        ("1000,99", "1000.99"),  # a decimal comma
        ("3,5", "3.5"),
        (r"11,\! 111", "11111"),
        ("14 {, }916", "14916"),
        ("10{,}000", "10000"),
        (r"\sum_{k=1}^{n} k", r"\frac{n(n+1)}{2}"),
        (r"\sum_{k=1}^{4} k^2", "30"),
    ],
)
def test_number_formats_and_sums(prediction, reference):
    assert is_equivalent(prediction, reference)


@pytest.mark.parametrize(
    "prediction,reference",
    [
        ("1001,99", "1000.99"),
        ("1,000", "1.000"),  # three digits after a comma group thousands
        ("3,5", "3"),
        (r"11,\! 112", "11111"),
        (r"\sum_{k=1}^{n} k", r"\frac{n(n-1)}{2}"),
        (r"\sum_{k=1}^{4} k^2", "31"),
    ],
)
def test_number_formats_and_sums_with_other_values(prediction, reference):
    assert not is_equivalent(prediction, reference)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("Option A fails the test. Because B is valid", "B"),
        ("A cell cannot do that, so the right one is C.", "C"),
        ("A cell divides quickly.", ""),  # the article is not an answer
    ],
)
def test_a_choice_letter_without_an_answer_cue(completion, expected):
    assert extract_answer(completion, "mmlu_stem", ["w", "x", "y", "z"]) == expected


# ---- our stricter rules survive the new tier -----------------------------------------------------


@pytest.mark.parametrize(
    "prediction,reference",
    [
        ("7.0000001", "7"),  # an exact integer gets no tolerance
        ("0.08", "8"),  # percentages only where a % is written
        (r"(1, 2)", r"\{1, 2\}"),  # an interval is not a set
        (r"[1, 2)", "(1, 2)"),
        ("B", "C"),
    ],
)
def test_our_stricter_rules_are_not_overridden(prediction, reference):
    assert not is_equivalent(prediction, reference)


# ---- safety of the math-verify tier --------------------------------------------------------------


def _hostile(marker: Path) -> list[str]:
    return [
        rf"\input{{{marker}}}",
        f"__import__('os').system('touch {marker}')",
        f"x < __import__('os').system('touch {marker}')",
        rf"\mathrm{{exec}}(\text{{open('{marker}', 'w')}})",
        r"\sum_{k=1}^{10^{12}} k!",
        r"x < 9^{9^{9^{9}}}",
        r"(10^{10})! = y",
        r"\prod_{k=1}^{10^{9}} k \leq x",
        "{" * 300 + "x<1" + "}" * 300,
        r"\left(" * 200 + "x<1" + r"\right)" * 200,
    ]


def test_hostile_answers_reaching_math_verify_are_graded_false_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for hostile in _hostile(marker):
        started = time.monotonic()
        assert not is_equivalent(hostile, "x < 1", timeout=1.0)  # a short budget keeps the test fast
        assert not is_equivalent("x < 1", hostile, timeout=1.0)
        assert time.monotonic() - started < 15, hostile[:40]
    started = time.monotonic()
    assert not is_equivalent(r"x < 9^{9^{9^{9}}}", "x < 1")  # the default budget
    assert time.monotonic() - started < 15
    assert not marker.exists()
    assert is_equivalent(r"x \leq 5", r"5 \geq x")  # the worker recovered


def test_core_imports_and_grades_without_math_verify(tmp_path):
    """A machine without math-verify still imports core; undecided pairs grade wrong, the rest as before."""
    blocker = tmp_path / "math_verify"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('math_verify is not installed here')\n")
    script = textwrap.dedent(
        """
        import sys
        import lightreasoner_ray.core
        from lightreasoner_ray.core.grading import is_equivalent
        assert "math_verify" not in sys.modules
        print(is_equivalent("1/2", "0.5"), is_equivalent("2, 3", "3; 2"), is_equivalent("x \\\\le 5", "5 \\\\ge x"))
        """
    )
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True", "False"]


def test_math_verify_is_imported_only_inside_functions():
    source = Path(grading.__file__).read_text()
    imports = [line.strip() for line in source.splitlines() if "import math_verify" in line or "from math_verify" in line]
    assert imports and all(line.startswith(("import math_verify", "from math_verify")) for line in imports)
    assert not any(line.startswith(("import math_verify", "from math_verify")) for line in source.splitlines())
