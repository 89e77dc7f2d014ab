"""Loading the problems to sample from: JSONL, JSON or Parquet files, or hub datasets.

Each problem becomes ``{"problem_id": str, "question": str, "line": int}``, plus
``"answer"`` (the raw gold answer field, as text) when the row has one: only the
rejection-sampling SFT baseline reads it. The id comes from the configured field
(``auto``: ``id``, ``idx``, ``unique_id``), else a stable hash of the question, so a
re-run sees the same ids and can skip what is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lightreasoner_ray.config import DataConfig
from lightreasoner_ray.core.grading import last_boxed
from lightreasoner_ray.data.benchmarks import gsm8k_final_answer
from lightreasoner_ray.data.jsonl import jsonl_rows, utf8_text
from lightreasoner_ray.errors import LightReasonerError

logger = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem", "prompt", "input", "query")
# Not the benchmarks' order (data.benchmarks): each decides the ids already recorded in samples and
# predictions, so changing either would stop existing output_dirs from resuming.
ID_FIELDS = ("id", "idx", "unique_id", "problem_id")
ANSWER_FIELDS = ("answer", "final_answer", "solution")


@dataclass
class LoadedProblems:
    problems: list[dict[str, Any]]
    source: str
    skipped: list[str] = field(default_factory=list)  # one message per skipped row


def question_hash(question: str) -> str:
    return "q-" + hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:16]


def _iter_file_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (row number, row, error) for each row of a JSONL/JSON/Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise LightReasonerError(f"{path}: not a readable Parquet file ({exc})") from None
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, row, None
    elif suffix == ".json":
        try:
            rows = json.loads(utf8_text(path.read_bytes(), path))
        except json.JSONDecodeError as exc:
            raise LightReasonerError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if isinstance(rows, dict):
            rows = next((v for v in rows.values() if isinstance(v, list)), None)
        if not isinstance(rows, list):
            raise LightReasonerError(f"{path}: a JSON problems file must hold a list of objects")
        for number, row in enumerate(rows, start=1):
            yield number, row, None
    else:  # a malformed line is skipped and counted, as a row without a question is
        yield from jsonl_rows(path)


def _hub_rows(name: str, subset: str, split: str) -> Iterator[tuple[int, Any, str | None]]:
    try:
        import datasets
    except ImportError:
        raise LightReasonerError(f"problems file {name} does not exist (and `datasets` is not installed)") from None
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split)
    except Exception as exc:  # offline, unknown name, missing split: all mean "not here"
        raise LightReasonerError(
            f"problems {name!r} is neither a local file nor a reachable Hugging Face dataset ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Give a JSONL/JSON/Parquet file in data.problems."
        ) from None
    for number, row in enumerate(dataset, start=1):
        yield number, row, None


def _pick(row: dict, configured: str, candidates: tuple[str, ...]) -> str | None:
    if configured != "auto":
        return configured
    return next((name for name in candidates if name in row), None)


def load_problems(config: DataConfig) -> LoadedProblems:
    """Load, validate, de-duplicate, shuffle (seeded) and limit the problems."""
    path = Path(config.problems).expanduser()
    if path.is_dir():
        raise LightReasonerError(f"problems path {path} is a directory: give a JSONL, JSON or Parquet file")
    if path.exists():
        rows = _iter_file_rows(path)
        source = str(path)
    elif path.suffix.lower() in (".jsonl", ".json", ".parquet") or config.problems.startswith((".", "/", "~")):
        raise LightReasonerError(f"problems file {path} does not exist")
    else:
        rows = _hub_rows(config.problems, config.subset, config.split)
        source = f"hub:{config.problems}[{config.split}]"

    problems: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: set[str] = set()

    def reject(message: str) -> None:
        if not config.skip_invalid:
            raise LightReasonerError(f"{message} (set data.skip_invalid=true to skip bad rows)")
        skipped.append(message)

    for number, row, error in rows:
        where = f"{source}, line {number}"
        if error is not None:
            reject(f"{where}: {error}")
            continue
        if not isinstance(row, dict):
            reject(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        question_field = _pick(row, config.question_field, QUESTION_FIELDS)
        question = row.get(question_field) if question_field else None
        if not isinstance(question, str) or not question.strip():
            field_name = question_field or "/".join(QUESTION_FIELDS)
            state = "missing" if question is None else "empty" if isinstance(question, str) else f"a {type(question).__name__}"
            reject(f"{where}: field {field_name!r} is {state}; set data.question_field to the field holding the question")
            continue
        id_field = _pick(row, config.id_field, ID_FIELDS)
        raw_id = row.get(id_field) if id_field else None
        problem_id = str(raw_id) if raw_id not in (None, "") else question_hash(question)
        if problem_id in seen:
            logger.warning("%s: duplicate problem id %s skipped", where, problem_id)
            continue
        seen.add(problem_id)
        problem: dict[str, Any] = {"problem_id": problem_id, "question": question.strip(), "line": number}
        answer_field = _pick(row, config.answer_field, ANSWER_FIELDS)
        answer = row.get(answer_field) if answer_field else None
        if isinstance(answer, (str, int, float)) and not isinstance(answer, bool) and str(answer).strip():
            problem["answer"] = str(answer)
        problems.append(problem)

    if skipped:
        logger.warning("skipped %d invalid rows of %s; first: %s", len(skipped), source, skipped[0])
    if not problems:
        raise LightReasonerError(f"{source} holds no usable problems" + (f" ({len(skipped)} invalid rows skipped)" if skipped else ""))
    if config.shuffle:
        random.Random(config.seed).shuffle(problems)
    if config.offset:
        if config.offset >= len(problems):
            raise LightReasonerError(
                f"data.offset={config.offset} skips all {len(problems)} problems of {source}: lower data.offset "
                "(or data.limit / rounds, which advance it per round), or give a larger problems file"
            )
        problems = problems[config.offset :]
    if config.limit is not None:
        problems = problems[: config.limit]
    return LoadedProblems(problems=problems, source=source, skipped=skipped)


def gold_answer(raw: str) -> str:
    """The answer itself from a gold answer field: the text after GSM8K's ``####``, else
    a solution's last ``\\boxed{}``, else the text (``"#### 1,200"`` -> ``"1200"``)."""
    text = str(raw).strip()
    if "####" in text:
        return gsm8k_final_answer(text)
    boxed = last_boxed(text)
    return boxed.strip() if boxed and boxed.strip() else text


def gold_answers(loaded: Any, answer_field: str) -> dict[str, str]:
    """Each loaded problem's gold answer (:func:`gold_answer`), or an error naming the row."""
    answers = {}
    for problem in loaded.problems:
        answer = gold_answer(problem["answer"]) if "answer" in problem else ""
        if not answer:
            field = answer_field if answer_field != "auto" else "/".join(ANSWER_FIELDS)
            raise LightReasonerError(
                f"{loaded.source}, line {problem.get('line', '?')}: problem {problem['problem_id']} has no gold "
                f"answer in field {field!r}; rejection_sft keeps the sampled solutions that reach the gold answer, "
                "so every problem needs one: set data.answer_field to the field holding it"
            )
        answers[problem["problem_id"]] = answer
    return answers


def check_gold_answers(data: DataConfig) -> None:
    """Fail in seconds, before any model is loaded, when a problem has no gold answer."""
    gold_answers(load_problems(data), data.answer_field)
