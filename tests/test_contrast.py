"""The contrast maths, and the one-pass sampler against a naive per-prefix oracle."""

from __future__ import annotations

import math

import pytest
import torch

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.contrast import contrast_positions, kl_divergence
from lightreasoner_ray.prompts import prompt_ids
from lightreasoner_ray.sampler import ContrastiveSampler

from conftest import gsm8k_rows


def test_hand_computed_example():
    # Expert probs (0.6, 0.3, 0.1), amateur (0.2, 0.4, 0.4) over 3 tokens.
    expert = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    amateur = torch.log(torch.tensor([[0.2, 0.4, 0.4]]))
    expected_kl = 0.6 * math.log(3) + 0.3 * math.log(0.75) + 0.1 * math.log(0.25)
    result = contrast_positions(expert, amateur, alpha=0.2, beta=0.1)
    assert result.kl[0].item() == pytest.approx(expected_kl, rel=1e-6)
    assert result.steps == [0]
    # Plausible set: pi_E >= 0.2 * 0.6 = 0.12 -> tokens 0 and 1. Weights ∝ pi_E / pi_A = 3 and 0.75.
    assert result.target_ids == [[0, 1]]
    assert result.target_probs[0] == pytest.approx([3 / 3.75, 0.75 / 3.75], rel=1e-6)


def test_beta_is_strict_and_alpha_one_keeps_the_argmax():
    expert = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-9], [0.9, 0.05, 0.05]]))
    amateur = expert.clone()
    result = contrast_positions(expert, amateur, alpha=1.0, beta=0.0)
    assert result.steps == []  # KL == 0 is not > 0
    amateur[1] = torch.log(torch.tensor([0.1, 0.45, 0.45]))
    result = contrast_positions(expert, amateur, alpha=1.0, beta=0.0)
    assert result.steps == [1]
    assert result.target_ids == [[0]] and result.target_probs == [[1.0]]


def test_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    expert, amateur = torch.randn(37, 101) * 3, torch.randn(37, 101) * 3
    whole = contrast_positions(expert, amateur, 0.2, 0.4, position_chunk=64)
    chunked = contrast_positions(expert, amateur, 0.2, 0.4, position_chunk=5)
    assert whole.steps == chunked.steps and whole.target_ids == chunked.target_ids
    assert torch.allclose(whole.kl, chunked.kl)


def test_bf16_inputs_are_contrasted_in_fp32():
    torch.manual_seed(1)
    expert, amateur = torch.randn(4, 50) * 4, torch.randn(4, 50) * 4
    result = contrast_positions(expert.bfloat16(), amateur.bfloat16(), 0.2, 0.0)
    assert result.kl.dtype == torch.float32
    reference = kl_divergence(torch.log_softmax(expert.bfloat16().float(), -1), torch.log_softmax(amateur.bfloat16().float(), -1))
    assert torch.allclose(result.kl, reference)


def naive_oracle(expert, amateur, prompt, completion, vocab, alpha, beta):
    """The reference script's algorithm: one forward pass per prefix, float64 maths from probabilities."""
    out = []
    for t in range(len(completion)):
        ids = torch.tensor([list(prompt) + list(completion[:t])])
        with torch.no_grad():
            p = torch.softmax(expert(ids).logits[0, -1, :vocab].double(), -1)
            q = torch.softmax(amateur(ids).logits[0, -1, :vocab].double(), -1)
        kl = float((p * (p.log() - q.log())).sum())
        if kl <= beta:
            out.append((t, kl, None))
            continue
        plausible = [a for a in range(vocab) if p[a] >= alpha * p.max()]
        ratios = {a: float(p[a] / q[a]) for a in plausible}
        total = sum(ratios.values())
        out.append((t, kl, {a: r / total for a, r in ratios.items()}))
    return out


def test_one_pass_sampler_matches_the_per_prefix_oracle(tiny_pair):
    alpha = 0.2
    sampler = ContrastiveSampler(ModelConfig(str(tiny_pair["expert"])), ModelConfig(str(tiny_pair["amateur"])),
                                 alpha=alpha, beta=0.0, max_new_tokens=24, position_chunk=7)
    # Padded heads: expert 602 rows, amateur 606, tokenizer 600 -> logits cut to 600.
    assert sampler.vocab_size == len(sampler.tokenizer) == 600
    questions = [row["question"] for row in gsm8k_rows(3)]
    prompts = [prompt_ids(sampler.tokenizer, q, "Please reason step by step.") for q in questions]
    # Random models diverge evenly; put beta at the median so selection really splits.
    all_kl = sorted(k for row in sampler.sample(["a", "b", "c"], prompts) for k in row["position_kl"])
    middle = len(all_kl) // 2
    beta = sampler.beta = (all_kl[middle - 1] + all_kl[middle]) / 2
    rows = sampler.sample(["a", "b", "c"], prompts)
    total_selected = 0
    for row, prompt in zip(rows, prompts):
        assert row["prompt_ids"] == prompt
        assert 0 < len(row["completion_ids"]) <= 24
        oracle = naive_oracle(sampler.expert, sampler.amateur, prompt, row["completion_ids"], 600, alpha, beta)
        assert row["position_kl"] == pytest.approx([kl for _, kl, _ in oracle], rel=1e-4, abs=1e-6)
        oracle_steps = [t for t, _, label in oracle if label is not None]
        assert row["steps"] == oracle_steps
        assert row["kl"] == pytest.approx([oracle[t][1] for t in oracle_steps], rel=1e-4)
        for ids, probs, t in zip(row["target_ids"], row["target_probs"], row["steps"]):
            label = oracle[t][2]
            assert sorted(ids) == sorted(label)
            assert probs == pytest.approx([label[a] for a in ids], rel=1e-4, abs=1e-6)
            assert sum(probs) == pytest.approx(1.0, abs=1e-5)
            assert probs == sorted(probs, reverse=True)
        total_selected += len(row["steps"])
    # The fixture pair is built so that some, not all, positions pass beta.
    total_positions = sum(len(r["completion_ids"]) for r in rows)
    assert 0 < total_selected < total_positions


def test_sampler_greedy_completion_is_the_experts_own_argmax(tiny_pair):
    """The completion is the expert's greedy decode: each token is the argmax of its position."""
    sampler = ContrastiveSampler(ModelConfig(str(tiny_pair["expert"])), ModelConfig(str(tiny_pair["amateur"])),
                                 alpha=0.2, beta=0.4, max_new_tokens=12)
    prompt = prompt_ids(sampler.tokenizer, gsm8k_rows(1)[0]["question"], "Please reason step by step.")
    completion = sampler.sample(["a"], [prompt])[0]["completion_ids"]
    with torch.no_grad():
        logits = sampler.expert(torch.tensor([prompt + completion])).logits[0]
    predicted = logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)].argmax(-1).tolist()
    assert predicted == completion
