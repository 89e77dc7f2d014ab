"""The contrast maths of LightReasoner, in one place (no Ray, no models).

Given next-token logits of the expert and the amateur at the same positions:

* step selection keeps position t when D_KL(pi_E || pi_A) > beta;
* the plausibility mask is V_t = {a : pi_E(a) >= alpha * max pi_E};
* the contrastive soft label is softmax over V_t of (log pi_E - log pi_A), zero elsewhere.

Everything is computed in float32 from log-softmax whatever the input dtype, a chunk
of positions at a time so a 152k vocabulary does not need T x V float32 buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ContrastResult:
    """Contrast of one trajectory's completion positions."""

    kl: torch.Tensor  # [T] float32: D_KL(pi_E || pi_A) at every position
    steps: list[int]  # selected positions, ascending
    target_ids: list[list[int]]  # support of v_C at each selected step, by falling weight
    target_probs: list[list[float]]  # v_C on that support (sums to 1)


def kl_divergence(expert_logprobs: torch.Tensor, amateur_logprobs: torch.Tensor) -> torch.Tensor:
    """D_KL(pi_E || pi_A) over the last dimension, from log-probabilities."""
    return (expert_logprobs.exp() * (expert_logprobs - amateur_logprobs)).sum(-1)


def plausibility_mask(expert_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """True where pi_E(a) >= alpha * max_a pi_E(a) (compared in log space)."""
    threshold = expert_logprobs.max(dim=-1, keepdim=True).values + math.log(alpha)
    return expert_logprobs >= threshold


def contrastive_soft_label(
    expert_logprobs: torch.Tensor, amateur_logprobs: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Dense v_C: softmax over the plausible set of log pi_E - log pi_A, zero elsewhere."""
    mask = plausibility_mask(expert_logprobs, alpha)
    scores = (expert_logprobs - amateur_logprobs).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def contrast_positions(
    expert_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    alpha: float,
    beta: float,
    position_chunk: int = 64,
) -> ContrastResult:
    """Contrast one trajectory: ``[T, V]`` logits of each model at its completion positions.

    Both tensors must cover the same vocabulary (cut padded embeddings beforehand).
    """
    if expert_logits.shape != amateur_logits.shape:
        raise ValueError(f"logit shapes differ: expert {tuple(expert_logits.shape)}, amateur {tuple(amateur_logits.shape)}")
    num_positions = expert_logits.shape[0]
    kl_chunks = []
    steps: list[int] = []
    target_ids: list[list[int]] = []
    target_probs: list[list[float]] = []
    for start in range(0, num_positions, position_chunk):
        expert_logprobs = torch.log_softmax(expert_logits[start : start + position_chunk].float(), dim=-1)
        amateur_logprobs = torch.log_softmax(amateur_logits[start : start + position_chunk].float(), dim=-1)
        kl = kl_divergence(expert_logprobs, amateur_logprobs)
        kl_chunks.append(kl)
        selected = torch.nonzero(kl > beta).flatten()
        if selected.numel() == 0:
            continue
        labels = contrastive_soft_label(expert_logprobs[selected], amateur_logprobs[selected], alpha)
        for row, position in zip(labels, selected.tolist()):
            support = torch.nonzero(row > 0).flatten()
            probs = row[support]
            order = torch.argsort(probs, descending=True)
            steps.append(start + position)
            target_ids.append(support[order].tolist())
            target_probs.append(probs[order].tolist())
    kl_all = torch.cat(kl_chunks) if kl_chunks else torch.zeros(0)
    return ContrastResult(kl=kl_all.cpu(), steps=steps, target_ids=target_ids, target_probs=target_probs)
