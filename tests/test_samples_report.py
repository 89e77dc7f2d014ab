"""`lightreasoner inspect`: the self-contained samples page, checked against the samples and the models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightreasoner_ray.io import storage
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.stages.inspect import run_inspect

from conftest import FINISHED_RUN_PROBLEMS, REPO_ROOT


def config_for(tiny_pair, problems_file, output_dir, *overrides):
    return load_config(None, [
        f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", f"data.problems={problems_file}",
        "data.limit=4", "sampling.max_new_tokens=16", "sampling.alpha=0.6", "sampling.beta=0.3", "sampling.batch_size=2",
        f"output_dir={output_dir}", *overrides,
    ])


@pytest.fixture(scope="module")
def sampled(finished_run):
    """The config of the session's finished run (conftest): its samples are what the page shows."""
    return finished_run["config"]


def page_data(html: str) -> dict:
    match = re.search(r'<script id="samples-data" type="application/json">(.*?)</script>', html, re.S)
    assert match, "the page embeds its data"
    return json.loads(match.group(1).replace("<\\/", "</"))


@pytest.mark.slow
def test_page_shows_the_samples_and_the_models_top_tokens(sampled, tiny_pair):
    result = run_inspect(sampled)
    html = storage.read_text(result["path"])
    # One static file: nothing to fetch (the SVG namespace is a name, not a request).
    assert "<link" not in html and " src=" not in html and "@import" not in html
    assert "<svg" in html and "β = 0.3" in html
    data = page_data(html)
    rows = sorted(storage.read_parquet(sampled.samples_dir).to_pylist(), key=lambda row: row["problem_id"])
    tokens = sum(len(row["completion_ids"]) for row in rows)
    selected = sum(len(row["steps"]) for row in rows)
    assert data["stats"]["selection_ratio"] == pytest.approx(selected / tokens)
    assert f"selection ratio <b>{selected / tokens:.3f}</b>" in html
    assert sum(data["histogram"]["counts"]) == tokens
    assert len(data["trajectories"]) == len(rows) == FINISHED_RUN_PROBLEMS

    from transformers import AutoModelForCausalLM, AutoTokenizer

    expert = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    for shown, row in zip(data["trajectories"], rows):
        assert shown["problem_id"] == row["problem_id"]
        assert shown["tokens"] == row["completion_ids"]
        assert shown["steps"] == row["steps"]
        assert shown["kl"] == pytest.approx(row["position_kl"], abs=1e-4)
        for step, ids, probs in zip(row["steps"], row["target_ids"], row["target_probs"]):
            assert shown["soft_labels"][str(step)]["ids"] == ids
            assert shown["soft_labels"][str(step)]["probs"] == pytest.approx(probs, abs=1e-4)
        # The expert's top tokens, recomputed here from the full sequence's logits.
        sequence = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        start = len(row["prompt_ids"]) - 1
        with torch.no_grad():
            logits = expert(input_ids=sequence).logits[0, start:start + len(row["completion_ids"])].float()
        # Over the tokenizer's tokens only: the head's padding rows are no tokens.
        probs = torch.softmax(logits[:, :len(tokenizer)], -1)
        top_probs, top_ids = probs.topk(len(shown["expert_top"]["ids"][0]), dim=-1)
        np.testing.assert_allclose(shown["expert_top"]["probs"], top_probs.numpy(), atol=1e-4)
        for position, token in enumerate(row["completion_ids"]):
            # The completion was decoded greedily: its token is the expert's first choice there (up to ties).
            assert probs[position, token] >= top_probs[position, 0] - 1e-4
            assert shown["expert_top"]["ids"][position][0] == top_ids[position, 0] or \
                probs[position, top_ids[position, 0]] - probs[position, shown["expert_top"]["ids"][position][0]] < 1e-4
    every_id = {str(token) for shown in data["trajectories"] for token in shown["tokens"]}
    assert every_id <= set(data["vocabulary"])


def test_no_samples_is_a_clear_error(tiny_pair, problems_file, tmp_path):
    with pytest.raises(LightReasonerError, match=r"no samples in .*samples: run `lightreasoner sample`"):
        run_inspect(config_for(tiny_pair, problems_file, tmp_path))


@pytest.mark.slow
def test_cli_inspect_console_is_short(sampled, tiny_pair, problems_file):
    # Models, alpha and beta come from the samples' own samples_summary.json (the default beta is 0.4).
    args = [f"output_dir={sampled.output_dir}"]
    result = subprocess.run([sys.executable, "-m", "lightreasoner_ray.cli", "inspect", *args],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "samples report:" in result.stdout and "at beta 0.3)" in result.stdout
    assert len((result.stdout + result.stderr).rstrip("\n").split("\n")) <= 6, result.stdout + result.stderr
    # The weights-loading bars went to the log, not the console.
    log = next(Path(sampled.output_dir, "logs").glob("inspect-*.log"))
    assert "Loading weights" in log.read_text() and "Loading weights" not in result.stderr
