"""The distillation loss: KL(v_C || pi_theta) (or another divergence) at the selected steps of packed trajectories.

All selected steps of a trajectory share one forward pass: the decoder runs once over
prompt + completion (right-padded with the other trajectories of the micro-batch),
the hidden states at the selected positions are gathered, and only those go through
the LM head. The logits predicting completion token t sit at sequence position
len(prompt) - 1 + t, exactly where a one-sequence-per-step model would put its last
position, so the loss equals training every step as its own sequence.

No Ray, no DeepSpeed here: plain tensors and modules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightreasoner_ray.core.lm_head import head_logits, logit_transform


def sparse_kl_divergence(
    logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """KL(v_C || pi) per step from ``[S, V]`` logits and a sparse ``[S, K]`` soft label.

    ``pi`` is the full-vocabulary softmax of ``logits`` (computed in float32 or wider);
    the label is zero outside its support, so KL = sum_k v_k (log v_k - log pi(id_k)).
    Padded support entries carry probability 0 and contribute nothing.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    model_logprobs = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, target_ids)
    target_probs = target_probs.to(dtype)
    positive = target_probs > 0
    target_logprobs = torch.where(positive, target_probs.clamp_min(1e-38).log(), torch.zeros_like(target_probs))
    return (target_probs * (target_logprobs - model_logprobs)).sum(-1)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def sparse_divergence(
    logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor, divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """The divergence between the sparse soft label v_C and pi = softmax(logits), per step, shape ``[S]``.

    ``forward_kl``: KL(v_C || pi) (:func:`sparse_kl_divergence`, the paper's loss).
    ``reverse_kl``: KL(pi_S || v_C), where pi_S is pi restricted to the label's support and
    renormalised (v_C is 0 outside its support, where the full reverse KL is infinite).
    ``jsd``: the generalised Jensen-Shannon divergence
    beta KL(v_C || m) + (1 - beta) KL(pi || m), m = beta v_C + (1 - beta) pi, exact over the
    full vocabulary: outside the support m = (1 - beta) pi, so those tokens contribute
    -(1 - beta) log(1 - beta) times pi's mass there.
    Padded support entries (probability 0) contribute nothing.
    """
    if divergence == "forward_kl":
        return sparse_kl_divergence(logits, target_ids, target_probs)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; one of {', '.join(DIVERGENCES)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    model_logprobs = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, target_ids)
    target_probs = target_probs.to(dtype)
    positive = target_probs > 0
    zeros = torch.zeros_like(target_probs)
    target_logprobs = torch.where(positive, target_probs.clamp_min(1e-38).log(), zeros)
    # Support entries only (a padded entry may repeat a real id).
    support_logprobs = torch.where(positive, model_logprobs, torch.full_like(model_logprobs, float("-inf")))
    if divergence == "reverse_kl":
        # Finite everywhere (no -inf reaches a product, whose gradient would be NaN).
        restricted = torch.where(positive, model_logprobs - torch.logsumexp(support_logprobs, dim=-1, keepdim=True),
                                 zeros)
        return torch.where(positive, restricted.exp() * (restricted - target_logprobs), zeros).sum(-1)
    beta = float(jsd_beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {beta}")
    log_beta, log_rest = math.log(beta), math.log1p(-beta)
    mixture_logprobs = torch.logaddexp(target_logprobs + log_beta, model_logprobs + log_rest)
    label_side = torch.where(positive, target_probs * (target_logprobs - mixture_logprobs), zeros).sum(-1)
    model_side = torch.where(positive, model_logprobs.exp() * (model_logprobs - mixture_logprobs), zeros).sum(-1)
    outside_mass = (1.0 - torch.where(positive, model_logprobs.exp(), zeros).sum(-1)).clamp_min(0.0)
    return beta * label_side + (1.0 - beta) * (model_side - log_rest * outside_mass)


def dense_kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference_logits) || softmax(logits)) per row, over the full vocabulary."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    reference = torch.log_softmax(reference_logits.to(dtype), dim=-1)
    model = torch.log_softmax(logits.to(dtype), dim=-1)
    present = reference > float("-inf")  # a token the reference excludes contributes 0 (0 log 0)
    difference = torch.where(present, reference - model, torch.zeros_like(reference))
    return (reference.exp() * difference).sum(-1)


