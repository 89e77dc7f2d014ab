"""``lightreasoner run`` / ``jobs/pipeline.py``: checks before any work, then one round
(:mod:`lightreasoner_ray.runs.round`) or ``rounds`` of them (:mod:`lightreasoner_ray.runs.rounds`)."""

from __future__ import annotations

import logging
from typing import Any

from lightreasoner_ray.config import Config
from lightreasoner_ray.data.problems import check_gold_answers
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.runs.round import REJECTION_SFT_TAG, run_round
from lightreasoner_ray.runs.rounds import run_rounds
from lightreasoner_ray.stages.evaluation.stage import load_benchmarks
from lightreasoner_ray.stages.preflight import require_preflight
from lightreasoner_ray.ui.tracking import numeric_leaves, tracked_stage

logger = logging.getLogger(__name__)


def check_before_start(config: Config) -> None:
    """Fail in seconds, not after hours of sampling and training, on what stage 3 would refuse."""
    if storage.is_uri(config.output_dir):
        raise LightReasonerError(
            f"output_dir {config.output_dir}: `run` evaluates the trained model from <output_dir>/model, which "
            "evaluator actors load from a filesystem path; use a shared filesystem path (the sample and train "
            "stages alone accept s3:// and other URIs)"
        )
    load_benchmarks(config.eval)  # every benchmark file is there (or on the hub), every row parses
    if config.rejection_sft.enabled:
        if config.eval.models:
            raise LightReasonerError(
                "rejection_sft.enabled with eval.models set: the baseline would be trained but not evaluated; leave "
                f"eval.models empty (baseline, lightreasoner and {REJECTION_SFT_TAG} are evaluated) or add "
                f"{REJECTION_SFT_TAG}={RunLayout(config.output_dir).rejection_sft.model} to it"
            )
        check_gold_answers(config.data)  # every problem has a gold answer to filter the sampled solutions by


def run_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished run: the report's timings and counts, and the report."""
    report = {k: result.get(k) for k in ("stage_wall_time_s", "total_wall_time_s", "problems_sampled", "tokens",
                                         "rejection_sft")}
    return numeric_leaves(report, "report"), list(RunLayout(config.output_dir).report.values())


@tracked_stage("run", outputs=run_outputs)
def run_pipeline(config: Config, restart: bool = False) -> dict[str, Any]:
    """``restart`` starts every stage over (each removes its own earlier outputs first)."""
    require_preflight(config, extra_checks=[("run", check_before_start)])  # `lightreasoner check`'s checks
    if config.rounds > 1:
        if restart:
            raise LightReasonerError(
                f"--restart with rounds={config.rounds} is not supported: use a new output_dir (or delete "
                f"{config.output_dir}) to start the rounds over"
            )
        return run_rounds(config)
    return run_round(config, restart=restart)


