"""What made an artefact (its stage record: settings and input fingerprints) and the refusals built on it.

Every stage resumes from what ``output_dir`` holds, so every artefact records what
made it and a re-run with other inputs is refused (or, asked with ``--restart``,
started over) instead of mixing old and new work:

- samples: ``sampling_settings.json`` (the models' weight fingerprints and the
  sampling settings);
- checkpoints: ``<output_dir>/checkpoints/provenance.json`` (a
  :class:`TrainingProvenance`: the samples' content, the expert's weights and the
  ``train.*`` settings that shape the result);
- the published model: ``<output_dir>/model/provenance.json`` (the same record and
  the update it holds), written inside the directory before it is published;
- predictions: the evaluated model's weights fingerprint in every prediction row and in
  ``generation.json``;
- rejection sampling: ``rejection_sft/rejection_settings.json`` (as samples), and the problem
  set's fingerprint in ``rejection_summary.json`` (a finished stage over it is reused whole);
- rounds: ``round_done.json`` (a round that finished with these settings is skipped whole);
- the demo: ``demo_settings.json`` (its whole output_dir: other settings are refused).

Sampling, rejection sampling, evaluation, rounds and the demo keep theirs as a
:class:`StageRecord`; every path is named by :class:`~lightreasoner_ray.io.layout.RunLayout`,
and the fingerprints are made by :mod:`lightreasoner_ray.io.fingerprints`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lightreasoner_ray.config import flatten_tree
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import PROVENANCE

logger = logging.getLogger(__name__)

PROVENANCE_FILE = PROVENANCE

# train.* keys that may differ between the runs of one output_dir, and why:
# - the step budget and bookkeeping: raising max_steps continues the same run;
# - where the samples are (their content is fingerprinted instead) and resources that do
#   not change the numbers (cpus_per_worker; gradient_checkpointing recomputes the same
#   activations);
# - optimizer settings, which the config sets anew on resume (training.checkpoints.restore_checkpoint), so a
#   lowered lr takes effect from the next update; the metrics log records the lr used.
# Everything else (data order: seed, micro_batch_steps, grad_accum, num_workers,
# steps_per_update; the model: lora.*, deepspeed.*, the device via gpus_per_worker) shapes
# what a checkpoint holds or where its data position points: a change is refused.
# A new train.* key is refused when it changes unless it is listed here.
RESUMABLE_TRAIN_KEYS = frozenset({
    "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_failures",
    "samples", "cpus_per_worker", "gradient_checkpointing",
    "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
})


def shaping_train_settings(config: Any) -> dict[str, Any]:
    """The ``train.*`` settings (and ``expert.dtype``) a checkpoint's content depends on."""
    import dataclasses

    settings = {
        key: value for key, value in flatten_tree(dataclasses.asdict(config.train), "train").items()
        if key.split(".", 1)[1] not in RESUMABLE_TRAIN_KEYS
    }
    settings["expert.dtype"] = config.expert.dtype
    return settings


# ---- records and their comparison -----------------------------------------------------


@dataclass
class TrainingProvenance:
    """What a training run's checkpoints and published model were made from."""

    samples: str  # samples_fingerprint of the training samples
    expert: str  # weights_fingerprint of the expert
    settings: dict[str, Any] = field(default_factory=dict)  # shaping_train_settings
    samples_source: str = ""  # where the samples were (informational)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "samples_source": self.samples_source, "expert": self.expert,
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "TrainingProvenance":
        return cls(samples=str(record.get("samples", "")), expert=str(record.get("expert", "")),
                   settings=dict(record.get("settings") or {}), samples_source=str(record.get("samples_source", "")))

    def changes_from(self, recorded: "TrainingProvenance") -> list[str]:
        """What differs now from ``recorded``, one phrase each (empty when nothing does)."""
        changes = []
        if recorded.samples != self.samples:
            where = f" in {self.samples_source}" if self.samples_source else ""
            changes.append(f"the samples changed{where} (content fingerprint {recorded.samples} -> {self.samples}; "
                           "re-sampled, or other problems or sampling settings?)")
        if recorded.expert != self.expert:
            changes.append(f"the expert's weights changed (fingerprint {recorded.expert} -> {self.expert})")
        for key in sorted(set(recorded.settings) | set(self.settings)):
            before, after = recorded.settings.get(key, "<unset>"), self.settings.get(key, "<unset>")
            if before != after:
                changes.append(f"{key}: {before!r} -> {after!r}")
        return changes


def read_record(path: str) -> Optional[dict[str, Any]]:
    """A JSON record, or None when there is none (or it is unreadable: treated as unknown)."""
    if not storage.exists(path):
        return None
    try:
        record = storage.read_json(path)
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s)", path, exc)
        return None
    return record if isinstance(record, dict) else None


def refusal(artefact: str, changes: list[str], output_dir: str, command: str) -> LightReasonerError:
    """The error for a re-run whose inputs differ from those of what ``output_dir`` holds."""
    return LightReasonerError(
        f"{artefact} came from other inputs: {'; '.join(changes)}. Resuming would mix them. To proceed, "
        f"use a new output_dir, or re-run with `lightreasoner {command} --restart` to discard them and start "
        f"over in {output_dir}."
    )


# ---- starting over --------------------------------------------------------------------


