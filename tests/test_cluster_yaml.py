"""cluster.yaml passes Ray's own autoscaler schema and matches what the README promises."""

import copy
import json
import os

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_is_not_vacuous(cluster):
    schema = json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_4x_a10g"]["max_wrkers"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_has_gpu_workers_and_installs_the_project(cluster):
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    gpu_types = [n for n in node_types.values() if n["max_workers"] > 0]
    assert len(gpu_types) >= 2  # autoscaling multi-GPU worker types
    assert any("pip install -e ~/lightreasoner-ray" in c for c in cluster["setup_commands"])
    assert "~/lightreasoner-ray/configs" in cluster["file_mounts"]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--metrics-export-port" in head_start


# ---- token authentication: the shipped head command, run locally ----------------------------


def test_every_node_starts_with_token_authentication(cluster):
    """Ray 2.60 turns token auth on only where a token already exists unless RAY_AUTH_MODE=token:
    every `ray start` of the cluster must set it, and the token must reach every node."""
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert any("ray get-auth-token --generate" in c for c in cluster["head_start_ray_commands"])
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_head_command(command: str, ports: dict[str, int], temp_dir: str) -> str:
    """The shipped head command on loopback: own ports and temp dir, no autoscaler, in the foreground."""
    import re

    assert "--port=6379" in command and "--metrics-export-port=8080" in command
    command = command.replace("--port=6379", f"--port={ports['gcs']}")
    command = command.replace("--metrics-export-port=8080", f"--metrics-export-port={ports['metrics']}")
    command = re.sub(r" --autoscaling-config=\S+", "", command)
    return (f"{command} --block --node-ip-address=127.0.0.1 --num-cpus=1 --include-dashboard=true "
            f"--dashboard-port={ports['dashboard']} --dashboard-agent-listen-port={ports['agent']} "
            f"--temp-dir={temp_dir} --disable-usage-stats")


@pytest.mark.slow
def test_the_shipped_head_refuses_clients_without_the_token(cluster, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    head_commands = cluster["head_start_ray_commands"]
    assert head_commands[0] == "ray stop"  # not run here: it would stop every Ray on this machine
    ports = {name: _free_port() for name in ("gcs", "metrics", "dashboard", "agent")}
    home = tmp_path / "head-home"  # the head's ~/.ray/auth_token lives here
    home.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    base_env = {key: value for key, value in os.environ.items()
                if not key.startswith("RAY_AUTH") and key != "RAY_ADDRESS"}
    base_env["PATH"] = f"{bin_dir}:{base_env.get('PATH', '')}"
    head_env = {**base_env, "HOME": str(home)}
    for command in head_commands[1:-1]:
        subprocess.run(["bash", "-c", command], env=head_env, check=True, timeout=120, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16
    # The README's recipe reads the token on the head with `ray get-auth-token | tail -n 1`.
    printed = subprocess.run(["bash", "-c", "ray get-auth-token 2>&1 | tail -n 1"], env=head_env, text=True,
                             capture_output=True, timeout=120).stdout.strip()
    assert printed == token
    temp_dir = f"/tmp/lr-auth-{os.getpid()}"
    head = subprocess.Popen(["bash", "-c", _local_head_command(head_commands[-1], ports, temp_dir)], env=head_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports['dashboard']}/api/jobs/"

        def status(headers: dict[str, str]) -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        deadline = time.time() + 120
        while True:
            try:
                served = status({"Authorization": f"Bearer {token}"})
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert head.poll() is None and time.time() < deadline, "the head did not start"
                time.sleep(1)
        assert served == 200
        assert status({}) == 401
        assert status({"Authorization": "Bearer not-the-token"}) == 403

        # A driver: refused without the token, served with it (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN).
        stranger_home = tmp_path / "client-home"
        stranger_home.mkdir()
        script = (f"import ray; ray.init(address='127.0.0.1:{ports['gcs']}', log_to_driver=False); "
                  "print('CPUS', ray.cluster_resources().get('CPU'))")
        client_env = {**base_env, "HOME": str(stranger_home)}
        refused = subprocess.run([sys.executable, "-c", script], env=client_env, text=True, capture_output=True,
                                 timeout=180)
        assert refused.returncode != 0 and "CPUS" not in refused.stdout
        served_driver = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True, timeout=180,
                                       env={**client_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert served_driver.returncode == 0 and "CPUS 1.0" in served_driver.stdout, served_driver.stderr[-2000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
