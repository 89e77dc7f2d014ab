"""Generation engines, one layer for both stages: token-id prompts in, completions out.

An engine is anything with a ``tokenizer`` (used to build the chat prompts) and
``generate(prompts: list[list[int]]) -> list[list[Completion]]``: for each prompt, in
prompt order, ``spec.n`` completions as exact token ids (cut after the first stop
token) and their text. Decoding is greedy when ``spec.temperature == 0`` (the
default and the paper's protocol), else sampled with ``temperature``/``top_p``/``seed``.

Engines: ``hf`` (:class:`lightreasoner_ray.engines.hf.HFEngine`, Hugging Face ``generate``
in length-sorted, left-padded batches) and ``vllm`` (:class:`lightreasoner_ray.engines.vllm.VLLMEngine`,
continuous batching); :mod:`lightreasoner_ray.engines.registry` resolves a name. Another backend slots in as a factory named
``"package.module:factory"`` in ``sampling.engine``/``eval.engine`` or passed to
``run_evaluation(engine_factory=...)``; a factory is called once per actor with an
:class:`EngineSpec`. Evaluation also accepts engines whose ``generate`` returns one
text (or a list of ``n`` texts) per prompt.

Model paths may be PEFT adapter directories (``adapter_config.json``): the base
model named there is loaded, the adapter applied and merged for inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from lightreasoner_ray.config import VLLMConfig

# torch and transformers are imported inside the functions that need them: the
# evaluation driver and its grading workers import this module and never need them.

logger = logging.getLogger(__name__)


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

    def generate(self, prompts: list[list[int]], seeds: Optional[list[int]] = None) -> list[list[Completion]]:
        """``spec.n`` completions per prompt. With ``seeds`` (sampled decoding), prompt i's draw
        depends on ``seeds[i]`` and the prompt alone, not on the other prompts of the call."""
        ...


EngineFactory = Callable[[EngineSpec], GenerationEngine]
