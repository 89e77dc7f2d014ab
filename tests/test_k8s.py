"""The Kubernetes manifests in k8s/ (KubeRay RayJob, RayCluster, PVC, Secret) checked without a cluster.

Each check is a function that returns the problems it finds (empty when the manifest is right),
so the same function is run on the shipped manifests and on deliberately broken copies:
- the Kubernetes objects (pod templates, volumes, the PVC, the Secret, the helper pod) against
  Kubernetes' own schemas, strictly (unknown fields fail), at a pinned Kubernetes version;
- every `rayStartParams` entry through Ray's own `ray start` option parser, as KubeRay turns it
  into flags;
- the RayJob / RayCluster fields against the fields KubeRay documents, and KubeRay's own rules;
- the entrypoint's config through the CLI's parser and config loader;
- the GPU worker group against what the preset's actors and workers ask for;
- token authentication, shared storage and the image, on every Ray pod.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import shlex
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from conftest import REPO_ROOT
from lightreasoner_ray.cli import build_parser, load_command_config
from lightreasoner_ray.config import Config
from lightreasoner_ray.errors import LightReasonerError

K8S = REPO_ROOT / "k8s"
DOCS = REPO_ROOT / "docs" / "kubernetes.md"

# The Kubernetes version whose schemas the objects are validated against (kubernetes_validate's
# bundled schemas; a version every managed offering still runs).
KUBERNETES_VERSION = "1.33"

# Fields KubeRay documents, from its v1.6 API reference (ray.io/v1: RayJobSpec, RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec, AuthOptions). The manifests need v1.6 for authOptions.secretName.
KUBERAY_VERSION = "v1.6"
RAYJOB_SPEC_FIELDS = frozenset({
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
})
RAYCLUSTER_SPEC_FIELDS = frozenset({
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
})
HEAD_GROUP_FIELDS = frozenset({
    "template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType",
})
WORKER_GROUP_FIELDS = frozenset({
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources",
    "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
})
AUTH_OPTIONS_FIELDS = frozenset({"mode", "secretName", "enableK8sTokenAuth"})
SUBMISSION_MODES = frozenset({"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"})
# KubeRay's name for the cluster a clusterSelector picks, and the Secret key holding the token.
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
TOKEN_SECRET_KEY = "auth_token"
# rayStartParams KubeRay turns into an on/off flag only when the value is not true/false.
KUBERAY_TRI_STATE_PARAMS = ("log-color", "include-dashboard")


def load_documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def load_one(name: str) -> dict[str, Any]:
    (doc,) = load_documents(name)
    return doc


# ---- the checks: each returns a list of problems ------------------------------------------------


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for the head group and every worker group."""
    templates = [("headGroupSpec", cluster_spec["headGroupSpec"]["template"])]
    for group in cluster_spec.get("workerGroupSpecs") or []:
        templates.append((f"workerGroupSpecs[{group.get('groupName')}]", group["template"]))
    return templates


def kubernetes_objects(documents: list[dict]) -> list[tuple[str, dict]]:
    """Every Kubernetes object a manifest holds: its core objects, and each Ray pod template as a PodTemplate."""
    objects = []
    for doc in documents:
        if doc["apiVersion"] == "ray.io/v1":
            spec = doc["spec"]
            # Its metadata is an ObjectMeta: checked on an object that holds nothing else.
            objects.append((f"{doc['kind']} metadata", {"apiVersion": "v1", "kind": "ConfigMap",
                                                          "metadata": doc["metadata"]}))
            cluster = spec.get("rayClusterSpec") if doc["kind"] == "RayJob" else spec
            for where, template in pod_templates(cluster) if cluster else []:
                objects.append((f"{doc['kind']} {where}", {
                    "apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{doc['metadata']['name']}-{where.split('[')[-1].rstrip(']')}".lower()},
                    "template": template,
                }))
            if spec.get("submitterPodTemplate"):
                objects.append(("RayJob submitterPodTemplate", {
                    "apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "submitter"},
                    "template": spec["submitterPodTemplate"]}))
        else:
            objects.append((f"{doc['kind']} {doc['metadata']['name']}", doc))
    return objects


