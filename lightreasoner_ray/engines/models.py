"""Loading models and tokenizers, placing them on a device, checking a pair fits.

Models come from local directories or hub names. On a GPU they load in bf16 (fp16
where bf16 is not supported), on CPU in fp32; the device is whatever this process
was given (Ray sets CUDA_VISIBLE_DEVICES for an actor with ``num_gpus``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.errors import LightReasonerError

logger = logging.getLogger(__name__)

# The dtypes the configs' ``dtype`` keys name (besides "auto").
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Strings whose token ids must agree between an expert and an amateur tokenizer.
_PROBE_TEXTS = (
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The answer is 3.14159 + x^2 - \\frac{1}{2} = 42.",
)


def default_device() -> torch.device:
    """The accelerator this process may use, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep in path.rstrip(os.sep) and path.count("/") != 1


def check_model_path(path: str, role: str) -> None:
    """A clear error for a local model directory that is not there or has no config."""
    if not path:
        raise LightReasonerError(f"{role}.path is empty: give a model directory or a hub name")
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
            raise LightReasonerError(f"{role} model directory {path} has no config.json (is it a Hugging Face model?)")
        return
    if _looks_local(path):
        raise LightReasonerError(f"{role} model path {path} does not exist")


# Files that hold a model's (or an adapter's) weights.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.safetensors.index.json",
                   "*.bin.index.json")


def check_model_weights(path: str, role: str) -> None:
    """A clear error for a local model (or adapter) directory that holds no weight files."""
    local = Path(path).expanduser()
    if not local.is_dir():
        return
    if not any(next(local.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        raise LightReasonerError(
            f"{role} model directory {path} holds no weights (no *.safetensors or *.bin file): "
            "was it saved completely?"
        )


def check_tokenizer_fits(tokenizer: Any, model_path: str, role: str, trust_remote_code: bool = False,
                         tokenizer_path: str | None = None) -> None:
    """Refuse a tokenizer with ids past the model's embedding rows (``vocab_size`` in its config.json):
    a prompt with such an id would index past the embedding inside the model."""
    rows = int(getattr(read_model_config(model_path, trust_remote_code), "vocab_size", 0) or 0)
    if rows <= 0:
        return
    special = [int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None]
    largest = max([len(tokenizer) - 1, *special])
    if largest >= rows:
        raise LightReasonerError(
            f"the {role} tokenizer ({tokenizer_path or model_path}) has token ids up to {largest} but the model "
            f"{model_path} has {rows} embedding rows (vocab_size in its config.json): ids from {rows} on would "
            "index past the embedding; use the tokenizer saved with the model"
        )


def check_local_model(config: ModelConfig, role: str, tokenizer: Any = None) -> None:
    """For a local model directory: weights present and ``tokenizer`` (default: its own) fitting its
    embedding. Hub names are checked where they load."""
    local = Path(config.path).expanduser()
    if not (local / "config.json").is_file():
        return
    check_model_weights(config.path, role)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config, role)
    check_tokenizer_fits(tokenizer, config.path, role, config.trust_remote_code)


def load_tokenizer(config: ModelConfig, role: str = "model") -> Any:
    from transformers import AutoTokenizer

    check_model_path(config.path, role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.path, trust_remote_code=config.trust_remote_code)
    except OSError as exc:
        raise LightReasonerError(f"cannot load the {role} tokenizer from {config.path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, role: str = "model", device: torch.device | None = None) -> Any:
    """Load a causal LM for inference on ``device`` in the configured dtype."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = resolve_dtype(config.dtype, device)
    check_model_path(config.path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.path, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    except OSError as exc:
        raise LightReasonerError(f"cannot load the {role} model from {config.path}: {exc}") from None
    model.to(device)
    model.eval()
    logger.info("loaded %s %s on %s in %s", role, config.path, device, dtype)
    return model


def context_length(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def shared_vocab_size(tokenizer: Any, *models: Any) -> int:
    """The logit width both models share: the tokenizer's vocabulary, cut to the narrowest head.

    Checkpoints often pad their embeddings (Qwen2.5: 151,936 rows for 151,665 tokens);
    the padded rows are no tokens at all, so logits are cut to this width.
    """
    widths = [len(tokenizer)] + [m.get_output_embeddings().weight.shape[0] for m in models]
    return min(widths)


def read_model_config(path: str, trust_remote_code: bool = False, text: bool = True) -> Any:
    """A model's configuration from its ``config.json`` (no weights loaded); with ``text``, the
    language model's part of a multimodal config."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if text and hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    return model_config


def head_rows(config: ModelConfig) -> int:
    """The LM head's rows from the model's config (no weights loaded)."""
    return int(read_model_config(config.path, config.trust_remote_code).vocab_size)


def pair_vocab_size(expert: ModelConfig, amateur: ModelConfig) -> int:
    """:func:`shared_vocab_size` from the configs: the vocabulary the sampler normalises over.

    Recorded with the samples so the trainer normalises pi_theta over the same ids.
    """
    tokenizer = load_tokenizer(expert, "expert")
    return min(len(tokenizer), head_rows(expert), head_rows(amateur))


def check_tokenizers_compatible(expert_tokenizer: Any, amateur_tokenizer: Any, expert_path: str, amateur_path: str) -> None:
    """Raise unless both tokenizers give the same ids to the same strings on the shared vocabulary.

    Added (special) tokens may differ, as DeepSeek-R1-Distill-Qwen's do from Qwen2.5's
    on the same BPE vocabulary: that is logged, not refused, since ordinary text gets
    the same ids and the reference implementation pairs such models too.
    """
    shared = min(len(expert_tokenizer), len(amateur_tokenizer))
    added_ids = set(expert_tokenizer.get_added_vocab().values()) | set(amateur_tokenizer.get_added_vocab().values())
    expert_by_id = {i: t for t, i in expert_tokenizer.get_vocab().items() if i < shared}
    amateur_by_id = {i: t for t, i in amateur_tokenizer.get_vocab().items() if i < shared}
    differing = sorted(i for i in expert_by_id if amateur_by_id.get(i) != expert_by_id[i])
    mismatched = [i for i in differing if i not in added_ids]
    if differing and not mismatched:
        logger.warning("the expert and the amateur differ on %d special tokens (e.g. id %d: %r vs %r)", len(differing),
                       differing[0], expert_by_id[differing[0]], amateur_by_id.get(differing[0]))
    probe_mismatch = next(
        (
            text
            for text in _PROBE_TEXTS
            if expert_tokenizer.encode(text, add_special_tokens=False)
            != amateur_tokenizer.encode(text, add_special_tokens=False)
        ),
        None,
    )
    if mismatched or probe_mismatch is not None:
        detail = (
            f"token id {mismatched[0]} is {expert_by_id[mismatched[0]]!r} for the expert and "
            f"{amateur_by_id.get(mismatched[0])!r} for the amateur ({len(mismatched)} ids differ)"
            if mismatched
            else f"they split {probe_mismatch!r} differently"
        )
        raise LightReasonerError(
            f"the expert ({expert_path}) and the amateur ({amateur_path}) do not share a tokenizer: {detail}. "
            "LightReasoner compares their distributions token by token, so both must use the same vocabulary."
        )
