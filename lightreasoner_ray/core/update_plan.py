"""The update plan: trajectories -> each rank's packed micro-batches, update by update.

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
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch


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
