"""Rejection-sampling SFT, the paper's SFT baseline, as an ablation `lightreasoner run` can request."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT
import fault_hooks
from lightreasoner_ray.data.sample_sets import tuned_tokens
from lightreasoner_ray.config import DataConfig, load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.stages.rejection_sampling import grade_solutions, keep_correct
from lightreasoner_ray.data.problems import gold_answer, gold_answers

TINY = REPO_ROOT / "configs" / "tiny.yaml"


# --- the pure core ------------------------------------------------------------------------------

def test_gold_answer_reduces_each_dataset_format_to_the_answer():
    assert gold_answer("Natalia sold 48/2 = 24 clips in May.\n#### 1,200") == "1200"  # GSM8K
    assert gold_answer("So the area is $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"  # a MATH solution
    assert gold_answer(" 42 ") == "42" and gold_answer("\\sqrt{2}") == "\\sqrt{2}"  # already an answer


def test_every_problem_needs_a_gold_answer_and_the_error_names_file_line_and_field(tmp_path):
    from lightreasoner_ray.data.problems import load_problems

    path = tmp_path / "problems.jsonl"
    path.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n\n{"question": "2 + 2?", "solution": "4"}\n'
                    '{"question": "3 + 3?", "hint": "6"}\n')
    loaded = load_problems(DataConfig(problems=str(path), shuffle=False, limit=None))
    with pytest.raises(LightReasonerError, match=r"problems.jsonl, line 4: problem q-\w+ has no gold answer in field "
                                                 r"'answer/final_answer/solution'.*data.answer_field"):
        gold_answers(loaded, "auto")
    assert list(gold_answers(type(loaded)(loaded.problems[:2], loaded.source), "auto").values()) == ["2", "4"]
    loaded = load_problems(DataConfig(problems=str(path), shuffle=False, limit=None, answer_field="hint"))
    with pytest.raises(LightReasonerError, match="line 1: .* in field 'hint'"):
        gold_answers(loaded, "hint")


def test_grading_and_keeping_the_distinct_correct_solutions():
    texts = ["3 * 4 = 12. The answer is \\boxed{12}.", "\\boxed{13}", "so 12.0", "no number at all"]
    answers, correct = grade_solutions(texts, "12", "gsm8k")
    assert answers == ["12", "13", "12.0", ""] and correct == [True, False, True, False]
    samples = [
        [[1, 2, 9], [1, 3, 9], [1, 2, 9], [4, 9]],  # right, wrong, right again (a duplicate), right
        [[1, 3, 9], [], [3], [1, 3]],  # nothing right; an empty completion is never kept
    ]
    corrects = [[True, False, True, True], [False, True, False, False]]
    result = keep_correct(["p", "q"], [[7], [8, 8]], samples, corrects)
    assert (result.problems, result.sampled, result.correct, result.kept) == (2, 8, 3, 2)
    assert result.problems_with_a_kept_solution == 1
    assert [r["problem_id"] for r in result.rows] == ["p#0", "p#1"]
    assert [r["completion_ids"] for r in result.rows] == [[1, 2, 9], [4, 9]]
    assert all(r["prompt_ids"] == [7] for r in result.rows)
    assert result.rows[0]["target_ids"] == [[1], [2], [9]] and result.rows[0]["target_probs"] == [[1.0]] * 3
    assert tuned_tokens(result.rows) == 5


def test_config_checks_and_the_demo_keys_that_moved():
    config = load_config(TINY, ["rejection_sft.enabled=true", "rejection_sft.lr=1e-4"])
    assert config.rejection_sft.lr == 1e-4 and config.rejection_sft.temperature == 0.7
    with pytest.raises(LightReasonerError, match="rejection_sft.temperature must be > 0"):
        load_config(TINY, ["rejection_sft.temperature=0"])
    with pytest.raises(LightReasonerError, match="rejection_sft.grader must be one of"):
        load_config(TINY, ["rejection_sft.grader=gsm9k"])
    with pytest.raises(LightReasonerError, match="rejection_sft.steps_per_update=1 is smaller than train.num_workers=2"):
        load_config(TINY, ["rejection_sft.steps_per_update=1", "train.num_workers=2"])
    with pytest.raises(LightReasonerError, match="demo.rejection_samples is now rejection_sft.samples_per_problem"):
        load_config(TINY, ["demo.rejection_samples=8"])


def test_training_config_uses_train_settings_unless_overridden():
    from lightreasoner_ray.runs.rejection_sft import training_config

    config = load_config(TINY, ["output_dir=/o", "train.max_steps=50", "train.lr=5e-5", "rejection_sft.max_steps=20",
                                "rejection_sft.steps_per_update=64"])
    trained = training_config(config)
    assert trained.output_dir == "/o/rejection_sft" and trained.train.samples == "/o/rejection_sft/samples"
    assert (trained.train.max_steps, trained.train.lr, trained.train.steps_per_update) == (20, 5e-5, 64)
    assert trained.train.lora == config.train.lora and trained.expert == config.expert
    # A whole solution (up to rejection_sft.max_new_tokens tokens) trains in one forward pass, unless set.
    assert config.train.micro_batch_steps == 8 and trained.train.micro_batch_steps == 512
    assert training_config(load_config(TINY, ["rejection_sft.micro_batch_steps=32"])).train.micro_batch_steps == 32


def test_tracking_logs_the_rejection_sampling_counts(tmp_path):
    from lightreasoner_ray.stages.rejection_sampling import rejection_sampling_outputs

    config = load_config(TINY, [f"output_dir={tmp_path}"])
    summary = {"settings": {"temperature": 0.7}, "counts": {"problems": 4, "kept": 3}, "timing": {"wall_time_s": 2.5}}
    metrics, artefacts = rejection_sampling_outputs(config, summary)
    assert metrics == {"rejection_sampling/counts.problems": 4.0, "rejection_sampling/counts.kept": 3.0,
                       "rejection_sampling/timing.wall_time_s": 2.5}
    assert artefacts == [str(tmp_path / "rejection_sft" / "rejection_summary.json")]


def test_hf_sampling_draws_from_the_whole_vocabulary_not_the_top_50(tiny_pair):
    """generate's own default top_k=50 would never draw a token outside the 50 likeliest; vLLM's engine
    does not cut either, so the two engines sample the same distribution."""
    import torch

    from lightreasoner_ray.engines.base import EngineSpec
    from lightreasoner_ray.engines.hf import HFEngine

    engine = HFEngine(EngineSpec(model_path=str(tiny_pair["expert"]), max_new_tokens=1, batch_size=8,
                                 temperature=3.0, n=64, seed=0))
    prompt = engine.tokenizer.encode("Tom has 3 pens.")
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1]  # the whole head, padded rows included
    top50 = set(torch.topk(logits, 50).indices.tolist())
    drawn = [c.token_ids[0] for c in engine.generate([prompt])[0]]
    assert len(drawn) == 64 and any(token not in top50 for token in drawn)


def test_run_refuses_eval_models_beside_the_baseline(tmp_path):
    from lightreasoner_ray.runs.pipeline import check_before_start

    config = load_config(TINY, [f"output_dir={tmp_path}", "rejection_sft.enabled=true", "eval.models=[a=/m]"])
    with pytest.raises(LightReasonerError, match="trained but not evaluated.*rejection_sft="):
        check_before_start(config)


@pytest.mark.slow
def test_with_no_solution_kept_the_baseline_is_skipped_with_a_warning(tiny_pair, problems_file, tmp_path, ray_local,
                                                                     caplog):
    from lightreasoner_ray.runs.rejection_sft import run_rejection_sft

    # Gold answers no 8-token completion can state.
    unreachable = tmp_path / "problems.jsonl"
    unreachable.write_text("".join(json.dumps({**json.loads(line), "answer": "#### 987654321.5"}) + "\n"
                                   for line in problems_file.read_text().splitlines()[:2]))
    config = load_config(TINY, [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
                                f"data.problems={unreachable}", f"output_dir={tmp_path}",
                                "sampling.num_actors=1", "rejection_sft.samples_per_problem=2",
                                "rejection_sft.max_new_tokens=8"])
    with caplog.at_level("WARNING", logger="lightreasoner_ray"):
        result = run_rejection_sft(config)
    assert result["training"] is None and result["sampling"]["counts"]["kept"] == 0
    assert "not trained or evaluated" in caplog.text
    assert not (tmp_path / "rejection_sft" / "samples").exists() and not (tmp_path / "rejection_sft" / "model").exists()


@pytest.mark.slow
def test_rejection_sampling_resumes_regrades_and_follows_the_problem_set(toy_run_inputs, tmp_path, ray_local):
    """The same run again samples nothing; a corrected gold answer regrades the stored answers
    (no model runs); a smaller data.limit builds the SFT data from the remaining problems only;
    a changed question under the same id, or a changed temperature, is refused."""
    from lightreasoner_ray.stages.rejection_sampling import run_rejection_sampling
    from lightreasoner_ray.toy.pair import SYSTEM_PROMPT

    rows = [json.loads(line) for line in toy_run_inputs["problems"].read_text().splitlines()]
    problems = tmp_path / "problems.jsonl"

    def write(rows):
        problems.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def sample(*extra):
        return run_rejection_sampling(load_config(TINY, [
            f"expert.path={toy_run_inputs['expert']}", f"amateur.path={toy_run_inputs['amateur']}",
            f"data.problems={problems}", "data.shuffle=false", "data.limit=12", f"output_dir={tmp_path / 'out'}",
            f"sampling.system_prompt={SYSTEM_PROMPT}", "sampling.num_actors=1", "sampling.batch_size=4",
            "rejection_sft.samples_per_problem=16", "rejection_sft.temperature=1.0", "rejection_sft.max_new_tokens=24",
            "rejection_sft.grader=toy", *extra]))

    def kept_ids():
        path = tmp_path / "out" / "rejection_sft" / "samples"
        return {row["problem_id"].split("#")[0] for row in pq.read_table(path).to_pylist()} if path.exists() else set()

    write(rows)
    first = sample()
    assert first["counts"]["problems"] == 12 and first["counts"]["kept"] > 0
    covered = kept_ids()
    assert len(covered) == first["counts"]["problems_with_a_kept_solution"]
    again = sample()
    assert again["counts"] == {**first["counts"], "resumed_problems": 12}
    assert again["timing"]["problems_this_run"] == 0 and again["timing"]["reused"]

    # A corrected gold answer: that problem's stored answers are regraded; nothing is sampled.
    target = next(row for row in rows if str(row["id"]) in covered)
    write([{**row, "answer": "-999"} if row is target else row for row in rows])
    regraded = sample()
    assert regraded["timing"]["problems_this_run"] == 0 and kept_ids() == covered - {str(target["id"])}
    write(rows)

    fewer = sample("data.limit=6")
    first_six = {str(row["id"]) for row in rows[:6]}
    assert fewer["counts"]["problems"] == 6 and fewer["counts"]["sampled"] == 6 * 16
    assert fewer["timing"]["problems_this_run"] == 0 and kept_ids() == covered & first_six

    write([{**row, "question": row["question"] + " Then she finds 1 more."} if row is rows[0] else row for row in rows])
    with pytest.raises(LightReasonerError, match=f"problem {rows[0]['id']} was sampled for another prompt"):
        sample()
    write(rows)
    with pytest.raises(LightReasonerError, match=r"temperature: 1.0 -> 0.5.*delete .*rejection_sft .*LightReasoner's stays"):
        sample("rejection_sft.temperature=0.5")


# --- `lightreasoner run rejection_sft.enabled=true`, through the command line ------------------

@pytest.fixture(scope="module")
def toy_run_inputs(tmp_path_factory) -> dict[str, Path]:
    """The quick toy pair (a few training steps: it writes mostly noise, but at temperature 1 some
    sampled answers are right), 12 toy train problems with gold answers and 6 held-out ones."""
    from lightreasoner_ray.runs.demo import quick_pair_spec
    from lightreasoner_ray.toy import generate_problems
    from lightreasoner_ray.toy.pair import build_toy_pair

    root = tmp_path_factory.mktemp("toy_run")
    pair = build_toy_pair(root / "pair", spec=quick_pair_spec())
    problems = root / "train.jsonl"
    problems.write_text("".join(json.dumps(row) + "\n" for row in generate_problems(12, seed=1000, split="train")))
    (root / "data" / "toy").mkdir(parents=True)
    (root / "data" / "toy" / "test.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in generate_problems(6, seed=4000, split="test")))
    return {"expert": pair.expert_path, "amateur": pair.amateur_path, "problems": problems, "data": root / "data"}


def _cli(command: str, overrides: list[str], ray_address: str, kill_after_files: int | None = None) -> int:
    env = dict(os.environ, RAY_ADDRESS=ray_address, LIGHTREASONER_NO_DASHBOARD="1")
    env.pop("LIGHTREASONER_TEST_HOOKS", None)
    env.pop(fault_hooks.KILL_AFTER_FILES_ENV, None)
    if kill_after_files is not None:
        env.update(fault_hooks.kill_after_files(kill_after_files))
    process = subprocess.Popen([sys.executable, "-m", "lightreasoner_ray.cli", command, "--config", str(TINY), *overrides],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, stderr = process.communicate(timeout=900)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"lightreasoner {command} failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return process.returncode


def _answer_of(text: str) -> str:
    """An independent reading of a toy solution's answer: the last boxed value, else its last number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    numbers = re.findall(r"-?\d+", text)
    return boxed[-1].strip() if boxed else (numbers[-1] if numbers else "")


