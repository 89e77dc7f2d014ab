"""The samples Parquet dataset: its schema, reading it into trajectories, checking files
before any worker starts (naming file, row and field), and importing the reference
implementation's one-row-per-step JSONL."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightreasoner_ray.config import SAMPLING_SYSTEM_PROMPT
from lightreasoner_ray.core.update_plan import Trajectory, trajectory_from_row
from lightreasoner_ray.data.prompts import chat_messages
from lightreasoner_ray.data.jsonl import utf8_text
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout

logger = logging.getLogger(__name__)

# One row per problem trajectory (DESIGN.md §3).
SAMPLES_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("completion_ids", pa.list_(pa.int32())),
        ("steps", pa.list_(pa.int32())),
        ("kl", pa.list_(pa.float32())),
        ("target_ids", pa.list_(pa.list_(pa.int32()))),
        ("target_probs", pa.list_(pa.list_(pa.float32()))),
        # Beyond the contract: KL at every completion position, so beta can be
        # chosen after the fact and the summary can show the whole distribution.
        ("position_kl", pa.list_(pa.float32())),
    ]
)

# Columns a trainer reads from the samples Parquet.
TRAIN_COLUMNS = ["problem_id", "prompt_ids", "completion_ids", "steps", "target_ids", "target_probs"]
# Soft labels are softmax outputs stored as float32; their sums drift by ~1e-6 per entry.
PROBABILITY_SUM_TOLERANCE = 1e-3


def trajectories_from_table(table: pa.Table) -> list[Trajectory]:
    columns = {name: table.column(name).to_pylist() for name in TRAIN_COLUMNS if name in table.column_names}
    rows = (dict(zip(columns, values)) for values in zip(*columns.values()))
    return [t for t in map(trajectory_from_row, rows) if t is not None]


@dataclass
class SamplesInfo:
    """What a set of samples files holds, once checked."""

    files: list[str]
    rows: int
    trajectories: int  # rows with at least one selected step
    selected_steps: int
    forward_tokens: int  # tokens of one packed pass over every trajectory
    max_sequence: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": len(self.files),
            "rows": self.rows,
            "trajectories": self.trajectories,
            "selected_steps": self.selected_steps,
            "forward_tokens_per_epoch": self.forward_tokens,
        }


def _first_bad_id(column: pa.ChunkedArray, vocab_size: int, depth: int) -> Optional[tuple[int, int]]:
    """(row, id) of the first id outside [0, vocab_size) in a list (depth 1) or list-of-lists column."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    parents = None
    for _ in range(depth):
        level_parents = pc.list_parent_indices(values)
        values = pc.list_flatten(values)
        parents = level_parents if parents is None else pc.take(parents, level_parents)
    if len(values) == 0:
        return None
    bad = pc.or_(pc.greater_equal(values, vocab_size), pc.less(values, 0))
    index = pc.index(bad, True).as_py()
    if index < 0:
        return None
    return int(parents[index].as_py()), int(values[index].as_py())


