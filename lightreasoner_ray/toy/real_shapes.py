"""Random-weight models at the published shapes of the checkpoints users run, without the hub.

``write_model(shape, directory)`` writes a Hugging Face model directory (sharded
safetensors, ``config.json``, ``generation_config.json``, tokenizer files) whose
architecture is the published one of Qwen2.5-Math-1.5B, Qwen2.5-0.5B, Qwen2.5-Math-7B or
DeepSeek-R1-Distill-Qwen-1.5B (``lightreasoner_ray/toy/shapes/<shape>.json``, each naming its source),
with random weights. Depth, width or vocabulary may be overridden for tests.

The tokenizer behaves like the real one where the pipeline can tell: a byte-level BPE
learned from maths text, padded with never-produced filler entries to 151,643 base
entries, then the family's added special tokens at their real ids (``<|endoftext|>``
151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ... 151,665 entries in all against
151,936 embedding rows), and the family's chat template. So prompts, stop ids and the
vocabulary cut are those of the real checkpoints.

Weights are made one tensor at a time on the ``meta``-built model's shapes and written
shard by shard: at most one shard (~1 GB) is ever in memory, so 7B at full width fits.

    python -m lightreasoner_ray.toy.real_shapes --shape qwen2.5-math-1.5b --out DIR [--layers N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightreasoner_ray.errors import LightReasonerError

logger = logging.getLogger(__name__)

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
BASE_VOCAB = 151_643  # byte-level BPE entries before the added tokens, as Qwen2.5's tokenizer
SHARD_BYTES = 1 << 30
DTYPE_NAMES = ("float32", "bfloat16", "float16")

QWEN_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
DEEPSEEK_R1_ADDED_TOKENS = [
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>", "<think>", "</think>",
    *QWEN_ADDED_TOKENS[7:],
]
ADDED_TOKENS = {"qwen2.5": QWEN_ADDED_TOKENS, "deepseek-r1": DEEPSEEK_R1_ADDED_TOKENS}

# Qwen2.5's template without its tool-calling branch: same text for system/user/assistant turns.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n__DEFAULT_SYSTEM__<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEEPSEEK_R1_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}{%- if message.role == 'system' %}{{- message.content }}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' %}{{- '<｜Assistant｜>' + message.content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape(shape: str) -> dict[str, Any]:
    """The published configuration of ``shape`` (``lightreasoner_ray/toy/shapes/<shape>.json``)."""
    path = SHAPES_DIR / f"{shape}.json"
    if not SHAPES_DIR.is_dir():
        raise LightReasonerError(f"{SHAPES_DIR} is missing: reinstall lightreasoner-ray (the shapes are package data)")
    if not path.is_file():
        raise LightReasonerError(f"unknown shape {shape!r}: choose one of {', '.join(shape_names())}")
    return json.loads(path.read_text())


def model_config_dict(shape: str, num_layers: int | None = None, overrides: dict[str, Any] | None = None,
                      dtype: str = "bfloat16") -> dict[str, Any]:
    """``config.json``'s content for ``shape``, with a depth and other fields overridden."""
    config = dict(load_shape(shape)["config"])
    if num_layers is not None:
        if num_layers <= 0:
            raise LightReasonerError(f"num_layers must be > 0, got {num_layers}")
        config["num_hidden_layers"] = num_layers
        config["max_window_layers"] = min(config.get("max_window_layers", num_layers), num_layers)
    config.update(overrides or {})
    if dtype not in DTYPE_NAMES:
        raise LightReasonerError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    config["torch_dtype"] = dtype
    config.setdefault("transformers_version", _transformers_version())
    return config


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _gsm8k_texts(limit: int = 2000) -> list[str]:
    """Maths text to learn the BPE from: GSM8K train rows when the shared copy is there."""
    for candidate in (Path(os.environ.get("LIGHTREASONER_BENCHMARKS", "")) / "gsm8k" / "train.jsonl",
                      Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks" / "gsm8k" / "train.jsonl"):
        if candidate.is_file():
            texts = []
            with candidate.open() as rows:
                for line in rows:
                    row = json.loads(line)
                    texts.append(f"{row.get('question', '')}\n{row.get('answer', '')}")
                    if len(texts) >= limit:
                        break
            return texts
    return ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May? 48/2 = 24, 48 + 24 = 72. #### 72"]


@functools.lru_cache(maxsize=4)
def _learned_bpe(learned_vocab: int) -> str:
    """A byte-level BPE learned from maths text, as a tokenizer.json string (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=learned_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_gsm8k_texts(), trainer=trainer)
    return bpe.to_str()


def build_tokenizer(shape: str, base_vocab: int = BASE_VOCAB, learned_vocab: int = 2048) -> Any:
    """A ``PreTrainedTokenizerFast`` with the shape family's special tokens at their real ids.

    ``base_vocab`` entries (learned merges, then filler entries no text encodes to), then the
    added tokens: with the default, ``<|endoftext|>`` is 151643 and ``len(tokenizer)`` 151665.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = load_shape(shape)["tokenizer"]
    data = json.loads(_learned_bpe(min(learned_vocab, base_vocab)))
    vocab = data["model"]["vocab"]
    if len(vocab) > base_vocab:
        raise LightReasonerError(f"base_vocab {base_vocab} is below the learned vocabulary's {len(vocab)} entries")
    for index in range(len(vocab), base_vocab):
        vocab[f"<|filler_{index}|>"] = index
    bpe = Tokenizer.from_str(json.dumps(data))
    added = ADDED_TOKENS[spec["family"]]
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=spec["bos_token"], eos_token=spec["eos_token"],
                                        pad_token=spec["pad_token"], unk_token=None)
    if spec["family"] == "qwen2.5":
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE.replace("__DEFAULT_SYSTEM__",
                                                              spec["default_system"].replace("\\", "\\\\"))
        tokenizer.add_bos_token = False
    else:
        tokenizer.chat_template = DEEPSEEK_R1_CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    return tokenizer


