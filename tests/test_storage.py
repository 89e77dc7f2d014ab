"""Directories are replaced whole: a reader sees the old one or the new one, and nothing is left behind."""

from __future__ import annotations

import pytest

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
