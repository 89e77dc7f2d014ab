"""Experiment tracking read back through each library's own reader, and the quiet console of `run`.

The session's one `lightreasoner run` (sample -> train -> evaluate; conftest's ``finished_run``)
has every installed backend on at once: MLflow's client, TensorBoard's event reader and the
offline W&B run files must each show the pipeline's run with its three stage runs nested
under it, the per-update training loss that rank 0 wrote, and the evaluation accuracies of
results.json. A backend's test skips, naming the extra, where that extra is not installed.
"""

from __future__ import annotations

import pytest

from lightreasoner_ray.ui import tracking
from lightreasoner_ray import config as config_module
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError

from conftest import FINISHED_RUN_MAX_STEPS, FINISHED_RUN_PROBLEMS, requires_extra
from wandb_offline import read_offline_run

MAX_STEPS = FINISHED_RUN_MAX_STEPS
CONSOLE_LINES = 20


def test_a_backend_that_is_not_installed_fails_at_config_time_naming_the_extra(monkeypatch):
    monkeypatch.setitem(config_module.TRACKING_PACKAGES, "wandb", ("wandb", "a_package_that_is_not_installed"))
    with pytest.raises(LightReasonerError, match=r"tracking.backend=wandb needs the 'wandb' extra.*lightreasoner-ray\[wandb\]"):
        load_config(None, ["tracking.backend=wandb"])


@requires_extra("mlflow", "tensorboard")
def test_backend_values(tmp_path):
    assert load_config(None, ["tracking.backend=[mlflow,tensorboard]"]).tracking.backends == ["mlflow", "tensorboard"]
    assert load_config(None, []).tracking.backends == []
    with pytest.raises(LightReasonerError, match="tracking.backend must be one of none, mlflow, tensorboard, wandb"):
        load_config(None, ["tracking.backend=comet"])
    with pytest.raises(LightReasonerError, match="none beside"):
        load_config(None, ["tracking.backend=[none,mlflow]"])


@requires_extra("mlflow")
def test_an_object_store_output_dir_needs_a_tracking_uri():
    config = load_config(None, ["output_dir=s3://bucket/run", "tracking.backend=mlflow"])
    with pytest.raises(LightReasonerError, match="set tracking.uri"):
        tracking.open_sinks(config.tracking, config.output_dir, "run", "run")


@pytest.fixture(scope="module")
def tracked_run(finished_run):
    return finished_run


@pytest.mark.slow
def test_console_is_short_and_the_rest_is_in_the_log(tracked_run):
    result, output_dir = tracked_run["result"], tracked_run["dir"]
    # Lines on the terminal: a progress bar redraws itself with "\r" on one line.
    console = (result.stderr + result.stdout).rstrip("\n").split("\n")
    assert len(console) <= CONSOLE_LINES, "\n".join(console)
    assert result.stdout.strip().splitlines()[-1] == f"report: {output_dir / 'report.md'}"
    (log,) = (output_dir / "logs").glob("run-*.log")
    assert f"logs in {log}" in result.stderr
    text = log.read_text()
    # Ray's worker output (the train controller, the evaluator actors) went to the file, not the console.
    assert "TrainController" in text and "TrainController" not in result.stderr + result.stdout
    assert "Reporting training result" not in result.stderr + result.stdout
    for label in ("sampling problems", "training updates", "evaluating"):
        assert label in result.stderr


@pytest.mark.slow
@requires_extra("mlflow")
def test_mlflow_nests_the_stage_runs_and_holds_the_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run['dir'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lightreasoner")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny-run", "sample:run", "train:run", "evaluate:run"}
    parent = runs["tiny-run"].info.run_id
    for name in ("sample:run", "train:run", "evaluate:run"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent
        assert runs[name].info.status == "FINISHED"
    history = client.get_metric_history(runs["train:run"].info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(tracked_run["losses"])
    assert len(history) == MAX_STEPS
    evaluate = runs["evaluate:run"].data
    for tag, value in tracked_run["accuracy"].items():
        assert evaluate.metrics[f"eval/{tag}/gsm8k/accuracy"] == pytest.approx(value)
    assert runs["sample:run"].data.params["sampling.beta"] == "0.3"
    assert runs["sample:run"].data.metrics["sampling/counts.problems"] == FINISHED_RUN_PROBLEMS
    artefacts = {f.path for f in client.list_artifacts(runs["evaluate:run"].info.run_id)}
    assert {"results.json", "results.md", "results.png"} <= artefacts
    assert "report.md" in {f.path for f in client.list_artifacts(parent)}


@pytest.mark.slow
@requires_extra("tensorboard")
def test_tensorboard_event_files_hold_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tracked_run["dir"] / "tensorboard" / "tiny-run"
    train = EventAccumulator(str(root / "train_run"), size_guidance={"scalars": 0})
    train.Reload()
    assert {e.step: e.value for e in train.Scalars("train/loss")} == pytest.approx(tracked_run["losses"])
    evaluate = EventAccumulator(str(root / "evaluate_run"))
    evaluate.Reload()
    for tag, value in tracked_run["accuracy"].items():
        assert evaluate.Scalars(f"eval/{tag}/gsm8k/accuracy")[-1].value == pytest.approx(value)
    assert "results.png" in evaluate.Tags()["images"]
    sample = EventAccumulator(str(root / "sample_run"))
    sample.Reload()
    assert sample.Scalars("sampling/counts.problems")[-1].value == FINISHED_RUN_PROBLEMS


@pytest.mark.slow
@requires_extra("wandb")
def test_wandb_offline_runs_are_grouped_and_hold_the_metrics(tracked_run):
    runs = {run["name"]: run for run in map(read_offline_run, (tracked_run["dir"] / "wandb").glob("offline-run-*"))}
    assert set(runs) == {"tiny-run", "sample:run", "train:run", "evaluate:run"}
    assert len({run["group"] for run in runs.values()}) == 1
    assert runs["train:run"]["job_type"] == "train"
    losses = {row["_step"]: row["train/loss"] for row in runs["train:run"]["history"] if "train/loss" in row}
    assert losses == pytest.approx(tracked_run["losses"])
    for tag, value in tracked_run["accuracy"].items():
        assert runs["evaluate:run"]["summary"][f"eval/{tag}/gsm8k/accuracy"] == pytest.approx(value)
    assert "sampling.beta" in runs["sample:run"]["config"]
    assert {"results.md", "results.png"} <= set(runs["evaluate:run"]["files"])
