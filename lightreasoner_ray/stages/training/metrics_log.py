"""Rank 0's per-update training metrics, kept as JSON lines, and followed by the driver while
training runs (to the tracked run and the console's progress bar)."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Optional

from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.ui.console import training_progress
from lightreasoner_ray.ui.tracking import MetricsFollower, TrackedRun, metric_name

# The columns of a metrics row that tracking receives as metrics.
TRAIN_METRICS = ("loss", "lr", "grad_norm", "steps_per_s", "tokens_per_s", "selected_steps", "forward_tokens")


class TrainMetricsLog:
    """``<output_dir>/train_metrics.jsonl``, one line per logged update, truncated on resume."""

    def __init__(self, path: str, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if storage.exists(path):
            text = storage.read_text(path)
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                if isinstance(row, dict) and int(row.get("step", 0)) <= resume_step:
                    self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        storage.write_bytes_atomic(self.path, text.encode("utf-8"))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if storage.is_uri(self.path):
            self._rewrite()  # object stores cannot append
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def train_row_metrics(row: dict[str, Any]) -> dict[str, float]:
    return {
        metric_name("train", key): float(row[key]) for key in TRAIN_METRICS
        if isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool) and row[key] == row[key]
    }


@contextlib.contextmanager
def following_training(config: Any, run: Optional[TrackedRun]) -> Iterator[None]:
    """While training runs: its metrics to the tracked run, its progress to the console's bar."""
    with training_progress(config.train.max_steps) as progress:
        def on_row(row: dict[str, Any]) -> None:
            if run is not None:
                run.log_metrics(train_row_metrics(row), step=row["step"])
            if progress is not None:
                progress(row)

        if run is None and progress is None:
            yield
            return
        with MetricsFollower(on_row, RunLayout(config.output_dir).train_metrics):
            yield
