"""Sampled evaluation (eval.n > 1): k outputs and answers per row, pass@1 / pass@k / maj@k."""

from __future__ import annotations

import json
from math import comb

import pytest

from conftest import DATA_DIR
from lightreasoner_ray.config import load_config
from lightreasoner_ray.core.scoring import grade_rows, score
from lightreasoner_ray.stages.evaluation.stage import run_evaluation


def test_majority_vote_counts_equivalent_answers_together_and_scores_follow_the_rows():
    rows = [
        {"id": "a", "question": "q", "answer": "0.5"},
        {"id": "b", "question": "q", "answer": "3"},
        {"id": "c", "question": "q", "answer": "7"},
    ]
    outputs = [
        # 1/2 and 0.5 are one answer (2 votes) against 2 and 4 (1 each): the majority is right.
        ["\\boxed{2}", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{4}"],
        # 5 has two votes, the right 3 one: pass@4 but not maj@4; the empty answer does not vote.
        ["\\boxed{5}", "no answer here", "\\boxed{5}", "\\boxed{3}"],
        # a tie between 8 and 9 goes to the first seen; none is right.
        ["\\boxed{8}", "\\boxed{9}", "\\boxed{9}", "\\boxed{8}"],
    ]
    graded = grade_rows("gsm8k", rows, [{"prompt": "p", "output": o[0], "outputs": o} for o in outputs])
    assert [row["corrects"] for row in graded] == [
        [False, True, True, False], [False, False, False, True], [False, False, False, False]
    ]
    assert [row["majority"] for row in graded] == ["\\frac{1}{2}", "5", "8"]
    assert [row["majority_correct"] for row in graded] == [True, False, False]
    assert [row["output"] for row in graded] == [o[0] for o in outputs]
    assert [len(row["answers"]) for row in graded] == [4, 4, 4]
    assert score(graded, 4) == {
        "accuracy": pytest.approx((2 / 4 + 1 / 4 + 0) / 3), "n": 3, "correct": 3, "k": 4,
        "pass@k": pytest.approx(2 / 3), "maj@k": pytest.approx(1 / 3),
    }


@pytest.mark.slow
def test_sampled_evaluation_stores_k_answers_and_reports_pass_at_k(tiny_pair, ray_local, tmp_path):
    k = 3
    config = load_config(None, [
        f"output_dir={tmp_path}", f"eval.data_dir={DATA_DIR}", "eval.benchmarks=[gsm8k,svamp]", "eval.limit=4",
        "eval.shard_size=2", "eval.max_new_tokens=12", f"expert.path={tiny_pair['expert']}",
        "eval.temperature=1.0", "eval.top_p=0.95", f"eval.n={k}", "eval.seed=1",
    ])
    results = run_evaluation(config)
    assert results["settings"]["n"] == k and results["settings"]["temperature"] == 1.0
    for benchmark in ("gsm8k", "svamp"):
        rows = [json.loads(line) for line in (tmp_path / "eval" / "expert" / f"{benchmark}.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        for row in rows:
            assert len(row["outputs"]) == len(row["answers"]) == len(row["corrects"]) == k
            assert row["output"] == row["outputs"][0]
        assert any(len(set(row["outputs"])) > 1 for row in rows)  # sampled, not k greedy copies
        scores = results["models"]["expert"]["benchmarks"][benchmark]
        assert scores == score(rows, k)
        assert scores["pass@k"] >= scores["accuracy"]
        # pass@1 is the unbiased estimate 1 - C(k-c, 1)/C(k, 1) = c/k averaged over rows.
        assert scores["accuracy"] == pytest.approx(
            sum(1 - comb(k - sum(r["corrects"]), 1) / comb(k, 1) for r in rows) / len(rows)
        )
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert f"pass@{k} in %" in markdown and f"maj@{k} in %" in markdown
