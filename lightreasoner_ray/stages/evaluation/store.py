"""One evaluated model's predictions on disk: the generation record, the shard files, the merged files.

``<output_dir>/eval/<tag>/`` (an :class:`~lightreasoner_ray.io.layout.EvalModelLayout`)
holds ``generation.json`` (what the predictions depend on), every graded shard as
``<benchmark>/shard-00003.jsonl`` (written atomically: a killed run loses at most the
shards in flight) and, once all shards of a benchmark exist, their concatenation
``<benchmark>.jsonl``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from lightreasoner_ray.core.scoring import PREDICTION_FIELDS, grade_rows
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import EvalModelLayout
from lightreasoner_ray.io.fingerprints import rows_fingerprint
from lightreasoner_ray.io.record import StageRecord, read_record, remove_path
from lightreasoner_ray.stages.evaluation.pool import Shard

logger = logging.getLogger(__name__)

MODEL_FINGERPRINT = "model_fingerprint"
BENCHMARK_ROWS = "benchmark_rows"


def read_jsonl_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file, local or URI; a bad file raises OSError or ValueError (its caller recomputes it)."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def read_finished_shard(path: str, shard: Shard, model_fingerprint: str = "") -> Optional[list[dict[str, Any]]]:
    """The graded rows of a shard written by an earlier run, or None when it must be (re)done.

    With ``model_fingerprint``, rows recorded for other weights (or for none) are redone. Rows
    whose question differs from the shard's (the benchmark file changed) are redone; rows whose
    gold answer differs are regraded against the current one.
    """
    return _finished_shard(path, shard, model_fingerprint)[0]


def _finished_shard(path: str, shard: Shard, model_fingerprint: str = "") -> tuple[Optional[list[dict[str, Any]]], bool]:
    """(rows or None, whether they were regraded)."""
    if not storage.exists(path):
        return None, False
    try:
        rows = read_jsonl_rows(path)
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); recomputing it", path, exc)
        return None, False
    if [str(row.get("id")) for row in rows] != shard.ids or any(set(PREDICTION_FIELDS) - set(row) for row in rows):
        logger.warning("%s does not hold this shard's rows (limit or shard_size changed?); recomputing it", path)
        return None, False
    if model_fingerprint and any(row.get(MODEL_FINGERPRINT) != model_fingerprint for row in rows):
        logger.warning("%s holds predictions of other weights; recomputing it", path)
        return None, False
    # The benchmark rows themselves (eval.data_dir may name another copy): a changed question is
    # another problem, so its prediction is redone; a changed gold answer only needs regrading.
    if any(str(row.get("question")) != str(current["question"]) for row, current in zip(rows, shard.rows)):
        logger.warning("%s was generated for other questions (the benchmark file changed); recomputing it", path)
        return None, False
    if any(str(row.get("answer")) != str(current["answer"]) for row, current in zip(rows, shard.rows)):
        logger.warning("%s was graded against other gold answers (the benchmark file changed); regrading it", path)
        return regrade(shard, rows), True
    return rows, False


def regrade(shard: Shard, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (predictions of ``shard``'s questions) graded again against the shard's gold answers."""
    outputs: list[Any] = []
    for row in rows:
        if "prompt" in row or "outputs" in row:
            output: dict[str, Any] = {"output": row.get("output", ""), "prompt": row.get("prompt", "")}
            if "outputs" in row:
                output["outputs"] = row["outputs"]
            outputs.append(output)
        else:
            outputs.append(row.get("output", ""))
    graded = grade_rows(shard.benchmark, shard.rows, outputs)
    return [{**old, **new} for new, old in zip(graded, rows)]


