"""The training stage: Ray Train ``TorchTrainer`` workers running DeepSpeed ZeRO.

Driver (``run_training``): finds the samples (a samples Parquet directory, or a
reference-format JSONL it imports), checks them against the expert's vocabulary and
context before any worker starts, hands them to Ray Data, runs the trainer, copies
the final model to ``<output_dir>/model`` and writes ``train_summary.json``.

Workers (``train_worker``): every rank reads all trajectories and computes the same
``UpdatePlan`` (train_data.py): one global seeded order of selected steps, cut into
updates of exactly ``train.steps_per_update`` steps across all ranks, each rank's share
packed into micro-batches. They build the expert (LoRA via peft by default; under
ZeRO-3 inside ``deepspeed.zero.Init`` so no worker holds it whole), resume from the
latest Ray Train checkpoint if there is one, and run the updates. Every rank runs the
same number of forward/backward calls per update (a short share is padded with
weightless placeholders), which ZeRO-3's collective parameter gathering requires.
Checkpoints (DeepSpeed state + step counter) go through ``ray.train.report`` every
``train.checkpoint_every`` updates and at the end; a re-run or a restarted worker
group resumes from the latest: the plan of update k depends on k alone, so exactly
the updates already trained are skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from ray.train import DataConfig

from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import SAMPLING_SETTINGS, RunLayout
from lightreasoner_ray.config import Config, TrainConfig, join_path
from lightreasoner_ray.stages.training.deepspeed_config import check_supported, deepspeed_config, use_bf16
from lightreasoner_ray.core.schedule import lr_multiplier
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.ui.prometheus import record_train_step
from lightreasoner_ray.ui.tracking import following_training, numeric_leaves, tracked_stage
from lightreasoner_ray.io.record import (
    PROVENANCE_FILE,
    TrainingProvenance,
    read_record,
    refusal,
    restart_stage,
    samples_fingerprint,
    shaping_train_settings,
    weights_fingerprint,
)
from lightreasoner_ray.data.samples import TRAIN_COLUMNS, SamplesInfo, check_samples, import_reference_jsonl, trajectories_from_table
from lightreasoner_ray.core.update_plan import MicroBatch, Trajectory, UpdatePlan, collate, placeholder_micro_batch

logger = logging.getLogger(__name__)

RUN_NAME = "train"
CHECKPOINT_TAG = "deepspeed"
TRAIN_STATE_FILE = "train_state.json"
MODEL_SUBDIR = "hf_model"
# Test-only fault injection, read by the driver and passed to the workers:
# "fail:<step>:<rank>:<marker file>" raises once on that rank at that update;
# "nan:<step>" makes that update's loss NaN.
FAULT_ENV = "LIGHTREASONER_TEST_FAULT"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_INTERVAL_S = 0.1


# ------------------------------------------------------------------------- driver


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
    check_supported(train, config.expert.dtype)
    from lightreasoner_ray.engines.models import check_model_path, load_tokenizer

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

    from lightreasoner_ray.stages.ray_helpers import init_ray

    init_ray(config.ray)
    result = _fit(config, files, info, tokenizer.pad_token_id)
    outcome = result.return_value or {}
    checkpoints = checkpoints_dir(config)
    if outcome.get("nonfinite_step"):
        kept = (
            f"The last good checkpoint (update {_checkpoint_step(result.checkpoint)}) is kept under {checkpoints}"
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
    model_dir = join_path(config.output_dir, "model")
    model_record = {
        "training": provenance.to_dict(),
        "step": outcome["step"],
        "optimizer": {key: getattr(train, key) for key in ("lr", "lr_schedule", "warmup_steps", "weight_decay",
                                                          "max_grad_norm")},
        "max_steps": train.max_steps,
    }
    with result.checkpoint.as_directory() as directory:
        publish_directory(str(Path(directory, MODEL_SUBDIR)), model_dir,
                          extra_files={PROVENANCE_FILE: json.dumps(model_record, indent=2).encode("utf-8")})
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
    storage.write_json_atomic(join_path(config.output_dir, "train_summary.json"), summary)
    logger.info(
        "trained %d updates (%d selected steps, final loss %.4f) in %.1fs; model: %s; summary: %s",
        summary["steps"], summary["tuned_tokens"], summary["final_loss"], summary["wall_time_s"], model_dir,
        join_path(config.output_dir, "train_summary.json"),
    )
    return summary


def checkpoints_dir(config: Config) -> str:
    return join_path(config.output_dir, "checkpoints")


def training_outputs(config: Config) -> list[str]:
    """What the training stage writes into ``output_dir`` (``--restart`` removes these)."""
    return [checkpoints_dir(config), join_path(config.output_dir, "model"),
            join_path(config.output_dir, "train_summary.json"), join_path(config.output_dir, "train_metrics.jsonl")]


def training_provenance(config: Config, files: list[str]) -> TrainingProvenance:
    """What a run on these samples files with this config is made from."""
    return TrainingProvenance(samples=samples_fingerprint(files), expert=weights_fingerprint(config.expert.path),
                              settings=shaping_train_settings(config), samples_source=_samples_source(config))


def current_training_provenance(config: Config) -> TrainingProvenance:
    """:func:`training_provenance` of the samples the config points at, found as ``run_training`` finds them."""
    from lightreasoner_ray.engines.models import load_tokenizer

    vocab_size, _ = model_vocab_and_context(config)
    return training_provenance(config, find_samples(config, load_tokenizer(config.expert, "expert"), vocab_size))


def training_done(config: Config) -> dict[str, Any] | None:
    """The summary of a finished training run, if the published model is what this config would train.

    That is: it holds update ``train.max_steps`` and its provenance (the samples' content,
    the expert's weights, the shaping ``train.*`` settings) matches the current inputs.
    Anything else runs the training stage, which resumes, or refuses with what changed.
    """
    path = join_path(config.output_dir, "train_summary.json")
    model_dir = join_path(config.output_dir, "model")
    if not storage.exists(path) or not storage.exists(model_dir):
        return None
    summary = storage.read_json(path)
    record = read_record(join_path(model_dir, PROVENANCE_FILE))
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
    record_path = join_path(directory, PROVENANCE_FILE)
    recorded = read_record(record_path)
    has_checkpoints = _has_checkpoints(directory)
    if recorded is not None and has_checkpoints:
        changes = provenance.changes_from(TrainingProvenance.from_dict(recorded))
        if changes:
            raise refusal(f"the checkpoints in {directory}", changes, config.output_dir, "train")
        return
    if has_checkpoints:
        raise LightReasonerError(
            f"the checkpoints in {directory} have no {PROVENANCE_FILE} (made by an older version?), so nothing "
            "says which samples and settings they came from. To proceed, use a new output_dir, or re-run with "
            f"`lightreasoner train --restart` to discard them and start over in {config.output_dir}."
        )
    storage.write_json_atomic(record_path, provenance.to_dict())


def _has_checkpoints(directory: str) -> bool:
    """Whether Ray Train would resume from something here (checkpoints are ``step_*`` directories)."""
    if storage.is_uri(directory):
        return storage.exists(join_path(directory, RUN_NAME))
    run = Path(directory, RUN_NAME)
    return run.is_dir() and any(path.name.startswith("step_") for path in run.iterdir())


def model_vocab_and_context(config: Config) -> tuple[int, int]:
    """The expert's logit width and context length, from its config (no weights loaded)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(config.expert.path, trust_remote_code=config.expert.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LightReasonerError(f"cannot read the expert's config from {config.expert.path}: {exc}") from None
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    vocab_size = int(getattr(text_config, "vocab_size", 0) or 0)
    if vocab_size <= 0:
        raise LightReasonerError(f"the expert's config in {config.expert.path} has no vocab_size")
    context = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 30)
    return vocab_size, context


