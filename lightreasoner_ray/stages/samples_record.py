"""The settings record of a samples directory: LightReasoner's samples and rejection sampling's
solutions are resumed only under the settings (and model weights) they were made with, and
only for problems whose question is the one they were sampled from."""

from __future__ import annotations

import logging
from typing import Any, Optional

from lightreasoner_ray.data.samples import finished_problem_ids
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.record import StageRecord

logger = logging.getLogger(__name__)

# The per-problem fingerprints (problem_id -> hash of its prompt) in the record.
PROBLEMS = "problems"
# Keys an older record lacks (an output_dir written before they were recorded still resumes).
ADDED_KEYS = frozenset({"expert_dtype", "amateur_dtype"})


def check_sampling_settings(record_path: str, samples_dir: str, settings: dict[str, Any],
                            way_out: str = "re-run with `lightreasoner sample --restart` to discard them and start over",
                            informational: tuple[str, ...] = ("expert", "amateur"),
                            problems: Optional[dict[str, str]] = None) -> None:
    """Record the settings of a new (or still empty) samples directory; refuse to resume one
    holding rows made with others, saying ``way_out``. Keys in ``informational`` (the models'
    paths: their weights' fingerprints identify them) are recorded but never compared.

    ``problems`` (``problem_id -> fingerprint`` of the question as prompted, see
    :func:`lightreasoner_ray.io.fingerprints.problem_fingerprints`) is checked against the
    problems already sampled: one whose id is sampled but whose question differs (another
    problem file with colliding ids) is refused, since resuming by id would keep the old
    problem's sample. The record keeps the fingerprint of every problem it has seen. A record
    written before problems were fingerprinted resumes unchecked (logged).

    The record (``record_path``, the run layout's ``sampling_settings`` or ``rejection_settings``)
    sits beside ``samples/``, which stays a pure Parquet dataset.
    """
    if problems is not None:
        settings = {**settings, PROBLEMS: problems}
    record = StageRecord(record_path, settings, informational=frozenset(informational) | {PROBLEMS, "problems_source"},
                         added=ADDED_KEYS & set(settings))
    settings_file = record_path.rstrip("/").rsplit("/", 1)[-1]

    def refuse(changes: list[str]) -> LightReasonerError:
        return LightReasonerError(
            f"{samples_dir} holds samples made with other settings ({'; '.join(changes)}); resuming would mix them. "
            f"Use a new output_dir, or {way_out}."
        )

    has_samples = bool(storage.list_parquet_files(samples_dir))
    recorded = record.claim(has_samples, refuse, unrecorded=lambda: logger.warning(
        "%s has samples but no %s; resuming without checking their settings", samples_dir, settings_file))
    if problems is None or not has_samples or recorded is None:
        return
    before = recorded.get(PROBLEMS)
    if not isinstance(before, dict):
        logger.warning("%s predates per-problem fingerprints: resuming without checking that the sampled problems' "
                       "questions are unchanged", record_path)
        before = {}
    else:
        done = finished_problem_ids(samples_dir)
        changed = sorted(pid for pid in done if pid in problems and pid in before and before[pid] != problems[pid])
        if changed:
            source = (f" (data.problems: {recorded.get('problems_source')!r} -> {settings.get('problems_source')!r})"
                      if recorded.get("problems_source") != settings.get("problems_source") else "")
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise LightReasonerError(
                f"{samples_dir} holds samples of other problems: problem {changed[0]!r}{more} had another question "
                f"when it was sampled{source}; resuming by id would keep the old problems' samples. Use a new "
                f"output_dir, or {way_out}."
            )
    storage.write_json_atomic(record_path, {**recorded, **settings, PROBLEMS: {**before, **problems}})
