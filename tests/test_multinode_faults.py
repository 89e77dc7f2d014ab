"""A worker node lost mid-stage, on a Ray cluster of several nodes on this machine
(``ray.cluster_utils.Cluster``: a head without CPUs and two 2-CPU worker nodes, each its own raylet).

Sampling and evaluation each run once undisturbed, then again with the node that hosts one of
their actors killed (SIGKILL of its raylet and workers) once the first results are stored, and a
fresh node added. The disturbed run either finishes or fails in one line and is re-run; either way
its results equal the undisturbed run's: no problem lost or duplicated, the same completions and
selected steps, the same predictions. Training (Ray Train, ZeRO-2, 2 workers) loses the node of a
worker after a complete checkpoint and resumes from it to the undisturbed run's adapter.

The actors report their node through the test seam (``hook`` below, loaded by path inside the
workers: this module imports only the standard library and pytest at its top, and the training
tests' fixtures where they import).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

NODES_ENV = "LIGHTREASONER_TEST_NODES_DIR"


HOLD_ENV = "LIGHTREASONER_TEST_TRAIN_HOLD"  # <update>:<release file>


def hook(point: str, **details) -> None:
    """In an actor that loads its models: record the node it runs on. In a Ray Train worker that
    starts update ``HOLD_ENV``'s: record its node, then wait there until the release file exists."""
    hold = os.environ.get(HOLD_ENV, "")
    holding = point == "train.update_started" and hold and details["step"] == int(hold.split(":", 1)[0])
    if point in ("sampling.actor_loading", "evaluation.actor_loading") or holding:
        import ray

        directory = Path(os.environ[NODES_ENV])
        node = ray.get_runtime_context().get_node_id()
        (directory / f"{node}-{os.getpid()}").write_text(point)
    if holding:
        release = Path(hold.split(":", 1)[1])
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.1)


pytestmark = pytest.mark.slow

try:
    from test_training import metrics, sampled, train_config  # noqa: F401 (sampled: the samples fixture)
except ImportError:  # loaded by path in an actor or a Ray Train worker, for hook alone
    pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    nodes_dir = tmp_path_factory.mktemp("nodes")
    saved = {key: os.environ.get(key) for key in ("LIGHTREASONER_TEST_HOOKS", NODES_ENV)}
    os.environ.update({"LIGHTREASONER_TEST_HOOKS": f"{Path(__file__).resolve()}:hook", NODES_ENV: str(nodes_dir)})
    was_initialized = ray.is_initialized()
    if was_initialized:  # the session's local Ray (ray_local): this module needs its own cluster
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"cluster": cluster, "workers": workers, "nodes_dir": nodes_dir}
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if was_initialized:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)


def kill_an_actor_node(state: dict) -> str:
    """SIGKILL a worker node that hosts an actor (its raylet and workers); add a fresh one."""
    cluster = state["cluster"]
    hosting = {path.name.split("-")[0] for path in state["nodes_dir"].iterdir()}
    victim = next(node for node in state["workers"] if node.node_id in hosting)
    cluster.remove_node(victim, allow_graceful=False)
    state["workers"].remove(victim)
    state["workers"].append(cluster.add_node(num_cpus=2))
    return victim.node_id


def clear_nodes(state: dict) -> None:
    for path in state["nodes_dir"].iterdir():
        path.unlink()


