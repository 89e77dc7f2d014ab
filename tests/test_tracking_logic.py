"""Tracking's own logic without a pipeline: metric names, the numbers a summary yields, the
follower of train_metrics.jsonl, and tracked stages nesting into child runs (on TensorBoard's
event files, read back by TensorBoard's reader). test_tracking.py reads a whole `lightreasoner run`."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path

from conftest import requires_extra

from lightreasoner_ray.config import load_config
from lightreasoner_ray.stages.training.metrics_log import train_row_metrics
from lightreasoner_ray.ui import tracking


def test_metric_names_keep_what_every_backend_accepts():
    assert tracking.metric_name("eval", "my-model", "gsm8k", "accuracy") == "eval/my-model/gsm8k/accuracy"
    assert tracking.metric_name("eval", "a=b", "", "pass@4") == "eval/a_b/pass_4"
    assert tracking.metric_name("sampling", "counts.problems") == "sampling/counts.problems"


def test_a_summary_yields_its_finite_numbers_only():
    summary = {"counts": {"problems": 8, "selection_ratio": 0.25, "done": True}, "kl": {"mean": float("nan"),
               "max": float("inf"), "histogram": [1, 2]}, "models": {"expert": "/m"}, "time": 1.5}
    assert tracking.numeric_leaves(summary, "sampling") == {
        "sampling/counts.problems": 8.0, "sampling/counts.selection_ratio": 0.25, "sampling/time": 1.5,
    }
    row = {"step": 3, "loss": 0.5, "lr": 1e-4, "grad_norm": float("nan"), "selected_steps": 12, "other": 7, "tokens_per_s": True}
    assert train_row_metrics(row) == {"train/loss": 0.5, "train/lr": 1e-4, "train/selected_steps": 12.0}


def test_the_follower_hands_on_each_new_update_once_in_order(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    seen: list[int] = []
    appended = threading.Event()

    def on_row(row: dict) -> None:
        seen.append(row["step"])
        appended.set()

    with path.open("w") as handle, tracking.MetricsFollower(on_row, str(path), interval_s=0.01):
        for step in (1, 2):
            handle.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
            handle.flush()
        assert appended.wait(10)
        # A line being written, a repeated step and a row without a step are passed over.
        handle.write(json.dumps({"step": 2}) + "\n" + json.dumps({"loss": 3}) + "\n" + json.dumps({"step": 3}) + "\n")
        handle.write('{"step": 4, "lo')
        handle.flush()
    assert seen == [1, 2, 3]  # the last poll on exit caught step 3


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@requires_extra("tensorboard")
def test_a_stage_inside_a_stage_is_a_child_run_and_each_logs_its_outputs(tmp_path):
    report = tmp_path / "out" / "report.md"

    @tracking.tracked_stage("sample", outputs=lambda config, result: ({"sampling/problems": float(result["n"])}, []))
    def sample(config):
        return {"n": 8}

    def pipeline_outputs(config, result):
        report.write_text("# report\n")
        return {"pipeline/score": result["score"]}, [str(report), str(tmp_path / "absent.md")]

    @tracking.tracked_stage("run", outputs=pipeline_outputs)
    def pipeline(config):
        sample(config)
        return {"score": 0.5}

    config = load_config(None, [f"output_dir={tmp_path / 'out'}", "tracking.backend=tensorboard",
                                "tracking.run_name=tiny-run"])
    assert pipeline(config) == {"score": 0.5}
    root = tmp_path / "out" / "tensorboard" / "tiny-run"
    assert tensorboard_scalars(root)["pipeline/score"] == [(0, 0.5)]
    assert tensorboard_scalars(root / "sample_out") == {"sampling/problems": [(0, 8.0)]}  # named stage:<output dir>

    # Called alone, the stage is a top-level run named after the stage.
    sample(dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, run_name="")))
    assert tensorboard_scalars(tmp_path / "out" / "tensorboard" / "sample") == {"sampling/problems": [(0, 8.0)]}


def test_without_a_backend_the_stage_only_runs(tmp_path):
    @tracking.tracked_stage("sample", outputs=lambda config, result: (_ for _ in ()).throw(AssertionError("not asked")))
    def sample(config, value):
        return value * 2

    assert sample(load_config(None, [f"output_dir={tmp_path}"]), 21) == 42
    assert list(tmp_path.iterdir()) == []


class _FailingSink:
    """A backend that fails at everything: its run must not take the stage down with it."""

    def log_params(self, params):
        raise ConnectionError("tracking server unreachable")

    log_metrics = log_artifact = finish = lambda self, *args: self.log_params({})

    def child(self, name, stage):
        raise ConnectionError("tracking server unreachable")


def test_a_failing_backend_is_logged_never_fatal(tmp_path, caplog):
    run = tracking.TrackedRun("tiny-run", [_FailingSink()])
    (tmp_path / "results.md").write_text("x")
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        run.log_params({"a": {"b": 1}})
        run.log_metrics({"m": 1.0}, step=1)
        run.log_artifacts([str(tmp_path / "results.md"), str(tmp_path / "absent.md"), "s3://bucket/x.md"])
        child = run.child("sample:run", "sample")
        run.finish(failed=False)
    assert child.sinks == []
    messages = [record.getMessage() for record in caplog.records]
    assert any("could not log parameters for run tiny-run: tracking server unreachable" in m for m in messages)
    assert any("could not log artefact" in m and "results.md" in m for m in messages)
    assert not any("absent.md" in m or "s3://" in m for m in messages)  # only files that exist are logged
    assert any("could not open run sample:run" in m for m in messages)
