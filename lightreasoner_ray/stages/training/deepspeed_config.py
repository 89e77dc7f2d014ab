"""DeepSpeed settings for the training workers, and the combinations we refuse.

One DeepSpeed rank drives one device: a GPU when the worker was given one (Ray sets
CUDA_VISIBLE_DEVICES), else the CPU. Precision is bf16 on GPUs that have it and
fp32 otherwise. ZeRO stage 2 partitions optimizer state and gradients; stage 3 also
partitions the parameters, and the model is then built under ``deepspeed.zero.Init``
and loaded and saved slice by slice (zero3_weights.py), so that no worker ever holds
it whole (DeepSpeed's consolidating 16-bit save is not used).
"""

from __future__ import annotations

from typing import Any

from lightreasoner_ray.config import TrainConfig
from lightreasoner_ray.core.update_plan import micro_batches_per_update
from lightreasoner_ray.errors import LightReasonerError

# Elements of gathered ZeRO-3 parameters a CPU worker may hold at once (400 MB in fp32);
# one larger parameter is still gathered whole.
CPU_MAX_LIVE_PARAMETERS = 100_000_000
# On CPU workers DeepSpeed's communication buffers and optimizer sub-groups are host memory
# too. Its defaults (5e8-element buckets, 2 GB each in fp32; one optimizer sub-group of up to
# 1e9 elements, whose gradient is copied whole before every step) are sized for GPUs with host
# memory to spare: at the 0.5B's full fine-tuning they alone took 3 GB a rank. CPU workers use
# 200 MB buckets and sub-groups of at most 400 MB.
CPU_BUCKET_ELEMENTS = 50_000_000
CPU_SUB_GROUP_ELEMENTS = 100_000_000


def check_supported(train: TrainConfig, expert_dtype: str) -> None:
    """Refuse, with the reason, settings DeepSpeed cannot serve here."""
    stage = train.deepspeed.stage
    if train.gpus_per_worker not in (0, 1):
        raise LightReasonerError(
            f"train.gpus_per_worker={train.gpus_per_worker} is not supported: each DeepSpeed rank drives exactly "
            "one GPU (NCCL cannot share a GPU between two ranks, and a second GPU would sit idle). Use 1, or 0 "
            "for CPU workers, and scale with train.num_workers."
        )
    if train.deepspeed.offload:
        if stage < 2:
            raise LightReasonerError(
                f"train.deepspeed.offload=true needs ZeRO stage 2 or 3 (got stage {stage}): DeepSpeed offloads "
                "the optimizer partitions that only those stages create"
            )
        if train.gpus_per_worker == 0:
            raise LightReasonerError(
                f"train.deepspeed.offload=true with ZeRO stage {stage} on CPU workers (train.gpus_per_worker=0) is "
                "not supported: offload moves the optimizer state"
                + (" and the parameter partitions" if stage == 3 else "")
                + " from GPU memory to host memory, and on CPU workers they already live in host memory "
                "(DeepSpeed's CPU optimizer would only add a copy). Set train.deepspeed.offload=false, or give "
                "the workers GPUs."
            )
    if expert_dtype == "float16":
        raise LightReasonerError(
            "expert.dtype=float16 is not supported for training: fp16 needs loss scaling that can silently skip "
            "updates; use auto (bf16 on GPUs that have it, else fp32), bfloat16 or float32"
        )


def use_bf16(device_type: str, expert_dtype: str) -> bool:
    """bf16 mixed precision on a bf16-capable GPU unless fp32 was asked for; fp32 on CPU."""
    if device_type != "cuda" or expert_dtype == "float32":
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())


def deepspeed_config(train: TrainConfig, bf16: bool, on_gpu: bool, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for one run on ``world_size`` ranks (default ``train.num_workers``).

    Each micro-batch is one padded batch of trajectory pieces, so DeepSpeed's "micro
    batch size" is only bookkeeping (1). Its gradient accumulation is the number of
    micro-batches every rank runs per update, which ``train.steps_per_update``,
    the world size and ``train.micro_batch_steps`` fix; the loss normalisation across
    micro-batches and ranks is done by the training loop (see ``loss.update_loss_scale``).
    """
    grad_accum = micro_batches_per_update(train.steps_per_update, world_size or train.num_workers,
                                          train.micro_batch_steps)
    stage = train.deepspeed.stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3 and not on_gpu:
        # On CPU workers gathered parameters live in host memory: release each one after use
        # and keep at most CPU_MAX_LIVE_PARAMETERS gathered (DeepSpeed's defaults keep up to
        # 1e9, the whole of a 1.5B model, gathered between forward and backward).
        zero["stage3_max_live_parameters"] = CPU_MAX_LIVE_PARAMETERS
        zero["stage3_max_reuse_distance"] = 0
        zero["sub_group_size"] = CPU_SUB_GROUP_ELEMENTS
    if stage >= 2 and not on_gpu:
        zero["reduce_bucket_size"] = CPU_BUCKET_ELEMENTS
        if stage == 2:
            zero["allgather_bucket_size"] = CPU_BUCKET_ELEMENTS
    if train.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # FusedAdam needs CUDA; the CPU Adam is what offload uses.
                "torch_adam": not on_gpu and not train.deepspeed.offload,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
