"""The training stage's driver: ``run_training`` on Ray Train ``TorchTrainer`` workers running DeepSpeed ZeRO.

It finds the samples (a samples Parquet directory, or a reference-format JSONL it
imports), checks them against the expert's vocabulary and context before any worker
starts, claims the checkpoints directory for these inputs (or refuses to mix), hands the
samples to Ray Data, runs the trainer with :func:`~lightreasoner_ray.stages.training.worker.train_worker`
on every rank, copies the final model to ``<output_dir>/model`` and writes
``train_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from ray.train import DataConfig

from lightreasoner_ray.config import Config, join_path
from lightreasoner_ray.data.samples import TRAIN_COLUMNS, SamplesInfo, check_samples, import_reference_jsonl
from lightreasoner_ray.engines.models import (
    check_model_path,
    context_length,
    head_rows,
    load_tokenizer,
    read_model_config,
)
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import (
    samples_fingerprint,
    weights_fingerprint,
)
from lightreasoner_ray.io.layout import PROVENANCE, RunLayout
from lightreasoner_ray.io.record import StageRecord, read_record, refusal, restart_stage
from lightreasoner_ray.io.test_seam import forwarded_environment
from lightreasoner_ray.stages.ray_helpers import init_ray
from lightreasoner_ray.stages.training.checkpoints import MODEL_SUBDIR, checkpoint_step
from lightreasoner_ray.stages.training.deepspeed_config import check_supported
from lightreasoner_ray.stages.training.metrics_log import following_training
from lightreasoner_ray.stages.training.provenance import TrainingProvenance, shaping_train_settings
from lightreasoner_ray.stages.training.worker import train_worker
from lightreasoner_ray.ui.tracking import numeric_leaves, tracked_stage

logger = logging.getLogger(__name__)

RUN_NAME = "train"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_INTERVAL_S = 0.1


def training_outputs_logged(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished training stage: its summary's figures, the summary and the metrics log."""
    keys = ("steps", "tuned_tokens", "forward_tokens", "wall_time_s", "train_time_s", "final_loss", "trainable_parameters")
    layout = RunLayout(config.output_dir)
    return numeric_leaves({k: result.get(k) for k in keys}, "train_summary"), [layout.train_summary, layout.train_metrics]


