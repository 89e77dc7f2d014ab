"""The sampling stage end to end: Ray Data with 2 actors, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
from lightreasoner_ray.stages.sampling.stage import run_sampling
from lightreasoner_ray.stages.problem_prompts import prepare_problems

from conftest import REPO_ROOT
from fault_hooks import kill_after_files

BETA = 0.3  # the fixture pair's KL sits around 0.27-0.34: a real split


def sampling_config(tiny_pair, problems_file, output_dir, *extra):
    return load_config(
        REPO_ROOT / "configs" / "tiny.yaml",
        [
            f"expert.path={tiny_pair['expert']}",
            f"amateur.path={tiny_pair['amateur']}",
            f"data.problems={problems_file}",
            f"output_dir={output_dir}",
            "data.limit=10",
            f"sampling.beta={BETA}",
            "sampling.max_new_tokens=16",
            "sampling.batch_size=3",
            "sampling.rows_per_file=2",
            *extra,
        ],
    )


def read_samples(output_dir: Path) -> dict[str, dict]:
    table = pq.read_table(output_dir / "samples")
    rows = table.to_pylist()
    return {row["problem_id"]: row for row in rows}


@pytest.fixture(scope="module")
def sampled(tiny_pair, problems_file, tmp_path_factory, ray_local):
    output_dir = tmp_path_factory.mktemp("sampled")
    summary = run_sampling(sampling_config(tiny_pair, problems_file, output_dir))
    return output_dir, summary


@pytest.mark.slow
def test_pipeline_writes_the_schema_and_summary(sampled):
    output_dir, summary = sampled
    files = sorted((output_dir / "samples").glob("*.parquet"))
    assert len(files) >= 5  # 10 rows, 2 per file: streamed, not written at the end in one piece
    assert pq.read_schema(files[0]).remove_metadata() == SAMPLES_SCHEMA
    rows = read_samples(output_dir)
    assert len(rows) == 10
    selected = 0
    for row in rows.values():
        assert row["problem_id"]  # GSM8K rows have no id: a stable hash of the question
        assert row["problem_id"].startswith("q-")
        assert len(row["position_kl"]) == len(row["completion_ids"]) <= 16
        assert row["steps"] == [t for t, kl in enumerate(row["position_kl"]) if kl > BETA]
        assert row["kl"] == pytest.approx([row["position_kl"][t] for t in row["steps"]])
        assert len(row["target_ids"]) == len(row["target_probs"]) == len(row["steps"])
        for probs in row["target_probs"]:
            assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        selected += len(row["steps"])
    counts = summary["counts"]
    assert counts["problems"] == 10 and counts["selected_steps"] == selected
    assert counts["completion_tokens"] == sum(len(r["completion_ids"]) for r in rows.values())
    assert 0 < counts["selection_ratio"] < 1
    on_disk = json.loads((output_dir / "samples_summary.json").read_text())
    assert on_disk["counts"] == counts
    assert sum(on_disk["kl"]["histogram"]["counts"]) == counts["completion_tokens"]
    assert on_disk["models"]["expert"].endswith("expert")


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(sampled, tiny_pair, problems_file):
    output_dir, _ = sampled
    before = sorted(p.name for p in (output_dir / "samples").glob("*.parquet"))
    summary = run_sampling(sampling_config(tiny_pair, problems_file, output_dir))
    assert sorted(p.name for p in (output_dir / "samples").glob("*.parquet")) == before
    assert summary["counts"]["resumed_problems"] == 10 and summary["timing"]["problems_this_run"] == 0


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(sampled, tiny_pair, problems_file, tmp_path):
    reference, _ = sampled
    output_dir = tmp_path / "killed"
    overrides = [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
                 f"data.problems={problems_file}", f"output_dir={output_dir}", "data.limit=10",
                 f"sampling.beta={BETA}", "sampling.max_new_tokens=16", "sampling.batch_size=1",
                 "sampling.rows_per_file=1", "sampling.num_actors=1", "ray.num_cpus=2"]
    # The job SIGKILLs itself right after its third file: a kill mid-run, at a known point.
    env = dict(os.environ, RAY_ADDRESS="", LIGHTREASONER_NO_DASHBOARD="1", **kill_after_files(3))
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "sample.py"), "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), *overrides],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert process.wait(timeout=300) == -signal.SIGKILL
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # Ray processes the killed driver left behind
        except ProcessLookupError:
            pass
    samples = output_dir / "samples"
    assert len(list(samples.glob("*.parquet"))) == 3

    summary = run_sampling(sampling_config(tiny_pair, problems_file, output_dir))
    assert summary["counts"]["resumed_problems"] >= 2
    assert summary["counts"]["problems"] == 10
    resumed, uninterrupted = read_samples(output_dir), read_samples(reference)
    assert sorted(resumed) == sorted(uninterrupted)
    assert pq.read_table(samples).num_rows == 10  # nothing duplicated
    for problem_id, row in uninterrupted.items():
        other = resumed[problem_id]
        assert other["completion_ids"] == row["completion_ids"]
        assert other["steps"] == row["steps"]
        assert other["target_ids"] == row["target_ids"]
        assert other["kl"] == pytest.approx(row["kl"], rel=1e-4)
    assert not list(samples.glob(".*"))  # no temporaries left visible


# --- bad input: clear errors before any model or Ray work --------------------------------


def bad(tiny_pair, problems_file, tmp_path, *extra):
    with pytest.raises(LightReasonerError) as info:
        prepare_problems(sampling_config(tiny_pair, problems_file, tmp_path / "out", *extra))
    return str(info.value)


def test_missing_problems_file(tiny_pair, problems_file, tmp_path):
    assert "problems file" in bad(tiny_pair, problems_file, tmp_path, f"data.problems={tmp_path}/nope.jsonl")


def test_empty_problems_file(tiny_pair, problems_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no usable problems" in bad(tiny_pair, problems_file, tmp_path, f"data.problems={empty}")


def test_malformed_json_line_fails_or_is_skipped(tiny_pair, problems_file, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "What is 2+3?"}\n{"question": "oops\n{"question": "What is 4+4?"}\n')
    message = bad(tiny_pair, problems_file, tmp_path, f"data.problems={broken}")
    assert f"{broken}, line 2" in message and "malformed JSON" in message and "skip_invalid" in message
    problems, info = prepare_problems(sampling_config(tiny_pair, problems_file, tmp_path / "o", f"data.problems={broken}",
                                                      "data.skip_invalid=true"))
    assert len(problems) == 2 and info["skipped_invalid"] == 1


@pytest.mark.parametrize("row, expected", [({"question": ""}, "'question' is empty"), ({"text": "x"}, "is missing"),
                                           ({"question": 7}, "is a int")])
def test_missing_or_empty_question(tiny_pair, problems_file, tmp_path, row, expected):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "fine"}) + "\n" + json.dumps(row) + "\n")
    message = bad(tiny_pair, problems_file, tmp_path, f"data.problems={path}")
    assert f"{path}, line 2" in message and expected in message


def test_question_field_is_configurable(tiny_pair, problems_file, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"idx": 5, "body": "How many?"}) + "\n")
    problems, _ = prepare_problems(sampling_config(tiny_pair, problems_file, tmp_path / "o", f"data.problems={path}",
                                                   "data.question_field=body"))
    assert problems[0]["problem_id"] == "5"


def test_prompt_longer_than_the_context(tiny_pair, problems_file, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "huge", "question": "seven apples and " * 400}) + "\n")
    message = bad(tiny_pair, problems_file, tmp_path, f"data.problems={path}")
    assert "problem huge" in message and "context of 512 tokens" in message


def test_model_path_that_does_not_exist(tiny_pair, problems_file, tmp_path):
    message = bad(tiny_pair, problems_file, tmp_path, f"amateur.path={tmp_path}/no-model")
    assert "amateur model path" in message and "does not exist" in message


def test_incompatible_tokenizers(tiny_pair, problems_file, tmp_path):
    from lightreasoner_ray.toy.tiny_models import DEFAULT_AMATEUR, save_pair

    _, other = save_pair(tmp_path / "other", ["completely different words here"] * 50 + ["zebra quartz"] * 50,
                         DEFAULT_AMATEUR, DEFAULT_AMATEUR, vocab_size=300)
    message = bad(tiny_pair, problems_file, tmp_path, f"amateur.path={other}")
    assert "do not share a tokenizer" in message and str(other) in message and str(tiny_pair["expert"]) in message


def test_cli_prints_the_error_without_a_traceback(tiny_pair, problems_file, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightreasoner_ray.cli", "sample", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
         "sampling.alpha=0"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "sampling.alpha must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_output_dir_as_a_uri_and_no_selected_steps(tiny_pair, problems_file, tmp_path, ray_local):
    """`output_dir` may be a URI (pyarrow filesystems: s3://, gs://; here file://); a beta
    nothing exceeds gives empty step lists, not a crash."""
    config = sampling_config(tiny_pair, problems_file, f"file://{tmp_path}/uri-run", "data.limit=3", "sampling.beta=50")
    summary = run_sampling(config)
    assert summary["counts"]["problems"] == 3 and summary["counts"]["selected_steps"] == 0
    assert len(read_samples(tmp_path / "uri-run")) == 3
    assert json.loads((tmp_path / "uri-run" / "samples_summary.json").read_text())["counts"]["problems"] == 3
    assert run_sampling(config)["counts"]["resumed_problems"] == 3


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused(sampled, tiny_pair, problems_file):
    output_dir, _ = sampled
    with pytest.raises(LightReasonerError, match=r"other settings \(beta: 0.3 -> 0.5\).*new output_dir"):
        run_sampling(sampling_config(tiny_pair, problems_file, output_dir, "sampling.beta=0.5"))
