"""One writer per output_dir: the lock every writing command holds (io.lock), and what it prevents."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pytest

from lightreasoner_ray import cli
from lightreasoner_ray.data.samples import check_samples
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.lock import OutputDirLock, read_holder

from conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny.yaml"
HOLDER = """
import sys, time
from lightreasoner_ray.io.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1], "sample").acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding ``tmp_path/run``'s lock, as a running `lightreasoner sample` does."""
    output_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT)
    assert process.stdout.readline().strip() == "locked"
    yield output_dir, process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder(holder):
    output_dir, process = holder
    with pytest.raises(LightReasonerError) as caught:
        OutputDirLock(str(output_dir), "train").acquire()
    message = str(caught.value)
    assert f"pid {process.pid} on host {socket.gethostname()}" in message
    assert "`lightreasoner sample`" in message and "\n" not in message


def test_a_lock_left_by_a_killed_process_is_taken_over(holder):
    output_dir, process = holder
    assert read_holder(str(output_dir))["pid"] == process.pid
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with OutputDirLock(str(output_dir), "sample"):
        assert read_holder(str(output_dir))["pid"] == os.getpid()
    # Released: no holder recorded, and the next command takes it at once.
    assert read_holder(str(output_dir)) is None
    OutputDirLock(str(output_dir), "evaluate").acquire().release()


def test_the_cli_refuses_a_second_run_in_one_line_before_any_work(holder, capsys):
    output_dir, process = holder
    code = cli.main(["sample", "--config", str(TINY), f"output_dir={output_dir}", "expert.path=/nonexistent/expert"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert f"is in use by `lightreasoner sample` (pid {process.pid}" in error[0]
    assert not (output_dir / "samples").exists()  # nothing written, not even the model check ran


def test_read_only_commands_take_no_lock(holder, monkeypatch):
    output_dir, _ = holder
    seen = []
    monkeypatch.setitem(cli.STAGES, "inspect", lambda config: seen.append(config.output_dir) or {})
    cli.run_stage("inspect", cli.load_command_config("inspect", str(TINY), [f"output_dir={output_dir}"]))
    assert seen == [str(output_dir)]
    assert set(cli.LOCKED) == {"sample", "train", "evaluate", "run", "export", "export-samples", "demo"}


def test_a_uri_output_dir_is_locked_by_a_holder_object(tmp_path):
    uri = f"file://{tmp_path}/bucket/run"
    first = OutputDirLock(uri, "sample").acquire()
    assert read_holder(uri)["pid"] == os.getpid()
    with pytest.raises(LightReasonerError, match=r"in use by `lightreasoner sample`.*delete .*\.lightreasoner\.lock"):
        OutputDirLock(uri, "train").acquire()
    first.release()
    assert not storage.exists(RunLayout(uri).lock)
    OutputDirLock(uri, "train").acquire().release()


def test_the_lock_file_does_not_count_as_an_output():
    from lightreasoner_ray.io.layout import RUN_RECORDS

    assert RunLayout("/o").lock == "/o/.lightreasoner.lock" and ".lightreasoner.lock" in RUN_RECORDS


def _samples_table(ids):
    return pa.table({"problem_id": ids, "prompt_ids": [[1, 2]] * len(ids), "completion_ids": [[3, 4]] * len(ids),
                     "steps": [[0]] * len(ids), "target_ids": [[[3]]] * len(ids), "target_probs": [[[1.0]]] * len(ids)})


def test_duplicate_problem_ids_in_samples_are_refused_naming_file_and_id(tmp_path):
    """Two runs that wrote one samples directory leave each problem twice: training refuses them."""
    first = storage.write_parquet_atomic(_samples_table(["a", "b"]), str(tmp_path), "part-1.parquet")
    assert check_samples([first], vocab_size=10, context=16).rows == 2
    second = storage.write_parquet_atomic(_samples_table(["c", "a"]), str(tmp_path), "part-2.parquet")
    with pytest.raises(LightReasonerError, match=r"part-2.parquet: row 1, field problem_id: problem 'a' is in .*part-1"):
        check_samples([first, second], vocab_size=10, context=16)
    within = storage.write_parquet_atomic(_samples_table(["x", "x"]), str(tmp_path / "one"), "part.parquet")
    with pytest.raises(LightReasonerError, match="problem 'x' is earlier in this file"):
        check_samples([within], vocab_size=10, context=16)


# ---- a relative output_dir inside `ray job submit --working-dir`


def test_a_relative_output_dir_in_a_ray_job_working_dir_is_refused_or_resolved(tmp_path):
    from lightreasoner_ray.io.local_dirs import resolve_output_dir

    cache = str(tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc")
    with pytest.raises(LightReasonerError, match=r"output_dir=outputs/run is relative.*Ray's per-job cache.*absolute path"):
        resolve_output_dir("outputs/run", environ={}, cwd=cache)
    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}})}
    with pytest.raises(LightReasonerError, match="is relative"):
        resolve_output_dir("outputs/run", environ=job_env, cwd="/home/ray")
    assert resolve_output_dir("outputs/run", environ={**job_env, "LIGHTREASONER_OUTPUT_ROOT": "/shared"},
                              cwd=cache) == "/shared/outputs/run"
    # Absolute paths and URIs are fine in a job; a relative path outside a job is fine too.
    assert resolve_output_dir("/shared/run", environ=job_env, cwd=cache) == "/shared/run"
    assert resolve_output_dir("s3://b/run", environ=job_env, cwd=cache) == "s3://b/run"
    assert resolve_output_dir("outputs/run", environ={}, cwd="/home/me/project") == "outputs/run"


def test_the_cli_refuses_a_relative_output_dir_in_a_job_working_dir(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "runtime_resources" / "working_dir_files" / "pkg"
    cache.mkdir(parents=True)
    monkeypatch.chdir(cache)
    assert cli.main(["sample", "--config", str(TINY), "output_dir=outputs/run"]) == 2
    assert "Ray's per-job cache" in capsys.readouterr().err
    assert not (cache / "outputs").exists()


def test_in_a_job_working_dir_inspect_and_compare_read_a_relative_output_dir_and_the_demo_says_why_not(
        tmp_path, monkeypatch):
    cache = tmp_path / "runtime_resources" / "working_dir_files" / "pkg"
    cache.mkdir(parents=True)
    monkeypatch.chdir(cache)
    monkeypatch.delenv("LIGHTREASONER_OUTPUT_ROOT", raising=False)
    for command in ("inspect", "compare"):  # read-only: no refusal, the path as given
        assert cli.load_command_config(command, str(TINY), ["output_dir=outputs/run"]).output_dir == "outputs/run"
    with pytest.raises(LightReasonerError, match=r"Ray's per-job cache.*the demo is made to run on one machine"):
        cli.load_command_config("demo", None, [])  # its default output_dir is relative
    with pytest.raises(LightReasonerError, match=r"Ray's per-job cache") as refused:
        cli.load_command_config("evaluate", str(TINY), ["output_dir=outputs/run"])  # writers are still refused
    assert "demo" not in str(refused.value)
    # With a shared root set, the readers look where the writers put the run.
    monkeypatch.setenv("LIGHTREASONER_OUTPUT_ROOT", str(tmp_path / "shared"))
    assert cli.load_command_config("inspect", str(TINY), ["output_dir=outputs/run"]).output_dir == str(
        tmp_path / "shared" / "outputs" / "run")
