"""`lightreasoner check`: every pre-flight check's refusal, in one line naming what is wrong, all of
them reported at once, nothing written and no lock taken; and `run` refusing on them before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import DATA_DIR, REPO_ROOT, gsm8k_rows

from lightreasoner_ray import cli
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io.lock import OutputDirLock
from lightreasoner_ray.stages import preflight as pf

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def overrides(tiny_pair, problems_file, tmp_path, *extra: str) -> list[str]:
    return [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
            f"data.problems={problems_file}", f"eval.data_dir={DATA_DIR}", "eval.limit=2",
            f"output_dir={tmp_path / 'run'}", *extra]


def config(tiny_pair, problems_file, tmp_path, *extra: str):
    return load_config(TINY, overrides(tiny_pair, problems_file, tmp_path, *extra))


def check(args: list[str], capsys) -> tuple[int, list[str], list[str]]:
    code = cli.main(["check", "--config", str(TINY), *args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


# ---- the whole check through the CLI -----------------------------------------------------------


def test_a_clean_config_passes_writing_nothing(tiny_pair, problems_file, tmp_path, capsys):
    code, out, err = check(overrides(tiny_pair, problems_file, tmp_path), capsys)
    assert code == 0, err
    assert out[-1].startswith("all checks passed")
    assert any(line.startswith("ok: models:") for line in out)
    assert any(line.startswith("ok: problems: 12 from") for line in out)  # the fixture's 12 problems
    assert any(line == "ok: benchmarks: gsm8k 2, svamp 2 rows" for line in out)  # eval.limit=2 of each
    assert not (tmp_path / "run").exists()  # read-only: no output_dir, no logs/, no lock file


def test_several_problems_are_all_reported_one_line_each(tiny_pair, problems_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = check(overrides(tiny_pair, problems_file, tmp_path, f"amateur.path={tmp_path / 'no_amateur'}",
                                   f"eval.data_dir={tmp_path}", "eval.benchmarks=[svamp]",
                                   f"output_dir={blocker / 'run'}"), capsys)
    assert code == 2
    problems = [line for line in err if line.startswith("lightreasoner check: problem: ")]
    assert len(problems) == 3 and len(err) == 4, err  # three problems, then the one-line verdict
    assert f"amateur model path {tmp_path / 'no_amateur'} does not exist" in problems[0]
    assert f"{tmp_path}/svamp/test.jsonl" in problems[1]
    assert f"{blocker} is a file, not a directory" in problems[2]
    assert err[-1].startswith("lightreasoner check: error: 3 problem(s) found")


def test_a_bad_config_value_is_one_line(capsys):
    code, _, err = check(["sampling.beta=-1"], capsys)
    assert code == 2 and len(err) == 1
    assert "sampling.beta must be >= 0, got -1" in err[0]


def test_check_takes_no_lock_and_run_still_can(tiny_pair, problems_file, tmp_path, capsys):
    assert "check" not in cli.LOCKED
    code, _, _ = check(overrides(tiny_pair, problems_file, tmp_path), capsys)
    assert code == 0
    with OutputDirLock(str(tmp_path / "run"), "run"):  # nothing left held
        pass


# ---- one check's failure at a time --------------------------------------------------------------


def test_missing_model_directory(tiny_pair, problems_file, tmp_path):
    report = pf.preflight(config(tiny_pair, problems_file, tmp_path, f"expert.path={tmp_path / 'gone'}"))
    assert report.problems == [f"expert model path {tmp_path / 'gone'} does not exist"]


def test_model_directory_without_weights(tiny_pair, problems_file, tmp_path):
    expert = tmp_path / "expert"
    shutil.copytree(tiny_pair["expert"], expert)
    (expert / "model.safetensors").unlink()
    report = pf.PreflightReport()
    assert pf.check_models(config(tiny_pair, problems_file, tmp_path, f"expert.path={expert}"), report) is False
    assert report.problems == [f"expert model directory {expert} holds no weights (no *.safetensors or *.bin file): "
                               "was it saved completely?"]


def test_tokenizer_mismatch_between_expert_and_amateur(tiny_pair, problems_file, tmp_path):
    from lightreasoner_ray.toy.tiny_models import train_tokenizer

    amateur = tmp_path / "amateur"
    shutil.copytree(tiny_pair["amateur"], amateur)
    # Another BPE, trained on other text: same size, different merges and ids.
    other = train_tokenizer([row["answer"][::-1] for row in gsm8k_rows(200)], vocab_size=600)
    other.save_pretrained(amateur)
    report = pf.PreflightReport()
    assert pf.check_models(config(tiny_pair, problems_file, tmp_path, f"amateur.path={amateur}"), report) is False
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"the expert ({tiny_pair['expert']}) and the amateur ({amateur}) do not "
                                         "share a tokenizer")


def test_lora_target_missing_from_the_expert(tiny_pair, problems_file, tmp_path):
    report = pf.PreflightReport()
    pf.check_models(config(tiny_pair, problems_file, tmp_path, "train.lora.target_modules=[qq_proj]"), report)
    assert len(report.problems) == 1 and report.problems[0].startswith("train.lora.target_modules: qq_proj match no")


def test_missing_benchmark_file_is_named(tiny_pair, problems_file, tmp_path):
    report = pf.PreflightReport()
    pf.check_data(config(tiny_pair, problems_file, tmp_path, f"eval.data_dir={tmp_path}", "eval.benchmarks=[svamp]"),
                  report, models_ok=True)
    assert report.problems == [f"benchmark file {tmp_path}/svamp/test.jsonl not found; provide "
                               f"{tmp_path}/svamp/test.jsonl"]


def test_unparseable_benchmark_row_names_file_and_line(tiny_pair, problems_file, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    lines = (DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    lines[1] = lines[1][:40]  # cut mid-object
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")
    report = pf.PreflightReport()
    pf.check_data(config(tiny_pair, problems_file, tmp_path, f"eval.data_dir={tmp_path}", "eval.benchmarks=[gsm8k]",
                         "eval.limit=null"), report, models_ok=False)
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{tmp_path}/gsm8k/test.jsonl:2: ")


def test_benchmark_row_missing_a_field_names_file_line_and_field(tiny_pair, problems_file, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    del rows[2]["answer"]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = pf.PreflightReport()
    pf.check_data(config(tiny_pair, problems_file, tmp_path, f"eval.data_dir={tmp_path}", "eval.benchmarks=[gsm8k]",
                         "eval.limit=null"), report, models_ok=False)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{tmp_path}/gsm8k/test.jsonl:3: field 'answer'")


def test_problems_file_missing_a_field(tiny_pair, problems_file, tmp_path):
    problems = tmp_path / "problems.jsonl"
    rows = gsm8k_rows(3)
    rows[1] = {"id": "p2", "text": rows[1]["question"]}
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = pf.PreflightReport()
    pf.check_data(config(tiny_pair, problems_file, tmp_path, f"data.problems={problems}"), report, models_ok=True)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{problems}, line 2: field 'question/problem/prompt/input/query' is missing")


def test_output_dir_not_writable(tiny_pair, problems_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    report = pf.PreflightReport()
    pf.check_output_dir(config(tiny_pair, problems_file, tmp_path, f"output_dir={blocker}/sub/run"), report)
    assert report.problems == [f"output_dir {blocker}/sub/run is not writable: {blocker} is a file, not a directory"]


HOLDER = """
import sys, time
from lightreasoner_ray.io.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1], "sample").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_output_dir_locked_by_another_process_is_found_without_taking_the_lock(tiny_pair, problems_file, tmp_path):
    output_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        record = (output_dir / ".lightreasoner.lock").read_bytes()
        report = pf.PreflightReport()
        pf.check_output_dir(config(tiny_pair, problems_file, tmp_path), report)
        assert len(report.problems) == 1
        assert f"output_dir {output_dir} is in use by `lightreasoner sample` (pid {holder.pid} on host" in report.problems[0]
        assert (output_dir / ".lightreasoner.lock").read_bytes() == record  # the holder's record untouched
        with pytest.raises(LightReasonerError, match="is in use by"):  # and the holder still holds it
            OutputDirLock(str(output_dir), "train").acquire()
    finally:
        holder.kill()
        holder.wait()
    report = pf.PreflightReport()
    pf.check_output_dir(config(tiny_pair, problems_file, tmp_path), report)  # its process gone, the lock is free
    assert report.problems == []


