"""The engine registry: ``sampling.engine`` / ``eval.engine`` names to engine factories."""

from __future__ import annotations

import importlib

from lightreasoner_ray.engines.base import EngineFactory
from lightreasoner_ray.engines.hf import HFEngine
from lightreasoner_ray.engines.vllm import VLLMEngine, require_vllm
from lightreasoner_ray.errors import LightReasonerError


def resolve_engine_factory(name: str, key: str = "eval.engine") -> EngineFactory:
    """``"hf"`` is :class:`HFEngine`, ``"vllm"`` the vLLM engine; ``"package.module:factory"`` imports a factory."""
    if name == "hf":
        return HFEngine
    if name == "vllm":
        require_vllm(key)
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
    if factory is VLLMEngine:
        return "vllm"
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__name__)}"
