"""What a training checkpoint holds, and how the workers write and read it.

A checkpoint is one ``ray.train.report`` directory: the DeepSpeed state of every rank under
the tag ``deepspeed`` (frozen base weights left out under LoRA), the step counters in
``train_state.json``, and at the end the Hugging Face model (or PEFT adapter) with its
tokenizer under ``hf_model/``, which the driver publishes as ``<output_dir>/model``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lightreasoner_ray.config import Config, TrainConfig
from lightreasoner_ray.core.schedule import lr_multiplier
from lightreasoner_ray.engines.models import load_tokenizer
from lightreasoner_ray.errors import LightReasonerError

CHECKPOINT_TAG = "deepspeed"
TRAIN_STATE_FILE = "train_state.json"
MODEL_SUBDIR = "hf_model"


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


def restore_checkpoint(engine: Any, lora: bool, train: Optional[TrainConfig] = None) -> tuple[TrainState, bool]:
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


def save_checkpoint(
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
    causal_lm.save_pretrained(directory, state_dict=state_dict)
    load_tokenizer(config.expert, "expert").save_pretrained(directory)


def checkpoint_step(checkpoint: Any) -> int:
    """The update a Ray Train checkpoint was taken at."""
    with checkpoint.as_directory() as directory:
        return int(json.loads(Path(directory, TRAIN_STATE_FILE).read_text())["step"])
