"""Rank 0's per-update training metrics, kept as JSON lines."""

from __future__ import annotations

import json
from typing import Any

from lightreasoner_ray.io import storage


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
