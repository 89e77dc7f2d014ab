"""Saving a LoRA adapter from a ZeRO-3 model without gathering the frozen base.

Under ZeRO-3 every parameter is a placeholder holding this rank's slice; DeepSpeed's
consolidated save gathers all of them on rank 0. A LoRA adapter needs the trainable
parameters only, so only those are gathered.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def adapter_state_dict(causal_lm: Any, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """The trainable parameters, gathered (all ranks must call this); the dict on rank 0, None elsewhere.

    Frozen base weights are never gathered.
    """
    import deepspeed

    named = [(name, param) for name, param in causal_lm.named_parameters() if param.requires_grad]
    state: Optional[dict[str, torch.Tensor]] = {} if rank == 0 else None
    with deepspeed.zero.GatheredParameters([param for _, param in named], modifier_rank=None):
        if state is not None:
            for name, param in named:
                state[name] = param.detach().cpu().clone()
    return state
