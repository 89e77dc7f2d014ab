"""`lightreasoner compare`: per-benchmark table and the questions fixed and broken, from prediction files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lightreasoner_ray.data.benchmarks import load_benchmark
from lightreasoner_ray.config import load_config
from lightreasoner_ray.stages.compare import run_compare
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.core.scoring import grade_rows

from conftest import DATA_DIR, REPO_ROOT


def write_predictions(output_dir, tag, benchmark, rows, right):
    """Prediction rows graded by the real grader: a boxed gold answer where ``right``, a wrong one elsewhere."""
    outputs = [f"So the answer is \\boxed{{{row['answer']}}}." if ok else "So the answer is \\boxed{-12345}."
               for row, ok in zip(rows, right)]
    graded = grade_rows(benchmark, rows, outputs)
    directory = output_dir / "eval" / tag
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{benchmark}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in graded))
    return graded


@pytest.fixture
def evaluated(tmp_path):
    gsm8k = load_benchmark("gsm8k", data_dir=str(DATA_DIR), limit=6)
    svamp = load_benchmark("svamp", data_dir=str(DATA_DIR), limit=4)
    before = {"gsm8k": [True, False, False, True, False, True], "svamp": [True, True, False, False]}
    after = {"gsm8k": [True, True, False, False, True, True], "svamp": [True, True, True, False]}
    for tag, pattern in (("baseline", before), ("lightreasoner", after)):
        write_predictions(tmp_path, tag, "gsm8k", gsm8k, pattern["gsm8k"])
        write_predictions(tmp_path, tag, "svamp", svamp, pattern["svamp"])
    return {"dir": tmp_path, "rows": {"gsm8k": gsm8k, "svamp": svamp}, "before": before, "after": after}


def test_fixed_and_broken_questions_and_the_table(evaluated):
    config = load_config(None, [f"output_dir={evaluated['dir']}"])
    result = run_compare(config, "baseline", "lightreasoner")
    rows, before, after = evaluated["rows"], evaluated["before"], evaluated["after"]
    for name in ("gsm8k", "svamp"):
        expected_fixed = {row["id"] for row, b, a in zip(rows[name], before[name], after[name]) if not b and a}
        expected_broken = {row["id"] for row, b, a in zip(rows[name], before[name], after[name]) if b and not a}
        assert {c["id"] for c in result["fixed"] if c["benchmark"] == name} == expected_fixed
        assert {c["id"] for c in result["broken"] if c["benchmark"] == name} == expected_broken
        stats = result["benchmarks"][name]
        assert stats["n"] == len(rows[name])
        assert stats["before_accuracy"] == sum(before[name]) / len(rows[name])
        assert stats["after_accuracy"] == sum(after[name]) / len(rows[name])
    assert len(result["fixed"]) == 3 and len(result["broken"]) == 1
    case = next(c for c in result["fixed"] if c["benchmark"] == "gsm8k")
    gold = next(row for row in rows["gsm8k"] if row["id"] == case["id"])
    assert case["question"] == gold["question"] and case["gold"] == gold["answer"]
    assert case["before_answer"] == "-12345" and case["after_answer"] == gold["answer"]

    on_disk = json.loads((evaluated["dir"] / "compare" / "baseline_vs_lightreasoner.json").read_text())
    assert on_disk["benchmarks"] == result["benchmarks"] and on_disk["fixed"] == result["fixed"]
    markdown = (evaluated["dir"] / "compare" / "baseline_vs_lightreasoner.md").read_text()
    assert "| GSM8K | 6 | 50.0 | 66.7 | +16.7 | 2 | 1 |" in markdown
    assert "| SVAMP | 4 | 50.0 | 75.0 | +25.0 | 1 | 0 |" in markdown
    assert "## Fixed by training (3)" in markdown and "## Broken by training (1)" in markdown
    assert gold["question"].split()[0] in markdown


def test_only_questions_both_answered_count(evaluated):
    directory = evaluated["dir"] / "eval" / "lightreasoner"
    lines = (directory / "gsm8k.jsonl").read_text().splitlines()
    (directory / "gsm8k.jsonl").write_text("\n".join(lines[:4]) + "\n")  # an evaluation cut short
    result = run_compare(load_config(None, [f"output_dir={evaluated['dir']}"]))
    assert result["benchmarks"]["gsm8k"]["n"] == 4 and result["benchmarks"]["gsm8k"]["only_before"] == 2


def test_missing_model_and_bad_rows_are_clear_errors(evaluated):
    config = load_config(None, [f"output_dir={evaluated['dir']}"])
    with pytest.raises(LightReasonerError, match="no predictions for 'trained'.*eval/trained"):
        run_compare(config, "baseline", "trained")
    path = evaluated["dir"] / "eval" / "lightreasoner" / "svamp.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(LightReasonerError, match=r"svamp.jsonl, line 5: not valid JSON"):
        run_compare(config)


def test_cli_compare_prints_the_table(evaluated):
    result = subprocess.run(
        [sys.executable, "-m", "lightreasoner_ray.cli", "compare", f"output_dir={evaluated['dir']}",
         "--before", "baseline", "--after", "lightreasoner"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| GSM8K | 6 | 50.0 | 66.7 | +16.7 | 2 | 1 |" in result.stdout
    assert "questions fixed: 3, broken: 1" in result.stdout
    assert "logs in" in result.stderr and (evaluated["dir"] / "logs").is_dir()


def test_cli_error_names_the_log_and_a_crash_prints_its_traceback(evaluated):
    missing = subprocess.run(
        [sys.executable, "-m", "lightreasoner_ray.cli", "compare", f"output_dir={evaluated['dir']}", "--after", "nothing"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error: no predictions for 'nothing'" in missing.stderr and "full log: " in missing.stderr
    log = missing.stderr.split("full log: ")[1].split(")")[0]
    assert log.startswith(str(evaluated["dir"] / "logs" / "compare-"))
    # An unexpected failure (here: a directory where a prediction file belongs) prints its traceback in full.
    (evaluated["dir"] / "eval" / "lightreasoner" / "svamp.jsonl").unlink()
    (evaluated["dir"] / "eval" / "lightreasoner" / "svamp.jsonl").mkdir()
    crash = subprocess.run(
        [sys.executable, "-m", "lightreasoner_ray.cli", "compare", f"output_dir={evaluated['dir']}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert crash.returncode == 1
    assert "Traceback (most recent call last)" in crash.stderr and "compare.py" in crash.stderr
    assert "failed; the full log is" in crash.stderr
