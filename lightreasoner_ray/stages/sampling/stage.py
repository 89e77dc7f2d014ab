"""The sampling stage: Ray Data streams problems through contrastive sampler actors.

Problems are loaded and tokenized on the driver (so a bad row or an over-long prompt
fails before any model is loaded), problems already in ``<output_dir>/samples`` are
skipped, and the rest flow through a fixed pool of ``ContrastiveSampler`` actors.
The driver writes each batch of results as its own Parquet file, atomically, so a
killed run loses at most the batches in flight and a re-run duplicates nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from lightreasoner_ray.config import Config, redact_tree
from lightreasoner_ray.data.samples import finished_problem_ids
from lightreasoner_ray.engines.models import check_local_model, load_tokenizer, pair_vocab_size
from lightreasoner_ray.engines.registry import resolve_engine_factory
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import problem_fingerprints, resolved_dtype_name, weights_fingerprint
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.record import restart_stage
from lightreasoner_ray.stages.problem_prompts import prepare_problems
from lightreasoner_ray.stages.ray_helpers import actor_pool_map, init_ray, write_batches
from lightreasoner_ray.stages.samples_record import check_sampling_settings
from lightreasoner_ray.ui.tracking import numeric_leaves, tracked_stage

logger = logging.getLogger(__name__)


def sampling_settings(config: Config) -> dict[str, Any]:
    """What the rows in a samples directory depend on: resuming must not mix two of these.

    The models are identified by their weights' fingerprints (the paths are kept for
    the reader), so a model retrained in place is a change and a moved one is not.
    """
    sampling = config.sampling
    return {
        "expert": config.expert.path,
        "amateur": config.amateur.path,
        "expert_weights": weights_fingerprint(config.expert.path),
        "amateur_weights": weights_fingerprint(config.amateur.path),
        "expert_dtype": resolved_dtype_name(config.expert.dtype, sampling.gpus_per_actor),
        "amateur_dtype": resolved_dtype_name(config.amateur.dtype, sampling.gpus_per_actor),
        "problems_source": config.data.problems,
        "alpha": sampling.alpha,
        "beta": sampling.beta,
        "max_new_tokens": sampling.max_new_tokens,
        "system_prompt": sampling.system_prompt,
        "selection": sampling.selection,
        # The ids pi_E and pi_A are normalised over; the trainer normalises pi_theta over the same.
        "vocab_size": pair_vocab_size(config.expert, config.amateur),
        # Sampled rollouts only: a greedy run's record is what it always was.
        # (engines draw differently for one seed, so the engine is part of it).
        **({"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "engine": sampling.engine} if sampling.temperature > 0 else {}),
    }


def check_pair(config: Config) -> None:
    """Before any model runs: both local models have weights, and the expert's tokenizer (whose ids
    both models read) has no id past either model's embedding rows."""
    tokenizer = load_tokenizer(config.expert, "expert")
    check_local_model(config.expert, "expert", tokenizer)
    check_local_model(config.amateur, "amateur", tokenizer)