def check_lora_targets(config: Config) -> None:
    """Every ``train.lora.target_modules`` entry must name modules of the expert (checked on a weightless copy)."""
    lora = config.train.lora
    if not lora.enabled:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = config.expert.trust_remote_code
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.expert.path, trust_remote_code=trust),
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
    from lightreasoner_ray.engines.models import head_rows, load_tokenizer

    source = _samples_source(config).rstrip("/")
    directory = source.rsplit("/", 1)[0] if source.endswith(".parquet") else source
    record = join_path(directory.rsplit("/", 1)[0] if "/" in directory else ".", SAMPLING_SETTINGS)
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
        train_loop_config={"config": config, "pad_id": pad_id, "fault": os.environ.get(FAULT_ENV, ""),
                           "vocab_size": logit_vocab_size(config)},
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


def _checkpoint_step(checkpoint: Any) -> int:
    with checkpoint.as_directory() as directory:
        return int(json.loads(Path(directory, TRAIN_STATE_FILE).read_text())["step"])


def publish_directory(source: str, destination: str, extra_files: Optional[dict[str, bytes]] = None) -> None:
    """Copy a local directory to ``destination`` (local or URI), replacing it whole, with ``extra_files`` added."""
    if not Path(source).is_dir():
        raise LightReasonerError(f"the final checkpoint has no model directory at {source}")
    extra_files = extra_files or {}
    if storage.is_uri(destination):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(destination)
        filesystem.create_dir(inner, recursive=True)
        fs.copy_files(source, inner, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
        for name, data in extra_files.items():
            storage.write_bytes_atomic(join_path(destination, name), data)
        return
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    shutil.copytree(source, staging)
    for name, data in extra_files.items():
        Path(staging, name).write_bytes(data)
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


# ------------------------------------------------------------------------- workers


@dataclass
class TrainState:
    """What a checkpoint records beside DeepSpeed's own state (counters are global)."""

    step: int = 0
    tuned_steps: int = 0
    forward_tokens: int = 0
    train_time_s: float = 0.0
    loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Fault:
    """Test-only fault injection (see FAULT_ENV)."""

    kind: str = ""
    step: int = 0
    rank: int = 0
    marker: str = ""

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        if not spec:
            return cls()
        parts = spec.split(":", 3)
        if parts[0] == "fail" and len(parts) == 4:
            return cls("fail", int(parts[1]), int(parts[2]), parts[3])
        if parts[0] == "nan" and len(parts) == 2:
            return cls("nan", int(parts[1]))
        raise ValueError(f"{FAULT_ENV}={spec!r} is not fail:<step>:<rank>:<marker> or nan:<step>")

    def maybe_fail(self, step: int, rank: int) -> None:
        if self.kind == "fail" and step == self.step and rank == self.rank and not Path(self.marker).exists():
            Path(self.marker).write_text(f"failed once at update {step} on rank {rank}\n")
            raise RuntimeError(f"injected worker failure at update {step} on rank {rank}")

    def poisons(self, step: int) -> bool:
        return self.kind == "nan" and step == self.step


def _configure_worker_logging() -> None:
    package_logger = logging.getLogger("lightreasoner_ray")
    package_logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)