@tracked_stage("train", outputs=training_outputs_logged, follow=following_training)
def run_training(config: Config, restart: bool = False) -> dict[str, Any]:
    """Train the expert on the contrastive samples; return (and write) the summary.

    A re-run resumes from the latest checkpoint when it trains the same samples and
    expert with the same shaping ``train.*`` settings (see
    :data:`lightreasoner_ray.io.record.RESUMABLE_TRAIN_KEYS`), and is refused otherwise;
    ``restart`` discards this stage's earlier outputs and trains from scratch instead.
    """
    started = time.time()
    train = config.train
    layout = RunLayout(config.output_dir)
    check_supported(train, config.expert.dtype)
    check_model_path(config.expert.path, "expert")
    tokenizer = load_tokenizer(config.expert, "expert")
    vocab_size, context = model_vocab_and_context(config)
    check_lora_targets(config)
    if restart:
        restart_stage("train", training_outputs(config))
    files = find_samples(config, tokenizer, vocab_size)
    info = check_samples(files, vocab_size, context)
    if info.selected_steps == 0:
        raise LightReasonerError(
            f"the samples in {_samples_source(config)} have no selected steps ({info.rows} trajectories): "
            "nothing to train on; sample more problems or lower sampling.beta"
        )
    logger.info(
        "training on %d trajectories, %d selected steps (%d files)", info.trajectories, info.selected_steps, len(files)
    )

    provenance = training_provenance(config, files)
    claim_checkpoints(config, provenance)
    init_ray(config.ray)
    result = _fit(config, files, info, tokenizer.pad_token_id)
    outcome = result.return_value or {}
    checkpoints = checkpoints_dir(config)
    if outcome.get("nonfinite_step"):
        kept = (
            f"The last good checkpoint (update {checkpoint_step(result.checkpoint)}) is kept under {checkpoints}"
            if result.checkpoint is not None
            else "No checkpoint had been written yet"
        )
        raise LightReasonerError(
            f"the loss or the gradient norm became non-finite at update {outcome['nonfinite_step']}; training "
            f"stopped there. {kept}; lower train.lr (the config's lr and schedule apply from the first update "
            "after a resume) then re-run to resume from it; or check the samples (changed samples train from scratch: re-run with --restart)."
        )
    if result.checkpoint is None:
        raise LightReasonerError(f"training finished without a checkpoint under {checkpoints}")
    model_dir = layout.model
    model_record = {
        "training": provenance.to_dict(),
        "step": outcome["step"],
        "optimizer": {key: getattr(train, key) for key in ("lr", "lr_schedule", "warmup_steps", "weight_decay",
                                                          "max_grad_norm")},
        "max_steps": train.max_steps,
    }
    with result.checkpoint.as_directory() as directory:
        publish_model(str(Path(directory, MODEL_SUBDIR)), model_dir,
                      extra_files={PROVENANCE: json.dumps(model_record, indent=2).encode("utf-8")})
    summary = {
        "steps": outcome["step"],
        "max_steps": train.max_steps,
        "tuned_tokens": outcome["tuned_steps"],
        "forward_tokens": outcome["forward_tokens"],
        "wall_time_s": time.time() - started,
        "train_time_s": outcome["train_time_s"],
        "final_loss": outcome["loss"],
        "resumed_from_step": outcome["resumed_from_step"],
        "model": model_dir,
        "model_kind": "peft_lora_adapter" if train.lora.enabled else "hf_model",
        "checkpoint": result.checkpoint.path,
        "workers": train.num_workers,
        "deepspeed_stage": train.deepspeed.stage,
        "precision": outcome["precision"],
        "parameters": outcome["parameters"],
        "parameters_loaded_per_rank": outcome["parameters_loaded_per_rank"],
        "trainable_parameters": outcome["trainable_parameters"],
        "samples": {"source": _samples_source(config), **info.to_dict()},
        "train_config": config.to_dict()["train"],
        "expert": config.expert.path,
        "provenance": provenance.to_dict(),
    }
    storage.write_json_atomic(layout.train_summary, summary)
    logger.info(
        "trained %d updates (%d selected steps, final loss %.4f) in %.1fs; model: %s; summary: %s",
        summary["steps"], summary["tuned_tokens"], summary["final_loss"], summary["wall_time_s"], model_dir,
        layout.train_summary,
    )
    return summary


def checkpoints_dir(config: Config) -> str:
    return RunLayout(config.output_dir).checkpoints


def training_outputs(config: Config) -> list[str]:
    """What the training stage writes into ``output_dir`` (``--restart`` removes these)."""
    return RunLayout(config.output_dir).training_outputs


def training_provenance(config: Config, files: list[str]) -> TrainingProvenance:
    """What a run on these samples files with this config is made from."""
    return TrainingProvenance(samples=samples_fingerprint(files), expert=weights_fingerprint(config.expert.path),
                              settings=shaping_train_settings(config), samples_source=_samples_source(config))


def current_training_provenance(config: Config) -> TrainingProvenance:
    """:func:`training_provenance` of the samples the config points at, found as ``run_training`` finds them."""
    vocab_size, _ = model_vocab_and_context(config)
    return training_provenance(config, find_samples(config, load_tokenizer(config.expert, "expert"), vocab_size))


