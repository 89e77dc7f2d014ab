"""Public import path for generation engines: ``from lightreasoner_ray.engine import EngineSpec``
(third-party engine factories take an :class:`EngineSpec` and return :class:`Completion` lists)."""

from lightreasoner_ray.engines.base import *  # noqa: F401,F403
from lightreasoner_ray.engines.base import Completion, EngineFactory, EngineSpec, GenerationEngine  # noqa: F401
from lightreasoner_ray.engines.hf import HFEngine, check_inference_model, load_inference_model  # noqa: F401
from lightreasoner_ray.engines.registry import factory_name, resolve_engine_factory  # noqa: F401
from lightreasoner_ray.engines.vllm import VLLM_INSTALL_HINT, require_vllm  # noqa: F401
from lightreasoner_ray.io.model_dirs import ADAPTER_CONFIG, adapter_base_path  # noqa: F401