def remove_path(path: str) -> bool:
    """Delete a file or directory tree (local or URI) for ``--restart``; True when something was there.

    A local directory is first renamed to a hidden sibling, so a reader never sees it
    half deleted and an interrupted removal leaves nothing that looks like a result.
    """
    if storage.is_uri(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.NotFound:
            return False
        if info.type == fs.FileType.Directory:
            filesystem.delete_dir(inner)
        else:
            filesystem.delete_file(inner)
        return True
    target = Path(path)
    if target.is_symlink() or target.is_file():
        target.unlink()
        return True
    if not target.exists():
        return False
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.removed")
    os.replace(target, retired)
    shutil.rmtree(retired)
    return True


def restart_stage(stage: str, paths: list[str]) -> None:
    """Remove a stage's artefacts (``--restart``), logging what went."""
    removed = [path for path in paths if remove_path(path)]
    if removed:
        logger.info("--restart: removed the %s stage's earlier outputs: %s", stage, ", ".join(removed))


# ---- the stage record ------------------------------------------------------------------


def describe_change(key: str, before: Any, after: Any) -> str:
    """One phrase per changed input, as every refusal words it: ``key: before -> after``."""
    return f"{key}: {before!r} -> {after!r}"


@dataclass
class StageRecord:
    """What one stage's outputs were made from, kept as JSON beside them, and the rule for a re-run.

    ``settings`` holds everything that decides the stage's result: its settings and the
    fingerprints of its inputs (weights, samples, problems, benchmark rows). Keys in
    ``informational`` are written for the reader (a model's path, when its weights'
    fingerprint identifies it) and never compared; keys in ``resumable`` may change
    between runs of one output_dir (the config wins from then on). Every stage claims its
    record before it resumes: with no outputs yet the record is (re)written, since
    nothing could be mixed; with outputs and the same inputs the stage resumes; with
    outputs and other inputs :meth:`claim` raises the stage's refusal, which names what
    changed and the two ways out (a new output_dir, or ``--restart``).

    Keys in ``identity`` name the input itself (the evaluated model's weights): when one
    changes, the outputs are of another input, neither resumed nor refused; :meth:`claim`
    hands them to its ``replaced`` callback (which discards them) and records the new
    inputs. With ``compare_dropped``, a key only the record holds is compared too (for
    settings that leave a key out at its default value).
    """

    path: str
    settings: dict[str, Any]
    informational: frozenset[str] = frozenset()
    resumable: frozenset[str] = frozenset()
    identity: frozenset[str] = frozenset()
    compare_dropped: bool = False
    # How a refusal names one change (the demo lists the changed keys alone).
    describe: Callable[[str, Any, Any], str] = describe_change
    # A record with structure of its own (training's provenance) compares itself: (recorded) -> changes.
    compare: Optional[Callable[[dict[str, Any]], list[str]]] = None

    def read(self) -> Optional[dict[str, Any]]:
        return read_record(self.path)

    def write(self) -> None:
        storage.write_json_atomic(self.path, self.settings)

    def compared_keys(self, recorded: dict[str, Any]) -> list[str]:
        """The keys that decide the result now (a key the stage no longer records decides nothing,
        unless ``compare_dropped``)."""
        keys = list(self.settings)
        if self.compare_dropped:
            keys += [key for key in recorded if key not in self.settings]
        return [key for key in keys if key not in self.informational | self.resumable | self.identity]

    def changed_keys(self, recorded: dict[str, Any], missing: Any = None) -> list[str]:
        return [key for key in self.compared_keys(recorded)
                if recorded.get(key, missing) != self.settings.get(key, missing)]

    def changes(self, recorded: dict[str, Any], missing: Any = None) -> list[str]:
        """What differs from ``recorded`` (``describe`` phrases; empty when nothing does)."""
        if self.compare is not None:
            return self.compare(recorded)
        return [self.describe(key, recorded.get(key, missing), self.settings.get(key, missing))
                for key in self.changed_keys(recorded, missing)]

    def claim(self, has_outputs: bool, refuse: Callable[[list[str]], Exception], *,
              unrecorded: Optional[Callable[[], None]] = None,
              replaced: Optional[Callable[[dict[str, Any]], None]] = None) -> Optional[dict[str, Any]]:
        """Record these inputs, or refuse to resume outputs made from others; returns the earlier record.

        ``unrecorded`` handles outputs without a record (an older version's run): by default the
        record is written and the stage resumes unchecked, with a warning. ``replaced`` (needed
        with ``identity`` keys) gets the earlier record when an identity key changed.
        """
        recorded = self.read()
        if has_outputs and recorded is None:
            if unrecorded is not None:
                unrecorded()
            else:
                logger.warning("%s has outputs but no record; resuming without checking what made them", self.path)
        elif has_outputs:
            changes = self.changes(recorded)
            if changes:
                raise refuse(changes)
            if any(recorded.get(key) != self.settings.get(key) for key in self.identity):
                if replaced is None:
                    raise ValueError(f"{self.path}: a record with identity keys needs a replaced callback")
                replaced(recorded)
                self.write()
                return recorded
            if self.resumable and any(recorded.get(key) != self.settings.get(key) for key in self.resumable):
                self.write()
            return recorded
        self.write()
        return recorded


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