def check_kubernetes_schemas(documents: list[dict]) -> list[str]:
    problems = []
    for where, obj in kubernetes_objects(documents):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path) if hasattr(error, "path") else ""
            problems.append(f"{where}: {path}: {error.message}")
    return problems


def ray_start_args(params: dict[str, str], head: bool) -> list[str]:
    """The `ray start` arguments KubeRay makes of rayStartParams (its convertParamMap), plus its own."""
    args = ["--head"] if head else ["--address=head:6379"]
    for key in sorted(params):
        value = str(params[key])
        if value.lower() in ("true", "false") and key not in KUBERAY_TRI_STATE_PARAMS:
            if value.lower() == "true":
                args.append(f"--{key}")
        else:
            args.append(f"--{key}={value}")
    return args + ["--block"]


def check_ray_start_params(cluster_spec: dict) -> list[str]:
    from ray.scripts.scripts import start

    problems = []
    groups = [("headGroupSpec", cluster_spec["headGroupSpec"], True)]
    groups += [(f"workerGroupSpecs[{g['groupName']}]", g, False) for g in cluster_spec.get("workerGroupSpecs") or []]
    for where, group, head in groups:
        params = group.get("rayStartParams")
        if params is None:
            problems.append(f"{where}: rayStartParams is required by KubeRay")
            continue
        for key, value in params.items():
            if not isinstance(value, str):
                problems.append(f"{where}: rayStartParams.{key} must be a string, not {value!r}")
        try:
            start.make_context("start", ray_start_args(params, head), resilient_parsing=False)
        except click.ClickException as error:
            problems.append(f"{where}: ray start refuses its rayStartParams: {error.format_message()}")
    return problems


def unknown_fields(where: str, mapping: dict, known: frozenset) -> list[str]:
    return [f"{where}.{key}: not a field KubeRay {KUBERAY_VERSION} documents" for key in sorted(set(mapping) - known)]


def check_cluster_spec(spec: dict, where: str = "rayClusterSpec") -> list[str]:
    problems = unknown_fields(where, spec, RAYCLUSTER_SPEC_FIELDS)
    problems += unknown_fields(f"{where}.headGroupSpec", spec.get("headGroupSpec", {}), HEAD_GROUP_FIELDS)
    problems += unknown_fields(f"{where}.authOptions", spec.get("authOptions") or {}, AUTH_OPTIONS_FIELDS)
    if "headGroupSpec" not in spec:
        problems.append(f"{where}.headGroupSpec is required")
    for group in spec.get("workerGroupSpecs") or []:
        name = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        problems += unknown_fields(name, group, WORKER_GROUP_FIELDS)
        low, high, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if low is None or high is None:
            problems.append(f"{name}: minReplicas and maxReplicas are required without autoscaling")
        elif not (0 <= low <= (replicas if replicas is not None else low) <= high):
            problems.append(f"{name}: needs 0 <= minReplicas <= replicas <= maxReplicas")
    return problems


