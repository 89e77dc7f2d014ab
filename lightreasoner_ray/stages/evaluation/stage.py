"""The evaluation stage: every evaluated model scored on every benchmark.

For each evaluated model:

1. On the driver, before any Ray work: benchmark names, model paths (and the base
   model of an adapter) and every benchmark row are checked.
2. The rows of all benchmarks are cut into shards of ``eval.shard_size``; shards
   already on disk with the same row ids (and weights) are kept, the rest are queued
   (:mod:`.store`: ``<output_dir>/eval/<tag>/``).
3. A Ray pool of evaluator actors generates and grades the queued shards
   (:mod:`.pool`); each graded shard is written as it arrives.
4. ``results.json``, ``results.md`` and ``results.png`` go to ``<output_dir>/eval``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightreasoner_ray.config import Config, EvalConfig, join_path
from lightreasoner_ray.core.scoring import score
from lightreasoner_ray.data.benchmarks import BENCHMARKS, load_benchmark
from lightreasoner_ray.engines.base import EngineFactory, EngineSpec
from lightreasoner_ray.engines.hf import check_inference_model
from lightreasoner_ray.engines.registry import factory_name, resolve_engine_factory
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import weights_fingerprint
from lightreasoner_ray.io.layout import PROVENANCE, RunLayout
from lightreasoner_ray.io.record import read_record, restart_stage
from lightreasoner_ray.stages.evaluation.pool import Shard, group_by_benchmark, interleave, make_shards, run_pool
from lightreasoner_ray.stages.evaluation.store import MODEL_FINGERPRINT, PredictionStore, check_generation_settings
from lightreasoner_ray.stages.ray_helpers import init_ray
from lightreasoner_ray.ui.prometheus import record_evaluation
from lightreasoner_ray.ui.reports import paper_order, write_reports
from lightreasoner_ray.ui.tracking import metric_name, tracked_stage

logger = logging.getLogger(__name__)

_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class EvalModel:
    tag: str
    path: str


# ---- inputs ---------------------------------------------------------------------------


def parse_model_entry(entry: str) -> EvalModel:
    """``"tag=path"`` or a bare path (the tag is then the directory's basename)."""
    entry = entry.strip()
    tag, separator, path = entry.partition("=")
    if separator and tag.strip() and "/" not in tag:
        tag, path = tag.strip(), path.strip()
    else:
        path = entry
        local = Path(path).expanduser()
        tag = (local.resolve() if local.exists() else Path(path.rstrip("/"))).name
    if not path:
        raise LightReasonerError(f"eval model entry {entry!r} has no path (use tag=path or a path)")
    if not _TAG.fullmatch(tag):
        raise LightReasonerError(
            f"eval model entry {entry!r}: tag {tag!r} must start with a letter or digit and use only "
            "letters, digits, '.', '_', '+', '-' (write the entry as tag=path)"
        )
    return EvalModel(tag=tag, path=path)


def evaluated_models(config: Config) -> list[EvalModel]:
    """``eval.model`` then ``eval.models``; neither set means the expert. A path published to a URI
    (``<output_dir>/model``) is resolved to the version its ``CURRENT`` pointer names."""
    entries = ([config.eval.model] if config.eval.model else []) + list(config.eval.models)
    if not entries:
        if not config.expert.path:
            raise LightReasonerError("nothing to evaluate: set eval.model, eval.models or expert.path")
        entries = [config.expert.path]
    models = [parse_model_entry(entry) for entry in entries]
    # A model published to a URI (training's <output_dir>/model) is the version its CURRENT names.
    models = [EvalModel(model.tag, storage.published_directory(model.path)) for model in models]
    tags = [model.tag for model in models]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        raise LightReasonerError(
            f"eval models share the tag {repeated[0]!r}; name them apart with tag=path entries in eval.models"
        )
    return models


def check_benchmark_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise LightReasonerError(
            f"unknown benchmark {unknown[0]!r} in eval.benchmarks; known benchmarks: {', '.join(BENCHMARKS)}"
        )


def load_benchmarks(eval_config: EvalConfig) -> dict[str, list[dict[str, Any]]]:
    """Every requested benchmark's rows (``eval.limit`` each), in the requested order."""
    check_benchmark_names(eval_config.benchmarks)
    loaded = {}
    for name in eval_config.benchmarks:
        rows = load_benchmark(name, eval_config.data_dir or None, eval_config.limit)
        if not rows:
            raise LightReasonerError(f"benchmark {name} has no rows (data_dir {eval_config.data_dir or 'default'})")
        loaded[name] = rows
    return loaded


# ---- the stage ------------------------------------------------------------------------


def generation_settings(model: EvalModel, config: Config, engine_factory: EngineFactory,
                        model_fingerprint: str = "") -> dict[str, Any]:
    """What a model's predictions depend on; ``model_path`` is informational, the fingerprint identifies it."""
    return {
        "model_path": model.path,
        MODEL_FINGERPRINT: model_fingerprint or weights_fingerprint(model.path),
        "engine": factory_name(engine_factory),
        "max_new_tokens": config.eval.max_new_tokens,
        "system_prompt": config.eval.system_prompt,
        "prompt": config.eval.prompt,
        "dtype": config.expert.dtype,
        **decoding_settings(config.eval),
    }


def decoding_settings(eval_config: EvalConfig) -> dict[str, Any]:
    """Decoding settings; default greedy decoding adds nothing (outputs made before these keys stay valid)."""
    if eval_config.temperature == 0 and eval_config.n == 1:
        return {}
    return {"temperature": eval_config.temperature, "top_p": eval_config.top_p, "n": eval_config.n, "seed": eval_config.seed}


def evaluate_model(
    model: EvalModel,
    config: Config,
    shards_by_benchmark: dict[str, list[Shard]],
    engine_factory: EngineFactory,
) -> dict[str, Any]:
    """Generate and grade every shard of ``model`` not already on disk; score all benchmarks."""
    eval_config = config.eval
    model_dir = RunLayout(config.output_dir).eval_model(model.tag)
    fingerprint = weights_fingerprint(model.path)
    check_generation_settings(model_dir, generation_settings(model, config, engine_factory, fingerprint))
    store = PredictionStore(model_dir, shards_by_benchmark, fingerprint)
    todo = store.resume()
    total_shards = sum(len(shards) for shards in shards_by_benchmark.values())
    logger.info("model %s (%s): %d of %d shards already done", model.tag, model.path, total_shards - len(todo), total_shards)
    timing: dict[str, float] = {}
    if todo:
        init_ray(config.ray)
        spec = EngineSpec(
            model_path=model.path,
            max_new_tokens=eval_config.max_new_tokens,
            batch_size=eval_config.batch_size,
            dtype=config.expert.dtype,
            trust_remote_code=config.expert.trust_remote_code,
            temperature=eval_config.temperature,
            top_p=eval_config.top_p,
            n=eval_config.n,
            seed=eval_config.seed,
            vllm=eval_config.vllm,
        )
        ordered_todo = interleave(group_by_benchmark(todo))

        def on_graded(shard: Shard, rows: list[dict[str, Any]]) -> None:
            store.add(shard, rows)
            record_evaluation(model.tag, shard.benchmark, len(rows), sum(bool(row["correct"]) for row in rows))

        timing = run_pool(ordered_todo, engine_factory, spec, eval_config, on_graded, f"evaluating {model.tag}")
    rows_generated = sum(len(shard.rows) for shard in todo)
    busy_seconds = timing.get("generate_and_grade_s", 0.0)
    scores = {name: score(store.benchmark_rows(name), eval_config.n) for name in paper_order(shards_by_benchmark)}
    trained = read_record(join_path(model.path, PROVENANCE)) if not storage.is_uri(model.path) else None
    return {
        "path": model.path,
        MODEL_FINGERPRINT: fingerprint,
        "trained_step": (trained or {}).get("step"),
        "benchmarks": scores,
        "average": sum(s["accuracy"] for s in scores.values()) / len(scores),
        "predictions": model_dir,
        "run": {
            "shards_generated": len(todo),
            "shards_resumed": total_shards - len(todo),
            "rows_generated": rows_generated,
            "rows_per_s": rows_generated / busy_seconds if busy_seconds > 0 else 0.0,
            **timing,
        },
    }


def evaluation_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished evaluation: accuracy, correct and n per model and benchmark, and the results files."""
    metrics = {}
    for tag, model in result.get("models", {}).items():
        for benchmark, scores in model.get("benchmarks", {}).items():
            for key in ("accuracy", "correct", "n"):
                if isinstance(scores.get(key), (int, float)):
                    metrics[metric_name("eval", tag, benchmark, key)] = float(scores[key])
        if isinstance(model.get("average"), (int, float)):
            metrics[metric_name("eval", tag, "average")] = float(model["average"])
    return metrics, list(RunLayout(config.output_dir).results.values())


@tracked_stage("evaluate", outputs=evaluation_outputs)
def run_evaluation(config: Config, engine_factory: Optional[EngineFactory] = None, restart: bool = False
                   ) -> dict[str, Any]:
    """Evaluate every model on every benchmark; write predictions and reports; return the results.

    ``engine_factory`` (called with an :class:`EngineSpec` inside each actor) overrides
    ``eval.engine``; it must be importable by, or picklable to, the Ray workers.
    Models load with the expert's ``dtype`` and ``trust_remote_code`` settings.
    All input is checked on the driver before any model loads or Ray starts.
    ``restart`` discards the earlier predictions of the evaluated models' tags (only theirs).
    """
    started = time.time()
    eval_config = config.eval
    layout = RunLayout(config.output_dir)
    factory = engine_factory or resolve_engine_factory(eval_config.engine)
    check_benchmark_names(eval_config.benchmarks)
    models = evaluated_models(config)
    for model in models:
        check_inference_model(model.path, f"eval model {model.tag!r}", config.expert.trust_remote_code)
    shards_by_benchmark = {
        name: make_shards(name, rows, eval_config.shard_size) for name, rows in load_benchmarks(eval_config).items()
    }
    if restart:
        restart_stage("evaluate", [layout.eval_model(model.tag) for model in models])
    results: dict[str, Any] = {
        "benchmarks": paper_order(shards_by_benchmark),
        "models": {model.tag: evaluate_model(model, config, shards_by_benchmark, factory) for model in models},
        "settings": {
            "limit": eval_config.limit,
            "max_new_tokens": eval_config.max_new_tokens,
            "system_prompt": eval_config.system_prompt,
            "engine": factory_name(factory),
            "data_dir": eval_config.data_dir or None,
            "temperature": eval_config.temperature,
            "top_p": eval_config.top_p,
            "n": eval_config.n,
            "seed": eval_config.seed,
        },
        "wall_time_s": time.time() - started,
    }
    paths = write_reports(results, layout.eval)
    logger.info("evaluation results: %s, %s, %s", paths["json"], paths["markdown"], paths["chart"])
    return results
