"""The training stage's plain logic, without Ray or DeepSpeed running: the DeepSpeed config dict,
the refused combinations, and rank 0's metrics file across a resume."""

from __future__ import annotations

import json

import pytest

from lightreasoner_ray.config import load_config
from lightreasoner_ray.core.update_plan import micro_batches_per_update
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.stages.training.deepspeed_config import check_supported, deepspeed_config, use_bf16
from lightreasoner_ray.stages.training.metrics_log import TrainMetricsLog


def train(*overrides: str):
    return load_config(None, list(overrides)).train


@pytest.mark.parametrize("steps_per_update, workers, micro_batch_steps, expected", [
    (16, 1, 8, 2), (48, 2, 16, 2), (49, 2, 16, 2), (50, 2, 16, 2), (66, 2, 16, 3), (8, 8, 4, 1),
])
def test_gradient_accumulation_is_the_micro_batches_of_the_largest_rank_share(steps_per_update, workers,
                                                                            micro_batch_steps, expected):
    config = train(f"train.steps_per_update={steps_per_update}", f"train.num_workers={workers}",
                   f"train.micro_batch_steps={micro_batch_steps}")
    # By hand: ceil(ceil(steps / workers) / micro_batch_steps), at least 1.
    assert micro_batches_per_update(steps_per_update, workers, micro_batch_steps) == expected
    assert deepspeed_config(config, bf16=False, on_gpu=False)["gradient_accumulation_steps"] == expected
    # A world size given explicitly (the workers Ray Train actually started) wins over the config's.
    one_rank = deepspeed_config(config, bf16=False, on_gpu=False, world_size=1)
    assert one_rank["gradient_accumulation_steps"] == max(1, -(-steps_per_update // micro_batch_steps))


def test_zero_stages_offload_precision_and_optimizer():
    cpu = deepspeed_config(train("train.deepspeed.stage=2", "train.lr=3e-4", "train.weight_decay=0.1",
                                 "train.max_grad_norm=0.5"), bf16=False, on_gpu=False)
    # CPU workers keep DeepSpeed's buffers small: they are host memory there.
    assert cpu["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50_000_000,
                                        "allgather_bucket_size": 50_000_000}
    cpu3 = deepspeed_config(train("train.deepspeed.stage=3"), bf16=False, on_gpu=False)
    # ... and release each gathered parameter after use, and step the optimizer in sub-groups.
    assert cpu3["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 100_000_000,
                                         "stage3_max_reuse_distance": 0, "sub_group_size": 100_000_000,
                                         "reduce_bucket_size": 50_000_000}
    cpu1 = deepspeed_config(train("train.deepspeed.stage=1"), bf16=False, on_gpu=False)
    assert cpu1["zero_optimization"] == {"stage": 1}
    assert cpu["train_micro_batch_size_per_gpu"] == 1 and cpu["gradient_clipping"] == 0.5
    assert cpu["bf16"] == {"enabled": False} and cpu["fp16"] == {"enabled": False}
    params = cpu["optimizer"]["params"]
    assert cpu["optimizer"]["type"] == "AdamW" and (params["lr"], params["weight_decay"]) == (3e-4, 0.1)
    assert params["torch_adam"] is True  # FusedAdam needs CUDA

    gpu3 = deepspeed_config(train("train.deepspeed.stage=3", "train.deepspeed.offload=true", "train.gpus_per_worker=1"),
                            bf16=True, on_gpu=True)
    assert gpu3["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }
    assert gpu3["bf16"] == {"enabled": True} and gpu3["optimizer"]["params"]["torch_adam"] is False
    gpu2 = deepspeed_config(train("train.deepspeed.stage=2", "train.deepspeed.offload=true", "train.gpus_per_worker=1"),
                            bf16=True, on_gpu=True)
    assert gpu2["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert deepspeed_config(train("train.deepspeed.stage=0"), bf16=False, on_gpu=True)["optimizer"]["params"]["torch_adam"] is False


def test_bf16_only_on_a_gpu_and_only_unless_fp32_was_asked_for():
    assert use_bf16("cpu", "auto") is False and use_bf16("cpu", "bfloat16") is False
    assert use_bf16("cuda", "float32") is False


@pytest.mark.parametrize("overrides, dtype, words", [
    (["train.gpus_per_worker=0.5"], "auto", "each DeepSpeed rank drives exactly one GPU"),
    (["train.gpus_per_worker=2"], "auto", r"train.gpus_per_worker=2(\.0)? is not supported"),
    (["train.deepspeed.stage=1", "train.deepspeed.offload=true", "train.gpus_per_worker=1"], "auto", "needs ZeRO stage 2 or 3"),
    (["train.deepspeed.stage=2", "train.deepspeed.offload=true"], "auto", "ZeRO stage 2 on CPU workers"),
    (["train.deepspeed.stage=3", "train.deepspeed.offload=true"], "auto", "and the parameter partitions"),
    ([], "float16", "expert.dtype=float16 is not supported for training"),
])
def test_combinations_deepspeed_cannot_serve_are_refused_with_the_reason(overrides, dtype, words):
    with pytest.raises(LightReasonerError, match=words):
        check_supported(train(*overrides), dtype)


@pytest.mark.parametrize("overrides, dtype", [
    ([], "auto"), (["train.gpus_per_worker=1", "train.deepspeed.stage=3", "train.deepspeed.offload=true"], "bfloat16"),
    (["train.deepspeed.stage=0"], "float32"),
])
def test_supported_combinations_pass(overrides, dtype):
    check_supported(train(*overrides), dtype)


def test_the_metrics_log_keeps_the_updates_a_resume_starts_from_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, 6)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 6, "lo')  # killed mid-write
    log = TrainMetricsLog(str(path), resume_step=3)
    assert log.rows == rows[:3]
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]  # rewritten at once
    log.append({"step": 4, "loss": 0.2})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert TrainMetricsLog(str(path), resume_step=0).rows == [] and path.read_text() == ""
    fresh = TrainMetricsLog(str(tmp_path / "new.jsonl"), resume_step=0)
    assert fresh.rows == [] and (tmp_path / "new.jsonl").read_text() == ""