class SelectedStepLogits(nn.Module):
    """A causal LM that returns float32 logits only at selected (row, position) pairs.

    The logits come from :func:`lightreasoner_ray.core.lm_head.head_logits`, the function the
    sampler uses for pi_E: the same vocabulary cut (``vocab_size``: the ids the samples
    were normalised over; default the whole head), logit scaling/soft-capping and fp32
    projection. Wrapping the model (rather than calling its parts from the training
    loop) keeps every parameter inside one module that DeepSpeed sees, so ZeRO-3's
    parameter gathering hooks fire as usual.
    """

    def __init__(self, causal_lm: nn.Module, vocab_size: int | None = None) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.transform = logit_transform(causal_lm, vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        step_rows: torch.Tensor,
        step_positions: torch.Tensor,
        reference: bool = False,
    ) -> torch.Tensor:
        """The logits at the selected steps; with ``reference``, the base model's with the LoRA adapter off."""
        if reference:
            with torch.no_grad(), self.causal_lm.disable_adapter():
                return self._logits(input_ids, attention_mask, step_rows, step_positions)
        return self._logits(input_ids, attention_mask, step_rows, step_positions)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_rows: torch.Tensor,
                step_positions: torch.Tensor) -> torch.Tensor:
        decoder = self.causal_lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        selected = hidden[step_rows, step_positions]
        return head_logits(selected, self.causal_lm.get_output_embeddings(), self.transform)


def step_kl(model: nn.Module, batch: Any) -> torch.Tensor:
    """KL(v_C || pi_theta) at every selected step of a collated micro-batch, shape ``[S]``.

    ``model`` is a ``SelectedStepLogits`` (or a DeepSpeed engine wrapping one);
    ``batch`` has ``input_ids``, ``attention_mask``, ``step_rows``, ``step_positions``,
    ``target_ids`` and ``target_probs`` tensors on the model's device.
    """
    logits = model(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_positions)
    return sparse_kl_divergence(logits, batch.target_ids, batch.target_probs)


def step_loss(model: nn.Module, batch: Any, divergence: str = "forward_kl", jsd_beta: float = 0.5,
              anchor_weight: float = 0.0) -> torch.Tensor:
    """The training loss at every selected step of a collated micro-batch, shape ``[S]``.

    :func:`sparse_divergence` between the soft label and the model, plus, when ``anchor_weight``
    is positive, ``anchor_weight`` * KL(pi_expert || pi_theta), pi_expert being the model with
    its LoRA adapter switched off (``model`` then wraps a PEFT model). With the defaults this is
    :func:`step_kl`.
    """
    logits = model(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_positions)
    loss = sparse_divergence(logits, batch.target_ids, batch.target_probs, divergence, jsd_beta)
    if anchor_weight > 0:
        # Every rank runs this pass, placeholder batches included (ZeRO-3 gathers collectively).
        reference = model(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_positions,
                          reference=True)
        loss = loss + anchor_weight * dense_kl_divergence(reference.detach(), logits)
    # A step with an empty label (a placeholder micro-batch: core.update_plan) is no step: nothing
    # counts there, whatever the divergence or the anchor would make of it.
    real = batch.target_probs.sum(-1) > 0
    return torch.where(real, loss, torch.zeros_like(loss))


def update_loss_scale(world_size: int, grad_accum: int, update_steps: int) -> float:
    """The factor that turns a micro-batch's KL *sum* into the loss handed to DeepSpeed.

    An update's loss is the mean KL over all ``update_steps`` selected steps that all
    workers train in it (``train.steps_per_update``). ``grad_accum`` is the number of
    micro-batches every rank runs per update (DeepSpeed's gradient_accumulation_steps,
    placeholders included). DeepSpeed divides each micro-batch loss by ``grad_accum``
    and averages gradients over ``world_size`` ranks, so the update's gradient is
    (1 / (world_size * grad_accum)) * sum of micro-batch gradients; scaling each
    micro-batch's KL sum by world_size * grad_accum / update_steps makes it exactly
    the gradient of the mean, however the steps split into trajectories,
    micro-batches and workers.
    """
    if update_steps <= 0:
        raise ValueError("an update needs at least one selected step")
    return world_size * grad_accum / update_steps
