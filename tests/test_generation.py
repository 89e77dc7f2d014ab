"""Generation stops at the end of the chat turn even when a base model's EOS is <|endoftext|>."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from lightreasoner_ray.engines.generation import eos_token_ids, greedy_generate, truncate_at_eos


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
