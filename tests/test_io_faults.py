"""Kills and a full disk in the middle of writes: nothing half written is ever under a final name, and the
re-run completes. Faults come through io.test_seam (tests/fault_hooks.py) in a separate process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from lightreasoner_ray.data.samples import finished_problem_ids
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage

from conftest import REPO_ROOT
import fault_hooks


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTREASONER_TEST_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], env=environment, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


WRITE_SAMPLES = """
import sys, pyarrow as pa
from lightreasoner_ray.io import storage
for name, ids in (("part-1.parquet", ["a", "b"]), ("part-2.parquet", ["c", "d"])):
    table = pa.table({"problem_id": ids, "x": [list(range(20000))] * 2})
    storage.write_parquet_atomic(table, sys.argv[1], name)
"""


def test_a_kill_during_a_parquet_write_leaves_no_partial_file_under_a_final_name(tmp_path):
    samples = tmp_path / "samples"
    killed = _run(WRITE_SAMPLES, str(samples), env=fault_hooks.kill_at("storage.writing", times=2))
    assert killed.returncode == -signal.SIGKILL
    names = sorted(p.name for p in samples.iterdir())
    assert len(names) == 2 and names[0].startswith(".part-2.parquet.") and names[1] == "part-1.parquet"
    assert storage.list_parquet_files(str(samples)) == [str(samples / "part-1.parquet")]
    assert finished_problem_ids(str(samples)) == {"a", "b"}  # a resume redoes c and d only
    assert storage.remove_stale_temporaries(str(samples)) == 1
    done = _run(WRITE_SAMPLES, str(samples))
    assert done.returncode == 0, done.stderr
    assert finished_problem_ids(str(samples)) == {"a", "b", "c", "d"}


def test_a_full_disk_fails_in_one_line_and_leaves_nothing_half_written(tmp_path):
    samples = tmp_path / "samples"
    code = WRITE_SAMPLES + "\n"
    full = _run("""
import sys
from lightreasoner_ray.errors import LightReasonerError
try:
    exec(open(sys.argv[2]).read())
except LightReasonerError as exc:
    print(exc); sys.exit(2)
""", str(samples), str(_script(tmp_path, code)), env=fault_hooks.disk_full_at("storage.writing"))
    assert full.returncode == 2, full.stderr
    message = full.stdout.strip()
    assert "\n" not in message and "part-1.parquet" in message and "ENOSPC" in message and "re-run" in message
    assert list(samples.iterdir()) == []  # the temporary went too
    done = _run(WRITE_SAMPLES, str(samples))
    assert done.returncode == 0 and finished_problem_ids(str(samples)) == {"a", "b", "c", "d"}


def _script(tmp_path: Path, code: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(code)
    return path


def test_a_file_size_limit_ends_in_the_storage_error_not_a_traceback(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE), as a full disk would give ENOSPC."""
    target = tmp_path / "big.json"
    result = _run("""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from lightreasoner_ray.io import storage
from lightreasoner_ray.errors import LightReasonerError
try:
    storage.write_json_atomic(sys.argv[1], {"x": "y" * 100000})
except LightReasonerError as exc:
    print(exc); sys.exit(2)
""", str(target))
    assert result.returncode == 2, result.stderr
    assert str(target) in result.stdout and "EFBIG" in result.stdout
    assert list(tmp_path.iterdir()) == []


PUBLISH = """
import sys
from lightreasoner_ray.io import storage
storage.publish_directory(sys.argv[1], sys.argv[2], {"provenance.json": sys.argv[3].encode()})
"""


def _model(directory: Path, tag: str, files: int = 3) -> Path:
    directory.mkdir(parents=True)
    for index in range(files):
        (directory / f"part-{index}.bin").write_text(f"{tag}-{index}")
    (directory / "config.json").write_text(json.dumps({"tag": tag}))
    return directory


