"""The samples page (stages/inspect.py) without Ray: samples made in-process by the contrastive
sampler on the tiny pair, the page checked against those rows and against both models' own
logits. (test_samples_report.py checks the page of a whole `lightreasoner run`, slowly.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DATA_DIR
from lightreasoner_ray.config import load_config
from lightreasoner_ray.data.benchmarks import load_benchmark
from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.stages.inspect import histogram_svg, kl_histogram, run_inspect

BETA = 0.3


@pytest.fixture(scope="module")
def samples_run(tiny_pair, tmp_path_factory) -> dict:
    """An output_dir whose samples/ holds 4 trajectories of the tiny pair (ids chosen out of order)."""
    from lightreasoner_ray.config import ModelConfig
    from lightreasoner_ray.data.prompts import prompt_ids
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

    sampler = ContrastiveSampler(ModelConfig(path=str(tiny_pair["expert"])), ModelConfig(path=str(tiny_pair["amateur"])),
                                 alpha=0.6, beta=BETA, max_new_tokens=12)
    questions = [row["question"] for row in load_benchmark("gsm8k", data_dir=DATA_DIR, limit=4)]
    prompts = [prompt_ids(sampler.tokenizer, q, "Please reason step by step.") for q in questions]
    rows = sampler.sample(["q-d", "q-b", "q-c", "q-a"], prompts)
    output_dir = tmp_path_factory.mktemp("inspect") / "run"
    (output_dir / "samples").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=SAMPLES_SCHEMA), output_dir / "samples" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=SAMPLES_SCHEMA), output_dir / "samples" / "part-1.parquet")
    config = load_config(None, [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
                                f"output_dir={output_dir}", "sampling.alpha=0.6", f"sampling.beta={BETA}"])
    return {"config": config, "rows": sorted(rows, key=lambda row: row["problem_id"]), "dir": output_dir}


def page_data(html: str) -> dict:
    match = re.search(r'<script id="samples-data" type="application/json">(.*?)</script>', html, re.S)
    assert match, "the page embeds its data"
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_the_page_holds_every_row_and_shows_the_first_trajectories_with_both_models_top_tokens(samples_run, tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = samples_run["rows"]
    result = run_inspect(samples_run["config"], max_trajectories=3)
    html = storage.read_text(result["path"])
    assert result["path"] == str(samples_run["dir"] / "samples_report.html")
    assert "<link" not in html and " src=" not in html and "@import" not in html
    data = page_data(html)

    # The statistics cover every row; the trajectories shown are the first 3 in problem-id order.
    tokens = sum(len(row["completion_ids"]) for row in rows)
    selected = sum(len(row["steps"]) for row in rows)
    all_kl = np.concatenate([np.asarray(row["position_kl"], dtype=np.float64) for row in rows])
    assert 0 < selected < tokens  # a real split: soft labels to show and positions without
    stats = data["stats"]
    assert (stats["trajectories"], stats["completion_tokens"], stats["selected_steps"], stats["shown"]) == (4, tokens, selected, 3)
    assert stats["selection_ratio"] == pytest.approx(selected / tokens)
    assert stats["kl_mean"] == pytest.approx(all_kl.mean())
    assert stats["kl_quantiles"]["p50"] == pytest.approx(np.median(all_kl))
    assert (stats["alpha"], stats["beta"]) == (0.6, BETA)
    assert f"selection ratio <b>{selected / tokens:.3f}</b>" in html and f"β = {BETA:g}" in html
    assert sum(data["histogram"]["counts"]) == tokens
    assert [shown["problem_id"] for shown in data["trajectories"]] == ["q-a", "q-b", "q-c"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    models = {role: AutoModelForCausalLM.from_pretrained(tiny_pair[role], dtype=torch.float32).eval()
              for role in ("expert", "amateur")}
    for shown, row in zip(data["trajectories"], rows):
        assert shown["tokens"] == row["completion_ids"] and shown["steps"] == row["steps"]
        assert shown["kl"] == pytest.approx(row["position_kl"], abs=1e-4)
        assert shown["prompt"] == tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
        assert set(shown["soft_labels"]) == {str(step) for step in row["steps"]}
        for step, ids, probs in zip(row["steps"], row["target_ids"], row["target_probs"]):
            assert shown["soft_labels"][str(step)]["ids"] == ids
            assert shown["soft_labels"][str(step)]["probs"] == pytest.approx(probs, abs=1e-4)
        # Each model's top tokens, recomputed from one full pass over prompt + completion.
        sequence = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        start, length = len(row["prompt_ids"]) - 1, len(row["completion_ids"])
        for role, model in models.items():
            with torch.no_grad():
                logits = model(input_ids=sequence).logits[0, start:start + length, :len(tokenizer)]
            top_probs, _ = torch.softmax(logits, -1).topk(len(shown[f"{role}_top"]["ids"][0]), dim=-1)
            np.testing.assert_allclose(shown[f"{role}_top"]["probs"], top_probs.numpy(), atol=1e-4)
    shown_ids = {token for shown in data["trajectories"] for token in shown["tokens"]}
    assert {int(key) for key in data["vocabulary"]} >= shown_ids
    assert all(data["vocabulary"][str(token)] == tokenizer.decode([token]) for token in shown_ids)


def test_the_samples_own_summary_names_the_models_and_beta(samples_run, tmp_path):
    """`inspect output_dir=D` needs no model paths: samples_summary.json gives them, and its beta wins."""
    run_dir = samples_run["dir"]
    config = samples_run["config"]
    summary = {"config": {"sampling": {"alpha": 0.5, "beta": 0.45}},
               "models": {"expert": config.expert.path, "amateur": config.amateur.path}}
    (run_dir / "samples_summary.json").write_text(json.dumps(summary))
    try:
        result = run_inspect(load_config(None, [f"output_dir={run_dir}"]), max_trajectories=1)
    finally:
        (run_dir / "samples_summary.json").unlink()
    assert (result["stats"]["alpha"], result["stats"]["beta"]) == (0.5, 0.45)
    assert result["stats"]["expert"] == config.expert.path and result["stats"]["shown"] == 1
    with pytest.raises(LightReasonerError, match="samples_summary.json is missing: give expert.path and amateur.path"):
        run_inspect(load_config(None, [f"output_dir={run_dir}"]))


def test_rows_without_a_kl_at_every_position_are_refused_naming_the_row(samples_run, tmp_path):
    row = {**samples_run["rows"][0], "position_kl": samples_run["rows"][0]["position_kl"][:-1]}
    (tmp_path / "samples").mkdir()
    pq.write_table(pa.Table.from_pylist([samples_run["rows"][1], row], schema=SAMPLES_SCHEMA),
                   tmp_path / "samples" / "part-0.parquet")
    config = load_config(None, [f"output_dir={tmp_path}", f"expert.path={samples_run['config'].expert.path}",
                                f"amateur.path={samples_run['config'].amateur.path}"])
    with pytest.raises(LightReasonerError, match=r"row 1 \(problem 'q-a'\) has no position_kl of the completion's length"):
        run_inspect(config)


def test_the_histogram_clips_the_top_half_percent_and_draws_beta():
    values = np.concatenate([np.linspace(0.0, 1.0, 999), [50.0]])  # one outlier past the 99.5% quantile
    histogram = kl_histogram(values, bins=10)
    assert sum(histogram["counts"]) == 1000 and len(histogram["edges"]) == 11
    assert histogram["edges"][0] == 0.0 and histogram["edges"][-1] == pytest.approx(np.quantile(values, 0.995))
    expected, _ = np.histogram(np.clip(values, 0.0, histogram["edges"][-1]), bins=10, range=(0.0, histogram["edges"][-1]))
    assert histogram["counts"] == expected.tolist()
    assert kl_histogram(np.zeros(0)) == {"edges": [0.0, 1.0], "counts": [0]}
    assert kl_histogram(np.zeros(5))["counts"][0] == 5  # all zero: a unit range, not a division by zero

    svg = histogram_svg(histogram, beta=0.5)
    assert svg.count("<rect") == 10 and "β = 0.5" in svg
    # Bars from beta up are drawn red, below it blue.
    colours = re.findall(r'fill="(#[0-9a-f]+)"', svg)
    assert colours == ["#d9534f" if edge >= 0.5 else "#7a9cc6" for edge in histogram["edges"][:-1]]
    assert "β =" not in histogram_svg(histogram, beta=9.0)  # beta past the range: no line
