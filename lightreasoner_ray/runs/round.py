"""One round of ``lightreasoner run``: sample -> train -> evaluate baseline and trained -> report.

Each stage resumes on its own (finished sample files are skipped, training restarts
from its latest checkpoint, evaluation skips finished shards), so a re-submitted job
picks up where the last one stopped; what each resumes was made from the same inputs
(lightreasoner_ray.io.record), else the stage refuses, or starts over with ``--restart``. The run ends with the efficiency report of the
paper's three measures: wall time per stage, problems sampled, and tuned tokens
against what SFT on the same trajectories would tune, beside the results table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from lightreasoner_ray.config import Config, redact_tree
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.stages.evaluation.stage import run_evaluation
from lightreasoner_ray.ui.console import echo
from lightreasoner_ray.ui.reports import accuracy_rows, markdown_table

logger = logging.getLogger(__name__)

BASELINE_TAG = "baseline"
TRAINED_TAG = "lightreasoner"
REJECTION_SFT_TAG = "rejection_sft"


def pipeline_eval_models(config: Config) -> list[str]:
    """``eval.models`` if given, else the untouched expert, the trained model and, with
    ``rejection_sft.enabled``, the rejection-sampling SFT baseline."""
    if config.eval.models:
        return list(config.eval.models)
    layout = RunLayout(config.output_dir)
    models = [f"{BASELINE_TAG}={config.expert.path}", f"{TRAINED_TAG}={layout.model}"]
    if config.rejection_sft.enabled:
        models.append(f"{REJECTION_SFT_TAG}={layout.rejection_sft.model}")
    return models


def run_round(config: Config, eval_models: list[str] | None = None, restart: bool = False) -> dict[str, Any]:
    """One round's stages in ``config.output_dir``: sample, train, evaluate ``eval_models``
    (default :func:`pipeline_eval_models`), report. ``restart`` starts each stage over."""
    from lightreasoner_ray.stages.sampling.stage import run_sampling
    from lightreasoner_ray.stages.training.driver import run_training, training_done

    stage_seconds: dict[str, float] = {}

    started = time.time()
    logger.info("stage 1/3: sampling")
    samples = run_sampling(config, restart=restart)
    stage_seconds["sample"] = time.time() - started

    started = time.time()
    training = None if restart else training_done(config)
    if training is None:
        logger.info("stage 2/3: training")
        training = run_training(config, restart=restart)
    else:
        logger.info("stage 2/3: training already finished (%s steps), skipped", training["steps"])
    stage_seconds["train"] = time.time() - started

    rejection = None
    if config.rejection_sft.enabled:
        from lightreasoner_ray.runs.rejection_sft import run_rejection_sft

        logger.info("baseline: SFT on the expert's rejection-sampled solutions")
        rejection = run_rejection_sft(config, restart=restart)
        stage_seconds.update({f"rejection_sft_{part}": seconds for part, seconds in rejection["stage_wall_time_s"].items()})

    started = time.time()
    logger.info("stage 3/3: evaluating the baseline and the trained expert")
    models = eval_models or pipeline_eval_models(config)
    if rejection is not None and rejection["training"] is None:  # nothing was kept, so nothing was trained
        models = [spec for spec in models if not spec.startswith(f"{REJECTION_SFT_TAG}=")]
    eval_config = dataclasses.replace(config.eval, model="", models=models)
    results = run_evaluation(dataclasses.replace(config, eval=eval_config), restart=restart)
    stage_seconds["evaluate"] = time.time() - started

    report = efficiency_report(config, samples, training, results, stage_seconds, rejection)
    paths = write_report(config.output_dir, report)
    echo(f"report: {paths['markdown']}")
    return report


def efficiency_report(config: Config, samples: dict[str, Any], training: dict[str, Any], results: dict[str, Any],
                      stage_seconds: dict[str, float], rejection: dict[str, Any] | None = None) -> dict[str, Any]:
    counts = samples["counts"]
    # Tuned tokens are the distinct positions that carry a training signal: the
    # selected steps for LightReasoner, every completion token for SFT on the same
    # trajectories (the paper's measure; epochs do not multiply it).
    sft_tokens = counts["completion_tokens"]
    tuned = counts["selected_steps"]
    report = {
        "output_dir": config.output_dir,
        "expert": config.expert.path,
        "amateur": config.amateur.path,
        "stage_wall_time_s": stage_seconds,
        "total_wall_time_s": sum(stage_seconds.values()),
        "problems_sampled": counts["problems"],
        "tokens": {
            "completion_tokens": counts["completion_tokens"],
            "selected_steps": counts["selected_steps"],
            "tuned_tokens_lightreasoner": tuned,
            "tuned_tokens_sft_same_trajectories": sft_tokens,
            "tuned_token_ratio": tuned / sft_tokens if sft_tokens else None,
            "training_forward_tokens": training.get("forward_tokens"),
            "training_positions_processed": training.get("tuned_tokens"),
        },
        "training": {k: training.get(k) for k in ("steps", "final_loss", "model", "model_kind", "deepspeed_stage")},
        "results": results,
    }
    if rejection is not None:
        report["rejection_sft"] = rejection_comparison(counts, stage_seconds, rejection)
    return report


def rejection_comparison(counts: dict[str, Any], stage_seconds: dict[str, float], rejection: dict[str, Any]) -> dict[str, Any]:
    """The paper's three efficiency measures, LightReasoner against SFT on rejection-sampled
    solutions: wall time (sampling + training), problems sampled, tuned tokens."""
    sampled, trained = rejection["sampling"], rejection["training"] or {}
    rejection_counts = sampled["counts"]
    lightreasoner_time = stage_seconds["sample"] + stage_seconds["train"]
    rejection_time = stage_seconds["rejection_sft_sample"] + stage_seconds["rejection_sft_train"]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "settings": {key: sampled["settings"][key] for key in ("samples_per_problem", "temperature", "top_p", "seed",
                                                               "max_new_tokens", "grader", "engine")},
        "problems_sampled": rejection_counts["problems"],
        "solutions_sampled": rejection_counts["sampled"],
        "solutions_correct": rejection_counts["correct"],
        "solutions_kept": rejection_counts["kept"],
        "problems_with_a_kept_solution": rejection_counts["problems_with_a_kept_solution"],
        "tuned_tokens": rejection_counts["tuned_tokens"],
        "wall_time_s": {"sample": stage_seconds["rejection_sft_sample"], "train": stage_seconds["rejection_sft_train"],
                        "total": rejection_time},
        "training": {k: trained.get(k) for k in ("steps", "final_loss", "model")},
        # A resumed stage's time is what this invocation took, not what the stage cost.
        "resumed": bool(rejection_counts.get("resumed_problems") or counts.get("resumed_problems")
                        or trained.get("resumed_from_step")),
        "lightreasoner_over_rejection_sft": {
            "wall_time": ratio(lightreasoner_time, rejection_time),
            "problems_sampled": ratio(counts["problems"], rejection_counts["problems"]),
            "tuned_tokens": ratio(counts["selected_steps"], rejection_counts["tuned_tokens"]),
        },
    }


def report_markdown(report: dict[str, Any]) -> str:
    tokens = report["tokens"]
    stages = report["stage_wall_time_s"]
    ratio = tokens["tuned_token_ratio"]
    efficiency = markdown_table(
        [
            ["wall time, sampling", f"{stages['sample']:.1f} s"],
            ["wall time, training", f"{stages['train']:.1f} s"],
            ["wall time, evaluation", f"{stages['evaluate']:.1f} s"],
            ["problems sampled", report["problems_sampled"]],
            ["tuned tokens (selected steps), LightReasoner", tokens["tuned_tokens_lightreasoner"]],
            ["tuned tokens, SFT on the same trajectories", tokens["tuned_tokens_sft_same_trajectories"]],
            ["LightReasoner / SFT tuned tokens", "–" if ratio is None else f"{100 * ratio:.1f}%"],
        ],
        ["measure", "value"],
    )
    table_rows, columns = accuracy_rows(report["results"])
    against = rejection_markdown(report) if "rejection_sft" in report else ""
    return (
        f"# LightReasoner run report\n\nExpert `{report['expert']}`, amateur `{report['amateur']}`; outputs under "
        f"`{report['output_dir']}`.\n\n## Efficiency\n\n{efficiency}\n{against}## Accuracy (zero-shot pass@1, %)\n\n"
        f"{markdown_table(table_rows, columns)}"
    )


def rejection_markdown(report: dict[str, Any]) -> str:
    """The paper's comparison: LightReasoner against SFT on rejection-sampled solutions."""
    rejection, tokens, stages = report["rejection_sft"], report["tokens"], report["stage_wall_time_s"]
    ratios = rejection["lightreasoner_over_rejection_sft"]
    settings = rejection["settings"]

    def ratio(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}x"

    lightreasoner_time = stages["sample"] + stages["train"]
    rows = [
        ["problems sampled", report["problems_sampled"], rejection["problems_sampled"], ratio(ratios["problems_sampled"])],
        ["solutions sampled / kept", f"{report['problems_sampled']} / –",
         f"{rejection['solutions_sampled']} / {rejection['solutions_kept']}", "–"],
        ["tuned tokens", tokens["tuned_tokens_lightreasoner"], rejection["tuned_tokens"], ratio(ratios["tuned_tokens"])],
        ["wall time, sampling", f"{stages['sample']:.1f} s", f"{rejection['wall_time_s']['sample']:.1f} s", "–"],
        ["wall time, training", f"{stages['train']:.1f} s", f"{rejection['wall_time_s']['train']:.1f} s", "–"],
        ["wall time, sampling + training", f"{lightreasoner_time:.1f} s", f"{rejection['wall_time_s']['total']:.1f} s",
         ratio(ratios["wall_time"])],
    ]
    note = " Some stages resumed earlier work: their wall times are this run's, not the stage's cost." if rejection["resumed"] else ""
    if not rejection["solutions_kept"]:
        note += " No sampled solution reached the gold answer: there was nothing to train, so no SFT model was evaluated."
    return (
        f"## Against SFT on rejection-sampled solutions\n\nThe expert sampled {settings['samples_per_problem']} "
        f"solutions a problem (temperature {settings['temperature']}, top-p {settings['top_p']}, up to "
        f"{settings['max_new_tokens']} tokens, engine {settings['engine']}); {rejection['solutions_correct']} reached "
        f"the gold answer, {rejection['solutions_kept']} distinct ones (covering "
        f"{rejection['problems_with_a_kept_solution']} problems) are its SFT data, trained one-hot through the same "
        f"trainer.{note}\n\n"
        f"{markdown_table(rows, ['measure', 'LightReasoner', 'SFT (rejection-sampled)', 'LightReasoner / SFT'])}\n"
    )


def write_report(output_dir: str, report: dict[str, Any]) -> dict[str, str]:
    paths = RunLayout(output_dir).report
    report = redact_tree(report)  # model paths may be URIs with credentials
    storage.write_json_atomic(paths["json"], report)
    storage.write_bytes_atomic(paths["markdown"], report_markdown(report).encode("utf-8"))
    return paths