def test_a_node_lost_during_sampling(cluster, tiny_pair, problems_file, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import lightreasoner_ray.stages.ray_helpers as helpers
    from conftest import REPO_ROOT
    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.errors import LightReasonerError
    from lightreasoner_ray.stages.sampling.stage import run_sampling

    def config(output_dir):
        return load_config(REPO_ROOT / "configs" / "tiny.yaml", [
            f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
            f"data.problems={problems_file}", f"output_dir={output_dir}", "data.limit=10", "sampling.beta=0.3",
            "sampling.max_new_tokens=16", "sampling.batch_size=2", "sampling.rows_per_file=2",
        ])

    def rows(output_dir):
        table = pq.read_table(output_dir / "samples").to_pylist()
        by_id = {row["problem_id"]: row for row in table}
        assert len(by_id) == len(table)  # no problem sampled twice
        return by_id

    clear_nodes(cluster)
    run_sampling(config(tmp_path / "undisturbed"))
    expected = rows(tmp_path / "undisturbed")
    assert len(expected) == 10

    killed = []
    original = helpers.reached

    def kill_after_the_first_file(point, **details):
        original(point, **details)
        if point == "sampling.file_written" and details["files"] == 1 and not killed:
            killed.append(kill_an_actor_node(cluster))

    monkeypatch.setattr(helpers, "reached", kill_after_the_first_file)
    clear_nodes(cluster)
    output_dir = tmp_path / "disturbed"
    try:
        run_sampling(config(output_dir))
    except LightReasonerError as error:  # lost beyond the restarts: one line, then a re-run resumes
        assert "\n" not in str(error)
        monkeypatch.setattr(helpers, "reached", original)
        run_sampling(config(output_dir))
    assert killed
    disturbed = rows(output_dir)
    assert sorted(disturbed) == sorted(expected)
    for problem_id, row in expected.items():
        other = disturbed[problem_id]
        assert other["completion_ids"] == row["completion_ids"]
        assert other["steps"] == row["steps"]  # the same selected steps
        assert other["target_ids"] == row["target_ids"]
        assert other["kl"] == pytest.approx(row["kl"], rel=1e-4)


def test_a_node_lost_during_evaluation(cluster, tiny_pair, tmp_path, monkeypatch):
    from conftest import DATA_DIR
    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.errors import LightReasonerError
    from lightreasoner_ray.stages.evaluation.stage import run_evaluation
    from lightreasoner_ray.stages.evaluation.store import PredictionStore

    def config(output_dir):
        return load_config(None, [
            f"output_dir={output_dir}", f"eval.model={tiny_pair['expert']}", f"eval.data_dir={DATA_DIR}",
            "eval.benchmarks=[gsm8k,svamp]", "eval.limit=4", "eval.shard_size=1", "eval.max_new_tokens=8",
            "eval.num_actors=2",
        ])

    def predictions(output_dir):
        import json

        return {b: [json.loads(line) for line in (output_dir / "eval" / "expert" / f"{b}.jsonl").read_text().splitlines()]
                for b in ("gsm8k", "svamp")}

    clear_nodes(cluster)
    undisturbed = run_evaluation(config(tmp_path / "undisturbed"))
    expected = predictions(tmp_path / "undisturbed")

    killed = []
    original_add = PredictionStore.add

    def add_then_kill(self, shard, rows):
        original_add(self, shard, rows)
        if not killed:
            killed.append(kill_an_actor_node(cluster))
            time.sleep(1.0)  # let the loss reach the driver while shards are in flight

    monkeypatch.setattr(PredictionStore, "add", add_then_kill)
    clear_nodes(cluster)
    output_dir = tmp_path / "disturbed"
    try:
        results = run_evaluation(config(output_dir))
    except LightReasonerError as error:
        assert "\n" not in str(error)
        monkeypatch.setattr(PredictionStore, "add", original_add)
        results = run_evaluation(config(output_dir))
    assert killed
    assert predictions(output_dir) == expected  # every row once, the same outputs and grades
    assert results["models"]["expert"]["benchmarks"] == undisturbed["models"]["expert"]["benchmarks"]


def test_a_node_lost_during_training(cluster, tiny_pair, sampled, tmp_path, monkeypatch):
    """ZeRO-2 on 2 workers, 8 updates, a checkpoint every 4: once update 4's checkpoint is complete, the
    workers are held at the start of update 6 and the node of one of them is killed. Ray Train restarts
    the workers (train.max_failures) or the run fails in one line and a re-run resumes; either way it
    resumes from update 4, logs every update once and ends with the undisturbed run's adapter."""
    import threading

    from lightreasoner_ray.errors import LightReasonerError
    from lightreasoner_ray.stages.training.checkpoints import COMPLETE_MARKER, checkpoint_problem
    from lightreasoner_ray.stages.training.driver import run_training
    from test_checkpoint_faults import assert_same_adapter

    STEPS = 8

    def config(output_dir):
        return train_config(tiny_pair, output_dir, sampled["dir"], "train.deepspeed.stage=2",
                            f"train.max_steps={STEPS}", "train.checkpoint_every=4", "train.keep_checkpoints=2",
                            "train.max_failures=2")

    clear_nodes(cluster)
    undisturbed = tmp_path / "undisturbed"
    expected = run_training(config(undisturbed))
    assert expected["resumed_from_step"] == 0 and expected["steps"] == STEPS

    # The fresh node joins before the kill: Ray starts nodes from the main thread only, and the kill
    # comes from a thread while run_training blocks this one.
    cluster["workers"].append(cluster["cluster"].add_node(num_cpus=2))
    cluster["cluster"].wait_for_nodes()
    clear_nodes(cluster)
    release = tmp_path / "release"
    monkeypatch.setenv(HOLD_ENV, f"6:{release}")
    output_dir = tmp_path / "disturbed"
    first = output_dir / "checkpoints" / "train" / "step_0000004"
    killed, problems = [], []

    def kill_when_held():
        try:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                # Whether Ray Train has registered it yet (it does so asynchronously) does not matter: the
                # restart resumes from the newest checkpoint every worker completed.
                complete = all((first / COMPLETE_MARKER.format(rank=r)).is_file() for r in (0, 1))
                if complete and any(cluster["nodes_dir"].iterdir()):
                    problems.append(checkpoint_problem(str(first), 0))
                    hosting = {path.name.split("-")[0] for path in cluster["nodes_dir"].iterdir()}
                    victim = next(node for node in cluster["workers"] if node.node_id in hosting)
                    cluster["cluster"].remove_node(victim, allow_graceful=False)  # SIGKILL its raylet and workers
                    cluster["workers"].remove(victim)
                    killed.append(victim.node_id)
                    return
                time.sleep(0.1)
        finally:
            release.write_text("released\n")

    killer = threading.Thread(target=kill_when_held, daemon=True)
    killer.start()
    try:
        summary = run_training(config(output_dir))
    except LightReasonerError as error:  # lost beyond the restarts: one line, then a re-run resumes
        assert "\n" not in str(error)
        killer.join()
        summary = run_training(config(output_dir))
    killer.join()
    assert killed and problems == [None]  # a worker's node was killed after update 4's checkpoint was complete
    assert summary["resumed_from_step"] == 4 and summary["steps"] == STEPS
    assert [row["step"] for row in metrics(output_dir)] == list(range(1, STEPS + 1))
    assert_same_adapter(output_dir / "model", undisturbed / "model")
