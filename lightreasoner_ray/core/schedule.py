"""The learning-rate schedule, as a multiplier of the base lr at each update."""

from __future__ import annotations

import math


def lr_multiplier(update: int, warmup_steps: int, max_steps: int, schedule: str, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` updates, then constant, linear or cosine decay to ``floor``."""
    if warmup_steps and update < warmup_steps:
        return (update + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
