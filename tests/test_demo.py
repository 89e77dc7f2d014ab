"""A reduced `lightreasoner demo`: every real stage, few problems, few steps, a quick toy pair."""

from __future__ import annotations

import json
import re

import pytest

from lightreasoner_ray.demo import demo_config, run_demo
from lightreasoner_ray.toy import parse_solution

pytestmark = pytest.mark.slow


def test_reduced_demo_runs_every_stage(tmp_path, monkeypatch, ray_local):
    monkeypatch.setenv("LIGHTREASONER_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "demo"
    config = demo_config([
        # The quick pair is barely trained: its KL is ~0.1 at every position, so beta sits just below.
        "demo.quick=true", "demo.seeds=[0]", "sampling.beta=0.1", "demo.train_problems=12", "demo.test_problems=10", "train.max_steps=2",
        "train.checkpoint_every=2", "sampling.max_new_tokens=24", "eval.max_new_tokens=24", f"output_dir={output_dir}",
    ])
    report = run_demo(config)

    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["amateur", "expert", "lightreasoner", "sft", "random_steps"]
    for row in rows.values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0
    # The random-step control tunes exactly as many positions as LightReasoner ...
    assert rows["random_steps"]["tuned_tokens"] == rows["lightreasoner"]["tuned_tokens"] == report["lightreasoner_steps"] > 0
    # ... and SFT tunes every token of the gold solutions (plus the end-of-turn token).
    assert rows["sft"]["tuned_tokens"] > rows["lightreasoner"]["tuned_tokens"]
    assert all(rows[name]["problems_used"] == 12 for name in ("lightreasoner", "sft", "random_steps"))
    evaluation = report["evaluation"]["models"]
    assert {tag: model["benchmarks"]["toy"]["n"] for tag, model in evaluation.items()} == {
        "amateur": 10, "expert": 10, "lightreasoner-seed0": 10, "sft-seed0": 10, "random_steps-seed0": 10}
    # Hasty slips, recomputed from the evaluator's predictions: of the held-out problems whose
    # last step doubles or triples, the share answered with the value before that step.
    test_rows = [json.loads(line) for line in (output_dir / "data" / "toy" / "test.jsonl").read_text().splitlines()]
    ending_in_scaling = {row["id"]: str(parse_solution(row["solution"])[0][-2].c) for row in test_rows
                         if len(parse_solution(row["solution"])[0]) >= 2 and parse_solution(row["solution"])[0][-1].op == "*"}
    assert ending_in_scaling  # 2 of these 10 problems
    for tag, name in (("amateur", "amateur"), ("expert", "expert"), ("lightreasoner-seed0", "lightreasoner")):
        predictions = [json.loads(line) for line in (output_dir / "eval" / tag / "toy.jsonl").read_text().splitlines()]
        slips = [re.findall(r"\\boxed\{(\d+)\}", p["output"])[-1:] == [ending_in_scaling[p["id"]]]
                 for p in predictions if p["id"] in ending_in_scaling]
        assert rows[name]["hasty_slip_rate"] == sum(slips) / len(slips)
    on_disk = json.loads((output_dir / "demo_results.json").read_text())
    assert [row["model"] for row in on_disk["rows"]] == list(rows)
    markdown = (output_dir / "demo_results.md").read_text()
    assert "expert + LightReasoner" in markdown and "expert + random-step ablation" in markdown
    assert (output_dir / "demo_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