def check_samples_table(table: pa.Table, source: str, vocab_size: int, context: int) -> SamplesInfo:
    """Raise a ``LightReasonerError`` naming the row and field of the first bad value."""
    missing = [name for name in TRAIN_COLUMNS if name not in table.column_names]
    if missing:
        raise LightReasonerError(
            f"{source}: missing column(s) {', '.join(missing)}; a samples file needs {', '.join(TRAIN_COLUMNS)}"
        )
    problem_ids = table.column("problem_id").to_pylist()

    def where(row: int, field: str) -> str:
        return f"{source}: row {row} (problem {problem_ids[row]!r}), field {field}"

    for field, depth in (("prompt_ids", 1), ("completion_ids", 1), ("target_ids", 2)):
        bad = _first_bad_id(table.column(field), vocab_size, depth)
        if bad is not None:
            row, token = bad
            raise LightReasonerError(
                f"{where(row, field)}: token id {token} is outside the model's vocabulary of {vocab_size} ids. "
                "These samples were made with a different tokenizer than the model being trained."
            )
    prompt_lengths = pc.list_value_length(table.column("prompt_ids")).to_pylist()
    completion_lengths = pc.list_value_length(table.column("completion_ids")).to_pylist()
    steps_column = table.column("steps").to_pylist()
    ids_column = table.column("target_ids").to_pylist()
    probs_column = table.column("target_probs").to_pylist()
    trajectories = selected = tokens = longest = 0
    for row, (prompt_length, completion_length, steps, ids, probs) in enumerate(
        zip(prompt_lengths, completion_lengths, steps_column, ids_column, probs_column)
    ):
        steps, ids, probs = steps or [], ids or [], probs or []
        if not (len(steps) == len(ids) == len(probs)):
            raise LightReasonerError(
                f"{where(row, 'steps/target_ids/target_probs')}: {len(steps)} steps but {len(ids)} label supports "
                f"and {len(probs)} label probability lists; they must match one to one"
            )
        if not steps:
            continue
        for t, step_ids, step_probs in zip(steps, ids, probs):
            if t < 0 or t > completion_length or prompt_length + t < 1:
                raise LightReasonerError(
                    f"{where(row, 'steps')}: step {t} is outside the completion of {completion_length} tokens"
                )
            if not step_ids or len(step_ids) != len(step_probs):
                raise LightReasonerError(
                    f"{where(row, 'target_ids')}: step {t} has {len(step_ids)} label ids and {len(step_probs)} "
                    "probabilities (need the same number, at least one)"
                )
            weights = np.asarray(step_probs, dtype=np.float64)
            if not np.all(np.isfinite(weights)) or np.any(weights < 0) or abs(weights.sum() - 1.0) > PROBABILITY_SUM_TOLERANCE:
                raise LightReasonerError(
                    f"{where(row, 'target_probs')}: the soft label at step {t} is not a probability distribution "
                    f"(sum {weights.sum():.6g}, min {weights.min():.6g})"
                )
        sequence = prompt_length + max(steps)
        if sequence > context:
            raise LightReasonerError(
                f"{where(row, 'completion_ids')}: training needs {sequence} tokens, more than the model's "
                f"context of {context}"
            )
        trajectories += 1
        selected += len(steps)
        tokens += sequence
        longest = max(longest, sequence)
    return SamplesInfo([source], table.num_rows, trajectories, selected, tokens, longest)


def check_samples(files: Sequence[str], vocab_size: int, context: int) -> SamplesInfo:
    """Check every samples file; the summed counts, or an error naming file/row/field."""
    total = SamplesInfo([], 0, 0, 0, 0, 0)
    seen: dict[str, str] = {}  # problem_id -> the file holding it
    for path in files:
        try:
            table = storage.read_parquet(path, columns=None)
        except (OSError, pa.ArrowInvalid) as exc:
            raise LightReasonerError(f"{path}: cannot read this samples file as Parquet: {exc}") from None
        info = check_samples_table(table, path, vocab_size, context)
        for row, problem_id in enumerate(table.column("problem_id").to_pylist()):
            if problem_id in seen:
                earlier = "earlier in this file" if seen[problem_id] == path else f"in {seen[problem_id]} too"
                raise LightReasonerError(
                    f"{path}: row {row}, field problem_id: problem {problem_id!r} is {earlier}; one trajectory a "
                    "problem is expected (were two runs writing one samples directory?). Re-sample into a new "
                    "output_dir, or remove the duplicate file"
                )
            seen[problem_id] = path
        total = SamplesInfo(
            total.files + info.files,
            total.rows + info.rows,
            total.trajectories + info.trajectories,
            total.selected_steps + info.selected_steps,
            total.forward_tokens + info.forward_tokens,
            max(total.max_sequence, info.max_sequence),
        )
    return total


# ---------------------------------------------------------------- reference-format JSONL

REFERENCE_FIELDS = ("prompt_id", "prefix", "token_ids", "weights")


def _read_samples_file(path: str) -> bytes:
    if not storage.is_uri(path) and not Path(path).expanduser().is_file():
        raise LightReasonerError(f"train.samples: {path} does not exist")
    return storage.read_bytes(path)


