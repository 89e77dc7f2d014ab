"""The contrastive sampler: one expert/amateur pair on one device.

``ContrastiveSampler`` is a plain class (no Ray import) that Ray Data instantiates
once per actor through ``map_batches``. For a batch of problems it generates the
expert's greedy completions, runs ONE teacher-forced forward pass of each model over
prompt + completion, contrasts the two at every completion position and returns one
row per trajectory in the samples schema.
"""

from __future__ import annotations

import hashlib

import logging
import time
from typing import Any, Sequence

import pyarrow as pa

from lightreasoner_ray.config import ModelConfig, VLLMConfig
from lightreasoner_ray.core.contrast import ContrastResult, contrast_positions
from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
from lightreasoner_ray.engines.base import EngineSpec
from lightreasoner_ray.engines.generation import completion_logits
from lightreasoner_ray.engines.hf import HFEngine
from lightreasoner_ray.engines.models import (
    context_length,
    default_device,
    load_model,
    load_tokenizer,
    shared_vocab_size,
)
from lightreasoner_ray.engines.registry import resolve_engine_factory
from lightreasoner_ray.io.test_seam import reached
from lightreasoner_ray.ui.prometheus import record_sampling

logger = logging.getLogger(__name__)



def completion_engine(name: str, expert: ModelConfig, max_new_tokens: int, context: int, vllm: VLLMConfig | None,
                      tokenizer: Any, expert_model: Any, temperature: float = 0.0, top_p: float = 1.0) -> Any:
    """The engine that writes the expert's completions (``sampling.engine``): greedy, or sampled at ``temperature``.

    ``hf`` serves the expert already loaded for the contrast; any other engine loads
    its own copy (vLLM: in the memory share ``sampling.vllm.gpu_memory_utilization``).
    Completions are capped to the context both models share.
    """
    import dataclasses

    settings = vllm or VLLMConfig()
    spec = EngineSpec(
        model_path=expert.path,
        max_new_tokens=max_new_tokens,
        batch_size=1 << 30,  # Ray Data hands over sampling.batch_size problems: one batch
        dtype=expert.dtype,
        trust_remote_code=expert.trust_remote_code,
        temperature=temperature,
        top_p=top_p,
        vllm=dataclasses.replace(settings, max_model_len=min(settings.max_model_len or context, context)),
    )
    if name == "hf":
        engine = HFEngine(spec, tokenizer, expert_model)
    else:
        engine = resolve_engine_factory(name, "sampling.engine")(spec)
    if hasattr(engine, "context"):
        engine.context = min(engine.context, context)
    return engine


def rollout_seed(seed: int, problem_id: str) -> int:
    """The random seed of one problem's sampled rollout: ``sampling.seed`` and the problem id, nothing else."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class ContrastiveSampler:
    """Holds an expert and an amateur on this process's device; contrasts batches of problems."""

    def __init__(
        self,
        expert: ModelConfig,
        amateur: ModelConfig,
        alpha: float,
        beta: float,
        max_new_tokens: int,
        position_chunk: int = 64,
        selection: str = "paper",
        engine: str = "hf",
        vllm: VLLMConfig | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        reached("sampling.actor_loading")
        self.device = default_device()
        self.tokenizer = load_tokenizer(expert, "expert")
        self.expert = load_model(expert, "expert", self.device)
        self.amateur = load_model(amateur, "amateur", self.device)
        self.vocab_size = shared_vocab_size(self.tokenizer, self.expert, self.amateur)
        self.context = min(context_length(self.expert), context_length(self.amateur))
        self.engine = completion_engine(engine, expert, max_new_tokens, self.context, vllm, self.tokenizer, self.expert,
                                        temperature, top_p)
        self.sampled = temperature > 0
        self.seed = seed
        self.generation_seconds = 0.0
        self.alpha = alpha
        self.beta = beta
        self.max_new_tokens = max_new_tokens
        self.position_chunk = position_chunk
        self.selection = selection

    def sample(self, problem_ids: Sequence[str], prompts: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """Contrast the expert and the amateur on each prompt; one row per problem."""
        started = time.perf_counter()
        if self.sampled:
            seeds = [rollout_seed(self.seed, str(problem_id)) for problem_id in problem_ids]
            generated = self.engine.generate([list(p) for p in prompts], seeds=seeds)
        else:
            generated = self.engine.generate([list(p) for p in prompts])
        completions = [samples[0].token_ids for samples in generated]
        self.generation_seconds += time.perf_counter() - started
        contrasts = self.contrast(prompts, completions)
        rows = []
        for i, (problem_id, prompt) in enumerate(zip(problem_ids, prompts)):
            result = contrasts.get(i)
            rows.append(
                {
                    "problem_id": str(problem_id),
                    "prompt_ids": list(prompt),
                    "completion_ids": completions[i],
                    "steps": result.steps if result else [],
                    "kl": [float(result.kl[t]) for t in result.steps] if result else [],
                    "target_ids": result.target_ids if result else [],
                    "target_probs": result.target_probs if result else [],
                    "position_kl": result.kl.tolist() if result else [],
                }
            )
        return rows

    def contrast(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> dict[int, ContrastResult]:
        """Contrast the two models on each non-empty completion, keyed by its index.

        One teacher-forced pass of each model keeps only hidden states (positions x
        hidden); contrast_positions projects a chunk of positions of both models at a
        time, in fp32, so positions x vocab logits never exist at once.
        """
        kept = [i for i, completion in enumerate(completions) if completion]
        if not kept:
            return {}
        sequences = [list(prompts[i]) + list(completions[i]) for i in kept]
        prompt_lengths = [len(prompts[i]) for i in kept]
        pad_id = self.tokenizer.pad_token_id
        expert_logits = completion_logits(self.expert, sequences, prompt_lengths, pad_id, self.vocab_size)
        amateur_logits = completion_logits(self.amateur, sequences, prompt_lengths, pad_id, self.vocab_size)
        return {
            i: contrast_positions(e, a, self.alpha, self.beta, self.position_chunk, self.selection)
            for i, e, a in zip(kept, expert_logits, amateur_logits)
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data entry point: a pyarrow batch of (problem_id, prompt_ids) in, samples out."""
        started = time.perf_counter()
        rows = self.sample(batch.column("problem_id").to_pylist(), batch.column("prompt_ids").to_pylist())
        record_sampling(len(rows), sum(len(r["completion_ids"]) for r in rows), sum(len(r["steps"]) for r in rows))
        logger.info("sampled %d problems in %.2fs", len(rows), time.perf_counter() - started)
        return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)

