"""The distillation loss: KL(v_C || pi_theta) at the selected steps of packed trajectories.

All selected steps of a trajectory share one forward pass: the decoder runs once over
prompt + completion (right-padded with the other trajectories of the micro-batch),
the hidden states at the selected positions are gathered, and only those go through
the LM head. The logits predicting completion token t sit at sequence position
len(prompt) - 1 + t, exactly where a one-sequence-per-step model would put its last
position, so the loss equals training every step as its own sequence.

No Ray, no DeepSpeed here: plain tensors and modules.
"""

from __future__ import annotations

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
    ) -> torch.Tensor:
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