def check_rayjob_spec(spec: dict) -> list[str]:
    """KubeRay's RayJob fields and the rules its validation enforces (ValidateRayJobSpec)."""
    problems = unknown_fields("spec", spec, RAYJOB_SPEC_FIELDS)
    selector = spec.get("clusterSelector")
    if bool(selector) == bool(spec.get("rayClusterSpec")):
        problems.append("spec: exactly one of rayClusterSpec and clusterSelector must be set")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
    backoff = spec.get("backoffLimit", 0)
    if not isinstance(backoff, int) or backoff < 0:
        problems.append("spec.backoffLimit must be a non-negative integer")
    elif backoff > 0 and selector:
        problems.append("spec.backoffLimit is incompatible with clusterSelector")
    elif backoff > 0 and mode == "InteractiveMode":
        problems.append("spec.backoffLimit is incompatible with InteractiveMode")
    if selector and not selector.get(CLUSTER_SELECTOR_KEY):
        problems.append(f"spec.clusterSelector must name the cluster under {CLUSTER_SELECTOR_KEY}")
    if selector and mode == "SidecarMode":
        problems.append("spec.clusterSelector is not supported in SidecarMode")
    if spec.get("ttlSecondsAfterFinished", 0) and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and not (isinstance(spec[key], int) and spec[key] > 0):
            problems.append(f"spec.{key} must be a positive integer")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        if not isinstance(runtime_env, dict):
            problems.append("spec.runtimeEnvYAML must hold a mapping")
    except yaml.YAMLError as error:
        problems.append(f"spec.runtimeEnvYAML is not valid YAML: {error}")
    if spec.get("rayClusterSpec"):
        problems += check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return problems


def entrypoint_config(spec: dict) -> Config:
    """The config the entrypoint runs, through the CLI's own parser and loader (LightReasonerError if bad)."""
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "lightreasoner", f"the entrypoint runs {words[0]!r}, not the lightreasoner CLI"
    args = build_parser().parse_args(words[1:])
    assert args.config, "the entrypoint names no --config"
    return load_command_config(args.command, str(REPO_ROOT / args.config), args.overrides)


def quantity(value: Any) -> float:
    """A Kubernetes CPU / count quantity ("4", "500m", 4) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_resources(group: dict) -> tuple[float, float]:
    """(GPUs, CPUs) Ray sees on one pod of a group: rayStartParams, else the container's limits (as KubeRay)."""
    container = group["template"]["spec"]["containers"][0]
    limits = (container.get("resources") or {}).get("limits") or {}
    params = group.get("rayStartParams") or {}
    gpus = quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    cpus = quantity(params.get("num-cpus", math.floor(quantity(limits.get("cpu", 0)))))
    return gpus, cpus


def fit_per_pod(pod_gpus: float, pod_cpus: float, gpus: float, cpus: float) -> int:
    """How many actors asking (gpus, cpus) Ray places on one pod: a fractional GPU share packs within one GPU."""
    by_gpu = math.inf
    if gpus > 0:
        by_gpu = math.floor(pod_gpus) * math.floor(1 / gpus + 1e-9) if gpus < 1 else math.floor(pod_gpus / gpus + 1e-9)
    by_cpu = math.floor(pod_cpus / cpus + 1e-9) if cpus > 0 else math.inf
    return by_gpu if by_cpu == math.inf else min(by_gpu, by_cpu)


def stage_demands(config: Config) -> list[tuple[str, int, float, float]]:
    """(who, how many, GPUs each, CPUs each) for each stage of `run`; the stages run one after another."""
    return [
        ("sampling actors", config.sampling.num_actors, config.sampling.gpus_per_actor, config.sampling.cpus_per_actor),
        ("training workers", config.train.num_workers, config.train.gpus_per_worker, config.train.cpus_per_worker),
        ("evaluator actors", config.eval.num_actors, config.eval.gpus_per_actor, config.eval.cpus_per_actor),
    ]


def check_capacity(cluster_spec: dict, config: Config) -> list[str]:
    try:
        return _check_capacity(cluster_spec, config)
    except ValueError as error:  # a quantity the schema lets through but is no number ("four")
        return [f"a CPU or GPU count is not a number: {error}"]


