"""Directories are replaced whole: a reader sees the old one or the new one, and nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import local_dirs, storage


def _tree(root, files: dict[str, str]):
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_replace_directory_swaps_in_the_new_tree_and_leaves_no_hidden_siblings(tmp_path):
    target = tmp_path / "model"
    staging = _tree(local_dirs.staging_path(target), {"a": "new"})
    assert staging.parent == tmp_path and staging.name.startswith(".model.") and staging.name.endswith(".tmp")
    local_dirs.replace_directory(staging, target)  # no target yet
    assert (target / "a").read_text() == "new"

    _tree(target / "sub", {"old": "x"})
    local_dirs.replace_directory(_tree(local_dirs.staging_path(target), {"b": "newer"}), target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # the old tree went whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .tmp or .old left


def test_replace_directory_can_keep_what_another_process_published(tmp_path):
    target = _tree(tmp_path / "cache", {"config.json": "first"})
    staging = _tree(local_dirs.staging_path(target), {"config.json": "second"})
    with pytest.raises(OSError):
        local_dirs.replace_directory(staging, target, keep_existing=True)
    assert (target / "config.json").read_text() == "first" and staging.is_dir()


def test_publish_directory_copies_with_extra_files_and_replaces_the_old(tmp_path):
    source = _tree(tmp_path / "checkpoint" / "hf_model", {"weights": "w"})
    destination = tmp_path / "out" / "model"
    _tree(destination, {"stale": "s"})
    storage.publish_directory(str(source), str(destination), {"provenance.json": b"{}"})
    assert sorted(p.name for p in destination.iterdir()) == ["provenance.json", "weights"]
    assert (source / "weights").is_file() and not (source / "provenance.json").exists()  # the source is copied
    assert [p.name for p in destination.parent.iterdir()] == ["model"]


def test_a_truncated_json_record_is_one_error_naming_the_file(tmp_path):
    from lightreasoner_ray.errors import LightReasonerError

    path = tmp_path / "sampling_settings.json"
    storage.write_json_atomic(str(path), {"alpha": 0.2, "beta": 0.4})
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(LightReasonerError, match=rf"{path}: not valid JSON.*truncated") as caught:
        storage.read_json(str(path))
    assert isinstance(caught.value, ValueError)  # record readers that treat a bad record as unknown still can
    path.write_bytes(b"")
    with pytest.raises(LightReasonerError, match="it is empty"):
        storage.read_json(str(path))


def test_writes_are_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Durability: the file's data reaches the disk before it takes its final name, and the rename too."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "x.json"
    storage.write_json_atomic(str(target), {"a": 1})
    kinds = [(kind, Path(path).name if kind == "replace" else path) for kind, path in events]
    assert kinds[0][0] == "fsync" and Path(kinds[0][1]).name.startswith(".x.json.")  # the temporary, synced
    assert kinds[1] == ("replace", "x.json")
    assert kinds[2] == ("fsync", str(tmp_path))  # the directory entry


def test_every_reader_of_a_model_published_to_a_uri_follows_its_current_pointer(tmp_path):
    """Training publishes <uri>/model as versions named by model/CURRENT; evaluation, export and the next
    round's expert all read the version CURRENT names, and a local output_dir keeps model/ itself."""
    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.runs.rounds import next_expert
    from lightreasoner_ray.stages.evaluation.stage import evaluated_models
    from lightreasoner_ray.stages.export import export_paths

    output_dir = f"file://{tmp_path / 'bucket' / 'run'}"
    model = f"{output_dir}/model"
    storage.publish_directory(str(_tree(tmp_path / "first", {"config.json": "1"})), model, {"provenance.json": b"{}"})
    storage.publish_directory(str(_tree(tmp_path / "second", {"config.json": "2"})), model, {"provenance.json": b"{}"})
    current = (tmp_path / "bucket" / "run" / "model" / "CURRENT").read_text().strip()
    assert current.startswith("v-")
    version = f"{model}/{current}"
    assert storage.read_text(f"{version}/config.json") == "2"  # the independent check: the pointer's target

    config = load_config(None, [f"output_dir={output_dir}", f"eval.models=[trained={model}, {model}]",
                                "train.lora.enabled=false"])
    assert [(m.tag, m.path) for m in evaluated_models(config)] == [("trained", version), ("model", version)]
    assert export_paths(config)[0] == version
    assert next_expert(config) == version
    with pytest.raises(LightReasonerError, match=rf"export.adapter={version}: export works on local directories"):
        from lightreasoner_ray.stages.export import run_export
        run_export(config)

    local = tmp_path / "local"
    storage.publish_directory(str(tmp_path / "second"), str(local / "model"), {})
    local_config = load_config(None, [f"output_dir={local}", "train.lora.enabled=false"])
    assert export_paths(local_config)[0] == str(local / "model")
    assert next_expert(local_config) == str(local / "model")
    assert sorted(p.name for p in (local / "model").iterdir()) == ["config.json"]


def test_a_pointer_that_cannot_be_read_is_one_error_naming_the_model(tmp_path):
    with pytest.raises(LightReasonerError, match=r"nosuchscheme://b/model: cannot read its CURRENT pointer"):
        storage.published_directory("nosuchscheme://b/model")
    # A URI published before the pointer existed is read where it is.
    older = tmp_path / "older"
    _tree(older, {"config.json": "0"})
    assert storage.published_directory(f"file://{older}") == f"file://{older}"