def _tensor_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _random_tensor(name: str, shape: tuple[int, ...], dtype: Any, std: float, seed: int) -> Any:
    """One parameter, initialised as HF's Qwen2 does (normal std for matrices, ones for norms, zero biases)."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(_tensor_seed(name, seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(dtype)


def parameter_shapes(config_dict: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every stored tensor's name and shape, from a model built on the ``meta`` device (no memory)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    names = [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]
    if config.tie_word_embeddings:
        names = [(name, shape) for name, shape in names if name != "lm_head.weight"]
    return names


def write_model(shape: str, directory: str | Path, num_layers: int | None = None, dtype: str = "bfloat16",
                overrides: dict[str, Any] | None = None, seed: int = 0, base_vocab: int = BASE_VOCAB,
                learned_vocab: int = 2048, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random-weight model directory at ``shape``; returns the directory."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = model_config_dict(shape, num_layers, overrides, dtype)
    torch_dtype = getattr(torch, dtype)
    std = float(config_dict.get("initializer_range", 0.02))
    shapes = parameter_shapes(config_dict)
    weight_map: dict[str, str] = {}
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    for name, tensor_shape in shapes:
        nbytes = itemsize * int(torch.Size(tensor_shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor_shape))
        size += nbytes
    total = 0
    for index, shard in enumerate(shards, start=1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, tensor_shape, torch_dtype, std, seed) for name, tensor_shape in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: filename for name, _ in shard})
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    spec = load_shape(shape)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(spec["generation_config"], indent=2) + "\n")
    build_tokenizer(shape, base_vocab, learned_vocab).save_pretrained(directory)
    (directory / "REAL_SHAPE.json").write_text(json.dumps(
        {"shape": shape, "source": spec["source"], "num_layers": config_dict["num_hidden_layers"], "dtype": dtype,
         "seed": seed, "random_weights": True}, indent=2) + "\n")
    logger.info("wrote %s (%d layers, %s, %.2f GB) to %s", shape, config_dict["num_hidden_layers"], dtype, total / 1e9,
                directory)
    return directory


def parameter_count(shape: str, num_layers: int | None = None) -> int:
    """Stored parameters of ``shape`` (tied heads counted once)."""
    import math

    return sum(math.prod(s) for _, s in parameter_shapes(model_config_dict(shape, num_layers)))


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight model at a published shape.")
    parser.add_argument("--shape", required=True, help=f"one of {', '.join(shape_names())}")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the published depth)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_model(args.shape, args.out, args.layers, args.dtype, seed=args.seed)
    except LightReasonerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