def training_done(config: Config) -> dict[str, Any] | None:
    """The summary of a finished training run, if the published model is what this config would train.

    That is: it holds update ``train.max_steps`` and its provenance (the samples' content,
    the expert's weights, the shaping ``train.*`` settings) matches the current inputs.
    Anything else runs the training stage, which resumes, or refuses with what changed.
    """
    layout = RunLayout(config.output_dir)
    path, model_dir = layout.train_summary, layout.model
    if not storage.exists(path) or not storage.exists(model_dir):
        return None
    summary = storage.read_json(path)
    record = read_record(layout.model_provenance)
    if summary.get("steps") != config.train.max_steps or record is None or record.get("step") != config.train.max_steps:
        return None
    changes = current_training_provenance(config).changes_from(TrainingProvenance.from_dict(record.get("training") or {}))
    if changes:
        logger.info("the model in %s came from other inputs (%s): not skipping training", model_dir, "; ".join(changes))
        return None
    return summary


def claim_checkpoints(config: Config, provenance: TrainingProvenance) -> None:
    """Record what the checkpoints come from, or refuse to resume checkpoints made from other inputs.

    Without any checkpoint yet (a run that failed before its first) the record is simply
    rewritten: there is nothing to mix.
    """
    directory = checkpoints_dir(config)
    record = StageRecord(RunLayout(config.output_dir).checkpoints_provenance, provenance.to_dict(),
                         compare=lambda recorded: provenance.changes_from(TrainingProvenance.from_dict(recorded)))

    def unrecorded() -> None:
        raise LightReasonerError(
            f"the checkpoints in {directory} have no {PROVENANCE} (made by an older version?), so nothing "
            "says which samples and settings they came from. To proceed, use a new output_dir, or re-run with "
            f"`lightreasoner train --restart` to discard them and start over in {config.output_dir}."
        )

    record.claim(_has_checkpoints(directory),
                 lambda changes: refusal(f"the checkpoints in {directory}", changes, config.output_dir, "train"),
                 unrecorded=unrecorded)


def _has_checkpoints(directory: str) -> bool:
    """Whether Ray Train would resume from something here (checkpoints are ``step_*`` directories)."""
    if storage.is_uri(directory):
        return storage.exists(join_path(directory, RUN_NAME))
    run = Path(directory, RUN_NAME)
    return run.is_dir() and any(path.name.startswith("step_") for path in run.iterdir())


def model_vocab_and_context(config: Config) -> tuple[int, int]:
    """The expert's logit width and context length, from its config (no weights loaded)."""
    try:
        text_config = read_model_config(config.expert.path, config.expert.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LightReasonerError(f"cannot read the expert's config from {config.expert.path}: {exc}") from None
    vocab_size = int(getattr(text_config, "vocab_size", 0) or 0)
    if vocab_size <= 0:
        raise LightReasonerError(f"the expert's config in {config.expert.path} has no vocab_size")
    return vocab_size, context_length(text_config)


def check_lora_targets(config: Config) -> None:
    """Every ``train.lora.target_modules`` entry must name modules of the expert (checked on a weightless copy)."""
    lora = config.train.lora
    if not lora.enabled:
        return
    from transformers import AutoModelForCausalLM

    trust = config.expert.trust_remote_code
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_model_config(config.expert.path, trust, text=False),
                                                 trust_remote_code=trust)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LightReasonerError(
            f"train.lora.target_modules: {', '.join(missing)} match no module of the expert ({config.expert.path}); "
            f"its linear layers are {', '.join(linear)}"
        )


def _samples_source(config: Config) -> str:
    return config.train.samples or config.samples_dir


def find_samples(config: Config, tokenizer: Any, vocab_size: int) -> list[str]:
    """The samples Parquet files to train on (importing a reference-format JSONL first)."""
    source = _samples_source(config)
    if source.endswith(".jsonl"):
        source = import_reference_jsonl(source, tokenizer, vocab_size, config.output_dir, config.expert.path)
    if source.endswith(".parquet"):
        if not storage.exists(source):
            raise LightReasonerError(f"train.samples: {source} does not exist")
        return [source]
    if not storage.is_uri(source) and not Path(source).exists():
        raise LightReasonerError(
            f"no samples at {source}: run `lightreasoner sample` first, or set train.samples to a samples "
            "directory, a .parquet file or a reference-format .jsonl file"
        )
    files = storage.list_parquet_files(source)
    if not files:
        raise LightReasonerError(
            f"no samples in {source}: the directory holds no .parquet files (did sampling finish?)"
        )
    return files


