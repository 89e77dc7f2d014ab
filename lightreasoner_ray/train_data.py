"""Training data: samples rows -> trajectories -> packed micro-batches (no Ray here).

A *trajectory* is one forward pass: the token ids to run (prompt + completion up to
its last selected step), the sequence positions whose logits are trained, and the
sparse soft label v_C at each of them. For a samples row, completion step t is
predicted at position len(prompt_ids) - 1 + t; a step t == len(completion_ids)
labels the position after the completion (used by imported reference samples).

Updates (``UpdatePlan``): every epoch is one seeded shuffle of all trajectories, read
as a sequence of selected steps; epochs follow each other without a break, and update
k trains global steps [(k-1)N, kN) of that endless sequence, N = steps_per_update. So
every update has exactly N steps and every step is trained exactly once per epoch; an
update may end in the next epoch. Each update's steps are cut into one contiguous share
per rank (sizes differ by at most one), and each share is packed into micro-batches of
at most micro_batch_steps steps, splitting a trajectory where a micro-batch is full
(each piece is one forward pass over the prefix it needs). Every rank runs the same
number of micro-batches per update (padding with weightless placeholders). The plan is
a pure function of the trajectories, the seed, N, the number of ranks and the
micro-batch cap, so resuming at update k needs nothing but k.

Also here: checking samples files before any worker starts (naming file, row and
field), and importing the reference implementation's one-row-per-step JSONL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lightreasoner_ray import storage
from lightreasoner_ray.config import SAMPLING_SYSTEM_PROMPT, join_path
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.sampler import SAMPLES_SCHEMA

logger = logging.getLogger(__name__)

# Columns a trainer reads from the samples Parquet.
TRAIN_COLUMNS = ["problem_id", "prompt_ids", "completion_ids", "steps", "target_ids", "target_probs"]
# Soft labels are softmax outputs stored as float32; their sums drift by ~1e-6 per entry.
PROBABILITY_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Trajectory:
    """One forward pass and the selected positions trained on it."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    target_ids: tuple[tuple[int, ...], ...]
    target_probs: tuple[tuple[float, ...], ...]
    problem_id: str = ""

    @property
    def num_steps(self) -> int:
        return len(self.positions)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def sort_key(self) -> tuple:
        return (self.problem_id, self.input_ids, self.positions)


def trajectory_from_row(row: Mapping[str, Any]) -> Optional[Trajectory]:
    """The trajectory of one samples row, or None when it has no selected step."""
    steps = [int(t) for t in row["steps"]]
    if not steps:
        return None
    prompt = [int(i) for i in row["prompt_ids"]]
    completion = [int(i) for i in row["completion_ids"]]
    last = max(steps)
    input_ids = tuple(prompt + completion[:last])
    positions = tuple(len(prompt) - 1 + t for t in steps)
    return Trajectory(
        input_ids=input_ids,
        positions=positions,
        target_ids=tuple(tuple(int(i) for i in ids) for ids in row["target_ids"]),
        target_probs=tuple(tuple(float(p) for p in probs) for probs in row["target_probs"]),
        problem_id=str(row.get("problem_id", "")),
    )


def trajectories_from_table(table: pa.Table) -> list[Trajectory]:
    columns = {name: table.column(name).to_pylist() for name in TRAIN_COLUMNS if name in table.column_names}
    rows = (dict(zip(columns, values)) for values in zip(*columns.values()))
    return [t for t in map(trajectory_from_row, rows) if t is not None]


def one_step_trajectories(trajectory: Trajectory) -> list[Trajectory]:
    """Each selected step as its own sequence, label at the last position (the unpacked baseline)."""
    return [
        Trajectory(
            input_ids=trajectory.input_ids[: position + 1],
            positions=(position,),
            target_ids=(ids,),
            target_probs=(probs,),
            problem_id=trajectory.problem_id,
        )
        for position, ids, probs in zip(trajectory.positions, trajectory.target_ids, trajectory.target_probs)
    ]


