"""A written memory model of each stage's processes, and the GPU settings it recommends.

Terms (bytes), from a model's config.json:

* weights: parameters x bytes per parameter (tied heads counted once);
* LoRA: r x (in + out) per adapted projection, plus its fp32 master, gradient and two Adam moments;
* optimizer state (full fine-tuning): fp32 gradient + two fp32 Adam moments (+ an fp32 master
  copy when the weights are bf16), divided by the ranks under ZeRO-2 (optimizer + gradients)
  or ZeRO-3 (also the weights);
* activations: training keeps per token and layer about 6 hidden + 4 MLP-wide values
  (no gradient checkpointing); inference keeps one layer's transient (3 MLP-wide values);
* LM-head chunks: the sampler projects ``position_chunk`` positions of both models at once,
  fp32, ~6 buffers of ``chunk x vocab``; the trainer projects its selected steps (x3 with
  the backward pass);
* KV cache: 2 x layers x kv heads x head dim x tokens x bytes (HF generate; vLLM's is the
  configured ``kv_cache_memory_bytes`` or its share of the GPU);
* a per-process runtime: Python + torch + transformers (+ Ray worker, DeepSpeed, vLLM).

``predict_cpu_stage(work)`` predicts the peak resident set of each role of a bench/real_scale.py
stage on CPU (fp32). ``gpu_plan(preset, card_gb)`` computes what each stage needs per GPU
in bf16 and the resource settings that follow (docs/scale.md, the presets).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lightreasoner_ray.engines.generation import TEACHER_FORCED_TOKENS
from lightreasoner_ray.stages.training.deepspeed_config import CPU_BUCKET_ELEMENTS, CPU_SUB_GROUP_ELEMENTS

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30

# Per-process runtime (RSS of a process of that role that has imported what it imports,
# before model work), measured on the 2-core CPU machine at 2-layer real-width models:
# python+torch+transformers (+ Ray in actors, + DeepSpeed and gloo in train workers).
RUNTIME_CPU = {"driver": 0.75e9, "sampler": 0.75e9, "train worker": 0.8e9, "evaluator": 0.6e9, "vllm": 1.2e9}
# vLLM's start-up profile run: logits of max_num_batched_tokens (= max_model_len on CPU) positions, ~2 buffers.
VLLM_PROFILE_TOKENS = 1024
# DeepSpeed's defaults (GPU workers): reduce_bucket_size 5e8 elements (the gradient bucket).
DEEPSPEED_REDUCE_BUCKET = 500_000_000
# CPU workers use smaller buckets and optimizer sub-groups: CPU_BUCKET_ELEMENTS, CPU_SUB_GROUP_ELEMENTS.
# DeepSpeed's default ZeRO-3 optimizer sub-group (GPU workers): effectively the whole partition.
DEEPSPEED_SUB_GROUP = 1_000_000_000
# On a GPU: the CUDA context and the caching allocator's slack.
RUNTIME_GPU = 1.0e9


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def lora_parameters(self, r: int = 8) -> int:
        kv = self.kv_heads * self.head_dim
        return self.layers * r * ((self.hidden + self.hidden) + (self.hidden + kv))  # q_proj, v_proj


def shape_of(path_or_shape: str, layers: int | None = None) -> Shape:
    """A model directory's config.json, or a ``lightreasoner_ray/toy/shapes`` name."""
    path = Path(path_or_shape)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    else:
        config = json.loads((ROOT / "lightreasoner_ray" / "toy" / "shapes" / f"{path_or_shape}.json").read_text())["config"]
    return Shape(config["hidden_size"], config["intermediate_size"], layers or config["num_hidden_layers"],
                 config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"],
                 bool(config.get("tie_word_embeddings", False)))


def weights(shape: Shape, dtype_bytes: int) -> float:
    return shape.parameters * dtype_bytes


def mapped_resident(shape: Shape, dtype_bytes: int) -> float:
    """Weights resident in a CPU process that memory-maps them (fp32 files loaded as fp32): an untied
    input embedding is only read at the rows of the tokens seen, so its pages mostly stay on disk."""
    untouched = 0 if shape.tied else shape.vocab * shape.hidden * dtype_bytes
    return weights(shape, dtype_bytes) - untouched


def inference_transient(shape: Shape, tokens: int, dtype_bytes: int) -> float:
    """One layer's transient while a batch of ``tokens`` positions goes through (MLP dominates)."""
    return tokens * (3 * shape.intermediate + 4 * shape.hidden) * dtype_bytes


