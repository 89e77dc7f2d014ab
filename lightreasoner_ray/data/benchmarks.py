"""Evaluation benchmarks as uniform rows: ``{"id", "question", "answer"[, "choices"]}``.

Each benchmark lives at ``<data_dir>/<name>/<split>.jsonl`` in the format of its
public release; one small builder per benchmark turns a raw row into the text shown
to the model and a clean reference answer (``9``, not ``9 (apples)``; ``C``, not
``2``). ``data_dir`` defaults to ``$LIGHTREASONER_DATA_DIR``, else
``../shared/data/benchmarks`` next to the working directory or the repository.

``math`` is the full MATH test set. It is read from ``<data_dir>/math/test.jsonl``
and, when that file is absent, from the Hugging Face hub (only if ``datasets`` is
installed and the hub is reachable). Offline, use ``math500`` (the standard
500-problem subset, shipped with the local data) or call
:func:`resolve_benchmark_name`, which picks ``math500`` for ``math`` when the full
file is not on disk.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from lightreasoner_ray.config import BENCHMARKS, PAPER_BENCHMARKS  # noqa: F401 (PAPER_BENCHMARKS: re-exported)
from lightreasoner_ray.core.grading import last_boxed
from lightreasoner_ray.data.jsonl import jsonl_rows
from lightreasoner_ray.errors import LightReasonerError

logger = logging.getLogger(__name__)

# The names live in config.BENCHMARKS: "toy" is the demo's held-out split of the toy arithmetic
# domain (lightreasoner_ray.toy), written by `lightreasoner demo` to <data_dir>/toy/test.jsonl.

DATA_DIR_ENV = "LIGHTREASONER_DATA_DIR"
_SHARED_DATA = Path("..") / "shared" / "data" / "benchmarks"
_ID_FIELDS = ("unique_id", "id", "ID", "idx")
CHOICE_LETTERS = "ABCDEFGHIJ"

# Hub copies whose rows have the same fields as the local files (used only when the
# local file is absent). (dataset, [configs], split names are the benchmark's own.)
_HUB_SOURCES: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "gsm8k": ("openai/gsm8k", ("main",)),
    "math500": ("HuggingFaceH4/MATH-500", (None,)),
    "math": (
        "EleutherAI/hendrycks_math",
        (
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
    ),
}


class _RowContext:
    """Where a raw row came from, so every error names file, line and field."""

    def __init__(self, source: str, line_no: int, row: dict[str, Any]):
        self.source = source
        self.line_no = line_no
        self.row = row

    def error(self, field: str, problem: str) -> LightReasonerError:
        return LightReasonerError(f"{self.source}:{self.line_no}: field '{field}' {problem}")

    def field(self, name: str, kind: type | tuple[type, ...] = str) -> Any:
        if name not in self.row or self.row[name] is None:
            raise self.error(name, "is missing")
        value = self.row[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            expected = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"should be {expected}, got {type(value).__name__}")
        return value


def default_data_dir() -> Path:
    """``$LIGHTREASONER_DATA_DIR``, else ``../shared/data/benchmarks`` from the cwd or the repo."""
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env)
    from_cwd = Path.cwd() / _SHARED_DATA
    if from_cwd.is_dir():
        return from_cwd
    return Path(__file__).resolve().parents[2] / _SHARED_DATA


def benchmark_path(name: str, data_dir: str | Path | None = None, split: str = "test") -> Path:
    """The local file a benchmark split is read from (it may not exist)."""
    _check_name(name)
    base = Path(data_dir) if data_dir else default_data_dir()
    return base / name / f"{split}.jsonl"


def resolve_benchmark_name(name: str, data_dir: str | Path | None = None) -> str:
    """The benchmark to load for ``name`` without touching the network.

    ``math`` becomes ``math500`` when the full MATH file is not on disk (the
    paper's MATH column is then reported on the standard 500-problem subset);
    every other name is returned unchanged.
    """
    _check_name(name)
    if name == "math" and not benchmark_path("math", data_dir).is_file():
        logger.info("full MATH test file not found under %s; using math500", benchmark_path("math", data_dir).parent)
        return "math500"
    return name


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file; a bad line is fatal
    (a benchmark is graded whole)."""
    for line_no, row, error in jsonl_rows(path):
        if error:
            raise LightReasonerError(f"{path}:{line_no}: {error}")
        if not isinstance(row, dict):
            raise LightReasonerError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row


def load_benchmark(
    name: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Load a benchmark split as rows with ``id``, ``question``, ``answer`` (and ``choices``).

    Each row also carries ``toolkit_question``: the question as the Qwen2.5-Math
    evaluation toolkit formats it (the ``qwen25-math-cot`` protocol, see
    :func:`toolkit_question`). ``limit`` keeps the first ``limit`` rows, in file order.
    """
    _check_name(name)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise LightReasonerError(f"limit must be a non-negative integer or None, got {limit!r}")
    path = benchmark_path(name, data_dir, split)
    if path.is_file():
        raw_rows: Iterator[tuple[str, int, dict[str, Any]]] = (
            (str(path), line_no, row) for line_no, row in read_jsonl(path)
        )
    else:
        raw_rows = _hub_rows(name, split, path)

    build_row = _ROW_BUILDERS[name]
    rows = []
    for index, (source, line_no, raw) in enumerate(raw_rows):
        if limit is not None and index >= limit:
            break
        context = _RowContext(source, line_no, raw)
        row = build_row(context)
        row["id"] = _row_id(raw, index)
        row["toolkit_question"] = toolkit_question(name, context, row["answer"])
        rows.append(row)
    logger.debug("loaded %d rows of %s/%s", len(rows), name, split)
    return rows


def _check_name(name: str) -> None:
    if name not in BENCHMARKS:
        raise LightReasonerError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")


def _row_id(raw: dict[str, Any], index: int) -> str:
    for field in _ID_FIELDS:
        if raw.get(field) is not None:
            return str(raw[field])
    return str(index)


def _hub_rows(name: str, split: str, missing: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Rows from the hub copy of a benchmark, or a clear error naming the file to provide."""
    hint = f"provide {missing}"
    if name == "math":
        hint += " (or use the benchmark 'math500', the 500-problem MATH subset available locally)"
    if name not in _HUB_SOURCES:
        raise LightReasonerError(f"benchmark file {missing} not found; {hint}")
    try:
        import datasets
    except ImportError:
        raise LightReasonerError(
            f"benchmark file {missing} not found and the `datasets` package is not installed; {hint}"
        ) from None
    dataset_name, configs = _HUB_SOURCES[name]
    parts = []
    for config in configs:
        try:
            parts.append(datasets.load_dataset(dataset_name, config, split=split))
        except Exception as exc:  # offline, gated, renamed: all mean "not available here"
            raise LightReasonerError(
                f"benchmark file {missing} not found and hub dataset {dataset_name} "
                f"is not available ({type(exc).__name__}: {exc}); {hint}"
            ) from None
    source = f"hub:{dataset_name}"
    index = 0
    for part in parts:
        for row in part:
            index += 1
            yield source, index, dict(row)


def _toy_row(context: _RowContext) -> dict[str, Any]:
    return {"question": context.field("question"), "answer": context.field("answer").strip()}


def _clean_number(value: float) -> str:
    """``8.0`` -> ``8``; ``2.5`` stays ``2.5``."""
    if value == int(value):
        return str(int(value))
    return repr(value)


def gsm8k_final_answer(solution: str) -> str:
    """The answer on a GSM8K solution's last ``#### <answer>`` line, thousands commas removed
    (``""`` when there is none)."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "") if "####" in solution else ""


def _gsm8k_row(context: _RowContext) -> dict[str, Any]:
    solution = context.field("answer")
    if "####" not in solution:
        raise context.error("answer", "has no '#### <answer>' line")
    answer = gsm8k_final_answer(solution)
    if not answer:
        raise context.error("answer", "has an empty '####' answer")
    return {"question": context.field("question"), "answer": answer}


def _math_row(context: _RowContext) -> dict[str, Any]:
    question = context.field("problem")
    if context.row.get("answer") is not None:
        answer = context.field("answer")
    else:
        answer = last_boxed(context.field("solution"))
        if answer is None:
            raise context.error("solution", "has no \\boxed{} answer (and there is no 'answer' field)")
    return {"question": question, "answer": answer.strip()}


def _minerva_row(context: _RowContext) -> dict[str, Any]:
    answer = last_boxed(context.field("solution"))
    if answer is None:
        raise context.error("solution", "has no \\boxed{} answer")
    return {"question": context.field("problem"), "answer": answer.strip()}


def _svamp_row(context: _RowContext) -> dict[str, Any]:
    body = context.field("Body").strip()
    question = context.field("Question").strip()
    answer = context.field("Answer", (int, float))
    return {"question": f"{body} {question}", "answer": _clean_number(float(answer))}


_ASDIV_UNIT = re.compile(r"(-?\d+(?:\.\d+)?)\s*\([^()]*\)")
_ASDIV_NEGATED_FRACTION = re.compile(r"-\((\d+/\d+)\)")


def _asdiv_answer(raw: str) -> str:
    """``9 (apples)`` -> ``9``; ratios (``3:4``), times and names are kept as written."""
    answer = raw.strip()
    with_unit = _ASDIV_UNIT.fullmatch(answer)
    if with_unit:
        return with_unit.group(1)
    negated = _ASDIV_NEGATED_FRACTION.fullmatch(answer)
    if negated:
        return "-" + negated.group(1)
    return answer


def _asdiv_row(context: _RowContext) -> dict[str, Any]:
    body = context.field("body").strip()
    question = context.field("question").strip()
    answer = _asdiv_answer(context.field("answer"))
    if not answer:
        raise context.error("answer", "is empty")
    return {"question": f"{body} {question}", "answer": answer}


def _olympiadbench_row(context: _RowContext) -> dict[str, Any]:
    final_answers = context.field("final_answer", list)
    if not final_answers or not isinstance(final_answers[0], str):
        raise context.error("final_answer", "should be a non-empty list of strings")
    answer = final_answers[0].replace("$", "").strip().rstrip(".").strip()
    question = context.field("question")
    if context.row.get("context"):
        question = f"{context.field('context')}\n{question}"
    return {"question": question, "answer": answer}


def _mmlu_row(context: _RowContext) -> dict[str, Any]:
    choices = context.field("choices", list)
    if not 2 <= len(choices) <= len(CHOICE_LETTERS) or not all(isinstance(c, str) for c in choices):
        raise context.error("choices", f"should be a list of 2 to {len(CHOICE_LETTERS)} strings")
    answer_index = context.field("answer", int)
    if not 0 <= answer_index < len(choices):
        raise context.error("answer", f"should be an index into choices (0-{len(choices) - 1}), got {answer_index}")
    lines = [context.field("question").strip()]
    lines += [f"({letter}) {choice}" for letter, choice in zip(CHOICE_LETTERS, choices)]
    return {"question": "\n".join(lines), "answer": CHOICE_LETTERS[answer_index], "choices": list(choices)}


# ---- the Qwen2.5-Math evaluation toolkit's question formatting ---------------------------
# evaluation/parser.py `parse_question` of QwenLM/Qwen2.5-Math, applied to the same public
# files; the rules differ from our own `question` on purpose (it is what the paper's
# numbers were measured with).


def _svamp_toolkit_question(context: _RowContext) -> str:
    body = context.field("Body").strip()
    if not body.endswith("."):
        body += "."
    return f"{body} {context.field('Question').strip()}"


def _mmlu_toolkit_question(context: _RowContext) -> str:
    # On the line after the question; each option stripped, "(A) ..." joined by one space.
    options = " ".join(
        f"({letter}) {str(choice).strip()}" for letter, choice in zip(CHOICE_LETTERS, context.field("choices", list))
    )
    return f"{context.field('question').strip()}\nAnswer Choices: {options}"


_TOOLKIT_QUESTIONS: dict[str, Callable[[_RowContext], str]] = {
    "gsm8k": lambda context: context.field("question"),
    "math": lambda context: context.field("problem"),
    "math500": lambda context: context.field("problem"),
    "minerva_math": lambda context: context.field("problem"),
    "svamp": _svamp_toolkit_question,
    "asdiv": lambda context: f"{context.field('body').strip()} {context.field('question').strip()}",
    # The toolkit reads `question` alone: an OlympiadBench `context` is not shown.
    "olympiadbench": lambda context: context.field("question"),
    "mmlu_stem": _mmlu_toolkit_question,
    "toy": lambda context: context.field("question"),
}
_BOOLEAN_ANSWER_HINTS = {"true": " (True or False)", "false": " (True or False)", "yes": " (Yes or No)", "no": " (Yes or No)"}


def toolkit_question(name: str, context: _RowContext, answer: str) -> str:
    """The question as Qwen2.5-Math's toolkit shows it (``parse_question``).

    Per benchmark: SVAMP's body gets a final "." when it lacks one before the question;
    MMLU-STEM's choices follow on a new line as ``Answer Choices: (A) ... (B) ...``;
    ASDiv joins body and question with a space; OlympiadBench shows ``question``
    only. Every benchmark: a question whose reference answer is yes/no (true/false)
    ends with " (Yes or No)" (" (True or False)"); the result is stripped.
    """
    question = _TOOLKIT_QUESTIONS[name](context)
    plain_answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer).replace("$", "").strip().rstrip(".").lower()
    question += _BOOLEAN_ANSWER_HINTS.get(plain_answer, "")
    return question.strip()


_ROW_BUILDERS: dict[str, Callable[[_RowContext], dict[str, Any]]] = {
    "gsm8k": _gsm8k_row,
    "math": _math_row,
    "math500": _math_row,
    "svamp": _svamp_row,
    "asdiv": _asdiv_row,
    "minerva_math": _minerva_row,
    "olympiadbench": _olympiadbench_row,
    "mmlu_stem": _mmlu_row,
    "toy": _toy_row,
}
