"""The sampling stage: Ray Data streams problems through contrastive sampler actors.

Problems are loaded and tokenized on the driver (so a bad row or an over-long prompt
fails before any model is loaded), problems already in ``<output_dir>/samples`` are
skipped, and the rest flow through a fixed pool of ``ContrastiveSampler`` actors.
The driver writes each batch of results as its own Parquet file, atomically, so a
killed run loses at most the batches in flight and a re-run duplicates nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from typing import Any, Iterator

import numpy as np

from lightreasoner_ray.config import Config, join_path
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.models import check_model_path, check_tokenizers_compatible, load_tokenizer, pair_vocab_size
from lightreasoner_ray.problems import load_problems
from lightreasoner_ray.prompts import prompt_ids
from lightreasoner_ray import storage
from lightreasoner_ray.tracking import tracked_stage

logger = logging.getLogger(__name__)

# Test-only: SIGKILL this process right after writing that many files.
TEST_KILL_ENV = "LIGHTREASONER_TEST_KILL_AFTER_FILES"


def _model_context(path: str, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return int(getattr(model_config, "max_position_embeddings", 0) or 1 << 30)


def prepare_problems(config: Config, with_answers: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load and tokenize the problems; check the models, tokenizers and prompt lengths.

    ``with_answers`` (rejection-sampling SFT) also keeps each problem's gold answer,
    reduced to the answer itself (:func:`lightreasoner_ray.rejection_sft.gold_answer`),
    and refuses a problem without one.
    """
    check_model_path(config.expert.path, "expert")
    check_model_path(config.amateur.path, "amateur")
    expert_tokenizer = load_tokenizer(config.expert, "expert")
    amateur_tokenizer = load_tokenizer(config.amateur, "amateur")
    check_tokenizers_compatible(expert_tokenizer, amateur_tokenizer, config.expert.path, config.amateur.path)
    context = min(
        _model_context(config.expert.path, config.expert.trust_remote_code),
        _model_context(config.amateur.path, config.amateur.trust_remote_code),
    )
    loaded = load_problems(config.data)
    if with_answers:
        from lightreasoner_ray.rejection_sft import gold_answers

        answers = gold_answers(loaded, config.data.answer_field)
    problems = []
    for problem in loaded.problems:
        ids = prompt_ids(expert_tokenizer, problem["question"], config.sampling.system_prompt)
        if len(ids) >= context:
            raise LightReasonerError(
                f"{loaded.source}: problem {problem['problem_id']}: the prompt is {len(ids)} tokens, "
                f"longer than the models' context of {context} tokens"
            )
        problems.append({"problem_id": problem["problem_id"], "prompt_ids": ids,
                         **({"answer": answers[problem["problem_id"]]} if with_answers else {})})
    info = {"source": loaded.source, "skipped_invalid": len(loaded.skipped), "context": context}
    return problems, info


SETTINGS_FILE = "sampling_settings.json"
# Informational in the settings record: the weights' fingerprints identify the models.
_MODEL_PATHS = ("expert", "amateur")


def sampling_settings(config: Config) -> dict[str, Any]:
    """What the rows in a samples directory depend on: resuming must not mix two of these.

    The models are identified by their weights' fingerprints (the paths are kept for
    the reader), so a model retrained in place is a change and a moved one is not.
    """
    from lightreasoner_ray.provenance import weights_fingerprint

    sampling = config.sampling
    return {
        "expert": config.expert.path,
        "amateur": config.amateur.path,
        "expert_weights": weights_fingerprint(config.expert.path),
        "amateur_weights": weights_fingerprint(config.amateur.path),
        "alpha": sampling.alpha,
        "beta": sampling.beta,
        "max_new_tokens": sampling.max_new_tokens,
        "system_prompt": sampling.system_prompt,
        "selection": sampling.selection,
        # The ids pi_E and pi_A are normalised over; the trainer normalises pi_theta over the same.
        "vocab_size": pair_vocab_size(config.expert, config.amateur),
    }


def check_sampling_settings(output_dir: str, samples_dir: str, settings: dict[str, Any],
                            settings_file: str = SETTINGS_FILE,
                            way_out: str = "re-run with `lightreasoner sample --restart` to discard them and start over") -> None:
    """Record the settings of a new (or still empty) samples directory; refuse to resume one
    holding rows made with others, saying ``way_out``.

    The record (``settings_file`` in ``output_dir``) sits beside ``samples/``, which
    stays a pure Parquet dataset.
    """
    path = join_path(output_dir, settings_file)
    has_rows = bool(storage.list_parquet_files(samples_dir))
    if not storage.exists(path) or not has_rows:  # nothing yet that other settings could be mixed with
        if has_rows:
            logger.warning("%s has samples but no %s; resuming without checking their settings", samples_dir, settings_file)
        storage.write_json_atomic(path, settings)
        return
    recorded = storage.read_json(path)
    changed = [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in settings.items()
               if recorded.get(key) != value and key not in _MODEL_PATHS]
    if changed:
        raise LightReasonerError(
            f"{samples_dir} holds samples made with other settings ({'; '.join(changed)}); resuming would mix them. "
            f"Use a new output_dir, or {way_out}."
        )


