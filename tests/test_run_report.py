"""The run's report (runs/round.py) from stage summaries written by hand: the paper's efficiency
measures and the comparison with SFT on rejection-sampled solutions, numbers worked out here.
(The slow tests read the reports of real runs.)"""

from __future__ import annotations

import json

import pytest

from lightreasoner_ray.config import load_config
from lightreasoner_ray.runs.round import efficiency_report, report_markdown, write_report

SAMPLES = {"counts": {"problems": 8, "completion_tokens": 200, "selected_steps": 50}}
TRAINING = {"steps": 4, "final_loss": 0.75, "model": "/o/model", "model_kind": "lora", "deepspeed_stage": 2,
            "forward_tokens": 1234, "tuned_tokens": 200}
RESULTS = {
    "benchmarks": ["gsm8k", "svamp"],
    "models": {
        "baseline": {"benchmarks": {"gsm8k": {"accuracy": 0.25}, "svamp": {"accuracy": 0.5}}, "average": 0.375},
        "lightreasoner": {"benchmarks": {"gsm8k": {"accuracy": 0.5}, "svamp": {"accuracy": 0.75}}, "average": 0.625},
    },
}
SECONDS = {"sample": 10.0, "train": 30.0, "evaluate": 5.0, "rejection_sft_sample": 20.0, "rejection_sft_train": 60.0}
REJECTION = {
    "sampling": {
        "settings": {"samples_per_problem": 4, "temperature": 1.0, "top_p": 0.95, "seed": 0, "max_new_tokens": 64,
                     "grader": "math", "engine": "hf", "not": "reported"},
        "counts": {"problems": 8, "sampled": 32, "correct": 10, "kept": 7, "problems_with_a_kept_solution": 5,
                   "tuned_tokens": 400},
    },
    "training": {"steps": 3, "final_loss": 1.5, "model": "/o/rejection_sft/model"},
}


@pytest.fixture
def config(tmp_path):
    return load_config(None, [f"output_dir={tmp_path}", "expert.path=/m/expert", "amateur.path=/m/amateur"])


def test_tuned_tokens_are_the_selected_steps_against_every_completion_token(config):
    report = efficiency_report(config, SAMPLES, TRAINING, RESULTS, {k: SECONDS[k] for k in ("sample", "train", "evaluate")})
    assert report["total_wall_time_s"] == 45.0 and report["problems_sampled"] == 8
    assert report["tokens"] == {
        "completion_tokens": 200, "selected_steps": 50, "tuned_tokens_lightreasoner": 50,
        "tuned_tokens_sft_same_trajectories": 200, "tuned_token_ratio": 0.25,
        "training_forward_tokens": 1234, "training_positions_processed": 200,
    }
    assert report["training"] == {"steps": 4, "final_loss": 0.75, "model": "/o/model", "model_kind": "lora",
                                  "deepspeed_stage": 2}
    assert "rejection_sft" not in report
    markdown = report_markdown(report)
    assert "| LightReasoner / SFT tuned tokens | 25.0% |" in markdown
    assert "| wall time, training | 30.0 s |" in markdown
    assert "| baseline | 25.0 | 50.0 | 37.5 |" in markdown and "| lightreasoner | 50.0 | 75.0 | 62.5 |" in markdown
    assert "Against SFT" not in markdown

    empty = efficiency_report(config, {"counts": {"problems": 0, "completion_tokens": 0, "selected_steps": 0}}, {},
                              RESULTS, {"sample": 0.0, "train": 0.0, "evaluate": 0.0})
    assert empty["tokens"]["tuned_token_ratio"] is None
    assert "| LightReasoner / SFT tuned tokens | – |" in report_markdown(empty)


def test_against_rejection_sft_the_three_measures_are_ratios_of_lightreasoner_over_sft(config, tmp_path):
    report = efficiency_report(config, SAMPLES, TRAINING, RESULTS, SECONDS, REJECTION)
    against = report["rejection_sft"]
    assert against["lightreasoner_over_rejection_sft"] == {
        "wall_time": pytest.approx(40.0 / 80.0), "problems_sampled": 1.0, "tuned_tokens": pytest.approx(50 / 400),
    }
    assert against["settings"] == {k: v for k, v in REJECTION["sampling"]["settings"].items() if k != "not"}
    assert (against["solutions_sampled"], against["solutions_correct"], against["solutions_kept"]) == (32, 10, 7)
    assert against["wall_time_s"] == {"sample": 20.0, "train": 60.0, "total": 80.0}
    assert against["resumed"] is False
    markdown = report_markdown(report)
    assert "| tuned tokens | 50 | 400 | 0.125x |" in markdown
    assert "| wall time, sampling + training | 40.0 s | 80.0 s | 0.500x |" in markdown
    assert "| solutions sampled / kept | 8 / – | 32 / 7 | – |" in markdown
    assert "Some stages resumed" not in markdown and "nothing to train" not in markdown

    resumed = {**REJECTION, "training": None,
               "sampling": {**REJECTION["sampling"], "counts": {**REJECTION["sampling"]["counts"], "kept": 0,
                                                                "resumed_problems": 3}}}
    note = report_markdown(efficiency_report(config, SAMPLES, TRAINING, RESULTS, SECONDS, resumed))
    assert "Some stages resumed earlier work" in note and "no SFT model was evaluated" in note

    paths = write_report(str(tmp_path), report)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "report.md").read_text() == markdown
    assert paths["markdown"].endswith("report.md")