def _read_trajectories() -> list[Trajectory]:
    """Every trajectory of the samples (the dataset is not split: each rank plans all updates)."""
    import ray.train

    dataset = ray.train.get_dataset_shard("train")
    trajectories: list[Trajectory] = []
    for batch in dataset.iter_batches(batch_size=1024, batch_format="pyarrow"):
        trajectories.extend(trajectories_from_table(batch))
    return trajectories


@dataclass
class LoadedModel:
    causal_lm: Any  # peft-wrapped for LoRA
    zero3_context: Any  # keep alive while training: transformers holds it by weak reference
    parameters: int  # elements of the base model
    parameters_held: int  # elements this rank materialised when loading it


def build_causal_lm(config: Config, ds_config: dict[str, Any], bf16: bool) -> LoadedModel:
    """The expert to train.

    Under ZeRO-3, ``HfDeepSpeedConfig`` makes ``from_pretrained`` build the model
    inside ``deepspeed.zero.Init``: each rank materialises only its partition.
    """
    from transformers import AutoModelForCausalLM

    train = config.train
    zero3_context = None
    if train.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_context = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        config.expert.path,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        trust_remote_code=config.expert.trust_remote_code,
    )
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        # Same seed on every rank: identical adapter initialisation everywhere.
        torch.manual_seed(train.seed)
        lora = LoraConfig(
            r=train.lora.r,
            lora_alpha=train.lora.alpha,
            lora_dropout=train.lora.dropout,
            target_modules=list(train.lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise LightReasonerError(f"train.lora.target_modules={train.lora.target_modules}: {exc}") from None
    return LoadedModel(model, zero3_context, parameters, held)


def rank_micro_batches(plan: UpdatePlan, update: int, rank: int, pad_id: int) -> list[MicroBatch]:
    """This rank's collated micro-batches of one update (placeholders where its share ran out)."""
    return [collate(pieces, pad_id) if pieces else placeholder_micro_batch(pad_id)
            for pieces in plan.micro_batches(update, rank)]


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


class MetricsLog:
    """``<output_dir>/train_metrics.jsonl``, one line per logged update, truncated on resume."""

    def __init__(self, path: str, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if storage.exists(path):
            text = storage.read_text(path)
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                if isinstance(row, dict) and int(row.get("step", 0)) <= resume_step:
                    self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        storage.write_bytes_atomic(self.path, text.encode("utf-8"))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if storage.is_uri(self.path):
            self._rewrite()  # object stores cannot append
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point on every worker."""
    import deepspeed
    import ray.train

    from lightreasoner_ray.core.loss import SelectedStepLogits, step_kl, update_loss_scale
    from lightreasoner_ray.engines.models import default_device

    _configure_worker_logging()
    config: Config = loop_config["config"]
    train = config.train
    pad_id = int(loop_config["pad_id"])
    fault = Fault.parse(loop_config.get("fault", ""))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = default_device()
    bf16 = use_bf16(device.type, config.expert.dtype)
    ds_config = deepspeed_config(train, bf16, on_gpu=device.type == "cuda", world_size=world_size)

    plan = UpdatePlan(_read_trajectories(), train.steps_per_update, world_size, train.micro_batch_steps, train.seed)
    if rank == 0:
        logger.info("%d trajectories, %d selected steps an epoch; %d steps an update over %d workers, %d micro-batches "
                    "of at most %d steps per worker and update", len(plan.trajectories), plan.steps_per_epoch,
                    train.steps_per_update, world_size, plan.micro_batches_per_rank, train.micro_batch_steps)
        if plan.steps_per_epoch < train.steps_per_update:
            logger.warning("train.steps_per_update=%d is more than the %d selected steps of the samples: every update "
                           "spans more than an epoch, so some steps count twice in it", train.steps_per_update,
                           plan.steps_per_epoch)
    loaded = build_causal_lm(config, ds_config, bf16)
    causal_lm = loaded.causal_lm
    logger.info("worker %d: loaded %d of the model's %d parameters (ZeRO stage %d)", rank, loaded.parameters_held,
                loaded.parameters, train.deepspeed.stage)
    trainable = [p for p in causal_lm.parameters() if p.requires_grad]

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda update: lr_multiplier(update, train.warmup_steps, train.max_steps, train.lr_schedule)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=SelectedStepLogits(causal_lm, loop_config.get("vocab_size")), model_parameters=trainable, config=ds_config, lr_scheduler=scheduler
    )
    state, latest_has_model = _restore(engine, train.lora.enabled, train)
    resumed_from = state.step
    metrics_log = (
        MetricsLog(join_path(config.output_dir, "train_metrics.jsonl"), state.step) if rank == 0 else None
    )
    if rank == 0:
        logger.info("%s at update %d of %d", "resuming" if state.step else "starting", state.step, train.max_steps)
        if state.step > train.max_steps:
            logger.warning("the latest checkpoint is at update %d, beyond train.max_steps=%d: nothing to train, the "
                           "model is the one at update %d", state.step, train.max_steps, state.step)
    engine.train()
    nonfinite_step = 0
    for step in range(state.step + 1, train.max_steps + 1):
        update_started = time.perf_counter()
        fault.maybe_fail(step, rank)
        # Dropout masks depend on the update, not on how many restarts happened.
        torch.manual_seed(train.seed * 1_000_003 + step * 1009 + rank)
        batches = rank_micro_batches(plan, step, rank, pad_id)
        local_steps = sum(batch.num_steps for batch in batches)
        local_tokens = sum(batch.forward_tokens for batch in batches)
        scale = update_loss_scale(world_size, len(batches), train.steps_per_update)
        lr = float(engine.get_lr()[0])
        local_kl = torch.zeros((), dtype=torch.float64, device=device)
        for index, batch in enumerate(batches):
            kl_sum = step_kl(engine, batch.to(device)).sum()
            if fault.poisons(step):
                kl_sum = kl_sum * float("nan")
            engine.backward(kl_sum * scale)
            local_kl += kl_sum.detach().double()
            if index < len(batches) - 1:
                engine.step()
        kl_total, tokens_total, steps_total = _all_reduce_sum(
            [float(local_kl), float(local_tokens), float(local_steps)], device
        )
        update_steps = int(steps_total)
        if update_steps != train.steps_per_update:
            raise RuntimeError(f"update {step} trained {update_steps} selected steps, planned {train.steps_per_update}")
        loss = kl_total / update_steps
        if not math.isfinite(loss):
            # Every rank sees the same reduced loss, so all stop here together,
            # before the optimizer applies anything.
            nonfinite_step = step
            if metrics_log is not None:
                metrics_log.append({"step": step, "loss": None, "nonfinite": True})
                logger.error("update %d: the loss is not finite; stopping at the last good checkpoint", step)
            break
        engine.step()
        latest_has_model = False
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            # The update is applied and the weights are suspect: stop before any checkpoint holds them.
            nonfinite_step = step
            if metrics_log is not None:
                metrics_log.append({"step": step, "loss": loss, "grad_norm": None, "nonfinite": True})
                logger.error("update %d: the gradient norm is not finite; stopping at the last good checkpoint", step)
            break
        elapsed = time.perf_counter() - update_started
        state.step = step
        state.tuned_steps += update_steps
        state.forward_tokens += int(tokens_total)
        state.train_time_s += elapsed
        state.loss = loss
        metrics = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "selected_steps": update_steps,
            "forward_tokens": int(tokens_total),
            "steps_per_s": update_steps / elapsed,
            "tokens_per_s": tokens_total / elapsed,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "epoch": plan.epoch_of(step),
            "tuned_steps": state.tuned_steps,
        }
        final = step == train.max_steps
        if step % train.checkpoint_every == 0 or final:
            _save_checkpoint(engine, causal_lm, config, state, metrics, rank, final)
            latest_has_model = final
        elif step % train.log_every == 0:
            ray.train.report(metrics)
        if metrics_log is not None and (step % train.log_every == 0 or final):
            metrics_log.append(metrics)
            record_train_step(step, loss, lr)
            logger.info(
                "update %d/%d  loss %.4f  lr %.2e  %.1f selected steps/s  %.0f tokens/s",
                step, train.max_steps, loss, lr, metrics["steps_per_s"], metrics["tokens_per_s"],
            )
    if not nonfinite_step and not latest_has_model:
        # Resumed at or past max_steps from a checkpoint that holds no final model.
        _save_checkpoint(engine, causal_lm, config, state, {"step": state.step, "loss": state.loss}, rank,
                         final=True, name_suffix="-final")
    return {
        **state.to_dict(),
        "nonfinite_step": nonfinite_step,
        "resumed_from_step": resumed_from,
        "precision": "bf16" if bf16 else "fp32",
        "parameters": loaded.parameters,
        "parameters_loaded_per_rank": loaded.parameters_held,
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
    }


def _restore(engine: Any, lora: bool, train: Optional[TrainConfig] = None) -> tuple[TrainState, bool]:
    """The state of the latest checkpoint (a fresh one without), and whether it holds the final model.

    With ``train``, the config's optimizer settings replace the checkpoint's (see
    :func:`apply_optimizer_settings`).
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), False
    with checkpoint.as_directory() as directory:
        load_path, _ = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=not lora)
        if load_path is None:
            raise LightReasonerError(f"cannot load the DeepSpeed state from checkpoint {directory}")
        state = TrainState(**json.loads(Path(directory, TRAIN_STATE_FILE).read_text()))
        if train is not None:
            apply_optimizer_settings(engine.lr_scheduler, train)
        return state, Path(directory, MODEL_SUBDIR).is_dir()


def apply_optimizer_settings(scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainConfig) -> None:
    """Make the config's lr, schedule and weight decay win over a loaded checkpoint's.

    Loading restores the optimizer's param groups (lr, weight_decay) and the
    scheduler's ``base_lrs``, so a re-run with a lowered ``train.lr`` would otherwise
    keep the old rate. The schedule's position (``last_epoch``, the updates done) is
    kept; its multiplier comes from the config's warm-up, schedule and max_steps (the
    scheduler's lambda is built from the config and not restored).
    """
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [train.lr] * len(groups)
    multiplier = lr_multiplier(scheduler.last_epoch, train.warmup_steps, train.max_steps, train.lr_schedule)
    for group in groups:
        group["initial_lr"] = train.lr
        group["lr"] = train.lr * multiplier
        if "weight_decay" in group:
            group["weight_decay"] = train.weight_decay
    scheduler._last_lr = [group["lr"] for group in groups]


def _save_checkpoint(
    engine: Any, causal_lm: Any, config: Config, state: TrainState, metrics: dict[str, Any], rank: int, final: bool,
    name_suffix: str = "",
) -> None:
    """DeepSpeed state of every rank + the step counter (+ the HF model at the end), via ray.train.report."""
    import ray.train
    from ray.train import Checkpoint

    lora = config.train.lora.enabled
    with tempfile.TemporaryDirectory(prefix="lightreasoner-checkpoint-") as directory:
        # Frozen base weights never change under LoRA: keep them out of every checkpoint.
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, exclude_frozen_parameters=lora)
        if final:
            save_hf_model(engine, causal_lm, config, str(Path(directory, MODEL_SUBDIR)), rank)
        if rank == 0:
            Path(directory, TRAIN_STATE_FILE).write_text(json.dumps(state.to_dict()))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"step_{state.step:07d}{name_suffix}")


def save_hf_model(engine: Any, causal_lm: Any, config: Config, directory: str, rank: int) -> None:
    """Rank 0 writes the PEFT adapter (LoRA) or the HF model (full), with the tokenizer.

    Under ZeRO-3 the weights are partitioned: every rank joins the gathering, one
    module at a time, and rank 0 receives the consolidated tensors.
    """
    lora = config.train.lora.enabled
    state_dict = None
    if config.train.deepspeed.stage == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
        if rank == 0:
            prefix = "causal_lm."
            state_dict = {key[len(prefix):]: value for key, value in gathered.items() if key.startswith(prefix)}
    if rank != 0:
        return
    from lightreasoner_ray.engines.models import load_tokenizer

    causal_lm.save_pretrained(directory, state_dict=state_dict)
    load_tokenizer(config.expert, "expert").save_pretrained(directory)
