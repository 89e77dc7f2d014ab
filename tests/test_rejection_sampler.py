"""Rejection sampling's actor and its regrading without Ray: the SolutionSampler the Ray Data
pool maps over batches, called here on a batch in-process (HF engine, tiny expert), and the
stored solutions regraded against corrected gold answers. (test_rejection_sft.py runs the stage
and the baseline through Ray, slowly.)"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA_DIR
from lightreasoner_ray.config import load_config
from lightreasoner_ray.data.benchmarks import load_benchmark
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.stages.rejection_sampling import (
    SOLUTIONS_SCHEMA,
    SolutionSampler,
    answer_matches,
    current_solutions,
    engine_spec,
)

K = 3


@pytest.fixture(scope="module")
def solutions(tiny_pair, tmp_path_factory) -> dict:
    """K sampled solutions to each of 3 real GSM8K test problems, as the stage stores them."""
    from lightreasoner_ray.data.prompts import prompt_ids
    from lightreasoner_ray.engines.models import load_tokenizer

    config = load_config(None, [f"expert.path={tiny_pair['expert']}", f"rejection_sft.samples_per_problem={K}",
                                "rejection_sft.temperature=1.0", "rejection_sft.max_new_tokens=12", "rejection_sft.seed=3"])
    tokenizer = load_tokenizer(config.expert, "expert")
    rows = load_benchmark("gsm8k", data_dir=DATA_DIR, limit=3)
    problems = [{"problem_id": f"p{i}", "prompt_ids": prompt_ids(tokenizer, row["question"], "Please reason step by step."),
                 "answer": row["answer"]} for i, row in enumerate(rows)]
    batch = pa.Table.from_pylist(problems)
    table = SolutionSampler(engine_spec(config), "hf", config.rejection_sft.grader)(batch)
    directory = tmp_path_factory.mktemp("rejection") / "solutions"
    directory.mkdir()
    pq.write_table(table, directory / "part-0.parquet")
    return {"table": table, "dir": directory, "problems": problems, "config": config}


def test_each_problem_gets_k_graded_solutions_in_the_stored_schema(solutions):
    table = solutions["table"]
    assert table.schema == SOLUTIONS_SCHEMA
    rows = table.to_pylist()
    assert [row["problem_id"] for row in rows] == ["p0", "p1", "p2"]
    for row, problem in zip(rows, solutions["problems"]):
        assert row["prompt_ids"] == problem["prompt_ids"] and row["gold"] == problem["answer"]
        assert len(row["solutions"]) == len(row["answers"]) == len(row["correct"]) == K
        assert all(0 < len(solution) <= 12 for solution in row["solutions"])
        assert len({tuple(solution) for solution in row["solutions"]}) > 1  # temperature 1: the draws differ
        assert row["correct"] == [answer_matches(answer, row["gold"]) for answer in row["answers"]]
    again = SolutionSampler(engine_spec(solutions["config"]), "hf", "gsm8k")(pa.Table.from_pylist(solutions["problems"]))
    assert again.column("solutions").to_pylist() == table.column("solutions").to_pylist()  # seeded draws


def test_a_corrected_gold_answer_regrades_the_stored_answers_without_sampling(solutions):
    problems = [dict(problem) for problem in solutions["problems"]]
    stored = {row["problem_id"]: row for row in solutions["table"].to_pylist()}
    # The corrected gold answer of one problem is what one of its solutions answered (random weights:
    # not the gold); another problem stays as it was, and the third leaves the problem set.
    target = next(pid for pid in ("p1", "p0", "p2") if any(stored[pid]["answers"]))
    unchanged, dropped = [pid for pid in ("p0", "p1", "p2") if pid != target][:2]
    index = next(i for i, answer in enumerate(stored[target]["answers"]) if answer)
    new_gold = stored[target]["answers"][index]
    assert stored[target]["correct"][index] is False
    kept = [problem for problem in problems if problem["problem_id"] != dropped]
    next(problem for problem in kept if problem["problem_id"] == target)["answer"] = new_gold
    rows = {row["problem_id"]: row for row in current_solutions(str(solutions["dir"]), kept, "gsm8k")}
    assert sorted(rows) == sorted([target, unchanged])
    assert rows[unchanged] == stored[unchanged]
    assert rows[target]["gold"] == new_gold and rows[target]["solutions"] == stored[target]["solutions"]
    assert rows[target]["correct"] == [answer_matches(answer, new_gold) for answer in stored[target]["answers"]]
    assert rows[target]["correct"][index] is True


def test_solutions_of_a_changed_question_are_refused(solutions):
    problems = [dict(problem) for problem in solutions["problems"]]
    problems[2]["prompt_ids"] = problems[2]["prompt_ids"][:-1]
    with pytest.raises(LightReasonerError, match=r"problem p2 was sampled for another prompt than its current one"):
        current_solutions(str(solutions["dir"]), problems, "gsm8k")