def logit_vocab_size(config: Config) -> int:
    """The ids pi_theta is normalised over: those the samples' pi_E was normalised over.

    The sampler records them in ``sampling_settings.json`` beside its samples directory;
    without that record (a reference JSONL, an older run) they are derived as the sampler
    derives them, from the tokenizer and the expert's head.
    """
    source = _samples_source(config).rstrip("/")
    directory = source.rsplit("/", 1)[0] if source.endswith(".parquet") else source
    # The sampling stage's record sits beside its samples directory, in that run's output_dir.
    record = RunLayout(directory.rsplit("/", 1)[0] if "/" in directory else ".").sampling_settings
    derived = min(len(load_tokenizer(config.expert, "expert")), head_rows(config.expert))
    if storage.exists(record):
        recorded = storage.read_json(record).get("vocab_size")
        if isinstance(recorded, int) and 0 < recorded <= head_rows(config.expert):
            if recorded != derived:
                logger.info("normalising over the %d ids the samples were drawn over (%s)", recorded, record)
            return recorded
    return derived


def _fit(config: Config, files: list[str], info: SamplesInfo, pad_id: int) -> Any:
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = config.train
    # The driver reads the samples (local, shared or URI) and hands Ray Data the tables:
    # no read task has to be scheduled, so a head node with no CPUs for tasks (as in
    # cluster.yaml) cannot stall it, and local files need not be on every node.
    tables = [storage.read_parquet(path, columns=TRAIN_COLUMNS) for path in files]
    dataset = ray.data.from_arrow(tables).materialize()
    on_gpu = train.gpus_per_worker > 0
    resources = {"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if on_gpu else {})}
    storage_path = checkpoints_dir(config)
    if not storage.is_uri(storage_path):
        storage_path = str(Path(storage_path).resolve())
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "pad_id": pad_id, "test_environment": forwarded_environment(),
                           "vocab_size": logit_vocab_size(config),
                           "checkpoint_root": join_path(storage_path, RUN_NAME)},
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=on_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
        datasets={"train": dataset},
        # Not split: every rank reads every trajectory and takes its share of each update (UpdatePlan).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    from ray.train import TrainingFailedError

    try:
        with _controller_poll_interval(REPORT_POLL_INTERVAL_S):
            return trainer.fit()
    except TrainingFailedError as exc:
        raise _training_error(exc, config) from None


@contextlib.contextmanager
def _controller_poll_interval(seconds: float) -> Iterator[None]:
    """Have the Ray Train controller collect worker reports every ``seconds`` during ``fit``.

    A worker's ``ray.train.report`` waits in a one-slot queue that the controller
    drains once per health check (2 s by default), so reporting every update would
    stall each one by up to that long. Ray passes this variable from the driver to the
    controller it starts; a value the user set is left alone.
    """
    if HEALTH_CHECK_ENV in os.environ:
        yield
        return
    os.environ[HEALTH_CHECK_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(HEALTH_CHECK_ENV, None)


def _training_error(exc: Exception, config: Config) -> LightReasonerError:
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, LightReasonerError):
            return cause
        message = f"{type(cause).__name__}: {cause}"
        break
    else:
        message = str(exc)
        rank = None
    where = f" on worker {rank}" if rank is not None else ""
    return LightReasonerError(
        f"training failed{where} (after up to train.max_failures={config.train.max_failures} restarts): {message}. "
        f"Checkpoints so far are kept under {checkpoints_dir(config)}; re-run to resume from the latest."
    )


def publish_model(source: str, destination: str, extra_files: dict[str, bytes]) -> None:
    """Copy the final checkpoint's model directory to ``destination`` (local or URI), replacing it whole."""
    if not Path(source).is_dir():
        raise LightReasonerError(f"the final checkpoint has no model directory at {source}")
    storage.publish_directory(source, destination, extra_files)
