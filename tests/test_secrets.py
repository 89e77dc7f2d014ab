"""A password in a URI (tracking.uri, a model path) never reaches a log, a written file or a tracker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lightreasoner_ray.config import load_config, redact, redact_tree
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io import storage

from conftest import requires_extra
from wandb_offline import read_offline_run

PASSWORD = "hunter2-s3cr3t"
TOKEN = "tok-98765"


@pytest.mark.parametrize("text, expected", [
    (f"postgresql://user:{PASSWORD}@db.example/mlflow", "postgresql://user:***@db.example/mlflow"),
    (f"postgresql+psycopg2://u:{PASSWORD}@h:5432/db", "postgresql+psycopg2://u:***@h:5432/db"),
    (f"https://{TOKEN}@wandb.example", "https://***@wandb.example"),
    (f"https://h/x?token={TOKEN}&run=1", "https://h/x?token=***&run=1"),
    (f"s3://bucket/model?X-Amz-Signature={TOKEN}", "s3://bucket/model?X-Amz-Signature=***"),
    ("s3://bucket/run", "s3://bucket/run"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("/plain/path", "/plain/path"),
])
def test_redact(text, expected):
    assert redact(text) == expected
    assert redact_tree({"a": [text, {"b": text}], "n": 1}) == {"a": [expected, {"b": expected}], "n": 1}


@requires_extra("wandb")
def test_a_password_in_tracking_uri_is_nowhere_a_run_writes_or_sends(tmp_path, monkeypatch, capfd):
    """Everything a stage does with its settings: log them, record them (the stage record), summarise them
    (samples_summary.json), echo a line, send them to the tracker; then grep every file and the console."""
    from lightreasoner_ray.stages.samples_record import check_sampling_settings
    from lightreasoner_ray.stages.sampling.stage import summarize_samples
    from lightreasoner_ray.ui.console import echo, quiet_console
    from lightreasoner_ray.ui.tracking import tracked_stage

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    uri = f"https://mlops:{PASSWORD}@wandb.internal.example"
    output_dir = tmp_path / "run"
    config = load_config(None, [f"output_dir={output_dir}", "tracking.backend=wandb", f"tracking.uri={uri}",
                                f"amateur.path=s3://models/amateur?token={TOKEN}"])
    layout = RunLayout(str(output_dir))

    def outputs(config, result):
        return {"sampling/x": 1.0}, [layout.samples_summary]

    @tracked_stage("sample", outputs=outputs)
    def stage(config):
        logging.getLogger("lightreasoner_ray.test").warning("tracking at %s, amateur %s", config.tracking.uri,
                                                            config.amateur.path)
        check_sampling_settings(layout.sampling_settings, layout.samples,
                                {"tracking": config.tracking.uri, "amateur": config.amateur.path, "beta": 0.4})
        storage.write_json_atomic(layout.samples_summary, summarize_samples(
            config, {"source": "test", "skipped_invalid": 0}, wall_time=1.0, new_rows=0, new_tokens=0, resumed=0))
        echo(f"samples done; tracker {config.tracking.uri}")
        return {}

    with quiet_console(str(output_dir), "sample"):
        stage(config)
    captured = capfd.readouterr()
    console = captured.out + captured.err
    assert "mlops:***@wandb.internal.example" in console  # the line was there, redacted
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".log") for p in files) and any(p.suffix == ".wandb" for p in files)
    for secret in (PASSWORD, TOKEN):
        assert secret not in console
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert leaked == [], f"{secret} written to {leaked}"
    summary = json.loads(Path(layout.samples_summary).read_text())
    assert summary["config"]["tracking"]["uri"] == "https://mlops:***@wandb.internal.example"
    (run,) = [read_offline_run(p) for p in (output_dir / "wandb").glob("offline-run-*")]
    assert run["config"]["tracking.uri"] == "https://mlops:***@wandb.internal.example"
    assert run["config"]["amateur.path"] == "s3://models/amateur?token=***"
