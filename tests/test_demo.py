"""A reduced `lightreasoner demo`: every real stage, few problems, few steps, a quick toy pair."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from lightreasoner_ray import cli
from lightreasoner_ray.runs.demo_report import demo_markdown
from lightreasoner_ray.toy import parse_solution

pytestmark = pytest.mark.slow

DEMO_CONSOLE_LINES = 50


def test_reduced_demo_runs_every_stage(tmp_path, monkeypatch, ray_local, capfd):
    monkeypatch.setenv("LIGHTREASONER_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "demo"
    overrides = [
        # The quick pair is barely trained: its KL is ~0.1 at every position, so beta sits just below.
        "demo.quick=true", "demo.seeds=[0]", "sampling.beta=0.1", "demo.train_problems=12", "demo.test_problems=10", "train.max_steps=2",
        "train.checkpoint_every=2", "sampling.max_new_tokens=24", "eval.max_new_tokens=24", f"output_dir={output_dir}",
        # The quick pair writes mostly noise: 16 samples a problem at temperature 1 give a few whose
        # answer (here its last number) is the gold one.
        "demo.rounds=2", "rejection_sft.samples_per_problem=16", "rejection_sft.temperature=1.0",
        "rejection_sft.max_new_tokens=24",
    ]
    # Through the command line, as a user runs it: the console fits on a screen and ends with the
    # table (lines end in "\n"; a progress bar redraws its line with "\r"); the rest is in logs/.
    assert cli.main(["demo", *overrides]) == 0
    console = capfd.readouterr()
    report = json.loads((output_dir / "demo_results.json").read_text())
    lines = (console.err + console.out).rstrip("\n").split("\n")
    assert len(lines) <= DEMO_CONSOLE_LINES, console.err + console.out
    assert console.out.rstrip().endswith(demo_markdown(report).rstrip())
    assert "logs in " in console.err and list((output_dir / "logs").glob("demo-*.log"))

    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["amateur", "expert", "lightreasoner", "lightreasoner_round2", "rejection_sft", "sft",
                          "random_steps"]
    for row in rows.values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0
    # The random-step control tunes exactly as many positions as LightReasoner ...
    assert rows["random_steps"]["tuned_tokens"] == rows["lightreasoner"]["tuned_tokens"] == report["lightreasoner_steps"] > 0
    # ... and SFT tunes every token of the gold solutions (plus the end-of-turn token).
    assert rows["sft"]["tuned_tokens"] > rows["lightreasoner"]["tuned_tokens"]
    assert all(rows[name]["problems_used"] == 12 for name in ("lightreasoner", "sft", "random_steps"))
    evaluation = report["evaluation"]["models"]
    assert {tag: model["benchmarks"]["toy"]["n"] for tag, model in evaluation.items()} == {
        "amateur": 10, "expert": 10, "lightreasoner-seed0": 10, "lightreasoner_round2-seed0": 10,
        "rejection_sft-seed0": 10, "sft-seed0": 10, "random_steps-seed0": 10}
    # Rejection-sampling SFT trains on the expert's sampled solutions whose answer is the gold one,
    # checked here against the gold answers with a plain regex (the boxed, else the last number), not the grading module.
    rejection = report["rejection_sampling"]
    assert rejection["sampled"] == 12 * 16 and rejection["kept"] == rows["rejection_sft"]["solutions_kept"] > 0
    from lightreasoner_ray.toy import boxed_answer
    from lightreasoner_ray.toy.pair import _load
    _, tokenizer = _load(report["toy_pair"]["expert"])
    gold = {row["id"]: row for row in map(json.loads, (output_dir / "data" / "toy_train.jsonl").read_text().splitlines())}
    kept = pq.read_table(output_dir / "rejection_sft" / "samples").to_pylist()
    assert len(kept) == rejection["kept"] and len({(r["problem_id"].split("#")[0], tuple(r["completion_ids"])) for r in kept}) == len(kept)
    for row in kept:
        text = tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        answer = boxed_answer(text) or re.findall(r"\d+", text)[-1]
        assert answer == gold[row["problem_id"].split("#")[0]]["answer"]
        assert row["target_ids"] == [[t] for t in row["completion_ids"]] and row["steps"] == list(range(len(row["completion_ids"])))
    assert rows["rejection_sft"]["tuned_tokens"] == sum(len(r["completion_ids"]) for r in kept)
    # Round 2: the seed's round-1 model, merged, sampled 12 fresh problems (not round 1's) with KL > beta.
    round_two = output_dir / "lightreasoner-seed0-round2"
    summary = json.loads((round_two / "samples_summary.json").read_text())
    assert summary["models"]["expert"] == str(output_dir / "lightreasoner-seed0" / "merged")
    round_ids = set(pq.read_table(round_two / "samples", columns=["problem_id"]).column("problem_id").to_pylist())
    assert len(round_ids) == 12 and not round_ids & set(gold)
    assert rows["lightreasoner_round2"]["tuned_tokens"] == summary["counts"]["selected_steps"] > 0
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

    # The options beyond the paper, added to the same directory: what it holds is resumed (not
    # retrained), each option trains LightReasoner with its one change, and all are evaluated.
    lightreasoner_model = output_dir / "lightreasoner-seed0" / "model" / "adapter_model.safetensors"
    stamp = lightreasoner_model.stat().st_mtime_ns
    options = ["demo.options=[reverse_kl,jsd,anchor,sampled_rollouts]", "demo.anchor_weight=0.25",
               "demo.rollout_temperature=1.0", "demo.rollout_top_p=0.9"]
    assert cli.main(["demo", *overrides, *options]) == 0
    capfd.readouterr()
    assert lightreasoner_model.stat().st_mtime_ns == stamp
    # A finished variant is skipped before any Ray Train start; only the options train.
    second_log = max((output_dir / "logs").glob("demo-*.log"), key=lambda path: path.stat().st_mtime_ns).read_text()
    for name in ("lightreasoner", "rejection_sft", "sft", "random_steps", "lightreasoner round 2"):
        assert f"demo: {name} (seed 0) already trained" in second_log
        assert f"demo: training {name} (seed 0)" not in second_log
    assert "demo: training lightreasoner_reverse_kl (seed 0)" in second_log
    report = json.loads((output_dir / "demo_results.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows)[-4:] == ["lightreasoner_reverse_kl", "lightreasoner_jsd", "lightreasoner_anchor",
                               "lightreasoner_sampled_rollouts"]
    trained = {name: json.loads((output_dir / f"{name}-seed0" / "train_summary.json").read_text())["train_config"]
               for name in list(rows)[-4:]}
    assert [(c["divergence"], c["anchor_weight"]) for c in trained.values()] == [
        ("reverse_kl", 0.0), ("jsd", 0.0), ("forward_kl", 0.25), ("forward_kl", 0.0)]
    # The three loss options train on LightReasoner's own steps; sampled rollouts on its own samples,
    # drawn at the given temperature/top-p with the training seed, selected with the same beta.
    for name in ("lightreasoner_reverse_kl", "lightreasoner_jsd", "lightreasoner_anchor"):
        assert rows[name]["tuned_tokens"] == report["lightreasoner_steps"]
    rollouts = json.loads((output_dir / "sampled_rollouts-seed0" / "sampling_settings.json").read_text())
    assert (rollouts["temperature"], rollouts["top_p"], rollouts["seed"], rollouts["beta"]) == (1.0, 0.9, 0, 0.1)
    sampled = pq.read_table(output_dir / "sampled_rollouts-seed0" / "samples").to_pylist()
    assert rows["lightreasoner_sampled_rollouts"]["tuned_tokens"] == sum(len(r["steps"]) for r in sampled) > 0
    greedy = {r["problem_id"]: r["completion_ids"] for r in pq.read_table(output_dir / "all_steps" / "samples").to_pylist()}
    assert any(r["completion_ids"] != greedy[r["problem_id"]] for r in sampled)  # sampled, not the greedy rollouts
    assert report["options"] == {"reverse_kl": {"divergence": "reverse_kl"},
                                 "jsd": {"divergence": "jsd", "jsd_beta": 0.5}, "anchor": {"anchor_weight": 0.25},
                                 "sampled_rollouts": {"temperature": 1.0, "top_p": 0.9, "seed": "the training seed"}}
    assert set(report["evaluation"]["models"]) >= {f"{name}-seed0" for name in list(rows)[-4:]}
    assert "reverse KL" in (output_dir / "demo_results.md").read_text()