def generation_extra(expert: Shape, batch: int, prompt: int, new_tokens: int, dtype_bytes: int) -> float:
    """HF generate on top of the weights: the KV cache at full length, the prefill's transient, last-token logits."""
    vocab = expert.vocab
    return (batch * (prompt + new_tokens) * expert.kv_bytes_per_token(dtype_bytes)
            + inference_transient(expert, batch * prompt, dtype_bytes) + 2 * batch * vocab * 4)


# Ids in a soft label's support (the alpha-plausible tokens) per selected step. Random-weight
# models have flat distributions: ~1,300 ids a step measured at the real shapes (sample-hf).
# Trained checkpoints are peaked: a handful (assumed 16 for the GPU plan).
SUPPORT_RANDOM, SUPPORT_TRAINED = 1300, 16
# A soft-label entry while the batch's rows are Python lists: an int and a float object and two list slots.
PYTHON_LABEL_ENTRY = 68


def contrast_extra(expert: Shape, amateur: Shape, batch: int, prompt: int, new_tokens: int, dtype_bytes: int,
                   chunk: int = 64, support: int = SUPPORT_TRAINED) -> float:
    """The sampler's contrast on top of the weights: one teacher-forced sub-batch at a time (no KV
    cache; at most TEACHER_FORCED_TOKENS padded tokens, or one sequence), the completion's final
    hidden states of both models, the fp32 LM-head chunk of both models, and the batch's soft
    labels as Python lists (every position selected, at worst)."""
    length = prompt + new_tokens
    sequence = min(batch, max(1, TEACHER_FORCED_TOKENS // length)) * length
    vocab = min(expert.vocab, amateur.vocab)
    body = max(inference_transient(expert, sequence, dtype_bytes), inference_transient(amateur, sequence, dtype_bytes))
    residual = 2 * sequence * expert.hidden * dtype_bytes
    kept_hidden = batch * new_tokens * (expert.hidden + amateur.hidden) * dtype_bytes
    labels = batch * new_tokens * support * PYTHON_LABEL_ENTRY
    return body + residual + kept_hidden + 6 * chunk * vocab * 4 + labels


def sampler_peak(expert: Shape, amateur: Shape, batch: int, prompt: int, new_tokens: int, dtype_bytes: int,
                 chunk: int = 64) -> float:
    """One sampling actor with the HF engine: the pair, plus the larger of generation and the contrast."""
    pair = weights(expert, dtype_bytes) + weights(amateur, dtype_bytes)
    return pair + max(generation_extra(expert, batch, prompt, new_tokens, dtype_bytes),
                      contrast_extra(expert, amateur, batch, prompt, new_tokens, dtype_bytes, chunk))


def vllm_peak(model: Shape, dtype_bytes: int, kv_bytes: float, profile_tokens: int = VLLM_PROFILE_TOKENS) -> float:
    """A vLLM engine: its own copy of the weights, its KV cache, the profile run's logits."""
    return weights(model, dtype_bytes) + kv_bytes + 2 * profile_tokens * model.vocab * 4


def train_worker_peak(model: Shape, workers: int, zero: int, lora: bool, dtype_bytes: int, tokens: int,
                      selected: int, master_fp32: bool = True, cpu: bool = False) -> float:
    """One training rank: weights (partitioned under ZeRO-3), optimizer state, activations, head.

    ``tokens``: the padded tokens of the largest micro-batch a rank runs (rows x longest row).
    """
    params = model.parameters
    embedding = model.vocab * model.hidden
    if zero == 3:
        # Each rank keeps its partition; a forward gathers a layer at a time (two with prefetch) and the embedding.
        resident = params * dtype_bytes / workers
        layer = (params - embedding * (1 if model.tied else 2)) / max(model.layers, 1)
        gathered = 2 * layer * dtype_bytes + embedding * dtype_bytes
    else:
        resident, gathered = params * dtype_bytes, 0.0
    trainable = model.lora_parameters() if lora else params
    # DeepSpeed keeps an fp32 master partition, fp32 gradients and two Adam moments of what it trains.
    state = trainable * (4 * master_fp32 + 4 + 8) / (workers if (zero >= 2 and not lora) else 1)
    bucket = 0.0
    if zero == 3:
        # The reduce bucket, and the copy of one optimizer sub-group's gradient partition made before each step.
        bucket = (min(CPU_BUCKET_ELEMENTS if cpu else DEEPSPEED_REDUCE_BUCKET, trainable)
                  + min(CPU_SUB_GROUP_ELEMENTS if cpu else DEEPSPEED_SUB_GROUP, trainable / workers)) * 4
    embedding_grad = embedding * 4 if (zero == 3 and not lora) else 0
    activations = tokens * model.layers * (6 * model.hidden + 4 * model.intermediate) * dtype_bytes
    head = 3 * selected * model.vocab * 4
    return resident + gathered + state + bucket + embedding_grad + activations + head


# ----------------------------------------------------------------------------- CPU predictions

SAMPLING_PROMPT = 96  # the reference sampling prompt (system + chat template + a GSM8K question), tokens
VLLM_CPU_KV = 256 * 2**20


def predict_cpu_stage(work: dict) -> dict[str, float]:
    """Peak RSS per role of one bench/real_scale.py stage on CPU (fp32 weights and compute)."""
    fp32 = 4
    kind = work.get("kind")
    prompt = SAMPLING_PROMPT
    if kind == "contrast":
        expert, amateur = shape_of(work["expert"]), shape_of(work["amateur"])
        pair = mapped_resident(expert, fp32) + mapped_resident(amateur, fp32)
        extra = contrast_extra(expert, amateur, work["batch"], prompt, work["new_tokens"], fp32, support=SUPPORT_RANDOM)
        return {"sampler": RUNTIME_CPU["sampler"] + pair + extra}
    if kind == "sample":
        expert, amateur = shape_of(work["expert"]), shape_of(work["amateur"])
        batch, new_tokens = work.get("batch", 8), work["new_tokens"]
        roles = {"driver": RUNTIME_CPU["driver"]}
        pair = mapped_resident(expert, fp32) + mapped_resident(amateur, fp32)
        if work.get("engine", "hf") == "vllm":
            roles["sampler"] = RUNTIME_CPU["sampler"] + pair + contrast_extra(
                expert, amateur, batch, prompt, new_tokens, fp32, support=SUPPORT_RANDOM)
            roles["vllm engine"] = RUNTIME_CPU["vllm"] + vllm_peak(expert, fp32, VLLM_CPU_KV)
        else:
            extra = max(generation_extra(expert, batch, prompt, new_tokens, fp32),
                        contrast_extra(expert, amateur, batch, prompt, new_tokens, fp32, support=SUPPORT_RANDOM))
            roles["sampler"] = RUNTIME_CPU["sampler"] + pair + extra
        return roles
    if kind == "train":
        model = shape_of(work["expert"])
        # The largest micro-batch a rank ran (bench/real_scale.py reads it from the samples' plan),
        # else a guess: up to 8 selected steps from ~2 trajectories.
        tokens = work.get("micro_batch_tokens") or 2 * (prompt + work.get("new_tokens", 64))
        peak = train_worker_peak(model, work.get("workers", 2), work["zero"], work["lora"], fp32, tokens, 8, cpu=True)
        return {"train worker": RUNTIME_CPU["train worker"] + peak, "driver": RUNTIME_CPU["driver"]}
    if kind == "eval":
        model = shape_of(work["expert"])
        # The evaluator merges the adapter into its base (memory-mapped weights) and hands vLLM the merged copy.
        return {"evaluator": RUNTIME_CPU["evaluator"] + weights(model, fp32),
                "vllm engine": RUNTIME_CPU["vllm"] + vllm_peak(model, fp32, VLLM_CPU_KV),
                "driver": RUNTIME_CPU["driver"]}
    return {}


# ----------------------------------------------------------------------------- GPU plan

PRESETS = {
    # preset: expert shape, amateur shape, the card its cluster.yaml node type has (GB), training workers
    "qwen2.5-math-1.5b": ("qwen2.5-math-1.5b", "qwen2.5-0.5b", 24, 2),
    "deepseek-r1-distill-qwen-1.5b": ("deepseek-r1-distill-qwen-1.5b", "qwen2.5-0.5b", 24, 2),
    "qwen2.5-math-7b": ("qwen2.5-math-7b", "qwen2.5-0.5b", 40, 8),
}
CARDS = {"A10G 24 GB": 24, "A100 40 GB": 40, "A100 80 GB": 80, "H100 80 GB": 80}
# The preset's workload on a GPU: reference batch sizes and lengths.
SAMPLING_BATCH, SAMPLING_PROMPT_GPU, SAMPLING_NEW = 16, 160, 128
EVAL_BATCH, EVAL_PROMPT, EVAL_NEW = 32, 160, 2048
TRAIN_TOKENS = 1024  # a micro-batch: up to 8 selected steps from up to ~4 trajectories of ~290 tokens


def gpu_needs(expert_name: str, amateur_name: str, workers: int) -> dict[str, float]:
    """Bytes each stage needs on one GPU in bf16 (computed from this model, not measured)."""
    bf16 = 2
    expert, amateur = shape_of(expert_name), shape_of(amateur_name)
    eval_kv = EVAL_BATCH * (EVAL_PROMPT + EVAL_NEW) * expert.kv_bytes_per_token(bf16)
    needs = {
        "sampling": RUNTIME_GPU + sampler_peak(expert, amateur, SAMPLING_BATCH, SAMPLING_PROMPT_GPU, SAMPLING_NEW, bf16),
        "evaluation": RUNTIME_GPU + weights(expert, bf16) + eval_kv,
    }
    for zero in (2, 3):
        needs[f"train ZeRO-{zero}"] = RUNTIME_GPU + train_worker_peak(expert, workers, zero, True, bf16, TRAIN_TOKENS, 8)
    return needs


def recommend(preset: str, card_gb: float | None = None) -> dict:
    """Resource settings for ``preset`` on a card of ``card_gb`` GB (default: the preset's card).

    * ``sampling.gpus_per_actor``: 0.5 when two actors (HF pair + generation/contrast each) fit in
      90% of the card, else 1;
    * ``train.deepspeed.stage``: 2 when the whole bf16 model, activations and LoRA state fit in 80%
      of the card (ZeRO-2 keeps frozen weights whole and communicates least), else 3; with the
      preset's workers (one a GPU of its node type);
    * ``sampling.vllm.gpu_memory_utilization``: the share vLLM may take beside the HF pair in a
      sampling actor (in steps of 0.05); ``eval.vllm.gpu_memory_utilization``: 0.9 (alone on its GPU).
    """
    expert_name, amateur_name, default_card, workers = PRESETS[preset]
    card = (card_gb or default_card) * 1e9
    needs = gpu_needs(expert_name, amateur_name, workers)
    gpus_per_actor = 0.5 if 2 * needs["sampling"] <= 0.9 * card else 1
    zero = 2 if needs["train ZeRO-2"] <= 0.8 * card else 3
    share = math.floor((gpus_per_actor * card * 0.9 - needs["sampling"]) / card * 20) / 20
    return {"sampling.gpus_per_actor": gpus_per_actor, "train.num_workers": workers, "train.deepspeed.stage": zero,
            "sampling.vllm.gpu_memory_utilization": round(max(0.05, share), 2),
            "eval.vllm.gpu_memory_utilization": 0.9, "fits": needs[f"train ZeRO-{zero}"] <= 0.9 * card
            and needs["evaluation"] <= 0.9 * card, "card_gb": card / 1e9,
            "needs_gb": {k: round(v / 1e9, 1) for k, v in needs.items()}}


def gpu_plan_markdown() -> str:
    """docs/scale.md's computed tables: what each stage needs per GPU, and the settings that follow."""
    lines = ["| preset | stage | needs per GPU (bf16, GB) |", "|---|---|---:|"]
    for name, (expert, amateur, _, workers) in PRESETS.items():
        needs = gpu_needs(expert, amateur, workers)
        labels = {"sampling": f"sampling, one actor (HF pair, batch {SAMPLING_BATCH}, {SAMPLING_NEW} new tokens)",
                  "evaluation": f"evaluation, vLLM weights + KV cache for {EVAL_BATCH} x {EVAL_PROMPT + EVAL_NEW} tokens",
                  "train ZeRO-2": f"training LoRA, ZeRO-2, {workers} workers", "train ZeRO-3": f"training LoRA, ZeRO-3, {workers} workers"}
        for key, label in labels.items():
            lines.append(f"| {name} | {label} | {needs[key] / 1e9:.1f} |")
    lines += ["", "| preset | card | sampling.gpus_per_actor | sampling.vllm.gpu_memory_utilization | train.num_workers | "
              "train.deepspeed.stage | eval.vllm.gpu_memory_utilization |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in PRESETS:
        for label, gb in CARDS.items():
            r = recommend(name, gb)
            mark = " (the preset)" if gb == PRESETS[name][2] and not (gb == 80 and label.startswith("H100")) else ""
            lines.append(f"| {name} | {label}{mark} | {r['sampling.gpus_per_actor']} | "
                         f"{r['sampling.vllm.gpu_memory_utilization']} | {r['train.num_workers']} | "
                         f"{r['train.deepspeed.stage']} | {r['eval.vllm.gpu_memory_utilization']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv:
        print(gpu_plan_markdown())
    else:
        for name in PRESETS:
            for label, gb in CARDS.items():
                print(f"{name:<30} {label:<11}", recommend(name, gb))