def _parse_reference_line(line: str, where: str, vocab_size: int) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LightReasonerError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise LightReasonerError(f"{where}: expected a JSON object with {', '.join(REFERENCE_FIELDS)}")
    for field in REFERENCE_FIELDS:
        if field not in item:
            raise LightReasonerError(f"{where}: missing field {field!r} (reference samples have {', '.join(REFERENCE_FIELDS)})")
    if not isinstance(item["prompt_id"], str) or not item["prompt_id"].strip():
        raise LightReasonerError(f"{where}: field 'prompt_id' must hold the question text")
    if not isinstance(item["prefix"], str):
        raise LightReasonerError(f"{where}: field 'prefix' must be a string")
    ids, weights = item["token_ids"], item["weights"]
    if not isinstance(ids, list) or not isinstance(weights, list) or not ids or len(ids) != len(weights):
        raise LightReasonerError(f"{where}: fields 'token_ids' and 'weights' must be non-empty lists of equal length")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise LightReasonerError(f"{where}: field 'token_ids' must hold integers")
    bad = next((i for i in ids if i < 0 or i >= vocab_size), None)
    if bad is not None:
        raise LightReasonerError(
            f"{where}: field 'token_ids': token id {bad} is outside the model's vocabulary of {vocab_size} ids. "
            "These samples were made with a different tokenizer than the model being trained."
        )
    try:
        probs = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise LightReasonerError(f"{where}: field 'weights' must hold numbers") from None
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or abs(probs.sum() - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise LightReasonerError(f"{where}: field 'weights' is not a probability distribution (sum {probs.sum():.6g})")
    return item


def reference_rows(
    lines: Sequence[str], source: str, tokenizer: Any, vocab_size: int, system_prompt: str = SAMPLING_SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """Samples rows (SAMPLES_SCHEMA) for reference-format JSONL lines: one trajectory per line.

    As the reference trainer does, the question goes through the chat template (system
    "Please reason step by step.") and the decoded prefix is appended to the text,
    which is tokenized as a whole; the label sits at the last position.
    """
    items: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            items.append((number, _parse_reference_line(line, f"{source}: line {number}", vocab_size)))
    if not items:
        return []
    templates: dict[str, str] = {}
    for _, item in items:
        question = item["prompt_id"]
        if question not in templates:
            templates[question] = tokenizer.apply_chat_template(
                chat_messages(question, system_prompt), tokenize=False, add_generation_prompt=True
            )
    questions = list(templates)
    prompt_ids = dict(zip(questions, tokenizer([templates[q] for q in questions])["input_ids"]))
    full_ids = tokenizer([templates[item["prompt_id"]] + item["prefix"] for _, item in items])["input_ids"]
    rows = []
    for (number, item), ids in zip(items, full_ids):
        prompt = list(prompt_ids[item["prompt_id"]])
        if len(prompt) >= 1 and list(ids[: len(prompt)]) == prompt:
            completion = list(ids[len(prompt):])
        else:  # the prefix merged with the template's last token: keep the whole text as prompt
            prompt, completion = list(ids), []
        bad = next((i for i in ids if i >= vocab_size), None)
        if bad is not None:
            raise LightReasonerError(
                f"{source}: line {number}: the tokenizer produced id {bad}, outside the model's vocabulary of {vocab_size}"
            )
        kl = item.get("kl_divergence")
        rows.append(
            {
                "problem_id": f"{Path(source).name}:{number}",
                "prompt_ids": prompt,
                "completion_ids": completion,
                "steps": [len(completion)],
                "kl": [float(kl) if isinstance(kl, (int, float)) else math.nan],
                "target_ids": [list(item["token_ids"])],
                "target_probs": [[float(w) for w in item["weights"]]],
                "position_kl": [],
            }
        )
    return rows


def import_reference_jsonl(path: str, tokenizer: Any, vocab_size: int, output_dir: str, model_path: str) -> str:
    """Convert a reference-format JSONL into a samples Parquet directory; return that directory.

    The directory is ``<output_dir>/imported_samples/<name>-<digest>``, keyed by the
    file's content and the model, so a re-run reuses it and trains on the same rows.
    """
    data = _read_samples_file(path)
    digest = hashlib.sha256(data + b"\0" + model_path.encode()).hexdigest()[:12]
    directory = RunLayout(output_dir).imported_samples(f"{Path(path).stem}-{digest}")
    if storage.list_parquet_files(directory):
        logger.info("reusing %s, imported earlier from %s", directory, path)
        return directory
    rows = reference_rows(utf8_text(data, f"train.samples: {path}").splitlines(), path, tokenizer, vocab_size)
    if not rows:
        raise LightReasonerError(f"train.samples: {path} holds no samples")
    storage.make_dirs(directory)
    storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), directory, "part-00000.parquet")
    logger.info("imported %d reference samples from %s into %s", len(rows), path, directory)
    return directory


def finished_problem_ids(samples_dir: str) -> set[str]:
    """The problem ids in the finished Parquet files of ``samples_dir``; a file that cannot be read
    raises a one-line error naming it (a partial file is never left under a finished name)."""
    done: set[str] = set()
    for path in storage.list_parquet_files(samples_dir):
        try:
            table = storage.read_parquet(path, columns=["problem_id"])
        except (OSError, pa.ArrowException) as exc:
            raise LightReasonerError(
                f"{path}: cannot read this samples file as Parquet ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                "delete it to re-sample its problems, or re-run with --restart to start over"
            ) from None
        except KeyError:
            raise LightReasonerError(f"{path}: no problem_id column; it is not a samples file") from None
        done.update(table.column("problem_id").to_pylist())
    return done
