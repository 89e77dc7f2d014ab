"""Typed configuration: YAML files plus dotted ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads the YAML,
applies the overrides (values are parsed as YAML, so ``true``, ``0.4`` and
``[gsm8k,svamp]`` mean what they look like), and builds the typed tree, rejecting
unknown keys (with the valid ones listed) and values of the wrong type or range.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lightreasoner_ray.errors import LightReasonerError

SAMPLING_SYSTEM_PROMPT = "Please reason step by step."
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
    limit: Optional[int] = 1000
    shuffle: bool = True
    seed: int = 0
    skip_invalid: bool = False

    def validate(self, key: str) -> None:
        if self.limit is not None and self.limit <= 0:
            raise LightReasonerError(f"{key}.limit must be a positive integer or null, got {self.limit}")


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
    # Completion positions turned into fp32 log-probabilities at once; bounds memory
    # at a 152k vocabulary (64 x 152k x 4 B x 4 buffers ~ 160 MB).
    position_chunk: int = 64
    # Rows per Parquet file written to <output_dir>/samples/.
    rows_per_file: int = 64

    def validate(self, key: str) -> None:
        if not (0.0 < self.alpha <= 1.0):
            raise LightReasonerError(f"{key}.alpha must be in (0, 1], got {self.alpha}")
        if self.beta < 0.0:
            raise LightReasonerError(f"{key}.beta must be >= 0, got {self.beta}")
        for name in ("max_new_tokens", "batch_size", "num_actors", "position_chunk", "rows_per_file"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise LightReasonerError(f"{key}.gpus_per_actor and {key}.cpus_per_actor must be >= 0")


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
    # Selected steps per micro-batch (trajectories are packed until this is reached).
    micro_batch_steps: int = 8
    grad_accum: int = 2
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
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self, key: str) -> None:
        for name in ("max_steps", "micro_batch_steps", "grad_accum", "num_workers", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LightReasonerError(f"{key}.lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "max_grad_norm", "weight_decay", "gpus_per_worker", "cpus_per_worker"):
            if getattr(self, name) < 0:
                raise LightReasonerError(f"{key}.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise LightReasonerError(f"{key}.max_failures must be >= -1, got {self.max_failures}")
        _check_choice(f"{key}.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))


@dataclass
class EvalConfig:
    # The model to evaluate; empty means the expert. `models` evaluates several.
    model: str = ""
    models: list[str] = field(default_factory=list)
    benchmarks: list[str] = field(
        default_factory=lambda: ["gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem"]
    )
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
    # "hf" (Hugging Face generate) or an engine factory import path "package.module:factory".
    engine: str = "hf"
    # CPUs reserved by each grading task (they run alongside the evaluator actors).
    grading_cpus: float = 1.0

    def validate(self, key: str) -> None:
        for name in ("max_new_tokens", "batch_size", "shard_size", "num_actors"):
            if getattr(self, name) <= 0:
                raise LightReasonerError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        from lightreasoner_ray.benchmarks import BENCHMARKS

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
        if self.engine != "hf" and ":" not in self.engine:
            raise LightReasonerError(f"{key}.engine must be 'hf' or an import path 'package.module:factory', got {self.engine!r}")
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

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class DemoConfig:
    """``lightreasoner demo`` only: the toy problems and the repeats."""

    train_problems: int = 256
    test_problems: int = 200
    # One LightReasoner / SFT / random-step training per seed; means and spread reported.
    seeds: list[int] = field(default_factory=lambda: [0])
    # A pair trained for a few steps only (tests of the plumbing; the numbers mean nothing).
    quick: bool = False

    def validate(self, key: str) -> None:
        if self.train_problems <= 0 or self.test_problems <= 0 or not self.seeds:
            raise LightReasonerError(f"{key}.train_problems, {key}.test_problems must be > 0 and {key}.seeds non-empty")


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
    ray: RayConfig = field(default_factory=RayConfig)
    output_dir: str = "outputs/run"

    def validate(self, key: str = "") -> None:
        _validate_tree(self, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def samples_dir(self) -> str:
        return join_path(self.output_dir, "samples")


def join_path(base: str, *parts: str) -> str:
    """Join a local path or a URI (``s3://bucket/x``) with more components."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise LightReasonerError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _validate_tree(node: Any, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, _join_key(prefix, f.name))
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
            tree = yaml.safe_load(path.read_text()) or {}
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise LightReasonerError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LightReasonerError(f"{key} must be a string, got {value!r}")
    return value
