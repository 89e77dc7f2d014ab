"""Bounded failure handling in the Ray stages, as users meet it: `lightreasoner sample` / `evaluate`
in a subprocess (its own local Ray), with faults injected into the actors through the test seam.

- a sampling actor whose process dies while loading its models: the run fails in one line after a
  bounded number of deaths (Ray Data's defaults restart it forever);
- an error raised in a sampling actor's constructor: its own message, once, at once;
- an evaluator actor that dies mid-shard: restarted / replaced, and the predictions equal an
  undisturbed run's; one that always dies: one line after a bounded number of deaths;
- the driver SIGKILLed mid-evaluation: the re-run completes and equals an undisturbed run;
- an actor no node can host (GPUs asked of a CPU cluster): fails after the stated wait, naming both.

The fault hook (``hook`` below) is loaded by path inside the Ray workers, so this module imports
only the standard library and pytest at its top.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
POINT_ENV, ACTION_ENV, TIMES_ENV, DIR_ENV = ("LIGHTREASONER_TEST_FAULT_POINT", "LIGHTREASONER_TEST_FAULT_ACTION",
                                             "LIGHTREASONER_TEST_FAULT_TIMES", "LIGHTREASONER_TEST_FAULT_DIR")


def hook(point: str, **details) -> None:
    """At ``$..._FAULT_POINT``: ``exit`` kills this process (a crash, an OOM kill), ``raise`` raises a
    LightReasonerError; at most ``$..._FAULT_TIMES`` times in all processes (one file per fault
    in ``$..._FAULT_DIR``, which also counts them)."""
    if point != os.environ.get(POINT_ENV):
        return
    directory = Path(os.environ[DIR_ENV])
    times = int(os.environ.get(TIMES_ENV, "0") or 0)
    done = len(list(directory.glob("fault-*")))
    if times and done >= times:
        return
    (directory / f"fault-{os.getpid()}-{time.monotonic_ns()}").write_text(point)
    if os.environ[ACTION_ENV] == "exit":
        os._exit(1)
    from lightreasoner_ray.errors import LightReasonerError

    raise LightReasonerError(f"injected at {point}: the model cannot load")


pytestmark = pytest.mark.slow


def faults(directory: Path) -> int:
    return len(list(directory.glob("fault-*")))


def run_cli(command: str, overrides: list[str], env_extra: dict[str, str] | None = None, timeout: float = 300,
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTREASONER_NO_DASHBOARD": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "lightreasoner_ray.cli", command, "--config", str(REPO / "configs" / "tiny.yaml"),
         "ray.num_cpus=4", *overrides],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )


def fault_env(tmp_path: Path, point: str, action: str, times: int = 0) -> tuple[dict[str, str], Path]:
    directory = tmp_path / "faults"
    directory.mkdir()
    return {"LIGHTREASONER_TEST_HOOKS": f"{Path(__file__).resolve()}:hook", POINT_ENV: point, ACTION_ENV: action,
            TIMES_ENV: str(times), DIR_ENV: str(directory)}, directory


def error_line(result: subprocess.CompletedProcess, command: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"lightreasoner {command}: error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def sample_overrides(tiny_pair, problems_file, output_dir) -> list[str]:
    return [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
            f"data.problems={problems_file}", f"output_dir={output_dir}", "data.limit=4", "sampling.max_new_tokens=8"]


def eval_overrides(tiny_pair, output_dir) -> list[str]:
    from conftest import DATA_DIR

    return [f"eval.model={tiny_pair['expert']}", f"output_dir={output_dir}", f"eval.data_dir={DATA_DIR}",
            "eval.benchmarks=[gsm8k,svamp]", "eval.limit=4", "eval.shard_size=1", "eval.max_new_tokens=8"]


def predictions(output_dir: Path) -> dict[str, list[dict]]:
    return {benchmark: [json.loads(line) for line in (output_dir / "eval" / "expert" / f"{benchmark}.jsonl")
                        .read_text().splitlines() if line.strip()] for benchmark in ("gsm8k", "svamp")}


@pytest.fixture(scope="module")
def undisturbed_eval(tiny_pair, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    result = run_cli("evaluate", eval_overrides(tiny_pair, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = predictions(output_dir)
    assert [len(rows[b]) for b in ("gsm8k", "svamp")] == [4, 4]
    return rows


# ---- sampling -------------------------------------------------------------------------------


def test_a_sampling_actor_dying_while_loading_fails_the_run_in_one_line(tiny_pair, problems_file, tmp_path):
    env, directory = fault_env(tmp_path, "sampling.actor_loading", "exit")
    started = time.monotonic()
    result = run_cli("sample", sample_overrides(tiny_pair, problems_file, tmp_path / "run"), env)
    line = error_line(result, "sample")
    assert "a Ray worker died" in line and "re-run to resume" in line
    # Two actors, each started once and restarted at most once by Ray, none replaced by Ray Data.
    assert 1 <= faults(directory) <= 4
    assert time.monotonic() - started < 240


def test_an_error_raised_while_loading_is_the_actors_own_line_at_once(tiny_pair, problems_file, tmp_path):
    env, directory = fault_env(tmp_path, "sampling.actor_loading", "raise")
    result = run_cli("sample", sample_overrides(tiny_pair, problems_file, tmp_path / "run"), env)
    line = error_line(result, "sample")
    assert line.startswith("lightreasoner sample: error: injected at sampling.actor_loading: the model cannot load")
    assert 1 <= faults(directory) <= 2  # no restart of an actor whose constructor raised


def test_a_sampler_no_node_can_host_fails_after_the_stated_wait(tiny_pair, problems_file, tmp_path):
    started = time.monotonic()
    result = run_cli("sample", [*sample_overrides(tiny_pair, problems_file, tmp_path / "run"), "sampling.gpus_per_actor=1"],
                     {"LIGHTREASONER_PLACEMENT_TIMEOUT_S": "3"})
    line = error_line(result, "sample")
    assert "ContrastiveSampler actor after 3s" in line and "asks for 1 CPUs and 1 GPUs" in line
    assert "4 CPUs and 0 GPUs" in line
    assert time.monotonic() - started < 120


def test_vllm_refusing_the_model_fails_the_run_at_once_in_one_line(tiny_pair, problems_file, tmp_path):
    """The fixture pair's attention heads are 16 wide: vLLM's CPU backend has no kernel for them."""
    from conftest import installed

    if not installed("vllm"):
        pytest.skip("needs the [vllm] extra")
    started = time.monotonic()
    result = run_cli("sample", [*sample_overrides(tiny_pair, problems_file, tmp_path / "run"), "sampling.engine=vllm"])
    line = error_line(result, "sample")
    assert "vLLM's CPU backend cannot serve" in line and "head size is 16" in line and "engine=hf" in line
    assert time.monotonic() - started < 180


# ---- evaluation -----------------------------------------------------------------------------


def test_evaluator_deaths_are_survived_and_predictions_equal_an_undisturbed_run(tiny_pair, tmp_path, undisturbed_eval):
    env, directory = fault_env(tmp_path, "evaluation.generating", "exit", times=3)
    output_dir = tmp_path / "run"
    result = run_cli("evaluate", eval_overrides(tiny_pair, output_dir), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert faults(directory) >= 3  # (two actors may both pass the count at once)
    assert predictions(output_dir) == undisturbed_eval  # no shard lost, duplicated or changed


def test_an_evaluator_that_always_dies_fails_in_one_line_after_bounded_deaths(tiny_pair, tmp_path):
    env, directory = fault_env(tmp_path, "evaluation.generating", "exit")
    result = run_cli("evaluate", eval_overrides(tiny_pair, tmp_path / "run"), env)
    line = error_line(result, "evaluate")
    assert "evaluator actors died 3 times" in line
    # 2 actors + 2 replacements, each dying at most twice (one Ray restart, its task retried once).
    assert 3 <= faults(directory) <= 8


def test_an_evaluator_no_node_can_host_fails_after_the_stated_wait(tiny_pair, tmp_path):
    started = time.monotonic()
    result = run_cli("evaluate", [*eval_overrides(tiny_pair, tmp_path / "run"), "eval.gpus_per_actor=1"],
                     {"LIGHTREASONER_PLACEMENT_TIMEOUT_S": "3"})
    line = error_line(result, "evaluate")
    assert "evaluator actor after 3s" in line and "1 GPUs" in line and "0 GPUs" in line
    assert time.monotonic() - started < 120


def test_a_driver_sigkilled_mid_evaluation_resumes_to_an_undisturbed_result(tiny_pair, tmp_path, undisturbed_eval):
    output_dir = tmp_path / "run"
    env = {**os.environ, "LIGHTREASONER_NO_DASHBOARD": "1"}
    env.pop("RAY_ADDRESS", None)
    # Slow each shard down a little so the kill lands mid-run, after the first shards are stored.
    env.update({"LIGHTREASONER_TEST_HOOKS": f"{Path(__file__).resolve()}:slow_hook"})
    process = subprocess.Popen(
        [sys.executable, "-m", "lightreasoner_ray.cli", "evaluate", "--config", str(REPO / "configs" / "tiny.yaml"),
         "ray.num_cpus=4", *eval_overrides(tiny_pair, output_dir)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(output_dir.glob("eval/expert/*/shard-*")) and time.monotonic() < deadline:
            assert process.poll() is None, "the evaluation ended before it could be killed"
            time.sleep(0.2)
        stored = list(output_dir.glob("eval/expert/*/shard-*"))
        assert stored, "no shard was stored in time"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait()
    assert not (output_dir / "eval" / "expert" / "svamp.jsonl").exists() or \
        not (output_dir / "eval" / "expert" / "gsm8k.jsonl").exists()  # it was stopped mid-run
    result = run_cli("evaluate", eval_overrides(tiny_pair, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert predictions(output_dir) == undisturbed_eval
    report = json.loads((output_dir / "eval" / "results.json").read_text())
    assert report["models"]["expert"]["run"]["shards_resumed"] >= 1


def slow_hook(point: str, **details) -> None:
    if point == "evaluation.generating":
        time.sleep(1.0)
