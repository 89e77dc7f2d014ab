"""Generation stops at the end of the chat turn even when a base model's EOS is <|endoftext|>;
the teacher-forced pass in bounded sub-batches gives the states of one pass."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightreasoner_ray.engines.generation import (
    TEACHER_FORCED_TOKENS,
    _sub_batches,
    completion_hidden_states,
    eos_token_ids,
    greedy_generate,
    truncate_at_eos,
)


def test_base_model_eos_and_pad_equal(tiny_pair):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"])
    # Like Qwen2.5 base checkpoints: EOS = PAD = <|endoftext|>, the turn ends with <|im_end|>.
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert eos_token_ids(model, tokenizer) == {endoftext, im_end}
    assert truncate_at_eos([5, 6, im_end, 7], {endoftext, im_end}) == [5, 6, im_end]

    prompts = [tokenizer.encode("Tom has 3 apples."), tokenizer.encode("What is 2 + 2?")]
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens=12)
    for completion in completions:
        assert len(completion) <= 12
        assert all(token not in (endoftext, im_end) for token in completion[:-1])


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_pair):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"])
    prompts = [tokenizer.encode("Tom has 3 apples and buys many more of them at the shop."), tokenizer.encode("What?"),
               tokenizer.encode("A train leaves at noon.")]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=10)
    assert batched == [greedy_generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in prompts]


def _ragged_batch():
    """Ragged prompts and completions (one completion empty, one a single token), lengths 3..23."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 9), (2, 1), (12, 11), (3, 0), (7, 4), (1, 13), (9, 14), (4, 6), (6, 2), (2, 8)]
    sequences = [torch.randint(10, 590, (p + c,), generator=g).tolist() for p, c in shapes]
    return sequences, [p for p, _ in shapes]


def _each_alone(model, sequences, prompt_lengths):
    """Independent oracle: every sequence through the decoder on its own, unpadded, no mask."""
    out = []
    with torch.inference_mode():
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            hidden = model.get_decoder()(input_ids=torch.tensor([sequence]), use_cache=False).last_hidden_state[0]
            out.append(hidden[prompt_length - 1 : len(sequence) - 1])
    return out


def test_sub_batched_pass_equals_one_pass_and_each_sequence_alone(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).eval()
    sequences, prompt_lengths = _ragged_batch()
    shapes = []
    handle = model.get_decoder().register_forward_hook(
        lambda module, args, kwargs, output: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        sub = completion_hidden_states(model, sequences, prompt_lengths, 0, max_tokens=40)
        split_shapes, shapes[:] = list(shapes), []
        one = completion_hidden_states(model, sequences, prompt_lengths, 0, max_tokens=10_000)
        assert shapes == [(10, 23)]  # the whole batch in one right-padded pass
    finally:
        handle.remove()
    # The budget held (no sequence is longer than it) and every row went through exactly once, in order.
    assert len(split_shapes) > 2 and all(rows * width <= 40 for rows, width in split_shapes)
    assert sum(rows for rows, _ in split_shapes) == len(sequences)
    alone = _each_alone(model, sequences, prompt_lengths)
    assert [h.shape[0] for h in sub] == [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    for a, b, c in zip(sub, one, alone):
        assert a.shape == b.shape == c.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-5)
    # Padding is invisible: another pad id gives the same states.
    repadded = completion_hidden_states(model, sequences, prompt_lengths, 597, max_tokens=40)
    assert all(torch.equal(a, b) for a, b in zip(sub, repadded))


def test_a_batch_larger_than_the_budget_runs_in_bounded_sub_batches(tiny_pair):
    # 40 rows of 10 tokens against a 64-token budget: 6 rows a pass; a 100-token row runs alone.
    assert [len(s) for s in _sub_batches([10] * 40, 64)] == [6] * 6 + [4]
    spans = _sub_batches([10, 10, 100, 10, 30, 30, 5], 64)
    assert [list(s) for s in spans] == [[0, 1], [2], [3, 4], [5, 6]]
    assert _sub_batches([], 64) == []
    assert TEACHER_FORCED_TOKENS == 4096

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).eval()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(10, 590, (int(n),), generator=g).tolist() for n in torch.randint(4, 16, (40,), generator=g)]
    prompt_lengths = [2] * len(sequences)
    passes = []
    handle = model.get_decoder().register_forward_hook(lambda module, args, output: passes.append(1))
    try:
        sub = completion_hidden_states(model, sequences, prompt_lengths, 0, max_tokens=64)
    finally:
        handle.remove()
    assert len(passes) >= 10
    for a, b in zip(sub, _each_alone(model, sequences, prompt_lengths)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_left_padded_generation_then_teacher_forcing_scores_what_was_generated(tiny_pair):
    # The sampler's path: left-padded greedy generation, then the right-padded teacher-forced
    # pass in sub-batches; the greedy token at every position is the argmax of its logits.
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).eval()
    prompts = [tokenizer.encode(t) for t in ("Tom has 3 apples and buys many more of them at the shop.", "What?",
                                               "A train leaves at noon.", "Sam reads 12 pages a day for a week.")]
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens=8)
    sequences = [p + c for p, c in zip(prompts, completions)]
    hidden = completion_hidden_states(model, sequences, [len(p) for p in prompts], tokenizer.pad_token_id,
                                      max_tokens=30)
    with torch.inference_mode():
        for states, completion in zip(hidden, completions):
            assert model.lm_head(states).argmax(-1).tolist() == completion
