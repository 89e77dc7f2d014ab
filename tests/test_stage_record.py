"""The one stage record: what a stage's outputs were made from, and the rule for a re-run."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io.record import StageRecord
from lightreasoner_ray.stages.samples_record import check_sampling_settings


def refuse(changes):
    return LightReasonerError("refused: " + "; ".join(changes))


def test_no_outputs_records_same_inputs_resume_other_inputs_refuse(tmp_path):
    path = str(tmp_path / "record.json")
    assert StageRecord(path, {"beta": 0.4, "expert": "/a"}).claim(False, refuse) is None
    assert json.loads((tmp_path / "record.json").read_text()) == {"beta": 0.4, "expert": "/a"}
    # The model moved (informational), same weights: resume.
    assert StageRecord(path, {"beta": 0.4, "expert": "/b"}, informational=frozenset({"expert"})).claim(True, refuse)
    with pytest.raises(LightReasonerError, match=r"refused: beta: 0.4 -> 0.5"):
        StageRecord(path, {"beta": 0.5, "expert": "/a"}).claim(True, refuse)
    # Without outputs nothing can be mixed: the new inputs simply replace the record.
    StageRecord(path, {"beta": 0.5, "expert": "/a"}).claim(False, refuse)
    assert json.loads((tmp_path / "record.json").read_text())["beta"] == 0.5


def test_an_unreadable_record_is_refused_unless_the_outputs_are_cheap_to_redo(tmp_path):
    path = tmp_path / "record.json"
    path.write_text('{"beta": 0.')  # truncated
    with pytest.raises(LightReasonerError, match="record.json is unreadable"):
        StageRecord(str(path), {"beta": 0.9}).claim(True, refuse)
    StageRecord(str(path), {"beta": 0.9}, unreadable_is_unrecorded=True).claim(True, refuse)
    assert json.loads(path.read_text()) == {"beta": 0.9}


def test_identity_keys_replace_the_outputs_and_dropped_keys_compare_with_a_sentinel(tmp_path):
    path = str(tmp_path / "record.json")
    StageRecord(path, {"weights": "w1", "temperature": 0.7}).claim(False, refuse)
    replaced = []
    record = StageRecord(path, {"weights": "w2", "temperature": 0.7}, identity=frozenset({"weights"}))
    record.claim(True, refuse, replaced=replaced.append)
    assert replaced == [{"weights": "w1", "temperature": 0.7}]
    # Going back to a setting that leaves the key out is a change, and an absent key is not a None.
    greedy = StageRecord(path, {"weights": "w2"}, compare_dropped=True, missing="<missing>")
    assert greedy.changes({"weights": "w2", "temperature": 0.7}) == ["temperature: 0.7 -> '<missing>'"]
    assert greedy.changes({"weights": "w2", "top_k": None}) == ["top_k: None -> '<missing>'"]


def test_a_truncated_sampling_record_beside_samples_is_refused_not_resumed(tmp_path):
    (tmp_path / "samples").mkdir()
    pq.write_table(pa.table({"problem_id": ["p"]}), tmp_path / "samples" / "part-0.parquet")
    record = tmp_path / "sampling_settings.json"
    record.write_text('{"beta": 0.4, "alp')
    with pytest.raises(LightReasonerError, match=r"holds samples made with other settings \(its record .* is unreadable"):
        check_sampling_settings(str(record), str(tmp_path / "samples"), {"beta": 0.9})
    assert record.read_text() == '{"beta": 0.4, "alp'  # nothing overwritten
