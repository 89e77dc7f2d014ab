"""Provenance: stale samples, checkpoints, models and predictions are refused or recomputed, never mixed.

The fast tests check the fingerprints, records and the lr re-basing on plain files and
plain torch; the slow ones drive the real stages through ``lightreasoner`` (``cli.main``)
on the tiny pair: Ray Data sampling, Ray Train + DeepSpeed training, the Ray evaluator pool.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR
from lightreasoner_ray import cli
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io.fingerprints import (
    safetensors_header,
    samples_fingerprint,
    weights_fingerprint,
)
from lightreasoner_ray.io.layout import PROVENANCE as PROVENANCE_FILE
from lightreasoner_ray.io.record import remove_path
from lightreasoner_ray.stages.training.provenance import RESUMABLE_TRAIN_KEYS, TrainingProvenance, shaping_train_settings


# ---- fingerprints ---------------------------------------------------------------------


def _copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_a_weights_fingerprint_follows_the_content_not_the_path(tiny_pair, tmp_path):
    expert = _copy_model(tiny_pair["expert"], tmp_path / "expert")
    first = weights_fingerprint(str(expert))
    assert weights_fingerprint(str(expert)) == first
    moved = _copy_model(expert, tmp_path / "elsewhere" / "expert-copy")
    assert weights_fingerprint(str(moved)) == first  # small files are hashed whole: mtimes do not matter

    weights = next(expert.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight, same size, same header
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(str(expert)) != first
    assert weights_fingerprint(str(expert / "absent")) == weights_fingerprint(str(expert / "absent"))
    assert weights_fingerprint("Qwen/Qwen2.5-Math-1.5B") != weights_fingerprint("Qwen/Qwen2.5-Math-7B")


def test_a_large_checkpoint_is_fingerprinted_by_layout_and_mtime_without_reading_the_weights(tiny_pair, tmp_path):
    from safetensors import safe_open

    expert = _copy_model(tiny_pair["expert"], tmp_path / "expert")
    weights = next(expert.glob("*.safetensors"))
    header = json.loads(safetensors_header(weights))
    with safe_open(str(weights), framework="pt") as handle:  # an independent reader of the header
        assert set(handle.keys()) == set(header) - {"__metadata__"}
        assert all(header[key]["shape"] == list(handle.get_slice(key).get_shape()) for key in handle.keys())

    large = dict(full_hash_max_bytes=1024)  # everything above 1 KiB counts as large here
    first = weights_fingerprint(str(expert), **large)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # The documented blind spot: same layout, same size, forged mtime.
    assert weights_fingerprint(str(expert), **large) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert weights_fingerprint(str(expert), **large) != first  # a re-written file gets a new mtime

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (expert / "generation_config.json").write_text('{"max_new_tokens": 7}')  # small files stay hashed whole
    assert weights_fingerprint(str(expert), **large) != first


def test_an_adapter_fingerprint_covers_its_base_model(tiny_pair, tmp_path):
    base = _copy_model(tiny_pair["expert"], tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"not really weights")
    first = weights_fingerprint(str(adapter))
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")  # the base changed, not the adapter
    assert weights_fingerprint(str(adapter)) != first


def test_samples_are_fingerprinted_by_content_whatever_the_file_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(directory: Path, tables: dict[str, pa.Table]) -> list[str]:
        directory.mkdir()
        for name, table in tables.items():
            pq.write_table(table, directory / name)
        return [str(directory / name) for name in tables]

    one, two = pa.table({"problem_id": ["a"], "steps": [[1, 2]]}), pa.table({"problem_id": ["b"], "steps": [[3]]})
    first = samples_fingerprint(write(tmp_path / "x", {"part-1.parquet": one, "part-2.parquet": two}))
    assert samples_fingerprint(write(tmp_path / "y", {"part-9.parquet": two, "part-0.parquet": one})) == first
    changed = pa.table({"problem_id": ["b"], "steps": [[4]]})
    assert samples_fingerprint(write(tmp_path / "z", {"part-1.parquet": one, "part-2.parquet": changed})) != first


def test_only_settings_that_shape_a_checkpoint_are_compared():
    base = load_config(None, ["train.lr=1e-4"])
    settings = shaping_train_settings(base)
    assert {"train.lora.r", "train.seed", "train.steps_per_update", "train.deepspeed.stage", "expert.dtype"} <= set(settings)
    assert not any(key.split(".", 1)[1] in RESUMABLE_TRAIN_KEYS for key in settings if key.startswith("train."))
    free = load_config(None, ["train.lr=1e-5", "train.max_steps=7", "train.checkpoint_every=3", "train.log_every=2",
                              "train.keep_checkpoints=5", "train.max_failures=0", "train.lr_schedule=cosine",
                              "train.warmup_steps=2", "train.samples=/elsewhere"])
    assert shaping_train_settings(free) == settings

    recorded = TrainingProvenance("s1", "e1", settings, "/o/samples")
    current = TrainingProvenance("s2", "e1", shaping_train_settings(load_config(None, ["train.lora.r=4"])), "/o/samples")
    changes = current.changes_from(recorded)
    assert len(changes) == 2
    assert changes[0].startswith("the samples changed in /o/samples (content fingerprint s1 -> s2")
    assert changes[1] == "train.lora.r: 8 -> 4"
    assert TrainingProvenance.from_dict(recorded.to_dict()) == recorded
    assert recorded.changes_from(TrainingProvenance.from_dict(recorded.to_dict())) == []


def test_checkpoints_are_claimed_by_their_provenance(tmp_path):
    from lightreasoner_ray.stages.training.driver import claim_checkpoints

    config = load_config(None, [f"output_dir={tmp_path}"])
    record = tmp_path / "checkpoints" / PROVENANCE_FILE
    first = TrainingProvenance("s1", "e1", {"train.lora.r": 8})
    other = TrainingProvenance("s1", "e1", {"train.lora.r": 4})
    claim_checkpoints(config, first)
    assert json.loads(record.read_text()) == first.to_dict()
    claim_checkpoints(config, other)  # no checkpoint was written yet: nothing to mix, the record follows
    assert json.loads(record.read_text()) == other.to_dict()
    (tmp_path / "checkpoints" / "train" / "step_0000002").mkdir(parents=True)
    claim_checkpoints(config, other)
    with pytest.raises(LightReasonerError, match=r"train\.lora\.r: 4 -> 8.*--restart"):
        claim_checkpoints(config, first)
    record.unlink()
    with pytest.raises(LightReasonerError, match="have no provenance.json"):
        claim_checkpoints(config, first)


def test_remove_path_removes_files_and_trees_and_reports_what_was_there(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    (tmp_path / "file").write_text("y")
    assert remove_path(str(tree)) and remove_path(str(tmp_path / "file"))
    assert not remove_path(str(tmp_path / "absent"))
    assert list(tmp_path.iterdir()) == []


# ---- the lr on resume, with plain torch ---------------------------------------------------


def test_a_resumed_scheduler_follows_the_configs_lr_not_the_checkpoints():
    from lightreasoner_ray.stages.training.checkpoints import apply_optimizer_settings
    from lightreasoner_ray.core.schedule import lr_multiplier

    def make(lr: float, max_steps: int, schedule: str, weight_decay: float):
        parameter = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([parameter], lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda update: lr_multiplier(update, 2, max_steps, schedule))
        return parameter, optimizer, scheduler

    parameter, optimizer, scheduler = make(5e-5, 10, "cosine", 0.0)
    for _ in range(4):
        parameter.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()

    train = load_config(None, ["train.lr=1e-5", "train.max_steps=20", "train.lr_schedule=linear",
                               "train.warmup_steps=2", "train.weight_decay=0.1"]).train
    _, optimizer, scheduler = make(train.lr, train.max_steps, train.lr_schedule, train.weight_decay)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    # The bug: loading brings back the checkpoint's base lr.
    assert scheduler.base_lrs == [5e-5]
    apply_optimizer_settings(scheduler, train)
    expected = [1e-5 * lr_multiplier(update, 2, 20, "linear") for update in range(4, 7)]
    seen = []
    for _ in range(3):
        seen.append(scheduler.get_last_lr()[0])
        assert optimizer.param_groups[0]["lr"] == seen[-1] and optimizer.param_groups[0]["weight_decay"] == 0.1
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-12)


# ---- predictions ------------------------------------------------------------------------


def test_predictions_of_other_weights_are_discarded_and_other_settings_refused(tmp_path):
    from lightreasoner_ray.stages.evaluation.pool import Shard
    from lightreasoner_ray.stages.evaluation.store import PredictionStore, check_generation_settings

    model_dir = str(tmp_path / "eval" / "lightreasoner")
    settings = {"model_path": "/o/model", "model_fingerprint": "f1", "engine": "hf", "max_new_tokens": 16}
    shard = Shard("gsm8k", 0, [{"id": "1", "question": "q", "answer": "2"}])
    row = {"id": "1", "question": "q", "output": "2", "extracted": "2", "answer": "2", "correct": True}

    check_generation_settings(model_dir, settings)
    store = PredictionStore(model_dir, {"gsm8k": [shard]}, "f1")
    assert store.resume() == [shard]
    store.add(shard, [row])
    assert json.loads(Path(model_dir, "gsm8k.jsonl").read_text())["model_fingerprint"] == "f1"
    assert PredictionStore(model_dir, {"gsm8k": [shard]}, "f1").resume() == []  # resumed
    assert PredictionStore(model_dir, {"gsm8k": [shard]}, "f2").resume() == [shard]  # rows of other weights

    check_generation_settings(model_dir, {**settings, "model_path": "/moved/model"})  # same weights, new path
    assert Path(model_dir, "gsm8k.jsonl").exists()
    with pytest.raises(LightReasonerError, match=r"max_new_tokens differ.*--restart"):
        check_generation_settings(model_dir, {**settings, "max_new_tokens": 32})
    check_generation_settings(model_dir, {**settings, "model_fingerprint": "f2"})  # retrained: start over
    assert not Path(model_dir, "gsm8k.jsonl").exists() and not Path(model_dir, "gsm8k").exists()
    assert json.loads(Path(model_dir, "generation.json").read_text())["model_fingerprint"] == "f2"


def test_restart_is_offered_by_the_resuming_stages_only():
    parser = cli.build_parser()
    for command in ("sample", "train", "evaluate", "run"):
        assert parser.parse_args([command, "--restart", "a=1"]).restart is True
        assert parser.parse_args([command, "a=1"]).restart is False
    for command in ("export", "demo"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--restart"])


# ---- through the command line, for real -------------------------------------------------------

slow = pytest.mark.slow


def _args(tiny_pair, problems_file, output_dir, *overrides) -> list[str]:
    return [
        f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", f"data.problems={problems_file}",
        f"output_dir={output_dir}", "data.limit=4", "sampling.max_new_tokens=16", "sampling.alpha=0.6",
        "sampling.beta=0.3", "sampling.num_actors=1", "sampling.batch_size=4", "train.num_workers=1",
        "train.steps_per_update=8", "train.micro_batch_steps=8", "train.lr=0.01", "train.checkpoint_every=2",
        f"eval.data_dir={DATA_DIR}", "eval.benchmarks=[gsm8k]", "eval.limit=2", "eval.shard_size=2",
        "eval.max_new_tokens=8", "eval.num_actors=1", *overrides,
    ]


def _lightreasoner(capsys, command: str, *args: str) -> tuple[int, str]:
    code = cli.main([command, *args])
    return code, capsys.readouterr().err


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_metrics.jsonl").read_text().splitlines()]


@slow
def test_stale_checkpoints_models_and_predictions_are_continued_recomputed_or_refused(
    tiny_pair, problems_file, ray_local, tmp_path, capsys
):
    out = tmp_path / "run"
    args = lambda *more: _args(tiny_pair, problems_file, out, *more)  # noqa: E731

    # (a) 2 updates, then 4: the run continues from 2, publishes the new model, re-evaluates it.
    assert _lightreasoner(capsys, "run", *args("train.max_steps=2"))[0] == 0
    first = json.loads((out / "report.json").read_text())["results"]["models"]
    first_record = json.loads((out / "model" / PROVENANCE_FILE).read_text())
    assert first_record["step"] == 2
    assert _lightreasoner(capsys, "run", *args("train.max_steps=4"))[0] == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [row["step"] for row in _metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "model" / PROVENANCE_FILE).read_text())["step"] == 4
    second = json.loads((out / "report.json").read_text())["results"]["models"]
    assert second["lightreasoner"]["model_fingerprint"] != first["lightreasoner"]["model_fingerprint"]
    assert second["lightreasoner"]["model_fingerprint"] == weights_fingerprint(str(out / "model"))
    assert second["lightreasoner"]["run"]["shards_generated"] == 1 and second["lightreasoner"]["trained_step"] == 4
    assert second["baseline"]["run"]["shards_resumed"] == 1  # the untouched expert is not redone
    rows = [json.loads(line) for line in (out / "eval" / "lightreasoner" / "gsm8k.jsonl").read_text().splitlines()]
    assert {row["model_fingerprint"] for row in rows} == {second["lightreasoner"]["model_fingerprint"]}
    # Same inputs again: the finished training is skipped (its provenance matches) and nothing is redone.
    summary_written = (out / "train_summary.json").stat().st_mtime_ns
    assert _lightreasoner(capsys, "run", *args("train.max_steps=4"))[0] == 0
    assert (out / "train_summary.json").stat().st_mtime_ns == summary_written
    third = json.loads((out / "report.json").read_text())["results"]["models"]
    assert third["lightreasoner"]["run"]["shards_resumed"] == third["baseline"]["run"]["shards_resumed"] == 1

    # (b) re-sampled with another beta: train and run refuse, naming the samples; --restart trains afresh.
    code, error = _lightreasoner(capsys, "sample", *args("sampling.beta=0.2"))
    assert code == 2 and "beta: 0.3 -> 0.2" in error and "--restart" in error
    assert _lightreasoner(capsys, "sample", "--restart", *args("sampling.beta=0.2"))[0] == 0
    assert json.loads((out / "sampling_settings.json").read_text())["beta"] == 0.2
    for command in ("train", "run"):
        code, error = _lightreasoner(capsys, command, *args("train.max_steps=4", "sampling.beta=0.2"))
        assert code == 2, error
        assert "the samples changed" in error and "lightreasoner train --restart" in error and "new output_dir" in error
    assert json.loads((out / "model" / PROVENANCE_FILE).read_text())["step"] == 4  # nothing was touched

    # (d) a changed train.* setting that shapes the result is refused, naming the key.
    code, error = _lightreasoner(capsys, "train", *args("train.max_steps=4", "train.lora.r=4"))
    assert code == 2 and "train.lora.r: 8 -> 4" in error

    # `run --restart` starts every stage over: samples again, trains from scratch, evaluates both tags afresh.
    assert _lightreasoner(capsys, "run", "--restart", *args("train.max_steps=2", "sampling.beta=0.2"))[0] == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 2
    restarted = json.loads((out / "report.json").read_text())["results"]["models"]
    assert restarted["baseline"]["run"]["shards_generated"] == restarted["lightreasoner"]["run"]["shards_generated"] == 1
    assert restarted["lightreasoner"]["trained_step"] == 2
    assert [row["step"] for row in _metrics(out)] == [1, 2]
    record = json.loads((out / "model" / PROVENANCE_FILE).read_text())
    assert record["step"] == 2
    assert record["training"]["samples"] == summary["provenance"]["samples"] != first_record["training"]["samples"]


@slow
def test_a_lowered_lr_takes_effect_when_a_run_resumes_after_a_nonfinite_loss(
    tiny_pair, problems_file, ray_local, tmp_path, capsys, monkeypatch
):
    import fault_hooks

    out = tmp_path / "run"
    args = lambda *more: _args(tiny_pair, problems_file, out, "train.max_steps=4", *more)  # noqa: E731
    assert _lightreasoner(capsys, "sample", *args())[0] == 0
    fault_hooks.inject(monkeypatch, "nan:3")
    code, error = _lightreasoner(capsys, "train", *args("train.lr=0.01"))
    assert code == 2 and "non-finite at update 3" in error and "lower train.lr" in error
    assert [(row["step"], row.get("lr")) for row in _metrics(out)] == [(1, 0.01), (2, 0.01), (3, None)]

    monkeypatch.delenv(fault_hooks.FAULT_ENV)
    assert _lightreasoner(capsys, "train", *args("train.lr=0.001"))[0] == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [(row["step"], row["lr"]) for row in _metrics(out)] == [(1, 0.01), (2, 0.01), (3, 0.001), (4, 0.001)]
    assert json.loads((out / "model" / PROVENANCE_FILE).read_text())["optimizer"]["lr"] == 0.001
