"""The run layout names every output path once, and those names are the on-disk interface:
an output_dir written by an earlier version must still resume, so they never change silently."""

from __future__ import annotations

from lightreasoner_ray.io.layout import RunLayout


def test_the_on_disk_names_are_those_earlier_versions_wrote():
    layout = RunLayout("/runs/a")
    assert layout.samples == "/runs/a/samples"
    assert layout.sampling_settings == "/runs/a/sampling_settings.json"
    assert layout.samples_summary == "/runs/a/samples_summary.json"
    assert layout.checkpoints == "/runs/a/checkpoints"
    assert layout.checkpoints_provenance == "/runs/a/checkpoints/provenance.json"
    assert layout.model == "/runs/a/model" and layout.model_provenance == "/runs/a/model/provenance.json"
    assert layout.train_summary == "/runs/a/train_summary.json"
    assert layout.train_metrics == "/runs/a/train_metrics.jsonl"
    assert layout.training_outputs == ["/runs/a/checkpoints", "/runs/a/model", "/runs/a/train_summary.json",
                                       "/runs/a/train_metrics.jsonl"]
    assert layout.eval == "/runs/a/eval" and layout.eval_model("baseline") == "/runs/a/eval/baseline"
    assert layout.results == {"json": "/runs/a/eval/results.json", "markdown": "/runs/a/eval/results.md",
                              "chart": "/runs/a/eval/results.png"}
    assert layout.report == {"json": "/runs/a/report.json", "markdown": "/runs/a/report.md"}
    assert layout.rounds_report == {"json": "/runs/a/rounds.json", "markdown": "/runs/a/rounds.md"}
    assert layout.round_done == "/runs/a/round_done.json"
    assert layout.round(1) == layout and layout.round(3).output_dir == "/runs/a/round-3"
    assert layout.merged == "/runs/a/merged"
    rejection = layout.rejection_sft
    assert rejection.output_dir == "/runs/a/rejection_sft"
    assert rejection.solutions == "/runs/a/rejection_sft/solutions"
    assert rejection.samples == "/runs/a/rejection_sft/samples"
    assert rejection.rejection_settings == "/runs/a/rejection_sft/rejection_settings.json"
    assert rejection.rejection_summary == "/runs/a/rejection_sft/rejection_summary.json"
    assert rejection.model == "/runs/a/rejection_sft/model"
    assert layout.demo_settings == "/runs/a/demo_settings.json"
    assert layout.demo_results == {"json": "/runs/a/demo_results.json", "markdown": "/runs/a/demo_results.md",
                                   "chart": "/runs/a/demo_results.png"}
    assert layout.logs == "/runs/a/logs"


def test_an_object_store_output_dir_keeps_its_scheme():
    layout = RunLayout("s3://bucket/run/")
    assert layout.samples == "s3://bucket/run/samples"
    assert layout.rejection_sft.solutions == "s3://bucket/run/rejection_sft/solutions"
    assert layout.results["json"] == "s3://bucket/run/eval/results.json"