def _check_capacity(cluster_spec: dict, config: Config) -> list[str]:
    problems = []
    head = cluster_spec["headGroupSpec"]
    head_gpus, head_cpus = pod_resources(head)
    if head.get("rayStartParams", {}).get("num-cpus") != "0" or head_gpus:
        problems.append("headGroupSpec: the head must be CPU-only with num-cpus \"0\" (no model work on it)")
    groups = cluster_spec.get("workerGroupSpecs") or []
    for who, count, gpus, cpus in stage_demands(config):
        placed = sum(fit_per_pod(*pod_resources(g), gpus, cpus) * (g.get("replicas") or g.get("minReplicas") or 0)
                     for g in groups)
        if placed < count:
            asked = f"{count} x ({gpus:g} GPU, {cpus:g} CPU)"
            have = ", ".join(f"{g.get('replicas')} x {pod_resources(g)[0]:g} GPU / {pod_resources(g)[1]:g} CPU"
                             for g in groups) or "no worker pods"
            problems.append(f"the {who} ask {asked} but the worker groups place only {placed} ({have})")
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        resources = container.get("resources") or {}
        requested = (resources.get("requests") or {}).get("nvidia.com/gpu")
        limited = (resources.get("limits") or {}).get("nvidia.com/gpu")
        if requested is not None and requested != limited:
            problems.append(f"workerGroupSpecs[{group['groupName']}]: nvidia.com/gpu requests must equal limits")
    return problems


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env") or []}


def check_token_auth(cluster_spec: dict, secret_name: str) -> list[str]:
    problems = []
    auth = cluster_spec.get("authOptions") or {}
    if auth.get("mode") != "token" or auth.get("secretName") != secret_name:
        problems.append(f"authOptions must be mode: token, secretName: {secret_name} (KubeRay's own client needs it)")
    version = tuple(int(part) for part in re.findall(r"\d+", str(cluster_spec.get("rayVersion", "0")))[:3])
    if version < (2, 52, 0):
        problems.append("rayVersion must be 2.52.0 or newer for token authentication")
    for where, template in pod_templates(cluster_spec):
        env = env_of(template["spec"]["containers"][0])
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}: the Ray container must set RAY_AUTH_MODE=token")
        ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if ref.get("name") != secret_name or ref.get("key") != TOKEN_SECRET_KEY:
            problems.append(f"{where}: RAY_AUTH_TOKEN must come from Secret {secret_name}, key {TOKEN_SECRET_KEY}")
    return problems


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_shared_storage(cluster_spec: dict, rayjob_spec: dict, config: Config, claim: str) -> list[str]:
    """Every Ray pod mounts the claim at one path, and every path the run writes or reads lies under it."""
    problems, mounts = [], set()
    for where, template in pod_templates(cluster_spec):
        spec = template["spec"]
        volumes = [v["name"] for v in spec.get("volumes") or []
                   if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim]
        paths = [m["mountPath"] for m in spec["containers"][0].get("volumeMounts") or [] if m["name"] in volumes]
        if not paths:
            problems.append(f"{where}: the Ray container does not mount the PersistentVolumeClaim {claim}")
        mounts.update(paths)
    if len(mounts) > 1:
        problems.append(f"the pods mount {claim} at different paths: {sorted(mounts)}")
    root = next(iter(mounts), "/nonexistent")
    runtime_env = yaml.safe_load(rayjob_spec.get("runtimeEnvYAML") or "{}") or {}
    paths = {"output_dir": config.output_dir, "eval.data_dir": config.eval.data_dir,
             "runtime env LIGHTREASONER_OUTPUT_ROOT": (runtime_env.get("env_vars") or {}).get("LIGHTREASONER_OUTPUT_ROOT")}
    for where, template in pod_templates(cluster_spec):
        for name in ("HF_HOME", "LIGHTREASONER_OUTPUT_ROOT"):
            paths[f"{where} {name}"] = env_of(template["spec"]["containers"][0]).get(name, {}).get("value")
    for what, path in paths.items():
        if not path or not under(path, root):
            problems.append(f"{what}={path} is not on the shared volume mounted at {root}")
    return problems


def dockerfile() -> dict[str, Any]:
    text = (K8S / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    return {
        "base": base,
        "ray_version": re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", base).group(1),
        "workdir": re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1),
        "copied": [source for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M)
                   for source in line.split()[:-1]],
    }