def _contents(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_kill_during_a_local_publish_keeps_the_old_model_and_the_rerun_cleans_up(tmp_path):
    old, new = _model(tmp_path / "old", "old"), _model(tmp_path / "new", "new", files=2)
    destination = tmp_path / "run" / "model"
    assert _run(PUBLISH, str(old), str(destination), '{"step": 1}').returncode == 0
    killed = _run(PUBLISH, str(new), str(destination), '{"step": 2}', env=fault_hooks.kill_at("storage.publish_staged"))
    assert killed.returncode == -signal.SIGKILL
    assert _contents(destination) == {**_contents(old), "provenance.json": '{"step": 1}'}
    assert any(p.name.startswith(".model.") for p in destination.parent.iterdir())  # the staging it left
    assert _run(PUBLISH, str(new), str(destination), '{"step": 2}').returncode == 0
    assert _contents(destination) == {**_contents(new), "provenance.json": '{"step": 2}'}  # no old file mixed in
    assert [p.name for p in destination.parent.iterdir()] == ["model"]


def test_a_kill_during_a_uri_publish_leaves_readers_the_old_version(tmp_path):
    old, new = _model(tmp_path / "old", "old"), _model(tmp_path / "new", "new", files=2)
    bucket = tmp_path / "bucket"
    destination = f"file://{bucket}/run/model"
    assert _run(PUBLISH, str(old), destination, '{"step": 1}').returncode == 0
    first = storage.published_directory(destination)
    assert _contents(Path(first.removeprefix("file://"))) == {**_contents(old), "provenance.json": '{"step": 1}'}
    killed = _run(PUBLISH, str(new), destination, '{"step": 2}', env=fault_hooks.kill_at("storage.publish_file_copied"))
    assert killed.returncode == -signal.SIGKILL
    assert storage.published_directory(destination) == first  # the pointer still names the whole old version
    assert len([p for p in (bucket / "run" / "model").iterdir() if p.name.startswith("v-")]) == 2  # one partial
    assert _run(PUBLISH, str(new), destination, '{"step": 2}').returncode == 0
    current = Path(storage.published_directory(destination).removeprefix("file://"))
    assert _contents(current) == {**_contents(new), "provenance.json": '{"step": 2}'}
    assert sorted(p.name for p in (bucket / "run" / "model").iterdir()) == sorted(["CURRENT", "provenance.json",
                                                                                    current.name])
    assert json.loads((bucket / "run" / "model" / "provenance.json").read_text()) == {"step": 2}


EXPORT = """
import sys
from lightreasoner_ray import cli
sys.exit(cli.main(["export", *sys.argv[1:]]))
"""


@pytest.mark.slow  # three processes that load torch, transformers and peft (about a minute on 2 cores)
def test_a_kill_during_an_export_keeps_the_earlier_export_and_the_rerun_completes(lora_adapter, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(lora_adapter["dir"], output_dir / "model")
    args = [f"output_dir={output_dir}"]
    assert _run(EXPORT, *args).returncode == 0
    merged = output_dir / "merged"
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    killed = _run(EXPORT, *args, env=fault_hooks.kill_at("export.staged"))
    assert killed.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before  # the earlier export, whole
    assert any(p.name.startswith(".merged.") for p in output_dir.iterdir())
    rerun = _run(EXPORT, *args)  # the dead process's lock is taken over, its staging removed
    assert rerun.returncode == 0, rerun.stderr
    assert not any(p.name.startswith(".merged.") for p in output_dir.iterdir())
    assert (merged / "lightreasoner_export.json").is_file() and (merged / "config.json").is_file()


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet"])
def test_a_corrupt_or_empty_samples_file_is_one_line_naming_it(tmp_path, content):
    """What resuming `sample` reads first: the finished problem ids."""
    samples = tmp_path / "samples"
    storage.write_parquet_atomic(pa.table({"problem_id": ["a"]}), str(samples), "part-1.parquet")
    bad = samples / "part-2.parquet"
    bad.write_bytes(content)
    with pytest.raises(LightReasonerError, match=rf"^{bad}: cannot read this samples file as Parquet .*delete it") as caught:
        finished_problem_ids(str(samples))
    assert "\n" not in str(caught.value)