def test_missing_extras(tiny_pair, problems_file, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("vllm", "deepspeed") else real_find_spec(name, *a, **k))
    report = pf.PreflightReport()
    pf.check_extras(config(tiny_pair, problems_file, tmp_path, "sampling.engine=vllm"), report)
    assert len(report.problems) == 2, report.problems
    assert report.problems[0].startswith("sampling.engine=vllm needs vLLM, which is not installed")
    assert report.problems[1].startswith("training runs DeepSpeed, which is not installed")


def test_missing_tracking_extra(tiny_pair, problems_file, tmp_path, monkeypatch):
    import dataclasses
    import importlib.util

    base = config(tiny_pair, problems_file, tmp_path)
    tracked = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, backend=["wandb"]))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "wandb" else real_find_spec(name, *a, **k))
    report = pf.PreflightReport()
    pf.check_extras(tracked, report)
    assert len(report.problems) == 1 and report.problems[0].startswith("tracking.backend=wandb needs the 'wandb' extra")


# ---- resources ------------------------------------------------------------------------------------


def test_fits_on_node_counts_whole_and_shared_gpus():
    node = {"CPU": 16.0, "GPU": 4.0}
    assert pf.fits_on_node(node, 1, 1) == 4
    assert pf.fits_on_node(node, 1, 0.5) == 8
    assert pf.fits_on_node(node, 1, 0.4) == 8  # two 0.4 shares a GPU, never 2.5
    assert pf.fits_on_node(node, 1, 2) == 2
    assert pf.fits_on_node(node, 3, 0) == 5
    assert pf.fits_on_node({"CPU": 0.0}, 1, 0) == 0  # a head node that runs no tasks


