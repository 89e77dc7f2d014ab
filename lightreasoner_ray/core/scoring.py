"""Grading completions into prediction rows, and scoring them: pass@1, pass@k, maj@k.

Plain functions of rows and texts: the evaluation stage runs :func:`grade_rows` as a
Ray task and :func:`score` on the driver.
"""

from __future__ import annotations

import logging
from typing import Any

from lightreasoner_ray.core.grading import extract_answer, is_equivalent

logger = logging.getLogger(__name__)

# The fields every prediction row has (a row with k samples adds outputs, answers, corrects, majority).
PREDICTION_FIELDS = ("id", "question", "output", "extracted", "answer", "correct")


def grade_rows(benchmark: str, rows: list[dict[str, Any]], outputs: list[Any]) -> list[dict[str, Any]]:
    """Prediction rows: the prompt, the completion, the extracted answer and whether it matches the reference.

    ``outputs`` holds the evaluator's ``{"prompt", "output"}`` dicts (plus ``"outputs"``
    with k samples), or bare completion texts.
    """
    graded = []
    for row, generated in zip(rows, outputs, strict=True):
        output = generated["output"] if isinstance(generated, dict) else generated
        prediction = {"id": row["id"], "question": row["question"], "output": output, "extracted": "",
                      "answer": row["answer"], "correct": False}
        if isinstance(generated, dict):
            prediction["prompt"] = generated["prompt"]
        try:
            prediction["extracted"] = extract_answer(output, benchmark, row.get("choices"))
            extracted = prediction["extracted"]
            prediction["correct"] = bool(extracted) and is_equivalent(extracted, row["answer"])
            if isinstance(generated, dict) and "outputs" in generated:
                prediction.update(grade_samples(benchmark, row, generated["outputs"]))
        except Exception as exc:  # a grader bug must not sink a long run; the row says what happened
            prediction["grading_error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s row %s: grading failed (%s); graded wrong", benchmark, row["id"], prediction["grading_error"])
        graded.append(prediction)
    return graded


def grade_samples(benchmark: str, row: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """The fields of a row with k sampled completions: each output, its answer and grade, and the majority vote.

    ``output``/``extracted``/``correct`` stay those of the first sample. The majority
    answer is the most frequent non-empty answer, answers counted equal when
    mathematically equivalent; ties go to the answer seen first.
    """
    answers = [extract_answer(output, benchmark, row.get("choices")) for output in outputs]
    corrects = [bool(answer) and is_equivalent(answer, row["answer"]) for answer in answers]
    groups: list[list[int]] = []  # sample indices, one list per distinct answer, in order of first appearance
    for index, answer in enumerate(answers):
        if not answer:
            continue
        for group in groups:
            if is_equivalent(answer, answers[group[0]]):
                group.append(index)
                break
        else:
            groups.append([index])
    majority = max(groups, key=len, default=None)  # max keeps the first of equal counts
    return {
        "outputs": outputs,
        "answers": answers,
        "corrects": corrects,
        "majority": answers[majority[0]] if majority else "",
        "majority_correct": bool(majority) and corrects[majority[0]],
    }


def score(rows: list[dict[str, Any]], k: int = 1) -> dict[str, Any]:
    """Accuracy (pass@1) over ``rows``; with ``k`` samples a row, pass@k and maj@k beside it.

    With k samples pass@1 is the mean share of correct samples per question (the
    unbiased estimate); pass@k counts a question solved when any sample is right, maj@k
    when the majority answer is. ``correct`` then counts correct samples out of ``n * k``.
    """
    if k == 1:
        correct = sum(bool(row["correct"]) for row in rows)
        return {"accuracy": correct / len(rows) if rows else 0.0, "n": len(rows), "correct": correct}
    sample_grades = [row.get("corrects") or [False] * k for row in rows]  # a grading error grades all wrong
    correct = sum(sum(grades) for grades in sample_grades)
    return {
        "accuracy": sum(sum(grades) / k for grades in sample_grades) / len(rows) if rows else 0.0,
        "n": len(rows),
        "correct": correct,
        "k": k,
        "pass@k": sum(any(grades) for grades in sample_grades) / len(rows) if rows else 0.0,
        "maj@k": sum(bool(row.get("majority_correct")) for row in rows) / len(rows) if rows else 0.0,
    }