def check_image(cluster_spec: dict, rayjob_spec: dict) -> list[str]:
    problems = []
    images = {template["spec"]["containers"][0]["image"] for _, template in pod_templates(cluster_spec)}
    if len(images) != 1:
        problems.append(f"the head and the workers run different images: {sorted(images)}")
    image = dockerfile()
    if cluster_spec.get("rayVersion") != image["ray_version"]:
        problems.append(f"rayVersion {cluster_spec.get('rayVersion')} is not the image's Ray {image['ray_version']}")
    runtime_env = yaml.safe_load(rayjob_spec.get("runtimeEnvYAML") or "{}") or {}
    if runtime_env.get("working_dir") != image["workdir"]:
        problems.append(f"runtime env working_dir {runtime_env.get('working_dir')} is not the image's "
                        f"project directory {image['workdir']}")
    config_path = shlex.split(rayjob_spec["entrypoint"])[shlex.split(rayjob_spec["entrypoint"]).index("--config") + 1]
    if Path(config_path).parts[0] not in image["copied"]:
        problems.append(f"the image does not hold the entrypoint's config {config_path}")
    return problems


# ---- the shipped manifests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claim_name() -> str:
    return load_one("pvc.yaml")["metadata"]["name"]


@pytest.fixture(scope="module")
def secret_name() -> str:
    return load_one("secret-example.yaml")["metadata"]["name"]


def manifest(name: str) -> tuple[dict, dict]:
    """(the RayJob's spec, the spec of the Ray cluster it runs on) for each RayJob manifest."""
    rayjob = load_one(name)
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    cluster = rayjob["spec"].get("rayClusterSpec")
    if cluster is None:
        raycluster = load_one("raycluster.yaml")
        assert rayjob["spec"]["clusterSelector"][CLUSTER_SELECTOR_KEY] == raycluster["metadata"]["name"]
        cluster = raycluster["spec"]
    return rayjob["spec"], cluster


RAYJOBS = ("rayjob.yaml", "rayjob-existing-cluster.yaml")


def test_the_manifests_are_what_the_docs_promise():
    assert load_one("rayjob.yaml")["spec"]["rayClusterSpec"] and load_one("raycluster.yaml")["kind"] == "RayCluster"
    assert CLUSTER_SELECTOR_KEY in load_one("rayjob-existing-cluster.yaml")["spec"]["clusterSelector"]
    assert load_one("pvc.yaml")["kind"] == "PersistentVolumeClaim"
    assert load_one("secret-example.yaml")["kind"] == "Secret"
    text = DOCS.read_text()
    for name in ("rayjob.yaml", "rayjob-existing-cluster.yaml", "raycluster.yaml", "pvc.yaml", "secret-example.yaml",
                 "Dockerfile", "kubectl ray job submit", "kubectl port-forward"):
        assert name in text, f"docs/kubernetes.md does not mention {name}"


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml", "rayjob-existing-cluster.yaml", "pvc.yaml",
                                  "secret-example.yaml", "pvc-shell.yaml"])
def test_kubernetes_objects_pass_the_kubernetes_schemas(name):
    documents = load_documents(name)
    assert kubernetes_objects(documents)
    assert check_kubernetes_schemas(documents) == []


def test_the_new_cluster_and_the_long_lived_cluster_are_the_same():
    assert load_one("rayjob.yaml")["spec"]["rayClusterSpec"] == load_one("raycluster.yaml")["spec"]


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_fields_are_kuberays(name):
    spec, cluster = manifest(name)
    assert check_rayjob_spec(spec) == []
    assert check_cluster_spec(cluster) == []


def test_the_new_cluster_job_cleans_up_and_retries():
    spec, _ = manifest("rayjob.yaml")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode" and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1


