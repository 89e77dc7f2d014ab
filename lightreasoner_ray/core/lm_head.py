"""The LM head as a distribution: ONE function turns hidden states into the logits of pi.

The sampler (pi_E and pi_A at contrasted positions) and the trainer (pi_theta at
selected steps) both call :func:`head_logits`, so they see the same distribution:

* the same vocabulary cut: the shared vocabulary only (checkpoints pad their heads,
  Qwen2.5 to 151,936 rows for 151,665 tokens; padded rows are no tokens);
* the model's own logit scaling (``logit_scale``) and soft-capping
  (``final_logit_softcapping``) where its config has them;
* float32 logits whatever the weights' dtype. A bf16 head rounds logits of 16-32 to
  multiples of 0.125, enough to move a KL by ~0.06. On CUDA ``torch.mm(...,
  out_dtype=torch.float32)`` multiplies bf16/fp16 operands with fp32 accumulation and
  output; elsewhere the head is upcast a slice of rows at a time (never a full fp32
  copy of the head), and the backward pass recomputes from the stored weights.

Only the rows asked for are projected, so this costs ``rows x vocab`` fp32, never
``positions x vocab``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Head rows upcast at once on the fallback path: 8,192 x 3,584 x 4 B = 117 MB transient.
SLICE_ROWS = 8192


@dataclass(frozen=True)
class LogitTransform:
    """How a model's head output becomes the logits of its distribution."""

    vocab_size: int  # logits kept: ids [0, vocab_size)
    scale: float | None = None  # config.logit_scale (e.g. Cohere)
    softcap: float | None = None  # config.final_logit_softcapping (e.g. Gemma 2)


def logit_transform(model: Any, vocab_size: int | None = None) -> LogitTransform:
    """The transform of ``model``'s config, cut to ``vocab_size`` (default: the whole head)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rows = model.get_output_embeddings().weight
    rows = int(getattr(rows, "ds_shape", rows.shape)[0])
    width = rows if vocab_size is None else int(vocab_size)
    if not 0 < width <= rows:
        raise ValueError(f"vocabulary cut {width} outside the head's {rows} rows")
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(width, float(scale) if scale not in (None, 1, 1.0) else None,
                          float(softcap) if softcap else None)


def _partitioned(weight: torch.Tensor) -> bool:
    """ZeRO-3 partitions parameters: only the module's own forward hooks gather them."""
    return hasattr(weight, "ds_id")


def _wide_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or wider where an operand is (float64 test models stay float64)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _fp32_matmul(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` in float32 (or wider) without a full-size fp32 copy of ``weight``."""
    wide = _wide_dtype(hidden, weight)
    if hidden.dtype == weight.dtype == wide:
        return hidden @ weight.T
    if hidden.device.type == "cuda" and hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(hidden, weight.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # an older torch or an unsupported GPU
            pass
    out = torch.empty((hidden.shape[0], weight.shape[0]), dtype=wide, device=hidden.device)
    wide_hidden = hidden.to(wide)
    for start in range(0, weight.shape[0], SLICE_ROWS):
        out[:, start : start + SLICE_ROWS] = wide_hidden @ weight[start : start + SLICE_ROWS].to(wide).T
    return out


class _Fp32Projection(torch.autograd.Function):
    """fp32 logits of the first ``vocab_size`` head rows; saves the weights, not fp32 copies."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.vocab_size = vocab_size
        return _fp32_matmul(hidden, weight[:vocab_size])

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        wide = _wide_dtype(hidden, weight, grad_logits)
        grad_logits = grad_logits.to(wide)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            accumulated = torch.zeros(hidden.shape, dtype=wide, device=hidden.device)
            for start in range(0, ctx.vocab_size, SLICE_ROWS):
                end = min(start + SLICE_ROWS, ctx.vocab_size)
                accumulated += grad_logits[:, start:end] @ weight[start:end].to(wide)
            grad_hidden = accumulated.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            grad_weight[: ctx.vocab_size] = (grad_logits.T @ hidden.to(wide)).to(weight.dtype)
        return grad_hidden, grad_weight, None


_warned_partitioned = False


def head_logits(hidden: torch.Tensor, head: nn.Module, transform: LogitTransform) -> torch.Tensor:
    """``[N, transform.vocab_size]`` float32 (or wider) logits of ``N`` hidden states through ``head``."""
    global _warned_partitioned
    weight = head.weight
    if _partitioned(weight):
        # ZeRO-3: call the module so DeepSpeed gathers (and re-partitions) the weight.
        logits = head(hidden)[:, : transform.vocab_size]
        logits = logits.to(_wide_dtype(logits))
        if logits.dtype != weight.dtype and not _warned_partitioned:
            _warned_partitioned = True
            logger.warning("ZeRO-3 partitioned LM head: logits are projected in %s and then upcast", weight.dtype)
    else:
        logits = _Fp32Projection.apply(hidden, weight, transform.vocab_size)
        bias = getattr(head, "bias", None)
        if bias is not None:
            logits = logits + bias[: transform.vocab_size].to(logits.dtype)
    if transform.scale is not None:
        logits = logits * transform.scale
    if transform.softcap is not None:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    return logits


class LMHead:
    """A model's head with its transform: call it on hidden states to get fp32 logits."""

    def __init__(self, model: Any, vocab_size: int | None = None) -> None:
        self.module = model.get_output_embeddings()
        self.transform = logit_transform(model, vocab_size)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.module, self.transform)


class ProjectedRows:
    """Hidden states that become fp32 logits only when a slice of them is indexed.

    ``rows[a:b]`` is ``[b - a, vocab]`` logits; ``len(rows)`` is the number of positions.
    Holding these instead of logits keeps ``positions x hidden`` alive, not ``positions x vocab``.
    """

    def __init__(self, hidden: torch.Tensor, head: LMHead) -> None:
        self.hidden = hidden
        self.head = head

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def __getitem__(self, index: slice) -> torch.Tensor:
        with torch.inference_mode():
            return self.head(self.hidden[index])
