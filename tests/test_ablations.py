"""Derived sample sets: beta filter, random-step control, SFT as one-hot labels."""

import math

import pytest
import torch

from lightreasoner_ray.ablations import random_steps, select_by_beta, sft_rows, tuned_tokens


def row(problem_id, kls):
    steps = list(range(len(kls)))
    return {"problem_id": problem_id, "prompt_ids": [1, 2], "completion_ids": [5] * len(kls), "steps": steps,
            "kl": list(kls), "target_ids": [[t] for t in steps], "target_probs": [[1.0] for _ in steps],
            "position_kl": list(kls)}


ROWS = [row("a", [0.1, 0.5, 0.9, 0.2]), row("b", [0.45, 0.05]), row("c", [0.3, 0.7, 0.8])]


def test_select_by_beta_equals_sampling_with_that_beta():
    selected = select_by_beta(ROWS, 0.4)
    assert [r["steps"] for r in selected] == [[1, 2], [0], [1, 2]]
    for r in selected:
        assert r["kl"] == [r["position_kl"][t] for t in r["steps"]]
        assert r["target_ids"] == [[t] for t in r["steps"]]
    assert tuned_tokens(selected) == 5


def test_random_steps_same_count_uniform_and_seeded():
    drawn = random_steps(ROWS, 5, seed=0)
    assert tuned_tokens(drawn) == 5
    assert drawn == random_steps(ROWS, 5, seed=0)
    assert drawn != random_steps(ROWS, 5, seed=1) or drawn != random_steps(ROWS, 5, seed=2)
    for r, original in zip(drawn, ROWS):
        assert set(r["steps"]) <= set(original["steps"]) and r["steps"] == sorted(r["steps"])
        assert r["target_ids"] == [[t] for t in r["steps"]]  # labels travel with their positions
    # Uniform: over many seeds each of the 9 positions is drawn about 5/9 of the time.
    counts = {}
    for seed in range(900):
        for r in random_steps(ROWS, 5, seed=seed):
            for t in r["steps"]:
                counts[(r["problem_id"], t)] = counts.get((r["problem_id"], t), 0) + 1
    assert len(counts) == 9 and all(abs(c / 900 - 5 / 9) < 0.07 for c in counts.values())
    with pytest.raises(ValueError):
        random_steps(ROWS, 10, seed=0)


def test_sft_one_hot_kl_is_cross_entropy():
    rows = sft_rows(["p"], [[1, 2, 3]], [[7, 8, 9]])
    assert rows[0]["steps"] == [0, 1, 2] and rows[0]["target_ids"] == [[7], [8], [9]]
    logits = torch.randn(3, 10)
    log_probs = torch.log_softmax(logits, -1)
    kl = sum(p * (math.log(p) - log_probs[i, t]) for i, (ids, probs) in enumerate(zip(rows[0]["target_ids"], rows[0]["target_probs"]))
             for t, p in zip(ids, probs))
    cross_entropy = torch.nn.functional.cross_entropy(logits, torch.tensor([7, 8, 9]), reduction="sum")
    assert float(kl) == pytest.approx(float(cross_entropy), rel=1e-6)


def test_select_by_beta_on_a_beta_zero_run_equals_a_sampler_run_with_that_beta(tiny_pair):
    """The demo samples once with beta = 0 and filters: the same rows as the real sampler at beta."""
    from lightreasoner_ray.config import ModelConfig
    from lightreasoner_ray.prompts import prompt_ids
    from lightreasoner_ray.sampler import ContrastiveSampler

    sampler = ContrastiveSampler(ModelConfig(str(tiny_pair["expert"])), ModelConfig(str(tiny_pair["amateur"])),
                                 alpha=0.2, beta=0.0, max_new_tokens=16)
    prompts = [prompt_ids(sampler.tokenizer, q, "Please reason step by step.")
               for q in ("Tom has 3 apples and buys 4 more.", "What is 12 times 7?", "Ann has 9 pens and loses 2.")]
    everything = sampler.sample(["a", "b", "c"], prompts)
    kls = sorted(k for row in everything for k in row["position_kl"])
    beta = sampler.beta = (kls[len(kls) // 2 - 1] + kls[len(kls) // 2]) / 2  # the median: selection splits
    direct = sampler.sample(["a", "b", "c"], prompts)
    filtered = select_by_beta(everything, beta)
    assert 0 < tuned_tokens(filtered) < sum(len(row["completion_ids"]) for row in everything)
    for got, want in zip(filtered, direct):
        assert got["steps"] == want["steps"] and got["target_ids"] == want["target_ids"]
        assert got["target_probs"] == want["target_probs"] and got["kl"] == want["kl"]


# --- rejection-sampling SFT ---------------------------------------------------------------------

def test_keep_correct_keeps_distinct_solutions_with_the_gold_answer():
    from lightreasoner_ray.rejection_sft import keep_correct

    texts = {1: "3 * 4 = 12", 2: "The answer is \\boxed{12}.", 3: "The answer is \\boxed{13}.", 4: "\\boxed{ 12.0 }",
             9: "<eos>"}
    decode = lambda ids: " ".join(texts[i] for i in ids)  # noqa: E731
    samples = [
        [[1, 2, 9], [1, 3, 9], [1, 2, 9], [4, 9]],  # right, wrong, right again (a duplicate), right (12.0 == 12)
        [[1, 3, 9], [], [3], [1, 3]],  # nothing right (and an empty completion)
    ]
    result = keep_correct(["p", "q"], [[7], [8, 8]], samples, ["12", "5"], decode, benchmark="toy")
    assert (result.problems, result.sampled, result.correct, result.kept) == (2, 8, 3, 2)
    assert result.problems_with_a_kept_solution == 1
    assert [r["problem_id"] for r in result.rows] == ["p#0", "p#1"]
    assert [r["completion_ids"] for r in result.rows] == [[1, 2, 9], [4, 9]]
    assert all(r["prompt_ids"] == [7] for r in result.rows)
    assert result.rows[0]["target_ids"] == [[1], [2], [9]] and result.rows[0]["target_probs"] == [[1.0]] * 3
    assert tuned_tokens(result.rows) == 5


def test_sampled_solutions_k_per_prompt_seeded_and_greedy_at_temperature_zero(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightreasoner_ray.generation import eos_token_ids, greedy_generate
    from lightreasoner_ray.rejection_sft import sample_solutions

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).eval()
    prompts = [tokenizer.encode(q) for q in ("Tom has 3 pens.", "How many apples are left after 5 are eaten?", "Sam")]
    samples = sample_solutions(model, tokenizer, prompts, k=3, temperature=1.0, max_new_tokens=10, seed=0, batch_size=2)
    assert [len(s) for s in samples] == [3, 3, 3]
    eos = eos_token_ids(model, tokenizer)
    for completions in samples:
        for c in completions:
            assert 0 < len(c) <= 10 and all(t not in eos for t in c[:-1])
    again = dict(k=3, temperature=1.0, max_new_tokens=10, batch_size=2)
    assert sample_solutions(model, tokenizer, prompts, seed=0, **again) == samples
    assert sample_solutions(model, tokenizer, prompts, seed=1, **again) != samples
    # A temperature near zero samples the argmax: every sample is the greedy completion.
    cold = sample_solutions(model, tokenizer, prompts, k=2, temperature=1e-6, max_new_tokens=10, seed=0)
    greedy = greedy_generate(model, tokenizer, prompts, max_new_tokens=10)
    assert cold == [[g, g] for g in greedy]