@pytest.mark.slow
def test_run_trains_and_reports_rejection_sft_and_resumes_after_a_kill(toy_run_inputs, tmp_path, ray_local):
    from transformers import AutoTokenizer

    from lightreasoner_ray.toy.pair import SYSTEM_PROMPT

    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "run"
    overrides = [
        f"expert.path={toy_run_inputs['expert']}", f"amateur.path={toy_run_inputs['amateur']}",
        f"data.problems={toy_run_inputs['problems']}", "data.limit=null", "data.shuffle=false",
        f"sampling.system_prompt={SYSTEM_PROMPT}", f"eval.system_prompt={SYSTEM_PROMPT}",
        "sampling.beta=0.0", "sampling.max_new_tokens=24", "sampling.batch_size=4", "sampling.rows_per_file=4",
        "sampling.num_actors=1", "train.max_steps=2", "train.checkpoint_every=2", "train.num_workers=1",
        "train.steps_per_update=16", "eval.benchmarks=[toy]", f"eval.data_dir={toy_run_inputs['data']}",
        "eval.max_new_tokens=24", "eval.limit=null", "eval.num_actors=1", "ray.num_cpus=2", f"output_dir={out}",
        "rejection_sft.enabled=true", "rejection_sft.samples_per_problem=16", "rejection_sft.temperature=1.0",
        "rejection_sft.max_new_tokens=24", "rejection_sft.grader=toy", "rejection_sft.max_steps=3",
    ]
    # LightReasoner's samples first; then `run` is killed after the first file of rejection sampling
    # (LightReasoner's stages have nothing to write by then: sampling is done, training writes no Parquet).
    assert _cli("sample", overrides, address) == 0
    assert _cli("run", overrides, address, kill_after_files=1) == -signal.SIGKILL
    rejection = out / "rejection_sft"
    assert [pq.read_metadata(p).num_rows for p in (rejection / "solutions").glob("*.parquet")] == [4]
    assert not (rejection / "model").exists()
    lightreasoner_model = {p.name: p.stat().st_mtime_ns for p in (out / "model").iterdir()}

    assert _cli("run", overrides, address) == 0
    # LightReasoner's training had finished: the resumed run did not redo it.
    assert {p.name: p.stat().st_mtime_ns for p in (out / "model").iterdir()} == lightreasoner_model
    summary = json.loads((rejection / "rejection_summary.json").read_text())
    counts = summary["counts"]
    assert counts["resumed_problems"] == 4 and counts["problems"] == 12 and counts["sampled"] == 12 * 16
    settings = json.loads((rejection / "rejection_settings.json").read_text())
    assert (settings["temperature"], settings["samples_per_problem"], settings["engine"]) == (1.0, 16, "hf")

    # The kept solutions, checked against the gold answers with a plain regex, not the grading module.
    tokenizer = AutoTokenizer.from_pretrained(toy_run_inputs["expert"])
    gold = {str(row["id"]): row["answer"] for row in map(json.loads, toy_run_inputs["problems"].read_text().splitlines())}
    solutions = pq.read_table(rejection / "solutions").to_pylist()
    assert sorted(row["problem_id"] for row in solutions) == sorted(gold)  # each problem once: nothing redone
    expected = set()
    for row in solutions:
        assert len(row["solutions"]) == 16 and all(0 < len(s) <= 24 for s in row["solutions"])
        for solution in row["solutions"]:
            if _answer_of(tokenizer.decode(solution, skip_special_tokens=True)) == gold[row["problem_id"]]:
                expected.add((row["problem_id"], tuple(solution)))
    kept = pq.read_table(rejection / "samples").to_pylist()
    assert expected and {(r["problem_id"].split("#")[0], tuple(r["completion_ids"])) for r in kept} == expected
    assert len(kept) == counts["kept"] == len(expected)
    for row in kept:
        assert row["target_ids"] == [[t] for t in row["completion_ids"]] and row["steps"] == list(range(len(row["completion_ids"])))

    # SFT trained its own adapter (rejection_sft.max_steps), and the run evaluated three models.
    trained = json.loads((rejection / "train_summary.json").read_text())
    assert trained["steps"] == 3 and (rejection / "model" / "adapter_config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]["models"]) == {"baseline", "lightreasoner", "rejection_sft"}
    predictions = [json.loads(line) for line in (out / "eval" / "rejection_sft" / "toy.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    assert report["results"]["models"]["rejection_sft"]["benchmarks"]["toy"]["accuracy"] == \
        sum(bool(p["correct"]) for p in predictions) / 6
    comparison = report["rejection_sft"]
    tokens = sum(len(r["completion_ids"]) for r in kept)
    assert comparison["tuned_tokens"] == tokens and comparison["solutions_kept"] == len(kept)
    assert comparison["solutions_sampled"] == 12 * 16 and comparison["problems_sampled"] == report["problems_sampled"] == 12
    ratios = comparison["lightreasoner_over_rejection_sft"]
    assert ratios["tuned_tokens"] == pytest.approx(report["tokens"]["tuned_tokens_lightreasoner"] / tokens)
    assert ratios["problems_sampled"] == 1.0 and comparison["resumed"] is True
    markdown = (out / "report.md").read_text()
    assert "## Against SFT on rejection-sampled solutions" in markdown
    assert f"{comparison['solutions_sampled']} / {comparison['solutions_kept']}" in markdown