def sampling_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished sampling stage: its counts, KL and timings, and its summary."""
    summary = {k: result.get(k) for k in ("counts", "kl", "timing")}
    summary["kl"] = {k: v for k, v in (summary["kl"] or {}).items() if k != "histogram"}
    return numeric_leaves(summary, "sampling"), [RunLayout(config.output_dir).samples_summary]


@tracked_stage("sample", outputs=sampling_outputs)
def run_sampling(config: Config, restart: bool = False) -> dict[str, Any]:
    """Sample every problem not yet in ``<output_dir>/samples``; return the summary.

    ``restart`` first removes the samples, their settings record and summary.
    """
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

    started = time.time()
    if config.sampling.engine != "hf":  # a missing vLLM or a bad factory path fails before any work
        resolve_engine_factory(config.sampling.engine, "sampling.engine")
    problems, info = prepare_problems(config)
    check_pair(config)
    layout = RunLayout(config.output_dir)
    samples_dir = layout.samples
    if restart:
        restart_stage("sample", [samples_dir, layout.sampling_settings, layout.samples_summary])
    storage.make_dirs(samples_dir)
    removed = storage.remove_stale_temporaries(samples_dir)
    if removed:
        logger.info("removed %d partial files left by an interrupted run", removed)
    check_sampling_settings(layout.sampling_settings, samples_dir, sampling_settings(config),
                            problems=problem_fingerprints(problems))
    done = finished_problem_ids(samples_dir)
    todo = [p for p in problems if p["problem_id"] not in done]
    logger.info("%d problems: %d already sampled, %d to go", len(problems), len(problems) - len(todo), len(todo))

    new_rows = new_tokens = 0
    if todo:
        init_ray(config.ray)
        sampling = config.sampling
        dataset = actor_pool_map(todo, ContrastiveSampler, sampling, dict(
            expert=config.expert,
            amateur=config.amateur,
            alpha=sampling.alpha,
            beta=sampling.beta,
            max_new_tokens=sampling.max_new_tokens,
            position_chunk=sampling.position_chunk,
            selection=sampling.selection,
            engine=sampling.engine,
            vllm=sampling.vllm,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        ))
        for batch in write_batches(dataset, samples_dir, len(todo), "sampling problems", sampling.rows_per_file):
            new_rows += batch.num_rows
            new_tokens += sum(len(c) for c in batch.column("completion_ids").to_pylist())
    wall = time.time() - started
    summary = summarize_samples(config, info, wall_time=wall, new_rows=new_rows, new_tokens=new_tokens,
                                resumed=len(problems) - len(todo))
    storage.write_json_atomic(layout.samples_summary, summary)
    return summary


def summarize_samples(config: Config, info: dict[str, Any], wall_time: float, new_rows: int, new_tokens: int,
                      resumed: int) -> dict[str, Any]:
    """Counts, KL distribution and timings over everything in ``<output_dir>/samples``."""
    files = storage.list_parquet_files(RunLayout(config.output_dir).samples)
    columns = ["completion_ids", "steps", "position_kl"]
    tables = [storage.read_parquet(path, columns=columns) for path in files]
    completion_tokens = selected = problems = 0
    all_kl: list[np.ndarray] = []
    for table in tables:
        problems += table.num_rows
        completion_tokens += sum(len(c) for c in table.column("completion_ids").to_pylist())
        selected += sum(len(s) for s in table.column("steps").to_pylist())
        all_kl.extend(np.asarray(k, dtype=np.float32) for k in table.column("position_kl").to_pylist())
    kl = np.concatenate(all_kl) if all_kl else np.zeros(0, dtype=np.float32)
    quantiles = {f"p{q}": float(np.quantile(kl, q / 100)) for q in (5, 25, 50, 75, 95, 99)} if kl.size else {}
    edges = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, float("inf")]
    counts, _ = np.histogram(kl, bins=edges)
    return {
        "config": config.to_dict(),
        "models": redact_tree({"expert": config.expert.path, "amateur": config.amateur.path}),
        "problems_source": info["source"],
        "counts": {
            "problems": problems,
            "completion_tokens": completion_tokens,
            "selected_steps": selected,
            "selection_ratio": selected / completion_tokens if completion_tokens else 0.0,
            "skipped_invalid_rows": info["skipped_invalid"],
            "resumed_problems": resumed,
        },
        "kl": {
            "mean": float(kl.mean()) if kl.size else 0.0,
            "quantiles": quantiles,
            "histogram": {"edges": [e if e != float("inf") else "inf" for e in edges], "counts": counts.tolist()},
            "beta": config.sampling.beta,
        },
        "timing": {
            "wall_time_s": wall_time,
            "problems_this_run": new_rows,
            "completion_tokens_this_run": new_tokens,
            "tokens_per_s": new_tokens / wall_time if wall_time > 0 else 0.0,
        },
    }