@pytest.mark.parametrize("name", RAYJOBS)
def test_ray_start_accepts_every_ray_start_param(name):
    _, cluster = manifest(name)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert check_ray_start_params(cluster) == []


@pytest.mark.parametrize("name", RAYJOBS)
def test_the_entrypoint_config_loads(name):
    spec, _ = manifest(name)
    config = entrypoint_config(spec)
    assert shlex.split(spec["entrypoint"])[:2] == ["lightreasoner", "run"]
    assert config.output_dir.startswith("/") and config.eval.data_dir.startswith("/")


@pytest.mark.parametrize("name", RAYJOBS)
def test_the_gpu_workers_hold_the_presets_actors_and_workers(name):
    spec, cluster = manifest(name)
    config = entrypoint_config(spec)
    assert any(gpus > 0 for _, _, gpus, _ in stage_demands(config))  # a GPU preset, so the check has teeth
    assert check_capacity(cluster, config) == []


@pytest.mark.parametrize("name", RAYJOBS)
def test_token_authentication_on_every_ray_pod(name, secret_name):
    _, cluster = manifest(name)
    assert check_token_auth(cluster, secret_name) == []
    assert load_one("secret-example.yaml")["stringData"] == {TOKEN_SECRET_KEY: ""}  # no usable token shipped


def test_the_token_variables_are_the_ones_ray_reads():
    from ray._private.authentication import authentication_token_setup
    from ray.exceptions import AuthenticationError

    assert authentication_token_setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    assert "`RAY_AUTH_TOKEN` environment variable" in inspect.getsource(AuthenticationError)


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_pod_mounts_the_shared_volume_the_run_uses(name, claim_name):
    spec, cluster = manifest(name)
    assert check_shared_storage(cluster, spec, entrypoint_config(spec), claim_name) == []


@pytest.mark.parametrize("name", RAYJOBS)
def test_the_image_matches_the_cluster(name):
    spec, cluster = manifest(name)
    assert check_image(cluster, spec) == []
    for source in dockerfile()["copied"]:
        assert (REPO_ROOT / source).exists(), f"k8s/Dockerfile copies {source}, which the repository lacks"


def test_the_interactive_variant_of_the_docs_is_a_valid_rayjob():
    """docs/kubernetes.md makes the InteractiveMode RayJob for `kubectl ray job submit` with sed."""
    text = DOCS.read_text()
    edits = re.findall(r"-e 's/([^/]+)/([^/]+)/'", text)
    assert ("submissionMode: K8sJobMode", "submissionMode: InteractiveMode") in edits
    interactive = (K8S / "rayjob.yaml").read_text()
    for old, new in edits:
        assert old in interactive
        interactive = interactive.replace(old, new)
    spec = yaml.safe_load(interactive)["spec"]
    assert spec["submissionMode"] == "InteractiveMode"
    assert check_rayjob_spec(spec) == []


# ---- the checks catch broken copies ---------------------------------------------------------------


def broken(name: str, edit) -> tuple[dict, dict]:
    spec, cluster = copy.deepcopy(manifest(name))
    edit(spec, cluster)
    return spec, cluster


def worker(cluster: dict) -> dict:
    return cluster["workerGroupSpecs"][0]


def worker_container(cluster: dict) -> dict:
    return worker(cluster)["template"]["spec"]["containers"][0]


def test_a_misspelt_pod_field_fails_the_kubernetes_schemas():
    documents = copy.deepcopy(load_documents("rayjob.yaml"))
    worker_container(documents[0]["spec"]["rayClusterSpec"])["resources"]["limit"] = {"cpu": "1"}
    problems = check_kubernetes_schemas(documents)
    assert len(problems) == 1 and "workerGroupSpecs[gpu]" in problems[0] and "limit" in problems[0]


