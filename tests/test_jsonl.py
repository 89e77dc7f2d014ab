"""One JSONL reader for problems and benchmarks: a bad problems line is refused (or skipped with
data.skip_invalid), a bad benchmark line is refused, and both name the file when it is not UTF-8."""

from __future__ import annotations

import pytest

from lightreasoner_ray.config import DataConfig
from lightreasoner_ray.data.benchmarks import read_jsonl
from lightreasoner_ray.data.jsonl import jsonl_rows, utf8_text
from lightreasoner_ray.data.problems import load_problems
from lightreasoner_ray.errors import LightReasonerError


def test_lines_values_and_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n[2]\n')
    rows = list(jsonl_rows(path))
    assert rows[0] == (1, {"a": 1}, None) and rows[2] == (4, [2], None)
    assert rows[1][:2] == (3, None) and rows[1][2].startswith("malformed JSON")


def test_a_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"id": "a", "question": "1+1?"}\n{oops\n{"id": "b", "question": "2+2?"}\n')
    with pytest.raises(LightReasonerError, match=r"problems.jsonl, line 2: malformed JSON.*data.skip_invalid"):
        load_problems(DataConfig(problems=str(path), limit=None))
    loaded = load_problems(DataConfig(problems=str(path), limit=None, skip_invalid=True))
    assert [problem["problem_id"] for problem in loaded.problems] == ["a", "b"] and len(loaded.skipped) == 1
    with pytest.raises(LightReasonerError, match=r"problems.jsonl:2: malformed JSON"):
        list(read_jsonl(path))


@pytest.mark.parametrize("reader", [lambda path: list(read_jsonl(path)),
                                    lambda path: load_problems(DataConfig(problems=str(path), limit=None))])
def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, reader):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"id": "a", "question": "1+1?"}\n\n{"id": "b", "question": "caf\u00e9?"}\n'.encode("latin-1"))
    with pytest.raises(LightReasonerError, match=r"latin1.jsonl, line 3: not UTF-8 text") as error:
        reader(path)
    assert "\n" not in str(error.value)


def test_a_json_problems_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "problems.json"
    path.write_bytes('[\n{"id": "a", "question": "1+1?"},\n{"id": "b", "question": "caf\u00e9?"}\n]\n'.encode("latin-1"))
    with pytest.raises(LightReasonerError, match=r"problems.json, line 3: not UTF-8 text"):
        load_problems(DataConfig(problems=str(path), limit=None))


def test_utf8_text_counts_lines_and_bytes_of_the_bad_line():
    data = "ok\nstill ok\nna\u00efve\n".encode("utf-8") + b"x\xffy\n"
    with pytest.raises(LightReasonerError, match=r"ref.jsonl, line 4: not UTF-8 text \(invalid start byte at byte 2 "):
        utf8_text(data, "ref.jsonl")
    assert utf8_text(data[:-5], "ref.jsonl").splitlines()[2] == "na\u00efve"


def test_a_reference_samples_file_that_is_not_utf8_names_file_and_line(tmp_path):
    from lightreasoner_ray.data.samples import import_reference_jsonl

    path = tmp_path / "reference.jsonl"
    path.write_bytes(b'{"question": "q"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(LightReasonerError, match=r"train.samples: .*reference.jsonl, line 2: not UTF-8 text"):
        import_reference_jsonl(str(path), tokenizer=None, vocab_size=10, output_dir=str(tmp_path / "out"), model_path="m")