def pack_trajectories(trajectories: Iterable[Trajectory], micro_batch_steps: int) -> Iterator[list[Trajectory]]:
    """Group whole trajectories into micro-batches of at most ``micro_batch_steps`` selected steps.

    A trajectory is never split (that would cost it a second forward pass), so one
    with more steps than the budget is a micro-batch of its own.
    """
    current: list[Trajectory] = []
    count = 0
    for trajectory in trajectories:
        if current and count + trajectory.num_steps > micro_batch_steps:
            yield current
            current, count = [], 0
        current.append(trajectory)
        count += trajectory.num_steps
    if current:
        yield current


def trajectory_piece(trajectory: Trajectory, start: int, stop: int) -> Trajectory:
    """Selected steps ``start:stop`` of a trajectory, with only the prefix their positions need."""
    positions = trajectory.positions[start:stop]
    if start == 0 and stop >= trajectory.num_steps:
        return trajectory
    return Trajectory(
        input_ids=trajectory.input_ids[: max(positions) + 1],
        positions=positions,
        target_ids=trajectory.target_ids[start:stop],
        target_probs=trajectory.target_probs[start:stop],
        problem_id=trajectory.problem_id,
    )


def micro_batches_per_update(steps_per_update: int, world_size: int, micro_batch_steps: int) -> int:
    """Micro-batches every rank runs per update: the largest rank share, packed full but for the last."""
    largest_share = -(-steps_per_update // world_size)
    return max(1, -(-largest_share // micro_batch_steps))


class UpdatePlan:
    """Which selected steps each rank trains in each update, in which micro-batches (see the module doc).

    ``micro_batches(update, rank)`` is a list of ``micro_batches_per_rank`` micro-batches,
    each a list of trajectory pieces; an empty list means a placeholder micro-batch.
    Updates count from 1. Input order of the trajectories does not matter.
    """

    def __init__(
        self,
        trajectories: Sequence[Trajectory],
        steps_per_update: int,
        world_size: int,
        micro_batch_steps: int,
        seed: int,
    ) -> None:
        if min(steps_per_update, world_size, micro_batch_steps) <= 0:
            raise ValueError("steps_per_update, world_size and micro_batch_steps must be positive")
        self.trajectories = sorted((t for t in trajectories if t.num_steps), key=Trajectory.sort_key)
        self.steps_per_epoch = sum(t.num_steps for t in self.trajectories)
        if not self.steps_per_epoch:
            raise ValueError("an update plan needs at least one selected step")
        self.steps_per_update = steps_per_update
        self.world_size = world_size
        self.micro_batch_steps = micro_batch_steps
        self.seed = seed
        self.micro_batches_per_rank = micro_batches_per_update(steps_per_update, world_size, micro_batch_steps)
        self._epochs: dict[int, tuple[list[int], np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """The epoch's trajectory order and where each trajectory's steps start in it."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            order = list(range(len(self.trajectories)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            counts = np.fromiter((self.trajectories[i].num_steps for i in order), dtype=np.int64, count=len(order))
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def pieces(self, start: int, stop: int) -> list[Trajectory]:
        """Global steps ``start:stop`` of the endless epoch-after-epoch sequence, as trajectory pieces."""
        pieces: list[Trajectory] = []
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.steps_per_epoch)
            order, starts = self._epoch(epoch)
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            trajectory = self.trajectories[order[slot]]
            first = offset - int(starts[slot])
            last = min(trajectory.num_steps, first + stop - position)
            pieces.append(trajectory_piece(trajectory, first, last))
            position += last - first
        return pieces

    def epoch_of(self, update: int) -> int:
        """The epoch (from 0) that the update's last step belongs to."""
        return (update * self.steps_per_update - 1) // self.steps_per_epoch

    def rank_share(self, update: int, rank: int) -> tuple[int, int]:
        """Global step range ``[start, stop)`` that ``rank`` trains in ``update``."""
        if update < 1 or not 0 <= rank < self.world_size:
            raise ValueError(f"no update {update} / rank {rank} in a plan for {self.world_size} ranks")
        base, extra = divmod(self.steps_per_update, self.world_size)
        first = (update - 1) * self.steps_per_update + rank * base + min(rank, extra)
        return first, first + base + (1 if rank < extra else 0)

    def micro_batches(self, update: int, rank: int) -> list[list[Trajectory]]:
        start, stop = self.rank_share(update, rank)
        batches: list[list[Trajectory]] = []
        for batch_start in range(start, stop, self.micro_batch_steps):
            batches.append(self.pieces(batch_start, min(stop, batch_start + self.micro_batch_steps)))
        batches.extend([] for _ in range(self.micro_batches_per_rank - len(batches)))
        return batches


@dataclass
class MicroBatch:
    """Right-padded trajectories and their selected steps, as tensors."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    step_rows: torch.Tensor  # [S] long: which row each selected step is in
    step_positions: torch.Tensor  # [S] long: its sequence position
    target_ids: torch.Tensor  # [S, K] long, padded with 0
    target_probs: torch.Tensor  # [S, K] float32, padded with 0
    num_steps: int  # selected steps that carry a label (0 for a placeholder batch)
    forward_tokens: int  # real (unpadded) tokens run through the model

    def to(self, device: torch.device) -> "MicroBatch":
        tensors = {
            name: getattr(self, name).to(device)
            for name in ("input_ids", "attention_mask", "step_rows", "step_positions", "target_ids", "target_probs")
        }
        return MicroBatch(**tensors, num_steps=self.num_steps, forward_tokens=self.forward_tokens)


def collate(trajectories: Sequence[Trajectory], pad_id: int) -> MicroBatch:
    """One padded batch holding every trajectory once."""
    width = max(t.num_tokens for t in trajectories)
    input_ids = torch.full((len(trajectories), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(trajectories), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    labels_ids: list[tuple[int, ...]] = []
    labels_probs: list[tuple[float, ...]] = []
    for row, trajectory in enumerate(trajectories):
        input_ids[row, : trajectory.num_tokens] = torch.tensor(trajectory.input_ids, dtype=torch.long)
        attention_mask[row, : trajectory.num_tokens] = 1
        rows.extend([row] * trajectory.num_steps)
        positions.extend(trajectory.positions)
        labels_ids.extend(trajectory.target_ids)
        labels_probs.extend(trajectory.target_probs)
    support = max(len(ids) for ids in labels_ids)
    target_ids = torch.zeros((len(labels_ids), support), dtype=torch.long)
    target_probs = torch.zeros((len(labels_ids), support), dtype=torch.float32)
    for index, (ids, probs) in enumerate(zip(labels_ids, labels_probs)):
        target_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        target_probs[index, : len(probs)] = torch.tensor(probs, dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        step_rows=torch.tensor(rows, dtype=torch.long),
        step_positions=torch.tensor(positions, dtype=torch.long),
        target_ids=target_ids,
        target_probs=target_probs,
        num_steps=len(positions),
        forward_tokens=sum(t.num_tokens for t in trajectories),
    )


def placeholder_micro_batch(pad_id: int) -> MicroBatch:
    """A one-token batch whose label weighs nothing.

    A worker with no data left still runs it so that every rank makes the same
    forward/backward calls (ZeRO-3 gathers parameters collectively in both).
    """
    batch = collate([Trajectory(input_ids=(pad_id,), positions=(0,), target_ids=((0,),), target_probs=((0.0,),))], pad_id)
    batch.num_steps = 0
    batch.forward_tokens = 0
    return batch


# ---------------------------------------------------------------- checking samples files


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
    for path in files:
        try:
            table = storage.read_parquet(path, columns=None)
        except (OSError, pa.ArrowInvalid) as exc:
            raise LightReasonerError(f"{path}: cannot read this samples file as Parquet: {exc}") from None
        info = check_samples_table(table, path, vocab_size, context)
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
    from lightreasoner_ray.prompts import chat_messages

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
    directory = join_path(output_dir, "imported_samples", f"{Path(path).stem}-{digest}")
    if storage.list_parquet_files(directory):
        logger.info("reusing %s, imported earlier from %s", directory, path)
        return directory
    rows = reference_rows(data.decode("utf-8").splitlines(), path, tokenizer, vocab_size)
    if not rows:
        raise LightReasonerError(f"train.samples: {path} holds no samples")
    storage.make_dirs(directory)
    storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), directory, "part-00000.parquet")
    logger.info("imported %d reference samples from %s into %s", len(rows), path, directory)
    return directory
