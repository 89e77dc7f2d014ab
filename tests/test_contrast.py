"""The contrast maths, and the one-pass sampler against a naive per-prefix oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.data.sample_sets import select_by_beta
from lightreasoner_ray.core.contrast import SELECTIONS, contrast_positions, is_selected, kl_divergence, selection_mask
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.data.prompts import prompt_ids
from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

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


def _three_positions():
    """Position 0 diverges most; positions 1 and 2 diverge less, with equal KL."""
    expert = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]))
    amateur = torch.log(torch.tensor([[0.05, 0.05, 0.9], [0.2, 0.4, 0.4], [0.2, 0.4, 0.4]]))
    return expert, amateur


def test_reference_selection_keeps_kl_equal_to_beta_and_never_the_first_position():
    expert, amateur = _three_positions()
    kl = contrast_positions(expert, amateur, alpha=0.2, beta=0.0).kl
    assert kl[0] > kl[1] == kl[2] > 0
    beta = float(kl[1])  # a float32 value: KL == beta exactly at positions 1 and 2
    paper = contrast_positions(expert, amateur, alpha=0.2, beta=beta, selection="paper")
    reference = contrast_positions(expert, amateur, alpha=0.2, beta=beta, selection="reference")
    assert paper.steps == [0]  # strict: KL == beta is not kept; position 0 is
    assert reference.steps == [1, 2]  # KL >= beta, never position 0
    assert torch.equal(paper.kl, reference.kl)  # the rule changes selection only
    both = contrast_positions(expert, amateur, alpha=0.2, beta=0.0, selection="reference")
    assert both.steps == [1, 2]  # position 0 stays out at any beta
    # Positions count from the trajectory's start, not from each chunk's.
    chunked = contrast_positions(expert, amateur, alpha=0.2, beta=beta, position_chunk=1, selection="reference")
    assert chunked.steps == [1, 2] and chunked.target_ids == reference.target_ids


def test_selection_rule_scalar_and_vector_forms_agree():
    kl = torch.tensor([0.5, 0.4, 0.3, 0.4])
    positions = torch.arange(4)
    assert selection_mask(kl, positions, 0.4, "paper").tolist() == [True, False, False, False]
    assert selection_mask(kl, positions, 0.4, "reference").tolist() == [False, True, False, True]
    for rule in SELECTIONS:
        assert [is_selected(t, float(k), 0.4, rule) for t, k in zip(positions.tolist(), kl)] == \
            selection_mask(kl, positions, 0.4, rule).tolist()
    with pytest.raises(ValueError, match="paper, reference"):
        selection_mask(kl, positions, 0.4, "strict")


def test_select_by_beta_refilters_with_the_same_rule():
    expert, amateur = _three_positions()
    everything = contrast_positions(expert, amateur, alpha=0.2, beta=0.0)
    row = {"steps": everything.steps, "kl": everything.kl.tolist(), "target_ids": everything.target_ids,
           "target_probs": everything.target_probs}
    beta = float(everything.kl[1])
    for rule in SELECTIONS:
        direct = contrast_positions(expert, amateur, alpha=0.2, beta=beta, selection=rule)
        assert select_by_beta([row], beta, rule)[0]["steps"] == direct.steps


def test_selection_is_validated_and_recorded_so_a_resume_with_another_rule_is_refused(tiny_pair, tmp_path):
    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.stages.sampling.stage import sampling_settings
    from lightreasoner_ray.io.layout import RunLayout
    from lightreasoner_ray.stages.samples_record import check_sampling_settings

    from conftest import REPO_ROOT

    def config(*extra):
        return load_config(REPO_ROOT / "configs" / "tiny.yaml", [
            f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", f"output_dir={tmp_path}",
            *extra])

    with pytest.raises(LightReasonerError, match="sampling.selection must be one of paper, reference"):
        config("sampling.selection=strict")
    paper = sampling_settings(config())
    assert paper["selection"] == "paper" and paper["vocab_size"] == 600  # the shared vocabulary, not a padded head
    check_sampling_settings(RunLayout(str(tmp_path)).sampling_settings, str(tmp_path / "samples"), paper)
    reference = sampling_settings(config("sampling.selection=reference"))
    # No samples yet: nothing to mix, so the new settings simply replace the record.
    check_sampling_settings(RunLayout(str(tmp_path)).sampling_settings, str(tmp_path / "samples"), reference)
    assert json.loads((tmp_path / "sampling_settings.json").read_text())["selection"] == "reference"
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "samples").mkdir()
    pq.write_table(pa.table({"problem_id": ["p"]}), tmp_path / "samples" / "part-0.parquet")
    with pytest.raises(LightReasonerError, match="selection: 'reference' -> 'paper'"):
        check_sampling_settings(RunLayout(str(tmp_path)).sampling_settings, str(tmp_path / "samples"), paper)


def naive_oracle(expert, amateur, prompt, completion, vocab, alpha, beta, selection="paper"):
    """One forward pass per prefix, float64 maths from probabilities.

    ``selection``: ``paper`` keeps KL > beta; ``reference`` keeps KL >= beta from the
    second completion position on (LightR_sampling.py loops ``for step in range(1, ...)``).
    """
    out = []
    for t in range(len(completion)):
        ids = torch.tensor([list(prompt) + list(completion[:t])])
        with torch.no_grad():
            p = torch.softmax(expert(ids).logits[0, -1, :vocab].double(), -1)
            q = torch.softmax(amateur(ids).logits[0, -1, :vocab].double(), -1)
        kl = float((p * (p.log() - q.log())).sum())
        selected = kl > beta if selection == "paper" else (t >= 1 and kl >= beta)
        if not selected:
            out.append((t, kl, None))
            continue
        plausible = [a for a in range(vocab) if p[a] >= alpha * p.max()]
        ratios = {a: float(p[a] / q[a]) for a in plausible}
        total = sum(ratios.values())
        out.append((t, kl, {a: r / total for a, r in ratios.items()}))
    return out


@pytest.mark.parametrize("selection", ["paper", "reference"])
def test_one_pass_sampler_matches_the_per_prefix_oracle(tiny_pair, selection):
    alpha = 0.2
    sampler = ContrastiveSampler(ModelConfig(str(tiny_pair["expert"])), ModelConfig(str(tiny_pair["amateur"])),
                                 alpha=alpha, beta=0.0, max_new_tokens=24, position_chunk=7, selection=selection)
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
        oracle = naive_oracle(sampler.expert, sampler.amateur, prompt, row["completion_ids"], 600, alpha, beta,
                              selection)
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
    if selection == "reference":
        assert all(0 not in row["steps"] for row in rows)


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
