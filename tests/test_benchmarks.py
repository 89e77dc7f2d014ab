"""Tests for benchmark loading: real files from ../shared/data/benchmarks, bad files in tmp_path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightreasoner_ray.data.benchmarks import (
    BENCHMARKS,
    PAPER_BENCHMARKS,
    benchmark_path,
    default_data_dir,
    load_benchmark,
    read_jsonl,
    resolve_benchmark_name,
)
from lightreasoner_ray.errors import LightReasonerError

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
LOCAL_BENCHMARKS = ("gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem")
EXPECTED_ROWS = {
    "gsm8k": 1319,
    "math500": 500,
    "svamp": 1000,
    "asdiv": 2215,
    "minerva_math": 272,
    "olympiadbench": 675,
    "mmlu_stem": 3018,
}

requires_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def loaded():
    return {name: load_benchmark(name, data_dir=DATA_DIR) for name in LOCAL_BENCHMARKS}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_names():
    assert set(PAPER_BENCHMARKS) <= set(BENCHMARKS)
    assert PAPER_BENCHMARKS == ("gsm8k", "math", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem")
    assert set(BENCHMARKS) == set(LOCAL_BENCHMARKS) | {"math", "toy"}


@requires_data
@pytest.mark.parametrize("name", LOCAL_BENCHMARKS)
def test_every_row_has_a_string_id_question_and_clean_answer(loaded, name):
    rows = loaded[name]
    assert len(rows) == EXPECTED_ROWS[name]
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        assert isinstance(row["id"], str) and row["id"]
        assert isinstance(row["question"], str) and row["question"].strip()
        answer = row["answer"]
        assert isinstance(answer, str) and answer == answer.strip() and answer
        assert "$" not in answer or name in ("math500", "minerva_math")  # "\$18.90" is MATH's own text


@requires_data
def test_numeric_benchmarks_have_plain_number_answers(loaded):
    for name in ("gsm8k", "svamp"):
        for row in loaded[name]:
            assert NUMBER.fullmatch(row["answer"]), row
            assert not row["answer"].endswith(".0")
    asdiv_numbers = [row["answer"] for row in loaded["asdiv"] if NUMBER.fullmatch(row["answer"])]
    assert len(asdiv_numbers) > 2000
    assert not any(re.search(r"\d\s*\(", row["answer"]) for row in loaded["asdiv"])


@requires_data
def test_known_rows(loaded):
    gsm8k, svamp, asdiv = loaded["gsm8k"][0], loaded["svamp"][0], loaded["asdiv"][0]
    assert gsm8k["answer"] == "18" and gsm8k["question"].startswith("Janet")
    assert svamp["answer"] == "145" and svamp["id"] == "chal-777"
    assert svamp["question"].startswith("There are 87 oranges") and svamp["question"].endswith(
        "93 groups How big is each group of bananas?"
    )
    assert asdiv["answer"] == "9"
    assert asdiv["question"] == (
        "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    )
    assert {row["answer"] for row in loaded["asdiv"]} >= {"3:4", "-1/3", "Mrs. Hilt", "5/2"}
    assert loaded["minerva_math"][0]["answer"] == "1.6"
    assert loaded["minerva_math"][1]["answer"] == "4.5e33"
    assert loaded["math500"][0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    olympiad = {row["id"]: row["answer"] for row in loaded["olympiadbench"]}
    assert olympiad["1606"] == "2"
    assert "(-6,6), (2,6)" in olympiad.values()


@requires_data
def test_mmlu_rows_list_choices_and_answer_with_a_letter(loaded):
    rows = loaded["mmlu_stem"]
    first = rows[0]
    assert first["answer"] == "C"
    assert first["choices"][2] == "reduce the carrying capacity cif the environment to lower the K value"
    assert first["question"].splitlines()[1:] == [
        f"({letter}) {choice}" for letter, choice in zip("ABCD", first["choices"])
    ]
    assert {row["answer"] for row in rows} == set("ABCD")


@requires_data
def test_gsm8k_train_split_and_thousands_separators():
    rows = load_benchmark("gsm8k", data_dir=DATA_DIR, split="train")
    assert len(rows) == 7473
    raw = [row for _, row in read_jsonl(benchmark_path("gsm8k", DATA_DIR, "train"))]
    with_commas = [i for i, row in enumerate(raw) if re.search(r"####\s*[\d,]*,\d", row["answer"])]
    assert with_commas, "expected some answers written like 1,600"
    for index in with_commas:
        assert "," not in rows[index]["answer"]


@requires_data
def test_limit_takes_the_first_rows(loaded):
    assert load_benchmark("svamp", data_dir=DATA_DIR, limit=5) == loaded["svamp"][:5]
    assert load_benchmark("svamp", data_dir=DATA_DIR, limit=0) == []
    assert len(load_benchmark("svamp", data_dir=DATA_DIR, limit=10**6)) == 1000
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(LightReasonerError, match="limit"):
            load_benchmark("svamp", data_dir=DATA_DIR, limit=bad)


def test_toy_split_loads_from_the_data_dir(tmp_path):
    from lightreasoner_ray.toy import generate_problems

    rows = generate_problems(5, seed=3, split="test")
    _write_jsonl(tmp_path / "toy" / "test.jsonl", rows)
    loaded = load_benchmark("toy", data_dir=tmp_path)
    assert [(r["id"], r["question"], r["answer"]) for r in loaded] == [(r["id"], r["question"], r["answer"]) for r in rows]


def test_unknown_name_lists_known_names():
    with pytest.raises(LightReasonerError) as error:
        load_benchmark("gsm9k")
    for name in BENCHMARKS:
        assert name in str(error.value)
    assert "gsm9k" in str(error.value)


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "gsm8k" / "test.jsonl",
        [{"question": "q1", "answer": "a\n#### 1"}, "", '{"question": "q2", "answer": "#### 2"', {"x": 1}],
    )
    with pytest.raises(LightReasonerError, match=rf"{re.escape(str(path))}:3: malformed JSON"):
        load_benchmark("gsm8k", data_dir=tmp_path)


def test_non_object_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "svamp" / "test.jsonl", ["[1, 2]"])
    with pytest.raises(LightReasonerError, match=rf"{re.escape(str(path))}:1: expected a JSON object"):
        load_benchmark("svamp", data_dir=tmp_path)


@pytest.mark.parametrize(
    "name,row,field,problem",
    [
        ("svamp", {"Question": "q", "Answer": 3.0}, "Body", "is missing"),
        ("svamp", {"Body": "b", "Question": "q", "Answer": "3"}, "Answer", "should be int or float"),
        ("gsm8k", {"question": "q", "answer": "no final line"}, "answer", "####"),
        ("asdiv", {"body": "b", "question": "q"}, "answer", "is missing"),
        ("olympiadbench", {"question": "q", "final_answer": []}, "final_answer", "non-empty list"),
        ("minerva_math", {"problem": "p", "solution": "no box"}, "solution", "boxed"),
        ("math500", {"solution": "s", "answer": "1"}, "problem", "is missing"),
        ("mmlu_stem", {"question": "q", "choices": ["a", "b"], "answer": 2}, "answer", "index into choices"),
        ("mmlu_stem", {"question": "q", "choices": "ab", "answer": 0}, "choices", "should be list"),
    ],
)
def test_bad_field_names_file_line_and_field(tmp_path, name, row, field, problem):
    good = load_benchmark(name, data_dir=DATA_DIR, limit=1) if DATA_DIR.is_dir() else []
    raw_good = [raw for _, raw in read_jsonl(benchmark_path(name, DATA_DIR))][:1] if good else []
    path = _write_jsonl(tmp_path / name / "test.jsonl", raw_good + [row])
    line = len(raw_good) + 1
    with pytest.raises(LightReasonerError) as error:
        load_benchmark(name, data_dir=tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: field '{field}'"), message
    assert problem in message


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(LightReasonerError, match=re.escape(str(tmp_path / "asdiv" / "test.jsonl"))):
        load_benchmark("asdiv", data_dir=tmp_path)


def test_math_reads_the_full_file_when_present(tmp_path):
    _write_jsonl(
        tmp_path / "math" / "test.jsonl",
        [
            {"problem": "1+1?", "solution": r"It is $\boxed{2}$.", "unique_id": "test/algebra/1.json"},
            {"problem": "Half?", "solution": r"$\boxed{\frac{1}{2}}$", "answer": r"\frac12"},
        ],
    )
    rows = load_benchmark("math", data_dir=tmp_path)
    assert rows == [
        {"question": "1+1?", "answer": "2", "id": "test/algebra/1.json", "toolkit_question": "1+1?"},
        {"question": "Half?", "answer": r"\frac12", "id": "1", "toolkit_question": "Half?"},
    ]
    assert resolve_benchmark_name("math", tmp_path) == "math"


def test_math_without_file_or_hub_suggests_math500(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LightReasonerError) as error:
        load_benchmark("math", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "math" / "test.jsonl") in message
    assert "math500" in message


@requires_data
def test_resolve_benchmark_name():
    assert resolve_benchmark_name("math", DATA_DIR) == ("math" if (DATA_DIR / "math").is_dir() else "math500")
    for name in LOCAL_BENCHMARKS:
        assert resolve_benchmark_name(name, DATA_DIR) == name
    with pytest.raises(LightReasonerError, match="known benchmarks"):
        resolve_benchmark_name("nope", DATA_DIR)


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTREASONER_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    _write_jsonl(tmp_path / "svamp" / "test.jsonl", [{"Body": "b.", "Question": "q?", "Answer": 2.5, "ID": "x"}])
    assert load_benchmark("svamp") == [{"question": "b. q?", "answer": "2.5", "id": "x", "toolkit_question": "b. q?"}]

    monkeypatch.delenv("LIGHTREASONER_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_data_dir().resolve() == (Path(__file__).resolve().parents[2] / "shared/data/benchmarks").resolve()


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, "", "   ", {"a": 2}])
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    with pytest.raises(LightReasonerError, match="file not found"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
