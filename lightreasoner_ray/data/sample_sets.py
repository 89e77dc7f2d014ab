"""Sample sets derived from one sampling run, for controlled comparisons.

A sampling run with beta = 0 holds a soft label at (almost) every completion
position. From it, without touching a model again:

* ``select_by_beta`` keeps the positions with KL > beta (or the reference's rule):
  exactly what sampling with that beta would have written (selection is a filter on
  the same numbers);
* ``random_steps`` keeps the same NUMBER of positions chosen uniformly at random, with
  the same soft labels: the control for "is it the KL selection that helps?";
* ``sft_rows`` turns gold solutions into one-hot labels at every position: the loss
  KL(onehot || pi) is then plain next-token cross-entropy, so supervised fine-tuning
  runs through the very same trainer.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from lightreasoner_ray.core.contrast import is_selected
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.record import remove_path


def _keep(row: dict[str, Any], keep: set[int]) -> dict[str, Any]:
    indices = [i for i, t in enumerate(row["steps"]) if t in keep]
    return {
        **row,
        "steps": [row["steps"][i] for i in indices],
        "kl": [row["kl"][i] for i in indices],
        "target_ids": [row["target_ids"][i] for i in indices],
        "target_probs": [row["target_probs"][i] for i in indices],
    }


def select_by_beta(rows: Sequence[dict[str, Any]], beta: float, selection: str = "paper") -> list[dict[str, Any]]:
    """The rows' steps that ``selection`` (contrast.selection_mask) keeps at ``beta``."""
    return [_keep(row, {t for t, kl in zip(row["steps"], row["kl"]) if is_selected(t, kl, beta, selection)})
            for row in rows]


def random_steps(rows: Sequence[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` labelled positions drawn uniformly (without replacement) over all rows."""
    candidates = [(r, t) for r, row in enumerate(rows) for t in row["steps"]]
    if count > len(candidates):
        raise ValueError(f"cannot draw {count} steps from {len(candidates)} labelled positions")
    chosen = random.Random(seed).sample(candidates, count)
    by_row: dict[int, set[int]] = {}
    for r, t in chosen:
        by_row.setdefault(r, set()).add(t)
    return [_keep(row, by_row.get(r, set())) for r, row in enumerate(rows)]


def sft_rows(problem_ids: Sequence[str], prompts: Sequence[list[int]], solutions: Sequence[list[int]]) -> list[dict[str, Any]]:
    """One-hot labels on every token of each gold solution (in the samples schema)."""
    rows = []
    for problem_id, prompt, solution in zip(problem_ids, prompts, solutions):
        positions = list(range(len(solution)))
        rows.append(
            {
                "problem_id": problem_id,
                "prompt_ids": list(prompt),
                "completion_ids": list(solution),
                "steps": positions,
                "kl": [0.0] * len(solution),
                "target_ids": [[token] for token in solution],
                "target_probs": [[1.0] for _ in solution],
                "position_kl": [0.0] * len(solution),
            }
        )
    return rows


def write_sample_set(rows: Sequence[dict[str, Any]], directory: str) -> None:
    """``rows`` as the whole samples dataset in ``directory`` (one Parquet file, written
    atomically; files of an earlier set there are removed first)."""
    import pyarrow as pa

    from lightreasoner_ray.data.samples import SAMPLES_SCHEMA

    storage.make_dirs(directory)
    for stale in storage.list_parquet_files(directory):
        remove_path(stale)
    storage.write_parquet_atomic(pa.Table.from_pylist(list(rows), schema=SAMPLES_SCHEMA), directory, "part-0.parquet")


def tuned_tokens(rows: Sequence[dict[str, Any]]) -> int:
    return sum(len(row["steps"]) for row in rows)
