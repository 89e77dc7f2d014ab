"""The training stage's workers: ``train_worker``, the Ray Train entry point run by every rank.

Every rank reads all trajectories and computes the same ``UpdatePlan``
(core/update_plan.py): one global seeded order of selected steps, cut into updates of
exactly ``train.steps_per_update`` steps across all ranks, each rank's share packed into
micro-batches. They build the expert (LoRA via peft by default; under ZeRO-3 inside
``deepspeed.zero.Init`` so no worker holds it whole), resume from the latest Ray Train
checkpoint if there is one, and run the updates. Every rank runs the same number of
forward/backward calls per update (a short share is padded with weightless
placeholders), which ZeRO-3's collective parameter gathering requires. Checkpoints
(checkpoints.py) go through ``ray.train.report`` every ``train.checkpoint_every``
updates and at the end; a re-run or a restarted worker group resumes from the latest:
the plan of update k depends on k alone, so exactly the updates already trained are
skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightreasoner_ray.config import Config
from lightreasoner_ray.core.loss import SelectedStepLogits, step_loss, update_loss_scale
from lightreasoner_ray.core.schedule import lr_multiplier
from lightreasoner_ray.core.update_plan import MicroBatch, Trajectory, UpdatePlan, collate, placeholder_micro_batch
from lightreasoner_ray.data.samples import trajectories_from_table
from lightreasoner_ray.engines.models import default_device
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.test_seam import adopt, altered, reached
from lightreasoner_ray.stages.training.checkpoints import restore_checkpoint, save_checkpoint
from lightreasoner_ray.stages.training.deepspeed_config import deepspeed_config, use_bf16
from lightreasoner_ray.stages.training.host_memory import return_freed_memory
from lightreasoner_ray.stages.training.metrics_log import TrainMetricsLog
from lightreasoner_ray.stages.training.zero3_weights import coverage, load_partitions, weight_files
from lightreasoner_ray.ui.prometheus import record_train_step

logger = logging.getLogger(__name__)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point on every worker."""
    import deepspeed
    import ray.train

    _configure_worker_logging()
    adopt(loop_config.get("test_environment"))
    config: Config = loop_config["config"]
    train = config.train
    pad_id = int(loop_config["pad_id"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = default_device()
    if device.type == "cpu":
        return_freed_memory()
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
    reached("train.model_loading", rank=rank)
    loaded = build_causal_lm(config, ds_config, bf16)
    reached("train.model_loaded", rank=rank)
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
    checkpoint_root = loop_config.get("checkpoint_root")
    state, latest_has_model = restore_checkpoint(engine, train.lora.enabled, train, rank, world_size, checkpoint_root)
    resumed_from = state.step
    metrics_log = (
        TrainMetricsLog(RunLayout(config.output_dir).train_metrics, state.step) if rank == 0 else None
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
        reached("train.update_started", step=step, rank=rank)
        # Dropout masks depend on the update, not on how many restarts happened.
        torch.manual_seed(train.seed * 1_000_003 + step * 1009 + rank)
        batches = rank_micro_batches(plan, step, rank, pad_id)
        local_steps = sum(batch.num_steps for batch in batches)
        local_tokens = sum(batch.forward_tokens for batch in batches)
        scale = update_loss_scale(world_size, len(batches), train.steps_per_update)
        lr = float(engine.get_lr()[0])
        local_kl = torch.zeros((), dtype=torch.float64, device=device)
        for index, batch in enumerate(batches):
            kl_sum = step_loss(engine, batch.to(device), train.divergence, train.jsd_beta,
                               train.anchor_weight).sum()
            kl_sum = altered("train.micro_batch_loss", kl_sum, step=step, rank=rank)
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
            save_checkpoint(engine, causal_lm, config, state, metrics, rank, final, world_size=world_size,
                            checkpoint_root=checkpoint_root)
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
        save_checkpoint(engine, causal_lm, config, state, {"step": state.step, "loss": state.loss}, rank,
                         final=True, name_suffix="-final", world_size=world_size, checkpoint_root=checkpoint_root)
    return {
        **state.to_dict(),
        "nonfinite_step": nonfinite_step,
        "resumed_from_step": resumed_from,
        "precision": "bf16" if bf16 else "fp32",
        "parameters": loaded.parameters,
        "parameters_loaded_per_rank": loaded.parameters_held,
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
    }


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

    Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (each parameter is
    partitioned as soon as its module exists) and every rank copies only its own slice
    of each weight from the safetensors files (zero3_weights.py): no rank holds the
    whole model at any moment. A model without safetensors weights, or whose weight
    names or shapes need transformers' conversions, is loaded by transformers' ZeRO-3
    path instead, which reads the whole checkpoint on every rank (a warning says so).
    ``HfDeepSpeedConfig`` stays alive either way: transformers and peft consult it.
    """
    from transformers import AutoModelForCausalLM

    train = config.train
    dtype = torch.bfloat16 if bf16 else torch.float32
    zero3_context = None
    model = None
    if train.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_context = HfDeepSpeedConfig(ds_config)
        model = _build_zero3_partitioned(config, ds_config, dtype)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            config.expert.path,
            dtype=dtype,
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


def _build_zero3_partitioned(config: Config, ds_config: dict[str, Any], dtype: torch.dtype) -> Any:
    """The expert built under ``deepspeed.zero.Init`` and filled slice by slice; None to fall back to transformers.

    The model is built the way transformers builds one under ZeRO-3 (no weight
    initialisation, RoPE buffers kept in their own dtype, ``zero.Init``), except that
    transformers' own ``zero.Init`` and its gathered random initialisation of every
    module are skipped: every weight is then overwritten from the files.
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path, trust = config.expert.path, config.expert.trust_remote_code
    files = weight_files(_local_model_dir(path))
    if files is None:
        logger.warning("%s has no safetensors weights: loading it through transformers, which reads the whole "
                       "checkpoint on every worker", path)
        return None
    try:
        from transformers.initialization import no_init_weights
        from transformers.modeling_utils import set_zero3_state
    except ImportError as exc:
        logger.warning("this transformers version lacks %s: loading %s through transformers, which reads the whole "
                       "checkpoint on every worker", exc, path)
        return None
    try:  # transformers up to 5.18 keeps RoPE's arange in its own dtype under zero.Init; later ones need nothing
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        prevent_arange_dtype_change = contextlib.nullcontext
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    # Imports must not happen inside zero.Init, which patches tensor creation: torch._dynamo
    # checks torch.Tensor.__new__'s signature when first imported (a lazy import by the
    # model's module would fail there).
    import torch._dynamo  # noqa: F401

    try:
        AutoModelForCausalLM._model_mapping[type(model_config)]  # imports the model's module
    except (KeyError, ValueError):
        pass  # remote code: imported by from_config below
    with no_init_weights(), prevent_arange_dtype_change(), _partition_without_broadcast(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state():
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=trust)
    model.tie_weights()
    found, problems = coverage(model, files)
    if problems:
        logger.warning("the weights of %s do not match %d of the model's parameters (%s): loading it through "
                       "transformers, which reads the whole checkpoint on every worker", path, len(problems),
                       "; ".join(problems[:3]) + ("..." if len(problems) > 3 else ""))
        del model
        return None
    load_partitions(model, found)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return model.eval()


@contextlib.contextmanager
def _partition_without_broadcast() -> Any:
    """Inside: ``zero.Init`` partitions each new parameter without first broadcasting it from rank 0.

    The broadcast makes randomly initialised weights agree across ranks; here nothing is
    initialised and every element is overwritten from the files (a model whose files do
    not cover it is discarded), so it would only move uninitialised memory, a whole
    parameter at a time, through every rank.
    """
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param

    def partition_only(self: Any, param: Any) -> None:
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only
    try:
        yield
    finally:
        Init._zero_init_param = original


def _local_model_dir(path: str) -> str:
    """``path``, or the local snapshot of a Hugging Face Hub id (its configs and safetensors files)."""
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # noqa: BLE001 - any failure: transformers' loader reports it in its own words
        logger.info("no local snapshot of %s (%s)", path, exc)
        return path


def rank_micro_batches(plan: UpdatePlan, update: int, rank: int, pad_id: int) -> list[MicroBatch]:
    """This rank's collated micro-batches of one update (placeholders where its share ran out)."""
    return [collate(pieces, pad_id) if pieces else placeholder_micro_batch(pad_id)
            for pieces in plan.micro_batches(update, rank)]


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
