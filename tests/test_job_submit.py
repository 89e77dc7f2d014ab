"""The product as users run it: a Ray head on loopback, `jobs/pipeline.py` submitted as a job.

Starts its own head (own ports, own temp dir, token authentication as Ray 2.60
enables it), submits the pipeline through the Jobs SDK with the token, waits for
success, checks every output, and stops the head it started.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, DATA_DIR

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head():
    """A Ray head bound to loopback with token auth; yields (dashboard URL, client env)."""
    gcs_port, dashboard_port, agent_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    temp_dir = Path("/tmp") / f"lr-head-{os.getpid()}"
    # The machine's token (~/.ray/auth_token), as `ray get-auth-token --generate` makes it: a
    # process that already talked to a token-auth cluster keeps that token cached.
    token = subprocess.run([ray_cli(), "get-auth-token", "--generate"], capture_output=True, text=True,
                           check=True, env=dict(os.environ, RAY_AUTH_MODE="token")).stdout.strip()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    head = subprocess.Popen(
        [ray_cli(), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent_port}", f"--metrics-export-port={metrics_port}",
         "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    try:
        yield url, client_env, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()


def test_pipeline_submitted_as_a_ray_job(ray_head, tiny_pair, problems_file, tmp_path, monkeypatch):
    url, client_env, _ = ray_head
    for key, value in client_env.items():
        monkeypatch.setenv(key, value)
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            client = JobSubmissionClient(url)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(2)

    output_dir = tmp_path / "run"
    entrypoint = " ".join([
        sys.executable, str(REPO_ROOT / "jobs" / "pipeline.py"), "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
        f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
        f"data.problems={problems_file}", "data.limit=8", "sampling.beta=0.3", "sampling.max_new_tokens=16",
        "train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-3", "train.deepspeed.stage=2",
        f"eval.data_dir={DATA_DIR}", "eval.benchmarks=[gsm8k,svamp]", "eval.limit=3", "eval.max_new_tokens=8",
        f"output_dir={output_dir}",
    ])
    deadline = time.time() + 180
    while True:  # right after start the head may have no job agent yet ("try again later")
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": {"LIGHTREASONER_NO_DASHBOARD": "1"}})
            break
        except RuntimeError as exc:
            if "try again" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(3)
    deadline = time.time() + 900
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]

    # Samples, the trained adapter, both models' results, the efficiency report.
    assert len(list((output_dir / "samples").glob("*.parquet"))) >= 1
    assert (output_dir / "model" / "adapter_config.json").is_file()
    results = json.loads((output_dir / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"baseline", "lightreasoner"}
    for model in results["models"].values():
        assert {b: s["n"] for b, s in model["benchmarks"].items()} == {"gsm8k": 3, "svamp": 3}
    table = (output_dir / "eval" / "results.md").read_text()
    assert "| baseline |" in table and "| lightreasoner |" in table
    report = json.loads((output_dir / "report.json").read_text())
    samples_summary = json.loads((output_dir / "samples_summary.json").read_text())
    assert report["problems_sampled"] == 8
    assert report["tokens"]["tuned_tokens_sft_same_trajectories"] == samples_summary["counts"]["completion_tokens"]
    assert report["tokens"]["tuned_tokens_lightreasoner"] == samples_summary["counts"]["selected_steps"] > 0
    assert set(report["stage_wall_time_s"]) == {"sample", "train", "evaluate"}
    markdown = (output_dir / "report.md").read_text()
    assert "tuned tokens, SFT on the same trajectories" in markdown and "| lightreasoner |" in markdown
    assert "report:" in logs
