"""Every input that decides a result is recorded, and a changed one is refused or recomputed, never reused:
the problems sampled (by their question, not their id alone), the models' resolved dtypes, the benchmark
rows graded (question and gold answer), and old records without these keys still resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from lightreasoner_ray.benchmarks import load_benchmark
from lightreasoner_ray.config import load_config
from lightreasoner_ray.core.scoring import grade_rows
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import problem_fingerprints
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.stages.evaluation.pool import make_shards
from lightreasoner_ray.stages.evaluation.store import PredictionStore
from lightreasoner_ray.stages.problem_prompts import prepare_problems
from lightreasoner_ray.stages.samples_record import check_sampling_settings
from lightreasoner_ray.stages.sampling.stage import sampling_settings

from conftest import DATA_DIR, REPO_ROOT, gsm8k_rows

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def _problems_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _fake_samples(samples_dir: str, ids: list[str]) -> None:
    """What a finished sampling run leaves for these problems (content does not matter here)."""
    n = len(ids)
    table = pa.table({"problem_id": ids, "prompt_ids": [[1]] * n, "completion_ids": [[2]] * n, "steps": [[0]] * n,
                      "target_ids": [[[2]]] * n, "target_probs": [[[1.0]]] * n})
    storage.write_parquet_atomic(table, samples_dir, "part-0.parquet")


def _claim(config):
    """What the sampling stage does before it skips finished problems."""
    problems, _ = prepare_problems(config)
    layout = RunLayout(config.output_dir)
    check_sampling_settings(layout.sampling_settings, layout.samples, sampling_settings(config),
                            problems=problem_fingerprints(problems))
    return problems


def _config(tiny_pair, output_dir, problems, *extra):
    return load_config(TINY, [f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}",
                              f"output_dir={output_dir}", f"data.problems={problems}", "data.limit=4",
                              "data.shuffle=false", "data.id_field=idx", *extra])


def test_another_problem_file_with_colliding_ids_is_refused(tiny_pair, tmp_path):
    rows = [{"idx": f"p{i}", **row} for i, row in enumerate(gsm8k_rows(8))]
    first = _problems_file(tmp_path / "first.jsonl", rows[:4])
    other = _problems_file(tmp_path / "other.jsonl", [{**row, "idx": f"p{i}"} for i, row in enumerate(rows[4:])])
    output_dir = tmp_path / "run"
    problems = _claim(_config(tiny_pair, output_dir, first))
    _fake_samples(RunLayout(str(output_dir)).samples, [p["problem_id"] for p in problems])
    _claim(_config(tiny_pair, output_dir, first))  # the same problems resume
    with pytest.raises(LightReasonerError) as caught:
        _claim(_config(tiny_pair, output_dir, other))
    message = str(caught.value)
    assert "problem 'p0' and 3 more had another question" in message
    assert f"data.problems: '{first}' -> '{other}'" in message and "--restart" in message and "\n" not in message


def test_the_resolved_dtype_is_recorded_and_a_change_refused(tiny_pair, tmp_path, problems_file):
    output_dir = tmp_path / "run"
    config = _config(tiny_pair, output_dir, problems_file, "data.id_field=auto")
    problems = _claim(config)
    record = json.loads(Path(RunLayout(str(output_dir)).sampling_settings).read_text())
    assert record["expert_dtype"] == "float32" and record["amateur_dtype"] == "float32"  # auto on CPU
    assert set(record["problems"]) == {p["problem_id"] for p in problems}
    _fake_samples(RunLayout(str(output_dir)).samples, [p["problem_id"] for p in problems])
    _claim(_config(tiny_pair, output_dir, problems_file, "data.id_field=auto", "expert.dtype=float32"))  # same
    with pytest.raises(LightReasonerError, match="expert_dtype: 'float32' -> 'bfloat16'"):
        _claim(_config(tiny_pair, output_dir, problems_file, "data.id_field=auto", "expert.dtype=bfloat16"))


def test_an_older_record_without_the_new_keys_still_resumes_and_is_upgraded(tiny_pair, tmp_path, problems_file):
    output_dir = tmp_path / "run"
    config = _config(tiny_pair, output_dir, problems_file, "data.id_field=auto")
    problems = _claim(config)
    layout = RunLayout(str(output_dir))
    _fake_samples(layout.samples, [p["problem_id"] for p in problems])
    record = json.loads(Path(layout.sampling_settings).read_text())
    old = {k: v for k, v in record.items() if k not in ("expert_dtype", "amateur_dtype", "problems", "problems_source")}
    Path(layout.sampling_settings).write_text(json.dumps(old))
    _claim(config)  # resumes, unchecked on the keys it lacks
    upgraded = json.loads(Path(layout.sampling_settings).read_text())
    assert upgraded["expert_dtype"] == "float32" and set(upgraded["problems"]) == set(record["problems"])
    with pytest.raises(LightReasonerError, match="expert_dtype"):  # compared from now on
        _claim(_config(tiny_pair, output_dir, problems_file, "data.id_field=auto", "expert.dtype=float16"))


# ---- evaluation: the benchmark rows themselves


def _benchmark_copy(directory: Path, rows: int, corrected: dict[int, str] | None = None, reworded: int | None = None):
    """The first ``rows`` GSM8K test rows in another eval.data_dir, some gold answers corrected or a question reworded."""
    lines = (DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[:rows]
    out = []
    for index, line in enumerate(lines):
        row = json.loads(line)
        if corrected and index in corrected:
            row["answer"] = row["answer"].rsplit("####", 1)[0] + "#### " + corrected[index]
        if reworded == index:
            row["question"] = row["question"] + " Answer in dollars."
        out.append(json.dumps(row))
    (directory / "gsm8k").mkdir(parents=True)
    (directory / "gsm8k" / "test.jsonl").write_text("\n".join(out) + "\n")
    return directory


def _predict(rows):
    """The model answered the original gold answer everywhere."""
    return [{"prompt": f"Q: {row['question']}", "output": f"so \\boxed{{{row['answer']}}}"} for row in rows]


def test_a_corrected_gold_answer_is_regraded_and_a_changed_question_recomputed(tmp_path):
    original = load_benchmark("gsm8k", str(DATA_DIR), limit=4)
    assert original[0]["answer"] == "18"
    model_dir = str(tmp_path / "run" / "eval" / "baseline")
    store = PredictionStore(model_dir, {"gsm8k": make_shards("gsm8k", original, 2)}, "fp")
    assert len(store.resume()) == 2
    for shard in store.shards["gsm8k"]:
        store.add(shard, grade_rows("gsm8k", shard.rows, _predict(shard.rows)))
    assert all(row["correct"] for row in store.benchmark_rows("gsm8k"))

    corrected = load_benchmark("gsm8k", str(_benchmark_copy(tmp_path / "fixed", 4, corrected={0: "19"}, reworded=3)),
                               limit=4)
    assert corrected[0]["answer"] == "19"
    again = PredictionStore(model_dir, {"gsm8k": make_shards("gsm8k", corrected, 2)}, "fp")
    todo = again.resume()
    assert [shard.index for shard in todo] == [1]  # row 3's question changed: its shard is generated again
    regraded = again.rows["gsm8k"][0]
    assert [row["correct"] for row in regraded] == [False, True] and regraded[0]["answer"] == "19"
    assert regraded[0]["extracted"] == "18" and regraded[0]["model_fingerprint"] == "fp"
    on_disk = [json.loads(line) for line in Path(model_dir, "gsm8k", "shard-00000.jsonl").read_text().splitlines()]
    assert [row["correct"] for row in on_disk] == [False, True]  # the new grades are kept
