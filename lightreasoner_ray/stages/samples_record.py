"""The settings record of a samples directory: LightReasoner's samples and rejection sampling's
solutions are resumed only under the settings (and model weights) they were made with."""

from __future__ import annotations

import logging
from typing import Any

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.record import StageRecord

logger = logging.getLogger(__name__)


def check_sampling_settings(record_path: str, samples_dir: str, settings: dict[str, Any],
                            way_out: str = "re-run with `lightreasoner sample --restart` to discard them and start over",
                            informational: tuple[str, ...] = ("expert", "amateur")) -> None:
    """Record the settings of a new (or still empty) samples directory; refuse to resume one
    holding rows made with others, saying ``way_out``. Keys in ``informational`` (the models'
    paths: their weights' fingerprints identify them) are recorded but never compared.

    The record (``record_path``, the run layout's ``sampling_settings`` or ``rejection_settings``)
    sits beside ``samples/``, which stays a pure Parquet dataset.
    """
    record = StageRecord(record_path, settings, informational=frozenset(informational))
    settings_file = record_path.rstrip("/").rsplit("/", 1)[-1]

    def refuse(changes: list[str]) -> LightReasonerError:
        return LightReasonerError(
            f"{samples_dir} holds samples made with other settings ({'; '.join(changes)}); resuming would mix them. "
            f"Use a new output_dir, or {way_out}."
        )

    record.claim(bool(storage.list_parquet_files(samples_dir)), refuse, unrecorded=lambda: logger.warning(
        "%s has samples but no %s; resuming without checking their settings", samples_dir, settings_file))
