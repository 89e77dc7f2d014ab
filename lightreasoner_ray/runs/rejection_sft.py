"""The rejection-sampled SFT baseline: rejection sampling, then SFT on the kept solutions
through the same trainer, in ``<output_dir>/rejection_sft`` (``rejection_sft.enabled``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from lightreasoner_ray.config import Config
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.stages.rejection_sampling import run_rejection_sampling
from lightreasoner_ray.stages.training.driver import run_training, training_done

logger = logging.getLogger(__name__)


def training_config(config: Config) -> Config:
    """The training stage's config: the kept solutions as samples, its own output directory,
    ``train.*`` with ``rejection_sft.max_steps / lr / steps_per_update / micro_batch_steps``
    where set; the micro-batch cap defaults to ``max_new_tokens`` steps, so a solution is one
    forward pass whenever one worker's share of an update holds it (see the config's note)."""
    settings = config.rejection_sft
    layout = RunLayout(config.output_dir).rejection_sft
    overrides = {name: getattr(settings, name) for name in ("max_steps", "lr", "steps_per_update", "micro_batch_steps")
                 if getattr(settings, name) is not None}
    overrides.setdefault("micro_batch_steps", max(config.train.micro_batch_steps, settings.max_new_tokens))
    train = dataclasses.replace(config.train, samples=layout.samples, **overrides)
    return dataclasses.replace(config, output_dir=layout.output_dir, train=train)


def run_rejection_sft(config: Config, restart: bool = False) -> dict[str, Any]:
    """Rejection sampling, then SFT on the kept solutions; returns both summaries and
    this invocation's wall time of each part. When no solution is kept there is nothing to
    train: ``training`` is None (a warning says why), and the run goes on without the baseline."""
    started = time.time()
    sampling = run_rejection_sampling(config, restart=restart)
    sampled_at = time.time()
    counts = sampling["counts"]
    if not counts["kept"]:
        logger.warning(
            "rejection_sft: none of the expert's %d sampled solutions reached the gold answer (summary: %s), so "
            "there is no SFT data and the baseline is not trained or evaluated; raise "
            "rejection_sft.samples_per_problem or rejection_sft.max_new_tokens, or check data.answer_field and "
            "rejection_sft.grader", counts["sampled"], RunLayout(config.output_dir).rejection_sft.rejection_summary)
        return {"sampling": sampling, "training": None, "stage_wall_time_s": {"sample": sampled_at - started, "train": 0.0}}
    train_config = training_config(config)
    training = None if restart else training_done(train_config)
    if training is None:
        training = run_training(train_config, restart=restart)
    else:
        logger.info("rejection_sft: training already finished (%s steps), skipped", training["steps"])
    return {"sampling": sampling, "training": training,
            "stage_wall_time_s": {"sample": sampled_at - started, "train": time.time() - sampled_at}}
