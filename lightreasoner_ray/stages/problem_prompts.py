"""The run's problems, loaded and tokenized on the driver for the stages that sample
(LightReasoner's sampling and rejection sampling), with the models' paths, tokenizers and
context checked first, so a bad row or an over-long prompt fails before any model loads."""

from __future__ import annotations

from typing import Any

from lightreasoner_ray.config import Config
from lightreasoner_ray.data.problems import gold_answers, load_problems
from lightreasoner_ray.data.prompts import prompt_ids
from lightreasoner_ray.engines.models import (
    check_model_path,
    check_tokenizers_compatible,
    context_length,
    load_tokenizer,
    read_model_config,
)
from lightreasoner_ray.errors import LightReasonerError


def _model_context(path: str, trust_remote_code: bool) -> int:
    return context_length(read_model_config(path, trust_remote_code))


def prepare_problems(config: Config, with_answers: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load and tokenize the problems; check the models, tokenizers and prompt lengths.

    ``with_answers`` (rejection-sampling SFT) also keeps each problem's gold answer,
    reduced to the answer itself (:func:`lightreasoner_ray.data.problems.gold_answer`),
    and refuses a problem without one.
    """
    check_model_path(config.expert.path, "expert")
    check_model_path(config.amateur.path, "amateur")
    expert_tokenizer = load_tokenizer(config.expert, "expert")
    amateur_tokenizer = load_tokenizer(config.amateur, "amateur")
    check_tokenizers_compatible(expert_tokenizer, amateur_tokenizer, config.expert.path, config.amateur.path)
    context = min(
        _model_context(config.expert.path, config.expert.trust_remote_code),
        _model_context(config.amateur.path, config.amateur.trust_remote_code),
    )
    loaded = load_problems(config.data)
    if with_answers:
        answers = gold_answers(loaded, config.data.answer_field)
    problems = []
    for problem in loaded.problems:
        ids = prompt_ids(expert_tokenizer, problem["question"], config.sampling.system_prompt)
        if len(ids) >= context:
            raise LightReasonerError(
                f"{loaded.source}: problem {problem['problem_id']}: the prompt is {len(ids)} tokens, "
                f"longer than the models' context of {context} tokens"
            )
        problems.append({"problem_id": problem["problem_id"], "prompt_ids": ids,
                         **({"answer": answers[problem["problem_id"]]} if with_answers else {})})
    info = {"source": loaded.source, "skipped_invalid": len(loaded.skipped), "context": context}
    return problems, info
