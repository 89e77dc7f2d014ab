"""Evaluation stage: the Ray evaluator pool end to end, grading arithmetic, resume, bad input, the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA_DIR
from lightreasoner_ray.data.benchmarks import load_benchmark
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.core.scoring import PREDICTION_FIELDS
from lightreasoner_ray.stages.evaluation.stage import EvalModel, parse_model_entry, run_evaluation
from lightreasoner_ray.stages.evaluation.store import check_generation_settings
from lightreasoner_ray.core.grading import extract_answer, is_equivalent

PAPER_SET = ["gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem"]
TABLE_HEADER = "| Model | GSM8K | MATH-500 | SVAMP | ASDiv | Minerva Math | OlympiadBench | MMLU-STEM | AVG |"


def eval_config(output_dir: Path, *overrides: str):
    return load_config(None, [
        f"output_dir={output_dir}",
        f"eval.data_dir={DATA_DIR}",
        f"eval.benchmarks=[{','.join(PAPER_SET)}]",
        "eval.num_actors=2",
        "eval.shard_size=2",
        "eval.max_new_tokens=16",
        *overrides,
    ])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_reports(output_dir: Path, results: dict, tags: list[str], limit: int) -> None:
    """Files exist, rows are complete and in benchmark order, and every score is re-derived from the rows."""
    eval_dir = output_dir / "eval"
    assert json.loads((eval_dir / "results.json").read_text())["models"] == json.loads(json.dumps(results["models"]))
    assert (eval_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (eval_dir / "results.md").read_text()
    assert TABLE_HEADER in markdown
    assert results["benchmarks"] == PAPER_SET
    for tag in tags:
        model = results["models"][tag]
        for benchmark in PAPER_SET:
            rows = read_jsonl(eval_dir / tag / f"{benchmark}.jsonl")
            reference = load_benchmark(benchmark, DATA_DIR, limit)
            assert [row["id"] for row in rows] == [row["id"] for row in reference]
            assert all(set(PREDICTION_FIELDS) <= set(row) for row in rows)
            assert [row["answer"] for row in rows] == [row["answer"] for row in reference]
            regraded = []
            for row, source in zip(rows, reference):
                extracted = extract_answer(row["output"], benchmark, source.get("choices"))
                assert extracted == row["extracted"]
                regraded.append(bool(extracted) and is_equivalent(extracted, row["answer"]))
            assert [row["correct"] for row in rows] == regraded
            assert model["benchmarks"][benchmark] == {
                "accuracy": sum(regraded) / limit, "n": limit, "correct": sum(regraded)
            }
        average = sum(model["benchmarks"][b]["accuracy"] for b in PAPER_SET) / len(PAPER_SET)
        assert model["average"] == pytest.approx(average)
        cells = [f"{100 * model['benchmarks'][b]['accuracy']:.1f}" for b in PAPER_SET] + [f"{100 * average:.1f}"]
        assert f"| {tag} | " + " | ".join(cells) + " |" in markdown


@pytest.mark.slow
def test_tiny_model_end_to_end_on_the_seven_benchmarks(tiny_pair, ray_local, tmp_path):
    config = eval_config(tmp_path, f"expert.path={tiny_pair['expert']}", "eval.limit=3")
    results = run_evaluation(config)
    check_reports(tmp_path, results, ["expert"], limit=3)
    run = results["models"]["expert"]["run"]
    assert run["shards_generated"] == 14 and run["rows_generated"] == 21
    # Completions really came from the model, and shards are on disk next to the merged files.
    assert any(row["output"] for row in read_jsonl(tmp_path / "eval" / "expert" / "gsm8k.jsonl"))
    assert sorted(p.name for p in (tmp_path / "eval" / "expert" / "asdiv").iterdir()) == [
        "shard-00000.jsonl", "shard-00001.jsonl"
    ]


def gold_engine_factory(questions: dict[str, tuple[str, int, str]], call_log: Path):
    """An engine that answers from the gold answers: right on a fixed subset of rows, wrong on the rest.

    The baseline (any path but the amateur's) is right on rows with an even index, the
    "trained" model (the amateur's path) on rows whose index is not a multiple of 3.
    Defined in a function so Ray ships it to the actors by value.
    """

    class GoldEngine:
        def __init__(self, spec):
            from lightreasoner_ray.config import ModelConfig
            from lightreasoner_ray.engines.models import load_tokenizer

            self.tokenizer = load_tokenizer(ModelConfig(path=spec.model_path))
            self.trained = "amateur" in spec.model_path

        def is_right(self, index: int) -> bool:
            return index % 3 != 0 if self.trained else index % 2 == 0

        def generate(self, prompts):
            outputs, benchmarks = [], set()
            for prompt in prompts:
                text = self.tokenizer.decode(prompt, skip_special_tokens=False)
                assert "put your final answer within \\boxed{}" in text
                question = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
                benchmark, index, answer = questions[question]
                benchmarks.add(benchmark)
                if benchmark == "mmlu_stem":
                    assert "\n(A) " in question and "\n(D) " in question
                    wrong = "ABCD"[("ABCD".index(answer) + 1) % 4]
                else:
                    wrong = "-987654321.5"
                outputs.append(f"Step by step... The final answer is \\boxed{{{answer if self.is_right(index) else wrong}}}.")
            with call_log.open("a") as handle:
                handle.write(json.dumps({"trained": self.trained, "benchmarks": sorted(benchmarks), "rows": len(prompts)}) + "\n")
            return outputs

    return GoldEngine


@pytest.mark.slow
def test_grading_accuracy_two_models_and_resume(tiny_pair, ray_local, tmp_path):
    limit = 5
    questions = {}
    for benchmark in PAPER_SET:
        for index, row in enumerate(load_benchmark(benchmark, DATA_DIR, limit)):
            questions[row["question"]] = (benchmark, index, row["answer"])
    assert len(questions) == limit * len(PAPER_SET)
    call_log = tmp_path / "calls.jsonl"
    factory = gold_engine_factory(questions, call_log)
    output_dir = tmp_path / "out"
    config = eval_config(
        output_dir, f"eval.limit={limit}",
        f"eval.models=[baseline={tiny_pair['expert']},{tiny_pair['amateur']}]",
    )
    first = run_evaluation(config, engine_factory=factory)

    # Accuracy exactly as designed: baseline right on indices 0, 2, 4; amateur on 1, 2, 4.
    assert list(first["models"]) == ["baseline", "amateur"]
    for tag, correct in (("baseline", 3), ("amateur", 3)):
        for benchmark in PAPER_SET:
            assert first["models"][tag]["benchmarks"][benchmark] == {"accuracy": correct / limit, "n": limit, "correct": correct}
    baseline_rows = read_jsonl(output_dir / "eval" / "baseline" / "olympiadbench.jsonl")
    assert [row["correct"] for row in baseline_rows] == [True, False, True, False, True]
    check_reports(output_dir, first, ["baseline", "amateur"], limit)
    assert len(read_jsonl(call_log)) == 2 * 3 * len(PAPER_SET)  # 3 shards a benchmark (2+2+1 rows)

    # Resume: delete one shard; only that shard is generated again and nothing else is rewritten.
    model_dir = output_dir / "eval" / "amateur"
    deleted = model_dir / "svamp" / "shard-00001.jsonl"
    deleted_content = deleted.read_text()
    shard_files = sorted((output_dir / "eval").glob("*/*/shard-*.jsonl"))
    mtimes = {path: path.stat().st_mtime_ns for path in shard_files if path != deleted}
    deleted.unlink()
    call_log.unlink()
    second = run_evaluation(config, engine_factory=factory)
    assert read_jsonl(call_log) == [{"trained": True, "benchmarks": ["svamp"], "rows": 2}]
    assert deleted.read_text() == deleted_content
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    for tag in ("baseline", "amateur"):
        assert second["models"][tag]["benchmarks"] == first["models"][tag]["benchmarks"]
    assert second["models"]["amateur"]["run"]["shards_generated"] == 1
    assert second["models"]["baseline"]["run"]["shards_generated"] == 0
    check_reports(output_dir, second, ["baseline", "amateur"], limit)


@pytest.mark.slow
def test_a_pool_larger_than_the_cluster_works_with_the_actors_it_gets(tiny_pair, ray_local, tmp_path):
    """3 actors of 2 CPUs on a 4-CPU cluster: two are placed; the run neither hangs nor loses shards."""
    questions = {row["question"]: ("svamp", index, row["answer"])
                 for index, row in enumerate(load_benchmark("svamp", DATA_DIR, 6))}
    config = eval_config(tmp_path, f"eval.model={tiny_pair['expert']}", "eval.benchmarks=[svamp]", "eval.limit=6",
                         "eval.num_actors=3", "eval.cpus_per_actor=2", "eval.shard_size=1")
    results = run_evaluation(config, engine_factory=gold_engine_factory(questions, tmp_path / "calls.jsonl"))
    assert results["models"]["expert"]["benchmarks"]["svamp"] == {"accuracy": 0.5, "n": 6, "correct": 3}
    assert 1 <= results["models"]["expert"]["run"]["actors"] <= 3
    assert sum(call["rows"] for call in read_jsonl(tmp_path / "calls.jsonl")) == 6


# ---- bad input: every error surfaces on the driver, before models or Ray --------------


def never_called(spec):
    raise AssertionError("no engine may be built for bad input")


def test_unknown_benchmark_is_reported_before_any_model_loads(tiny_pair, tmp_path):
    # Refused when the config is read, before any model, data or Ray work.
    with pytest.raises(LightReasonerError, match=r"unknown benchmark 'gsm9k'.*known benchmarks: gsm8k, math, math500"):
        eval_config(tmp_path, f"expert.path={tiny_pair['expert']}", "eval.benchmarks=[gsm8k,gsm9k]")
    assert not (tmp_path / "eval").exists()


def test_missing_benchmark_file_names_the_file(tiny_pair, tmp_path):
    config = eval_config(tmp_path / "out", f"expert.path={tiny_pair['expert']}", f"eval.data_dir={tmp_path}",
                         "eval.benchmarks=[svamp]")
    with pytest.raises(LightReasonerError, match=r"svamp/test.jsonl not found"):
        run_evaluation(config, engine_factory=never_called)


@pytest.mark.parametrize(
    "second_line, message",
    [
        ('{"question": "How many?", "answer": "4 + 4 = 8\\n#### 8"', r"gsm8k/test.jsonl:2: malformed JSON"),
        ('{"question": "How many?"}', r"gsm8k/test.jsonl:2: field 'answer' is missing"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tiny_pair, tmp_path, second_line, message):
    data_dir = tmp_path / "data"
    (data_dir / "gsm8k").mkdir(parents=True)
    good = json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"})
    (data_dir / "gsm8k" / "test.jsonl").write_text(f"{good}\n{second_line}\n")
    config = eval_config(tmp_path / "out", f"expert.path={tiny_pair['expert']}", f"eval.data_dir={data_dir}",
                         "eval.benchmarks=[gsm8k]")
    with pytest.raises(LightReasonerError, match=message):
        run_evaluation(config, engine_factory=never_called)


def test_missing_model_path_is_reported_before_ray(tmp_path):
    config = eval_config(tmp_path, f"eval.models=[trained={tmp_path / 'no-such-model'}]")
    with pytest.raises(LightReasonerError, match=r"eval model 'trained'.*no-such-model does not exist"):
        run_evaluation(config, engine_factory=never_called)
    assert not (tmp_path / "eval").exists()


def test_adapter_with_missing_base_model(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    config = eval_config(tmp_path, f"eval.model={adapter}")
    with pytest.raises(LightReasonerError, match=r"base model of adapter .*gone does not exist"):
        run_evaluation(config, engine_factory=never_called)


def test_nothing_to_evaluate_and_clashing_tags(tiny_pair, tmp_path):
    with pytest.raises(LightReasonerError, match="nothing to evaluate"):
        run_evaluation(eval_config(tmp_path), engine_factory=never_called)
    clash = eval_config(tmp_path, f"eval.models=[{tiny_pair['expert']},expert={tiny_pair['amateur']}]")
    with pytest.raises(LightReasonerError, match="share the tag 'expert'"):
        run_evaluation(clash, engine_factory=never_called)


def test_model_entries_and_config_checks(tmp_path):
    assert parse_model_entry("base=/models/Qwen2.5-Math-1.5B") == EvalModel(tag="base", path="/models/Qwen2.5-Math-1.5B")
    assert parse_model_entry("/models/Qwen2.5-Math-1.5B/").tag == "Qwen2.5-Math-1.5B"
    assert parse_model_entry("Qwen/Qwen2.5-Math-7B").tag == "Qwen2.5-Math-7B"
    with pytest.raises(LightReasonerError, match="tag 'my model'"):
        parse_model_entry("my model=/models/x")
    with pytest.raises(LightReasonerError, match="more than once"):
        load_config(None, ["eval.benchmarks=[gsm8k,gsm8k]"])
    with pytest.raises(LightReasonerError, match="eval.engine must be 'hf', 'vllm' or an import path"):
        load_config(None, ["eval.engine=vllm-gpu"])
    with pytest.raises(LightReasonerError, match="set eval.temperature > 0"):
        load_config(None, ["eval.n=4"])
    with pytest.raises(LightReasonerError, match="eval.vllm.gpu_memory_utilization must be in"):
        load_config(None, ["eval.vllm.gpu_memory_utilization=1.5"])
    with pytest.raises(LightReasonerError, match="cannot import"):
        run_evaluation(eval_config(tmp_path, "eval.engine=no_such_package.engines:make"))


def test_outputs_made_with_other_settings_are_not_mixed(tmp_path):
    settings = {"model_path": "/m", "engine": "hf", "max_new_tokens": 16, "system_prompt": "s", "dtype": "auto"}
    check_generation_settings(str(tmp_path), settings)
    check_generation_settings(str(tmp_path), dict(settings))
    with pytest.raises(LightReasonerError, match=r"max_new_tokens differ.*--restart"):
        check_generation_settings(str(tmp_path), {**settings, "max_new_tokens": 32})


def test_going_back_to_greedy_decoding_after_sampling_is_refused(tmp_path):
    """Greedy decoding records no sampling keys, so their absence is a change from a sampled run."""
    greedy = {"model_path": "/m", "model_fingerprint": "f", "engine": "hf", "max_new_tokens": 16}
    check_generation_settings(str(tmp_path), {**greedy, "temperature": 1.0, "top_p": 0.95, "n": 4, "seed": 0})
    with pytest.raises(LightReasonerError, match=r"\(n, seed, temperature, top_p differ: .* then, \{'n': None"):
        check_generation_settings(str(tmp_path), greedy)


# ---- the engine ------------------------------------------------------------------------


def test_hf_engine_keeps_prompt_order_and_respects_the_context(tiny_pair):
    from lightreasoner_ray.engines.base import EngineSpec
    from lightreasoner_ray.engines.hf import HFEngine
    from lightreasoner_ray.engines.generation import greedy_generate
    from lightreasoner_ray.data.prompts import prompt_ids

    engine = HFEngine(EngineSpec(model_path=str(tiny_pair["expert"]), max_new_tokens=6, batch_size=2))
    questions = [row["question"] for row in load_benchmark("gsm8k", DATA_DIR, 4)]
    prompts = [prompt_ids(engine.tokenizer, q, "Please reason step by step.") for q in questions]
    one_by_one = [greedy_generate(engine.model, engine.tokenizer, [p], 6)[0] for p in prompts]
    completions = engine.generate(prompts)
    assert [[c.token_ids for c in samples] for samples in completions] == [[tokens] for tokens in one_by_one]
    assert [samples[0].text for samples in completions] == [
        engine.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in one_by_one
    ]

    # Near the context limit a completion stops at the context; a prompt that fills it gets nothing.
    longest = max(len(p) for p in prompts)
    engine.context = longest + 2
    rooms = [engine.room(len(p)) for p in prompts]
    batches = engine._batches(prompts)
    assert sorted(i for batch in batches for i in batch) == list(range(4))
    assert all(len({rooms[i] for i in batch}) == 1 for batch in batches)
    assert engine.room(longest) == 2
    engine.context = len(prompts[0])
    outputs = engine.generate([prompts[0]])
    assert [[c.token_ids for c in samples] for samples in outputs] == [[[]]]


def test_peft_adapter_is_merged_for_inference(tiny_pair, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightreasoner_ray.engines.base import EngineSpec
    from lightreasoner_ray.engines.hf import load_inference_model

    base = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir = tmp_path / "lightreasoner-adapter"
    get_peft_model(base, lora).save_pretrained(adapter_dir)
    assert not (adapter_dir / "tokenizer_config.json").exists()

    tokenizer, merged = load_inference_model(EngineSpec(model_path=str(adapter_dir), max_new_tokens=4, batch_size=1))
    assert not isinstance(merged, PeftModel)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]), adapter_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).eval()
    ids = torch.tensor([tokenizer.encode("Natalia sold 48 clips in April.")])
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, reference, plain))
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    assert parse_model_entry(str(adapter_dir)).tag == "lightreasoner-adapter"


def test_the_pool_may_replace_as_many_dead_actors_as_it_has_and_at_least_two():
    from lightreasoner_ray.stages.evaluation.pool import ACTOR_RECREATIONS, actor_recreations

    assert ACTOR_RECREATIONS == 2
    assert [actor_recreations(size) for size in (1, 2, 3, 8, 64)] == [2, 2, 3, 8, 64]
