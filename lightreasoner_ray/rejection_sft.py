"""Rejection-sampling SFT data: the expert's own sampled solutions that reach the gold answer.

The usual SFT baseline for reasoning (and the one the paper's efficiency claims are
against): the expert samples ``k`` solutions per training problem at a temperature,
the grading module keeps those whose final answer is equivalent to the gold one, and
the expert is fine-tuned on them with one-hot labels (:func:`ablations.sft_rows`:
KL(onehot || pi) is next-token cross-entropy, so the same trainer runs it). Unlike
LightReasoner it needs ground-truth answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lightreasoner_ray.ablations import sft_rows
from lightreasoner_ray.generation import _pad_batch, eos_token_ids, truncate_at_eos
from lightreasoner_ray.grading import extract_answer, is_equivalent

logger = logging.getLogger(__name__)


@torch.inference_mode()
def sample_solutions(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], k: int, temperature: float,
                     max_new_tokens: int, seed: int, batch_size: int = 32) -> list[list[list[int]]]:
    """``k`` sampled completions (token ids, cut after the first EOS) per prompt: pure
    temperature sampling over the full vocabulary (no top-k/top-p), seeded."""
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        samples: list[list[list[int]]] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            input_ids, attention_mask = _pad_batch(batch, tokenizer.pad_token_id, left=True, device=device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=True,
                temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0, num_return_sequences=k,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids),
            )
            generated = output[:, input_ids.shape[1] :].tolist()
            for row in range(len(batch)):
                samples.append([truncate_at_eos(tokens, eos_ids) for tokens in generated[row * k : (row + 1) * k]])
    finally:
        torch.random.set_rng_state(generator_state)
    return samples


@dataclass(frozen=True)
class RejectionResult:
    rows: list[dict[str, Any]]  # samples-schema rows, one per kept solution
    problems: int  # problems sampled
    sampled: int  # solutions sampled
    correct: int  # of those, with the gold answer
    kept: int  # distinct correct solutions (the SFT data)
    problems_with_a_kept_solution: int


def keep_correct(problem_ids: Sequence[str], prompts: Sequence[Sequence[int]], samples: Sequence[Sequence[Sequence[int]]],
                 gold_answers: Sequence[str], decode: Callable[[Sequence[int]], str], benchmark: str) -> RejectionResult:
    """The distinct sampled solutions of each problem whose extracted answer is equivalent to
    the gold one, as one-hot SFT rows (one row per kept solution, ``problem_id#j``)."""
    ids, kept_prompts, solutions = [], [], []
    sampled = correct = covered = 0
    for problem_id, prompt, completions, gold in zip(problem_ids, prompts, samples, gold_answers, strict=True):
        seen: set[tuple[int, ...]] = set()
        for completion in completions:
            sampled += 1
            if not completion or not is_equivalent(extract_answer(decode(completion), benchmark), str(gold)):
                continue
            correct += 1
            if tuple(completion) in seen:
                continue
            seen.add(tuple(completion))
            ids.append(f"{problem_id}#{len(seen) - 1}")
            kept_prompts.append(prompt)
            solutions.append(list(completion))
        covered += bool(seen)
    logger.info("rejection sampling: %d of %d sampled solutions correct, %d distinct kept, %d of %d problems covered",
                correct, sampled, len(solutions), covered, len(problem_ids))
    return RejectionResult(rows=sft_rows(ids, kept_prompts, solutions), problems=len(problem_ids), sampled=sampled,
                           correct=correct, kept=len(solutions), problems_with_a_kept_solution=covered)
