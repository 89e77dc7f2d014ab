"""The Hugging Face engine: ``generate`` on this process's device, and loading a model
(or a PEFT adapter merged into its base) for inference."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.engines.base import Completion, EngineSpec
from lightreasoner_ray.io.model_dirs import adapter_base_path

logger = logging.getLogger(__name__)


def check_inference_model(path: str, role: str, trust_remote_code: bool = False) -> None:
    """A clear error for a model (or an adapter and its base) that is not there, a local one
    without weights, or one whose tokenizer has ids past its embedding rows."""
    from lightreasoner_ray.engines.models import check_local_model, check_model_path, check_model_weights, load_tokenizer

    check_model_path(path, role)
    base = adapter_base_path(path)
    if base is not None:
        base_role = f"{role} (base model of adapter {path})"
        check_model_path(base, base_role)
        check_model_weights(path, role)
        has_own_tokenizer = (Path(path).expanduser() / "tokenizer_config.json").is_file()
        tokenizer_config = ModelConfig(path=path if has_own_tokenizer else base, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(tokenizer_config, role) if (Path(base).expanduser() / "config.json").is_file() else None
        check_local_model(ModelConfig(path=base, trust_remote_code=trust_remote_code), base_role, tokenizer)
    else:
        check_local_model(ModelConfig(path=path, trust_remote_code=trust_remote_code), role)


def load_inference_model(spec: EngineSpec, device: Any = None) -> tuple[Any, Any]:
    """Tokenizer and eval-mode model for ``spec.model_path``, an adapter merged into its base."""
    from lightreasoner_ray.engines.models import default_device, load_model, load_tokenizer

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
        from lightreasoner_ray.engines.models import context_length

        self.spec = spec
        if model is None:
            tokenizer, model = load_inference_model(spec)
        self.tokenizer, self.model = tokenizer, model
        self.context = context_length(self.model)

    def room(self, prompt_length: int) -> int:
        return min(self.spec.max_new_tokens, self.context - prompt_length)

    def generate(self, prompts: list[list[int]], seeds: list[int] | None = None) -> list[list[Completion]]:
        """Completions in batches of similar length; with ``seeds`` (sampled decoding), each prompt
        is drawn alone from its own seed, so its draw does not depend on the rest of the call."""
        import torch

        from lightreasoner_ray.engines.generation import greedy_generate, sampled_generate

        spec = self.spec
        completions: list[list[Completion]] = [[Completion([], "") for _ in range(spec.n)] for _ in prompts]
        too_long = [i for i, prompt in enumerate(prompts) if self.room(len(prompt)) <= 0]
        if too_long:
            logger.warning("%d prompts fill the %d-token context; their completions are empty", len(too_long), self.context)
        batches = self._batches(prompts)
        if seeds is not None and not spec.greedy:
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            batches = [[index] for batch in batches for index in batch]
        for batch in batches:
            budget = self.room(len(prompts[batch[-1]]))  # the same for every row of a batch
            batch_prompts = [prompts[i] for i in batch]
            if spec.greedy and spec.n == 1:
                token_lists = [[tokens] for tokens in greedy_generate(self.model, self.tokenizer, batch_prompts, budget)]
            else:
                torch.manual_seed(spec.seed if seeds is None else seeds[batch[0]])
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
