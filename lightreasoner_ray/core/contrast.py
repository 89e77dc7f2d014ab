"""The contrast maths of LightReasoner, in one place (no Ray, no models).

Given next-token logits of the expert and the amateur at the same positions:

* step selection keeps position t when D_KL(pi_E || pi_A) > beta (``selection: paper``),
  or, as the reference implementation does (``selection: reference``), when
  KL >= beta and t >= 1: its loop starts at the second completion token, so the
  distribution of the first token (empty assistant prefix) is never selected;
* the plausibility mask is V_t = {a : pi_E(a) >= alpha * max pi_E};
* the contrastive soft label is softmax over V_t of (log pi_E - log pi_A), zero elsewhere.

Everything is computed in float32 from log-softmax whatever the input dtype, a chunk
of positions of BOTH models at a time: the inputs may be ``[T, V]`` tensors or
:class:`lightreasoner_ray.core.lm_head.ProjectedRows` that project only the chunk asked for,
so a 152k vocabulary never needs T x V buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

SELECTIONS = ("paper", "reference")


class LogitRows(Protocol):
    """``[T, V]`` logits, or anything that yields a slice of them (``ProjectedRows``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> torch.Tensor: ...


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


def selection_mask(kl: torch.Tensor, positions: torch.Tensor, beta: float, selection: str = "paper") -> torch.Tensor:
    """Which positions (their index in the completion) are selected steps, by ``selection``.

    ``paper``: KL > beta at every position. ``reference``: KL >= beta and position >= 1,
    the rule of HKUDS/LightReasoner's ``LightR_sampling.py``.
    """
    if selection == "paper":
        return kl > beta
    if selection == "reference":
        return (kl >= beta) & (positions >= 1)
    raise ValueError(f"unknown selection rule {selection!r}; expected one of {', '.join(SELECTIONS)}")


def is_selected(position: int, kl: float, beta: float, selection: str = "paper") -> bool:
    """:func:`selection_mask` for one position (for re-selecting recorded KLs at another beta).

    Compared in float32, as the sampler compares its float32 KLs (and as the samples
    store them): in float64, float32(0.4) > 0.4 would select a step the sampler did not.
    """
    return bool(selection_mask(torch.tensor([kl], dtype=torch.float32), torch.tensor([position]), beta, selection))


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
    expert_logits: LogitRows,
    amateur_logits: LogitRows,
    alpha: float,
    beta: float,
    position_chunk: int = 64,
    selection: str = "paper",
) -> ContrastResult:
    """Contrast one trajectory: logits of each model at its ``T`` completion positions.

    Both must cover the same vocabulary (cut padded embeddings beforehand). Only
    ``position_chunk`` positions of each model are materialised at a time.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection rule {selection!r}; expected one of {', '.join(SELECTIONS)}")
    if len(expert_logits) != len(amateur_logits):
        raise ValueError(f"position counts differ: expert {len(expert_logits)}, amateur {len(amateur_logits)}")
    num_positions = len(expert_logits)
    kl_chunks = []
    steps: list[int] = []
    target_ids: list[list[int]] = []
    target_probs: list[list[float]] = []
    for start in range(0, num_positions, position_chunk):
        expert_logprobs = torch.log_softmax(expert_logits[start : start + position_chunk].float(), dim=-1)
        amateur_logprobs = torch.log_softmax(amateur_logits[start : start + position_chunk].float(), dim=-1)
        if expert_logprobs.shape != amateur_logprobs.shape:
            raise ValueError(
                f"logit shapes differ: expert {tuple(expert_logprobs.shape)}, amateur {tuple(amateur_logprobs.shape)}"
            )
        kl = kl_divergence(expert_logprobs, amateur_logprobs)
        kl_chunks.append(kl)
        positions = torch.arange(start, start + kl.shape[0], device=kl.device)
        selected = torch.nonzero(selection_mask(kl, positions, beta, selection)).flatten()
        if selected.numel() == 0:
            continue
        labels = contrastive_soft_label(expert_logprobs[selected], amateur_logprobs[selected], alpha)
        del expert_logprobs, amateur_logprobs
        for row, position in zip(labels, selected.tolist()):
            support = torch.nonzero(row > 0).flatten()
            probs = row[support]
            order = torch.argsort(probs, descending=True)
            steps.append(start + position)
            target_ids.append(support[order].tolist())
            target_probs.append(probs[order].tolist())
    kl_all = torch.cat(kl_chunks) if kl_chunks else torch.zeros(0)
    return ContrastResult(kl=kl_all.cpu(), steps=steps, target_ids=target_ids, target_probs=target_probs)
