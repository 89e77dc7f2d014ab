"""One JSONL reader for problems and benchmarks: a bad problems line is refused (or skipped with
data.skip_invalid), a bad benchmark line is refused, and both name the file when it is not UTF-8."""

from __future__ import annotations

import pytest

from lightreasoner_ray.config import DataConfig
from lightreasoner_ray.data.benchmarks import read_jsonl
from lightreasoner_ray.data.jsonl import jsonl_rows
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
    path.write_bytes('{"id": "a", "question": "caf\u00e9?"}\n'.encode("latin-1"))
    with pytest.raises(LightReasonerError, match=r"latin1.jsonl: not UTF-8 text"):
        reader(path)