def finished_problem_ids(samples_dir: str) -> set[str]:
    done: set[str] = set()
    for path in storage.list_parquet_files(samples_dir):
        done.update(storage.read_parquet(path, columns=["problem_id"]).column("problem_id").to_pylist())
    return done


@tracked_stage("sample")
def run_sampling(config: Config, restart: bool = False) -> dict[str, Any]:
    """Sample every problem not yet in ``<output_dir>/samples``; return the summary.

    ``restart`` first removes the samples, their settings record and summary.
    """
    from lightreasoner_ray.engine import resolve_engine_factory
    from lightreasoner_ray.ray_session import init_ray
    from lightreasoner_ray.sampler import ContrastiveSampler

    started = time.time()
    if config.sampling.engine != "hf":  # a missing vLLM or a bad factory path fails before any work
        resolve_engine_factory(config.sampling.engine, "sampling.engine")
    problems, info = prepare_problems(config)
    samples_dir = config.samples_dir
    if restart:
        from lightreasoner_ray.provenance import restart_stage

        restart_stage("sample", [samples_dir, join_path(config.output_dir, SETTINGS_FILE),
                                 join_path(config.output_dir, "samples_summary.json")])
    storage.make_dirs(samples_dir)
    removed = storage.remove_stale_temporaries(samples_dir)
    if removed:
        logger.info("removed %d partial files left by an interrupted run", removed)
    check_sampling_settings(config.output_dir, samples_dir, sampling_settings(config))
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
        ))
        for batch in write_batches(dataset, samples_dir, len(todo), "sampling problems", sampling.rows_per_file):
            new_rows += batch.num_rows
            new_tokens += sum(len(c) for c in batch.column("completion_ids").to_pylist())
    wall = time.time() - started
    summary = summarize_samples(config, info, wall_time=wall, new_rows=new_rows, new_tokens=new_tokens,
                                resumed=len(problems) - len(todo))
    storage.write_json_atomic(join_path(config.output_dir, "samples_summary.json"), summary)
    return summary


def actor_pool_map(items: list[dict[str, Any]], actor_class: type, sampling: Any, constructor_kwargs: dict[str, Any]) -> Any:
    """A Ray Dataset of ``items`` mapped, ``sampling.batch_size`` rows at a time, through a pool of
    ``sampling.num_actors`` ``actor_class`` actors (``sampling.gpus_per_actor``/``cpus_per_actor`` each)."""
    import ray

    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * sampling.num_actors)))
    return dataset.map_batches(
        actor_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=sampling.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sampling.num_actors),
        num_gpus=sampling.gpus_per_actor or None,
        num_cpus=sampling.cpus_per_actor,
    )


def write_batches(dataset: Any, directory: str, total: int, description: str, rows_per_file: int) -> Iterator[Any]:
    """Write a Ray Dataset's rows to ``directory`` as Parquet files of ``rows_per_file`` rows,
    each atomically (a killed run loses only the rows in flight), with a progress bar;
    yields each table once it is on disk."""
    from tqdm.auto import tqdm

    from lightreasoner_ray.console import progress_stream

    kill_after = int(os.environ.get(TEST_KILL_ENV, "0"))
    with tqdm(total=total, desc=description, unit="problem", file=progress_stream()) as progress:
        for files, batch in enumerate(dataset.iter_batches(batch_size=rows_per_file, batch_format="pyarrow"), 1):
            storage.write_parquet_atomic(batch, directory, f"part-{uuid.uuid4().hex}.parquet")
            if files == kill_after:  # tests: die like a killed job, mid-run, at a known point
                os.kill(os.getpid(), signal.SIGKILL)
            progress.update(batch.num_rows)
            yield batch


def summarize_samples(config: Config, info: dict[str, Any], wall_time: float, new_rows: int, new_tokens: int,
                      resumed: int) -> dict[str, Any]:
    """Counts, KL distribution and timings over everything in ``<output_dir>/samples``."""
    files = storage.list_parquet_files(config.samples_dir)
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
        "models": {"expert": config.expert.path, "amateur": config.amateur.path},
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
