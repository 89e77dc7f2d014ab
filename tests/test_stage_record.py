"""The one stage record: what a stage's outputs were made from, and the rule for a re-run."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert json.loads((tmp_path / "record.json").read_text())["expert"] == "/b"  # the reader sees where it is now
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


def test_keys_added_later_let_an_older_record_resume_and_are_compared_once_recorded(tmp_path):
    from lightreasoner_ray.io.record import StageRecord

    path = str(tmp_path / "record.json")
    Path(path).write_text(json.dumps({"beta": 0.4}))  # written before "dtype" was recorded

    def refuse(changes):
        return LightReasonerError("; ".join(changes))

    StageRecord(path, {"beta": 0.4, "dtype": "float32"}, added=frozenset({"dtype"})).claim(True, refuse)
    assert json.loads(Path(path).read_text()) == {"beta": 0.4, "dtype": "float32"}  # upgraded
    with pytest.raises(LightReasonerError, match="dtype: 'float32' -> 'bfloat16'"):
        StageRecord(path, {"beta": 0.4, "dtype": "bfloat16"}, added=frozenset({"dtype"})).claim(True, refuse)
    # Without ``added`` the same old record is a change (the key compares as missing).
    Path(path).write_text(json.dumps({"beta": 0.4}))
    with pytest.raises(LightReasonerError, match="dtype: None -> 'float32'"):
        StageRecord(path, {"beta": 0.4, "dtype": "float32"}).claim(True, refuse)


def test_a_record_never_holds_a_uri_password_and_still_resumes(tmp_path):
    from lightreasoner_ray.io.record import StageRecord

    path = str(tmp_path / "record.json")
    settings = {"tracking": "postgresql://u:pw-123@db/x", "beta": 0.4}
    StageRecord(path, settings).claim(False, lambda changes: LightReasonerError(str(changes)))
    assert "pw-123" not in Path(path).read_text() and "u:***@db" in Path(path).read_text()
    StageRecord(path, settings).claim(True, lambda changes: LightReasonerError(str(changes)))  # same inputs resume


def test_a_record_written_before_redaction_still_resumes_and_loses_its_password(tmp_path):
    path = tmp_path / "record.json"
    # An older version recorded the URI as given, password and all.
    path.write_text(json.dumps({"tracking": "postgresql://u:pw-123@db/x", "data": "s3://b/x?token=t-9", "beta": 0.4}))
    settings = {"tracking": "postgresql://u:pw-123@db/x", "data": "s3://b/x?token=t-9", "beta": 0.4}
    recorded = StageRecord(str(path), settings).claim(True, refuse)  # same inputs: resumes, no refusal
    assert recorded["beta"] == 0.4
    assert "pw-123" not in path.read_text() and "t-9" not in path.read_text()  # rewritten redacted
    # Another host is still a change, and the refusal does not repeat the old password.
    path.write_text(json.dumps({"tracking": "postgresql://u:pw-123@db/x", "beta": 0.4}))
    with pytest.raises(LightReasonerError, match=r"refused: tracking") as refused:
        StageRecord(str(path), {"tracking": "postgresql://u:pw-123@other/x", "beta": 0.4}).claim(True, refuse)
    assert "pw-123" not in str(refused.value)
    # An identity key recorded with its password is the same input, not a replaced one.
    path.write_text(json.dumps({"model": "s3://u:pw@b/m", "beta": 0.4}))
    replaced = []
    StageRecord(str(path), {"model": "s3://u:pw@b/m", "beta": 0.4}, identity=frozenset({"model"})).claim(
        True, refuse, replaced=replaced.append)
    assert replaced == []


def test_a_setting_added_since_the_record_is_unchanged_at_its_default_and_recorded_from_then_on(tmp_path):
    path = str(tmp_path / "record.json")
    StageRecord(path, {"a": 1}).write()
    record = StageRecord(path, {"a": 1, "new": 0}, defaults={"a": 5, "new": 0})
    assert record.changes({"a": 1}) == []
    record.claim(True, lambda changes: AssertionError(changes))
    assert json.loads((tmp_path / "record.json").read_text()) == {"a": 1, "new": 0}

    (tmp_path / "record.json").write_text(json.dumps({"a": 1}))
    moved = StageRecord(path, {"a": 1, "new": 3}, defaults={"new": 0})
    assert len(moved.changes({"a": 1})) == 1  # away from its default: the older run did not run so
    dropped = StageRecord(path, {"new": 0}, defaults={"a": 1, "new": 0})
    assert dropped.changes({"a": 2}) == []  # a key only the record holds decides nothing (no compare_dropped)