def test_a_bad_volume_a_bad_label_and_a_bad_pvc_fail_the_kubernetes_schemas():
    rayjob = copy.deepcopy(load_documents("rayjob-existing-cluster.yaml"))
    rayjob[0]["metadata"]["labels"] = {"app.kubernetes.io/name": 1}
    assert check_kubernetes_schemas(rayjob)
    documents = copy.deepcopy(load_documents("raycluster.yaml"))
    documents[0]["spec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] = {"claim": "x"}
    assert check_kubernetes_schemas(documents)
    pvc = copy.deepcopy(load_one("pvc.yaml"))
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    assert check_kubernetes_schemas([pvc])
    secret = copy.deepcopy(load_one("secret-example.yaml"))
    secret["stringdata"] = secret.pop("stringData")
    assert check_kubernetes_schemas([secret])


@pytest.mark.parametrize("name", RAYJOBS)
def test_an_unknown_rayjob_field_fails(name):
    spec, cluster = broken(name, lambda spec, cluster: spec.update(shutdownAfterJobFinish=True))
    assert check_rayjob_spec(spec) == [f"spec.shutdownAfterJobFinish: not a field KubeRay {KUBERAY_VERSION} documents"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 1
    assert any("maxReplica:" in problem for problem in check_cluster_spec(cluster))


@pytest.mark.parametrize("edit, expected", [
    (lambda spec: spec.update(backoffLimit=1, clusterSelector={CLUSTER_SELECTOR_KEY: "x"}, rayClusterSpec=None),
     "incompatible with clusterSelector"),
    (lambda spec: spec.update(shutdownAfterJobFinishes=False), "needs shutdownAfterJobFinishes"),
    (lambda spec: spec.update(submissionMode="K8sJob"), "submissionMode"),
    (lambda spec: spec.update(activeDeadlineSeconds=0), "activeDeadlineSeconds"),
    (lambda spec: spec.update(clusterSelector={CLUSTER_SELECTOR_KEY: "x"}), "exactly one of"),
    (lambda spec: spec.update(runtimeEnvYAML="working_dir: [unclosed"), "runtimeEnvYAML"),
])
def test_kuberays_rules_catch_a_broken_rayjob(edit, expected):
    spec, _ = broken("rayjob.yaml", lambda spec, cluster: edit(spec))
    assert any(expected in problem for problem in check_rayjob_spec(spec)), check_rayjob_spec(spec)


@pytest.mark.parametrize("name", RAYJOBS)
@pytest.mark.parametrize("params, expected", [
    ({"num-cpu": "0"}, "num-cpu"),        # no such option
    ({"num-cpus": "zero"}, "zero"),       # not an integer
    ({"num-cpus": 0}, "must be a string"),
])
def test_ray_start_refuses_a_bad_ray_start_param(name, params, expected):
    _, cluster = broken(name, lambda spec, cluster: cluster["headGroupSpec"].update(rayStartParams=params))
    problems = check_ray_start_params(cluster)
    assert problems and any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("name", RAYJOBS)
def test_a_bad_entrypoint_override_fails_the_config_loader(name):
    spec, _ = broken(name, lambda spec, cluster: spec.update(entrypoint=spec["entrypoint"] + " sampling.betta=0.5"))
    with pytest.raises(LightReasonerError, match="betta"):
        entrypoint_config(spec)


@pytest.mark.parametrize("name", RAYJOBS)
@pytest.mark.parametrize("gpus", [1, 2, 3])
def test_too_few_gpus_fail_the_capacity_check(name, gpus):
    def edit(spec, cluster):
        for section in ("requests", "limits"):
            worker_container(cluster)["resources"][section]["nvidia.com/gpu"] = gpus

    spec, cluster = broken(name, edit)
    problems = check_capacity(cluster, entrypoint_config(spec))
    # 4 x 1-GPU evaluator actors need 4 GPUs; 4 sampling actors at 0.5 GPU need 2.
    assert any("evaluator actors" in problem for problem in problems)
    assert any("sampling actors" in problem for problem in problems) == (gpus < 2)


@pytest.mark.parametrize("name", RAYJOBS)
def test_a_preset_asking_more_than_the_workers_hold_fails(name):
    spec, cluster = broken(name, lambda spec, cluster: spec.update(entrypoint=spec["entrypoint"] + " train.num_workers=8"
                                                                   " train.steps_per_update=16"))
    problems = check_capacity(cluster, entrypoint_config(spec))
    assert len(problems) == 1 and "training workers ask 8 x (1 GPU" in problems[0]


def test_one_gpu_pods_hold_the_preset_when_there_are_enough():
    def edit(spec, cluster):
        worker(cluster).update(replicas=4, maxReplicas=4)
        for section in ("requests", "limits"):
            worker_container(cluster)["resources"][section].update({"nvidia.com/gpu": 1, "cpu": "8"})

    spec, cluster = broken("rayjob.yaml", edit)
    assert check_capacity(cluster, entrypoint_config(spec)) == []
    worker(cluster)["replicas"] = 3
    assert check_capacity(cluster, entrypoint_config(spec))


def test_a_gpu_count_that_is_no_number_fails_the_capacity_check():
    spec, cluster = broken("rayjob.yaml", lambda spec, cluster: worker_container(cluster)["resources"]["limits"].update(
        {"nvidia.com/gpu": "four"}))
    assert check_kubernetes_schemas([{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"},
                                      "template": worker(cluster)["template"]}]) == []  # the schema lets it through
    assert any("not a number" in problem for problem in check_capacity(cluster, entrypoint_config(spec)))


def test_a_gpu_head_fails_the_capacity_check():
    spec, cluster = broken("rayjob.yaml", lambda spec, cluster: cluster["headGroupSpec"]["rayStartParams"].pop("num-cpus"))
    assert any("CPU-only" in problem for problem in check_capacity(cluster, entrypoint_config(spec)))


@pytest.mark.parametrize("name", RAYJOBS)
def test_a_pod_without_the_token_fails(name, secret_name):
    spec, cluster = broken(name, lambda spec, cluster: worker_container(cluster).update(
        env=[e for e in worker_container(cluster)["env"] if e["name"] != "RAY_AUTH_MODE"]))
    assert check_token_auth(cluster, secret_name) == ["workerGroupSpecs[gpu]: the Ray container must set RAY_AUTH_MODE=token"]
    cluster["authOptions"]["secretName"] = "other"
    assert len(check_token_auth(cluster, secret_name)) == 2


@pytest.mark.parametrize("name", RAYJOBS)
def test_a_pod_without_the_shared_volume_fails(name, claim_name):
    spec, cluster = broken(name, lambda spec, cluster: worker_container(cluster).update(
        volumeMounts=[m for m in worker_container(cluster)["volumeMounts"] if m["name"] != "shared"]))
    problems = check_shared_storage(cluster, spec, entrypoint_config(spec), claim_name)
    assert problems[0] == f"workerGroupSpecs[gpu]: the Ray container does not mount the PersistentVolumeClaim {claim_name}"


@pytest.mark.parametrize("name", RAYJOBS)
def test_an_output_dir_off_the_shared_volume_fails(name, claim_name):
    spec, cluster = broken(name, lambda spec, cluster: spec.update(entrypoint=spec["entrypoint"] + " output_dir=/data/run"))
    problems = check_shared_storage(cluster, spec, entrypoint_config(spec), claim_name)
    assert problems == ["output_dir=/data/run is not on the shared volume mounted at /mnt/shared"]


@pytest.mark.parametrize("name", RAYJOBS)
def test_mismatched_images_fail(name):
    spec, cluster = broken(name, lambda spec, cluster: worker_container(cluster).update(image="rayproject/ray:2.59.0"))
    assert any("different images" in problem for problem in check_image(cluster, spec))
    cluster["rayVersion"] = "2.59.0"
    assert any("not the image's Ray" in problem for problem in check_image(cluster, spec))
