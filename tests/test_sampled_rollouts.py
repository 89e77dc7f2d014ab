"""Sampled expert rollouts for the sampling stage (sampling.temperature / top_p / seed).

A problem's rollout depends on sampling.seed and the problem alone: the same in any batch, in any
actor, on a re-run; greedy (temperature 0, the default) is unchanged. The vLLM engine's side is in
test_vllm_engine.py (same seed, same draw, whatever the call's other prompts)."""

from __future__ import annotations

import pytest

from conftest import gsm8k_rows
from lightreasoner_ray.config import ModelConfig, SamplingConfig, load_config
from lightreasoner_ray.errors import LightReasonerError


def _sampler(tiny_pair, **kwargs):
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

    return ContrastiveSampler(ModelConfig(path=str(tiny_pair["expert"])), ModelConfig(path=str(tiny_pair["amateur"])),
                              alpha=0.2, beta=0.0, max_new_tokens=24, **kwargs)


def _prompts(sampler, count):
    from lightreasoner_ray.data.prompts import prompt_ids

    return [prompt_ids(sampler.tokenizer, row["question"], "Please reason step by step.") for row in gsm8k_rows(count)]


def test_a_problems_sampled_rollout_depends_on_the_seed_and_the_problem_alone(tiny_pair):
    sampler = _sampler(tiny_pair, temperature=1.0, top_p=0.95, seed=3)
    prompts = _prompts(sampler, 4)
    ids = ["p0", "p1", "p2", "p3"]
    together = {row["problem_id"]: row["completion_ids"] for row in sampler.sample(ids, prompts)}
    alone = sampler.sample(["p2"], [prompts[2]])[0]["completion_ids"]
    assert alone == together["p2"]  # its batch does not matter
    reordered = {row["problem_id"]: row["completion_ids"] for row in sampler.sample(ids[::-1], prompts[::-1])}
    assert reordered == together

    again = _sampler(tiny_pair, temperature=1.0, top_p=0.95, seed=3)  # another actor, same seed
    assert {row["problem_id"]: row["completion_ids"] for row in again.sample(ids, prompts)} == together
    other = _sampler(tiny_pair, temperature=1.0, top_p=0.95, seed=4)
    assert {row["problem_id"]: row["completion_ids"] for row in other.sample(ids, prompts)} != together

    greedy = _sampler(tiny_pair)
    greedy_rows = greedy.sample(ids, prompts)
    assert [row["completion_ids"] for row in greedy_rows] != list(together.values())  # random weights: sampling differs
    # Each sampled row is contrasted on its own completion, as greedy rows are.
    row = sampler.sample(["p1"], [prompts[1]])[0]
    assert row["completion_ids"] and len(row["position_kl"]) == len(row["completion_ids"])


def test_greedy_is_the_default_and_matches_plain_greedy_decoding(tiny_pair):
    from lightreasoner_ray.engines.generation import greedy_generate

    sampler = _sampler(tiny_pair)
    assert SamplingConfig().temperature == 0.0 and not sampler.sampled
    prompts = _prompts(sampler, 3)
    rows = sampler.sample(["a", "b", "c"], prompts)
    assert [row["completion_ids"] for row in rows] == greedy_generate(sampler.expert, sampler.tokenizer, prompts, 24)


def test_rollout_seeds_differ_per_problem_and_per_seed():
    from lightreasoner_ray.stages.sampling.sampler import rollout_seed

    seeds = {rollout_seed(0, f"p{i}") for i in range(200)}
    assert len(seeds) == 200 and all(0 <= s < 2 ** 31 for s in seeds)
    assert rollout_seed(0, "p1") == rollout_seed(0, "p1") != rollout_seed(1, "p1")


def test_the_settings_record_names_sampled_rollouts_and_keeps_greedy_records_as_they_were(tiny_pair, tmp_path):
    from lightreasoner_ray.stages.sampling.stage import sampling_settings

    base = [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", f"output_dir={tmp_path}"]
    greedy = sampling_settings(load_config(None, base))
    assert not {"temperature", "top_p", "seed"} & set(greedy)
    sampled = sampling_settings(load_config(None, base + ["sampling.temperature=0.6", "sampling.top_p=0.95",
                                                          "sampling.seed=5"]))
    assert {k: sampled[k] for k in ("temperature", "top_p", "seed")} == {"temperature": 0.6, "top_p": 0.95, "seed": 5}


@pytest.mark.parametrize("override,needle", [
    ("sampling.temperature=-0.1", "sampling.temperature must be >= 0"),
    ("sampling.top_p=0", "sampling.top_p must be in (0, 1]"),
    ("sampling.top_p=1.5", "sampling.top_p must be in (0, 1]"),
])
def test_bad_rollout_settings_are_one_line(override, needle):
    with pytest.raises(LightReasonerError) as error:
        load_config(None, [override])
    assert needle in str(error.value) and "\n" not in str(error.value)