def test_resources_not_placeable_are_named(tiny_pair, problems_file, tmp_path):
    asks = pf.stage_asks(config(tiny_pair, problems_file, tmp_path, "sampling.num_actors=4", "sampling.gpus_per_actor=1",
                                "train.num_workers=4", "train.gpus_per_worker=1", "train.steps_per_update=16",
                                "eval.gpus_per_actor=2"))
    # Two nodes of 2 GPUs (and a head node with no CPUs for tasks): everything fits.
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 0.0}]
    assert pf.check_placement(asks, nodes, "the Ray cluster") == ([], [])
    # One node of 2 GPUs: training needs all 4 workers at once; the pools run with the actors that fit.
    problems, warnings = pf.check_placement(asks, [{"CPU": 8.0, "GPU": 2.0}], "the Ray cluster")
    assert problems == ["training: only 2 of 4 DeepSpeed workers (1 CPUs, 1 GPUs each: train.num_workers, "
                        "train.cpus_per_worker, train.gpus_per_worker) fit at once and all start together; the Ray "
                        "cluster has 1 node(s), 8 CPUs and 2 GPUs in all, the largest 8 CPUs and 2 GPUs"]
    assert warnings == ["sampling: only 2 of 4 sampler actors (1 CPUs, 1 GPUs each) fit at once on the Ray cluster; "
                        "the stage runs with 2",
                        "evaluation: only 1 of 2 evaluator actors (1 CPUs, 2 GPUs each) fit at once on the Ray "
                        "cluster; the stage runs with 1"]
    # Nodes of 1 GPU each: no evaluator asking 2 GPUs can be placed anywhere.
    problems, _ = pf.check_placement(asks, [{"CPU": 8.0, "GPU": 1.0}] * 4, "the Ray cluster")
    assert problems == ["evaluation: no node can host one evaluator actor (1 CPUs, 2 GPUs: eval.num_actors, "
                        "eval.cpus_per_actor, eval.gpus_per_actor); the Ray cluster has 4 node(s), 32 CPUs and 4 GPUs "
                        "in all, the largest 8 CPUs and 1 GPUs"]