def check_generation_settings(model_dir: str, settings: dict[str, Any]) -> None:
    """Refuse to mix predictions made with different settings in one directory; start over for new weights.

    ``settings`` holds the evaluated model's ``model_fingerprint`` (of its weights, not
    its path: see :func:`lightreasoner_ray.io.fingerprints.weights_fingerprint`). When that
    differs from the recorded one (the model at that path was retrained, or the record
    predates fingerprints) the directory's predictions are discarded and the model is
    evaluated afresh; a change of any generation setting is refused instead.
    """
    record = StageRecord(
        EvalModelLayout(model_dir).generation_settings, settings,
        # benchmark_rows: the benchmark rows' fingerprints, for the reader; every prediction row carries its
        # question and gold answer, and PredictionStore.resume checks those row by row.
        informational=frozenset({"model_path", BENCHMARK_ROWS}), identity=frozenset({MODEL_FINGERPRINT}),
        # Greedy decoding leaves the sampling keys out, so going back to it is a change too.
        compare_dropped=True,
        # Predictions are re-made cheaply: an unreadable record is as good as none.
        unreadable_is_unrecorded=True,
    )

    def refuse(_changes: list[str]) -> LightReasonerError:
        previous = record.read() or {}
        changed = sorted(record.changed_keys(previous))
        return LightReasonerError(
            f"{model_dir} holds predictions made with other settings ({', '.join(changed)} differ: "
            f"{ {k: previous.get(k) for k in changed} } then, { {k: settings.get(k) for k in changed} } now); "
            "use another output_dir or model tag, or re-run with `lightreasoner evaluate --restart` "
            "(`run --restart` for the pipeline) to discard them"
        )

    def discard(previous: dict[str, Any]) -> None:
        logger.warning(
            "the model at %s is not the one whose predictions are in %s (weights fingerprint %s then, %s now): "
            "discarding them and evaluating it afresh", settings.get("model_path"), model_dir,
            previous.get(MODEL_FINGERPRINT, "<none recorded>"), settings.get(MODEL_FINGERPRINT),
        )
        remove_path(model_dir)

    # The record sits in the model's directory, so a recorded directory counts as holding predictions.
    # One without a record (an older version's) needs no check: its rows carry no fingerprint and are redone.
    record.claim(storage.exists(model_dir), refuse, unrecorded=lambda: None, replaced=discard)


class PredictionStore:
    """One model's shard files; concatenates a benchmark as soon as all its shards are in.

    Every row records the ``model_fingerprint`` of the weights that produced it;
    :meth:`resume` keeps only shards whose rows all carry the current one.
    """

    def __init__(self, model_dir: str, shards: dict[str, list[Shard]], model_fingerprint: str = "") -> None:
        self.model_dir = model_dir
        self.layout = EvalModelLayout(model_dir)
        self.shards = shards
        self.model_fingerprint = model_fingerprint
        self.rows: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in shards}

    def resume(self) -> list[Shard]:
        """Load shards finished earlier; return the ones still to do."""
        todo = []
        for name, shards in self.shards.items():
            directory = self.layout.shards(name)
            if storage.remove_stale_temporaries(directory):
                logger.info("removed partial files an interrupted run left in %s", directory)
            for shard in shards:
                path = self.layout.shard(name, shard.index)
                rows, regraded = _finished_shard(path, shard, self.model_fingerprint)
                if rows is None:
                    todo.append(shard)
                    continue
                if regraded:
                    storage.write_bytes_atomic(path, _jsonl_bytes(rows))  # keep the new grades
                self.rows[name][shard.index] = rows
            if len(self.rows[name]) == len(shards):
                self._merge(name)
        self._record_benchmark_rows()
        return todo

    def _record_benchmark_rows(self) -> None:
        """Note in ``generation.json`` which benchmark rows (ids, questions, gold answers) the predictions are of."""
        path = self.layout.generation_settings
        record = read_record(path)
        if record is None:
            return
        rows = {name: rows_fingerprint(row for shard in shards for row in shard.rows)
                for name, shards in self.shards.items()}
        if record.get(BENCHMARK_ROWS) != {**(record.get(BENCHMARK_ROWS) or {}), **rows}:
            storage.write_json_atomic(path, {**record, BENCHMARK_ROWS: {**(record.get(BENCHMARK_ROWS) or {}), **rows}})

    def add(self, shard: Shard, rows: list[dict[str, Any]]) -> None:
        if self.model_fingerprint:
            rows = [{**row, MODEL_FINGERPRINT: self.model_fingerprint} for row in rows]
        storage.write_bytes_atomic(self.layout.shard(shard.benchmark, shard.index), _jsonl_bytes(rows))
        self.rows[shard.benchmark][shard.index] = rows
        if len(self.rows[shard.benchmark]) == len(self.shards[shard.benchmark]):
            self._merge(shard.benchmark)

    def _merge(self, benchmark: str) -> None:
        rows = self.benchmark_rows(benchmark)
        storage.write_bytes_atomic(self.layout.predictions(benchmark), _jsonl_bytes(rows))
        logger.info("%s: %d predictions in %s", benchmark, len(rows), self.layout.predictions(benchmark))

    def benchmark_rows(self, benchmark: str) -> list[dict[str, Any]]:
        finished = self.rows[benchmark]
        return [row for index in sorted(finished) for row in finished[index]]
