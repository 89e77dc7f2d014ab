"""Batched greedy generation and teacher-forced logits for Hugging Face causal LMs.

This is the small engine interface the stages use: ``greedy_generate`` (left-padded
batches through ``model.generate``) and ``completion_logits`` (right-padded,
teacher-forced forward passes over sub-batches of bounded size, no KV cache, whose
hidden states at the completion positions are kept and projected to logits only a
slice of positions at a time).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lightreasoner_ray.core.lm_head import LMHead, ProjectedRows


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a generation (generation configs may list several)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    # Base checkpoints (Qwen2.5-Math-1.5B, Qwen2.5-0.5B) name <|endoftext|> as EOS while
    # their chat template closes the assistant turn with <|im_end|>: stop there too.
    end_of_turn = tokenizer.get_vocab().get("<|im_end|>")
    if end_of_turn is not None:
        ids.add(int(end_of_turn))
    return ids


def truncate_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first end-of-sequence token."""
    out = []
    for token in tokens:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def _pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device):
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy completions (token ids, cut after the first EOS) for a batch of prompts."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    input_ids, attention_mask = _pad_batch(prompts, pad_id, left=True, device=device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=1.0,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
    )
    generated = output[:, input_ids.shape[1] :].tolist()
    return [truncate_at_eos(tokens, eos_ids) for tokens in generated]


@torch.inference_mode()
def sampled_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float, top_p: float, n: int) -> list[list[list[int]]]:
    """``n`` completions per prompt (token ids, cut after the first EOS); greedy when ``temperature == 0``.

    Sampling is over the whole vocabulary at ``temperature`` with nucleus ``top_p`` and no
    top-k (generate's own default would cut to the 50 likeliest tokens; vLLM's engine
    does not either). Uses torch's global random state: seed it (``torch.manual_seed``)
    for a reproducible draw.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    input_ids, attention_mask = _pad_batch(prompts, pad_id, left=True, device=device)
    sample = temperature > 0
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=0 if sample else None,
        repetition_penalty=1.0,
        num_return_sequences=n,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
    )
    generated = [truncate_at_eos(tokens, eos_ids) for tokens in output[:, input_ids.shape[1] :].tolist()]
    return [generated[i * n : (i + 1) * n] for i in range(len(prompts))]


TEACHER_FORCED_TOKENS = 4096
"""Token budget of one teacher-forced forward pass (rows x longest sequence, padding included).

The pass's peak memory is set by one decoder layer's MLP, which holds about
3 x rows x sequence length x MLP width values while it runs (1.9 GB in fp32 for 16
completions of 1,024 tokens at Qwen2.5-Math-1.5B's width). Running the batch in
sub-batches of at most this many tokens bounds that transient whatever the sampling
batch size (~0.44 GB fp32 at that width); a single sequence longer than the budget runs
alone. Only the completion positions' final hidden states are kept between sub-batches.
"""


def _sub_batches(lengths: Sequence[int], max_tokens: int) -> list[range]:
    """Consecutive runs of rows whose padded size (rows x longest) stays within ``max_tokens``."""
    spans, start, longest = [], 0, 0
    for row, length in enumerate(lengths):
        widest = max(longest, length)
        if row > start and (row - start + 1) * widest > max_tokens:
            spans.append(range(start, row))
            start, widest = row, length
        longest = widest
    if start < len(lengths):
        spans.append(range(start, len(lengths)))
    return spans


def completion_hidden_states(
    model: Any,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    pad_id: int,
    max_tokens: int = TEACHER_FORCED_TOKENS,
) -> list[torch.Tensor]:
    """Teacher-forced passes: the final hidden states that predict each completion token.

    For a sequence ``prompt + y`` the state at position ``len(prompt) - 1 + t`` gives
    pi(. | prompt + y_<t). Right padding keeps every real position's causal context
    intact; no KV cache is built. The batch goes through the decoder in consecutive
    sub-batches of at most ``max_tokens`` padded tokens (:data:`TEACHER_FORCED_TOKENS`),
    so memory does not grow with the batch. Returns one ``[len(y), hidden]`` tensor per
    sequence (``positions x hidden``: small next to ``positions x vocab`` logits).
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    out: list[torch.Tensor] = []
    for span in _sub_batches([len(s) for s in sequences], max_tokens):
        chunk = [sequences[row] for row in span]
        input_ids, attention_mask = _pad_batch(chunk, pad_id, left=False, device=device)
        rows, cols, counts = [], [], []
        for row, (sequence, prompt_length) in enumerate(zip(chunk, (prompt_lengths[r] for r in span))):
            completion_length = len(sequence) - prompt_length
            counts.append(completion_length)
            rows.extend([row] * completion_length)
            cols.extend(range(prompt_length - 1, len(sequence) - 1))
        with torch.inference_mode():
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            # Advanced indexing copies: the sub-batch's full hidden states are freed here.
            selected = hidden[torch.tensor(rows, device=device, dtype=torch.long),
                              torch.tensor(cols, device=device, dtype=torch.long)]
            del hidden
        out.extend(torch.split(selected, counts))
    return out


def completion_logits(
    model: Any,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    pad_id: int,
    vocab_size: int,
) -> list[ProjectedRows]:
    """Per sequence, the logits that predict each completion token, projected lazily.

    Each item holds ``[len(y), hidden]`` states; indexing a slice of positions projects
    just those through the LM head (fp32, cut to ``vocab_size``, with the model's logit
    scaling/soft-capping: :func:`lightreasoner_ray.core.lm_head.head_logits`).
    """
    head = LMHead(model, vocab_size)
    return [ProjectedRows(hidden, head) for hidden in completion_hidden_states(model, sequences, prompt_lengths, pad_id)]