def test_without_a_cluster_the_local_ray_is_what_is_checked(tiny_pair, problems_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    report = pf.PreflightReport()
    pf.check_cluster(config(tiny_pair, problems_file, tmp_path, "ray.num_cpus=3", "sampling.gpus_per_actor=64"), report)
    import ray

    assert not ray.is_initialized()  # nothing started for the check
    assert len(report.problems) == 1
    assert report.problems[0].startswith("sampling: no node can host one sampler actor (1 CPUs, 64 GPUs: ")
    assert "the local Ray a run starts on this machine has 1 node(s), 3 CPUs" in report.problems[0]  # ray.num_cpus
    assert "sampling: 2 sampler actor(s) x (1 CPU, 64 GPU) asked" in report.asks


# ---- run performs the same checks first -------------------------------------------------------------


def test_run_refuses_every_problem_before_any_work(tiny_pair, problems_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = overrides(tiny_pair, problems_file, tmp_path, f"amateur.path={tmp_path / 'no_amateur'}",
                     "train.lora.target_modules=[qq_proj]", "eval.benchmarks=[svamp]", f"eval.data_dir={tmp_path}")
    code = cli.main(["run", "--config", str(TINY), *args])
    err = capsys.readouterr().err.strip().splitlines()
    import ray

    assert code == 2 and not ray.is_initialized()
    refusal = [line for line in err if line.startswith("lightreasoner run: error: ")]
    assert len(refusal) == 1 and "3 problems found before starting" in refusal[0]
    assert "no_amateur does not exist" in refusal[0] and "svamp/test.jsonl not found" in refusal[0]
    assert "qq_proj match no module" in refusal[0]
    assert not (tmp_path / "run" / "samples").exists()


# ---- a real cluster -------------------------------------------------------------------------------


@pytest.mark.slow
def test_on_a_cluster_resources_and_paths_are_checked_on_every_node(tiny_pair, problems_file, tmp_path, ray_local):
    report = pf.preflight(config(tiny_pair, problems_file, tmp_path, "train.num_workers=8",
                                 "train.steps_per_update=16"))
    cpus = ray_local.cluster_resources()["CPU"]
    assert report.problems == [
        f"training: only {int(cpus)} of 8 DeepSpeed workers (1 CPUs, 0 GPUs each: train.num_workers, "
        f"train.cpus_per_worker, train.gpus_per_worker) fit at once and all start together; the Ray cluster has "
        f"1 node(s), {cpus:g} CPUs and 0 GPUs in all, the largest {cpus:g} CPUs and 0 GPUs"]
    # A path present here but not on a node is named with the node (one node here: a missing path).
    missing, unanswered = pf.check_nodes_have_paths({"expert model directory": str(tmp_path / "elsewhere")})
    assert len(missing) == 1 and unanswered == []
    assert missing[0].startswith(f"expert model directory {tmp_path / 'elsewhere'} is missing on 1 of 1 nodes "
                                 "that can host model work (")
    assert pf.check_nodes_have_paths({"expert model directory": str(tiny_pair["expert"])}) == ([], [])
    # Only nodes that can host a model-loading actor or worker are asked: none here holds a GPU.
    gpu_only = [pf.Ask("sampling", "sampler actor", 1, 1.0, 1.0, "sampling.*")]
    assert pf.check_nodes_have_paths({"expert model directory": str(tmp_path / "elsewhere")}, asks=gpu_only) == ([], [])
    grading_only = [pf.Ask("evaluation", "grading task", 1, 1.0, 0.0, "eval.grading_cpus", loads_models=False)]
    assert pf.check_nodes_have_paths({"expert model directory": str(tmp_path / "elsewhere")},
                                     asks=grading_only) == ([], [])


def test_only_nodes_that_can_host_model_work_are_asked_for_the_model_paths():
    asks = pf.stage_asks(load_config(None, ["sampling.gpus_per_actor=0.5", "train.gpus_per_worker=1",
                                            "eval.gpus_per_actor=1"]))
    cpu_only = {"Resources": {"CPU": 16.0}}
    gpu_node = {"Resources": {"CPU": 8.0, "GPU": 4.0}}
    head = {"Resources": {}}  # num-cpus 0: the driver and the grading task's node at most
    assert [pf._hosts_model_work(node, asks) for node in (cpu_only, gpu_node, head)] == [False, True, False]
    assert pf._hosts_model_work(cpu_only, pf.stage_asks(load_config(None, [])))  # CPU stages: any node with a CPU
    assert pf._hosts_model_work(head, None)  # without asks every node is asked
