"""``lightreasoner run ... rounds=N``: iterative LightReasoner rounds.

Round 1 is an ordinary run in ``<output_dir>`` (the layout of a one-round run).
Round r + 1 (in ``<output_dir>/round-<r+1>``) samples with round r's trained expert,
its LoRA adapter merged into its base (``<round r dir>/merged``; a fully fine-tuned
model is used as it is), against the same amateur, on the next ``data.limit``
problems of the same problem file (fresh ones: ``data.offset`` advances by
``data.limit`` a round), trains from them and evaluates the new model. The report
(``<output_dir>/rounds.json`` and ``rounds.md``) gives accuracy and tuned tokens per
round.

A round that finished (its stages and the merge) leaves ``round_done.json`` holding
the settings it ran with; a re-submitted job skips such rounds whole and resumes the
first unfinished one stage by stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from lightreasoner_ray.config import Config, ExportConfig, redact_tree
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.record import StageRecord
from lightreasoner_ray.runs.round import BASELINE_TAG, REJECTION_SFT_TAG, TRAINED_TAG, run_round
from lightreasoner_ray.ui.reports import markdown_table, paper_order, percent, title

logger = logging.getLogger(__name__)


# ---- what makes a next round (also the demo's rounds) ------------------------------------


def round_config(config: Config, round_number: int, expert_path: str, output_dir: Optional[str] = None,
                 problems: Optional[str] = None) -> Config:
    """The config of one round: its own output directory, expert and fresh problems.

    By default round r runs in ``<output_dir>/round-<r>`` (round 1 in ``output_dir`` itself) on
    the next ``data.limit`` problems of the problem file (``data.offset`` advances by
    ``data.limit`` a round); ``output_dir`` and ``problems`` (a file of the round's own
    problems) name others, as the demo's rounds do (one directory per seed and round).
    """
    if problems is None:
        data = dataclasses.replace(config.data, offset=config.data.offset + (round_number - 1) * config.data.limit)
    else:
        data = dataclasses.replace(config.data, problems=problems)
    return dataclasses.replace(
        config,
        output_dir=output_dir or RunLayout(config.output_dir).round(round_number).output_dir,
        expert=dataclasses.replace(config.expert, path=expert_path),
        data=data,
        # Each round's adapter is merged to the round's defaults (<round dir>/merged).
        export=ExportConfig(dtype=config.export.dtype),
        # The rejection-sampling SFT baseline is trained once, beside round 1, from the original expert.
        rejection_sft=dataclasses.replace(config.rejection_sft, enabled=config.rejection_sft.enabled and round_number == 1),
        rounds=1,
    )


def next_expert(config: Config, reuse: bool = False) -> str:
    """The model ``config``'s run trained, standalone, for the next round to sample with.

    A LoRA adapter (``<output_dir>/model``) is merged into ``expert.path``, into
    ``<output_dir>/merged``; a fully fine-tuned model is used as it is. With ``reuse`` a merged
    model already there is taken as it is (the demo: its output_dir is claimed whole, so the
    adapter under it cannot have changed). The path is absolute: the next round's Ray workers
    do not share the driver's working directory.
    """
    from lightreasoner_ray.stages.export import run_export

    layout = RunLayout(config.output_dir)
    if not config.train.lora.enabled:
        if storage.is_uri(layout.model):  # published as versions: the one CURRENT names
            return storage.published_directory(layout.model)
        return os.path.abspath(layout.model)
    merged = os.path.abspath(layout.merged)
    if not (reuse and Path(merged, "config.json").is_file()):  # a merged model is written whole (staged, renamed)
        run_export(dataclasses.replace(config, export=ExportConfig(dtype=config.export.dtype)))
    return merged


# ---- lightreasoner run ... rounds=N -------------------------------------------------------


def check_rounds_config(config: Config) -> None:
    if config.train.samples:
        raise LightReasonerError(
            f"rounds={config.rounds}: train.samples={config.train.samples!r} would train every round on the same "
            "samples; leave train.samples empty (each round trains on <round dir>/samples)"
        )
    if config.eval.models:
        raise LightReasonerError(
            f"rounds={config.rounds}: eval.models is set; each round evaluates its own trained model "
            "(and round 1 the untouched expert too): leave eval.models empty"
        )


def _settings(config: Config) -> dict[str, Any]:
    tree = config.to_dict()
    tree.pop("ray", None)
    return tree


def round_record(config: Config, row: Optional[dict[str, Any]] = None, expert_after: str = "") -> StageRecord:
    """``round_done.json``: the settings a finished round ran with (compared), its report row and
    the expert it leaves for the next round (kept, so a re-submitted job can skip it whole)."""
    outcome = {} if row is None else {"row": row, "next_expert": expert_after}
    return StageRecord(RunLayout(config.output_dir).round_done, {"settings": _settings(config), **outcome},
                       informational=frozenset({"row", "next_expert"}))


def _without_added_defaults(current: dict[str, Any], recorded: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """``current`` less the settings ``recorded`` lacks that sit at their default: keys added by a later
    version, with which an older finished round ran as if at their default."""
    kept = {}
    for key, value in current.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if key not in recorded:
            if isinstance(defaults, dict) and key in defaults and value == default:
                continue
            kept[key] = value
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            kept[key] = _without_added_defaults(value, recorded[key], default)
        else:
            kept[key] = value
    return kept


def _finished_round(config: Config) -> dict[str, Any] | None:
    record = round_record(config)
    done = record.read()
    if done is None:
        return None
    recorded = done.get("settings")
    if isinstance(recorded, dict):
        settings = _without_added_defaults(record.settings["settings"], recorded, Config().to_dict())
        record = dataclasses.replace(record, settings={**record.settings, "settings": settings})
    if record.changes(done):
        logger.info("%s was written with other settings: the round's stages resume or redo as they see fit", record.path)
        return None
    return done


def run_rounds(config: Config) -> dict[str, Any]:
    check_rounds_config(config)
    rows: list[dict[str, Any]] = []
    expert = config.expert.path
    for number in range(1, config.rounds + 1):
        current = round_config(config, number, expert)
        done = _finished_round(current)
        if done is not None:
            logger.info("round %d/%d already finished in %s, skipped", number, config.rounds, current.output_dir)
            rows.append(done["row"])
            expert = done.get("next_expert") or ""
            if not expert and number < config.rounds:
                # The last round of an earlier, shorter run left no next expert: make it now
                # (``rounds`` grew), and record it so the next re-submission skips this too.
                expert = next_expert(current)
                round_record(current, done["row"], expert).write()
            continue
        logger.info("round %d/%d: expert %s, problems %d..%d of %s", number, config.rounds, expert,
                    current.data.offset, current.data.offset + current.data.limit - 1, current.data.problems)
        started = time.time()
        models = None if number == 1 else [f"{TRAINED_TAG}={RunLayout(current.output_dir).model}"]
        report = run_round(current, eval_models=models)
        expert_after = next_expert(current) if number < config.rounds else ""
        row = round_row(number, current, report, time.time() - started)
        round_record(current, row, expert_after).write()
        rows.append(row)
        expert = expert_after
    summary = redact_tree({"output_dir": config.output_dir, "rounds": rows})
    paths = RunLayout(config.output_dir).rounds_report
    storage.write_json_atomic(paths["json"], summary)
    storage.write_bytes_atomic(paths["markdown"], rounds_markdown(summary).encode("utf-8"))
    logger.info("rounds report: %s", paths["markdown"])
    return summary


def _accuracies(results: dict[str, Any], tag: str) -> dict[str, float]:
    return {name: bench["accuracy"] for name, bench in results["models"][tag]["benchmarks"].items()}


def round_row(number: int, config: Config, report: dict[str, Any], wall_time_s: float) -> dict[str, Any]:
    results = report["results"]
    return {
        "round": number,
        "output_dir": config.output_dir,
        "expert": config.expert.path,
        "problems": [config.data.offset, config.data.offset + report["problems_sampled"]],
        "problems_sampled": report["problems_sampled"],
        "tuned_tokens": report["tokens"]["tuned_tokens_lightreasoner"],
        "completion_tokens": report["tokens"]["completion_tokens"],
        "accuracy": _accuracies(results, TRAINED_TAG),
        # Round 1 also evaluated the untouched expert: the accuracy every round is measured against.
        "baseline_accuracy": _accuracies(results, BASELINE_TAG) if number == 1 else None,
        "rejection_sft_accuracy": _accuracies(results, REJECTION_SFT_TAG) if REJECTION_SFT_TAG in results["models"] else None,
        "rejection_sft_tuned_tokens": report.get("rejection_sft", {}).get("tuned_tokens"),
        "wall_time_s": wall_time_s,
    }


def rounds_markdown(summary: dict[str, Any]) -> str:
    rows = summary["rounds"]
    benchmarks = paper_order(rows[0]["accuracy"])
    table = [["expert (before round 1)", "–", "–", *[percent(rows[0]["baseline_accuracy"].get(b)) for b in benchmarks], "–"]]
    for row in rows:
        table.append([f"after round {row['round']}", row["problems_sampled"], row["tuned_tokens"],
                      *[percent(row["accuracy"].get(b)) for b in benchmarks], f"{row['wall_time_s']:.0f} s"])
    if rows[0].get("rejection_sft_accuracy"):
        table.append(["SFT (rejection-sampled), round 1's problems", rows[0]["problems_sampled"],
                      rows[0]["rejection_sft_tuned_tokens"],
                      *[percent(rows[0]["rejection_sft_accuracy"].get(b)) for b in benchmarks], "–"])
    columns = ["model", "problems sampled", "tuned tokens", *[f"{title(b)} (%)" for b in benchmarks], "wall time"]
    return (f"# LightReasoner rounds\n\nOutputs under `{summary['output_dir']}` (round 1 there, round r in "
            f"`round-<r>/`). Each round samples fresh problems with the previous round's expert, merged.\n\n"
            f"{markdown_table(table, columns)}")
