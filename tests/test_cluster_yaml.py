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
