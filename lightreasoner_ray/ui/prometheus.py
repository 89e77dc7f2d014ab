"""Custom Ray metrics for dashboards backed by Prometheus (``ray.util.metrics``).

Ray exports them from every node at its ``--metrics-export-port``; Prometheus stores
them with the ``ray_`` prefix, counters with a ``_total`` suffix (e.g.
``ray_lightreasoner_problems_sampled_total``; docs/monitoring.md). Each process creates
its metric objects once, on first use; outside Ray they are no-ops.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = ()):
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return None
        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys)
    except Exception:  # metrics must never break a stage
        logger.debug("metric %s unavailable", name, exc_info=True)
        return None


def _record(kind: str, name: str, description: str, value: float, tags: dict[str, str] | None = None) -> None:
    metric = _metric(kind, name, description, tuple(sorted(tags or {})))
    if metric is None or (kind == "Counter" and value <= 0):  # Counter.inc refuses 0
        return
    try:
        if kind == "Counter":
            metric.inc(value, tags=tags)
        else:
            metric.set(value, tags=tags)
    except Exception:  # metrics must never break a stage
        logger.debug("could not record %s", name, exc_info=True)


def record_sampling(problems: int, completion_tokens: int, selected_steps: int) -> None:
    _record("Counter", "lightreasoner_problems_sampled", "Problems contrasted by sampler actors", problems)
    _record("Counter", "lightreasoner_completion_tokens", "Expert completion tokens contrasted", completion_tokens)
    _record("Counter", "lightreasoner_selected_steps", "Completion positions with KL above beta", selected_steps)


def record_train_step(step: int, loss: float, lr: float) -> None:
    _record("Gauge", "lightreasoner_train_loss", "Training loss at the last update (train.divergence, plus the anchor term)", loss)
    _record("Gauge", "lightreasoner_train_step", "Updates done", step)
    _record("Gauge", "lightreasoner_train_lr", "Learning rate", lr)


def record_evaluation(model: str, benchmark: str, rows: int, correct: int) -> None:
    tags = {"model": model, "benchmark": benchmark}
    _record("Counter", "lightreasoner_eval_rows", "Benchmark rows generated and graded", rows, tags)
    _record("Counter", "lightreasoner_eval_correct", "Benchmark rows graded correct", correct, tags)
