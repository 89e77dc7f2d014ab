"""Tiny Qwen2-architecture models and a tokenizer trained in-process.

Used by the tests and by quick local runs: no hub, no downloads. The tokenizer is a
byte-level BPE trained by the `tokenizers` library on the given texts, with Qwen's
special tokens and a ChatML chat template, so prompts look like the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class TinyModelSpec:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    # Extra embedding rows past the tokenizer's vocabulary, as real checkpoints have.
    vocab_padding: int = 0
    # Larger than the usual 0.02 so random models have peaked, diverging distributions.
    initializer_range: float = 0.02
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, spec: TinyModelSpec):
    """A randomly initialised ``Qwen2ForCausalLM`` for ``tokenizer``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer) + spec.vocab_padding,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_pair(directory: str | Path, texts: Iterable[str], expert: TinyModelSpec, amateur: TinyModelSpec,
              vocab_size: int = 512) -> tuple[Path, Path]:
    """Train a tokenizer and save a random expert and amateur under ``directory``."""
    directory = Path(directory)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    paths = []
    for name, spec in (("expert", expert), ("amateur", amateur)):
        path = directory / name
        build_model(tokenizer, spec).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


# Random weights at this scale diverge by KL ~0.3 at most positions: beta 0.3 splits them.
DEFAULT_EXPERT = TinyModelSpec(hidden_size=64, num_layers=2, initializer_range=0.08, vocab_padding=2, seed=1)
DEFAULT_AMATEUR = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                initializer_range=0.08, vocab_padding=6, seed=2)
