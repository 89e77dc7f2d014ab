"""Derived sample sets: beta filter, random-step control, SFT as one-hot labels."""

import math

import pytest
import torch

from lightreasoner_ray.data.sample_sets import random_steps, select_by_beta, sft_rows, tuned_tokens


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
    from lightreasoner_ray.data.prompts import prompt_ids
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

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
