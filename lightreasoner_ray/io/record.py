"""What made an artefact (its stage record: settings and input fingerprints) and the refusals built on it.

Every stage resumes from what ``output_dir`` holds, so every artefact records what
made it and a re-run with other inputs is refused (or, asked with ``--restart``,
started over) instead of mixing old and new work:

- samples: ``sampling_settings.json`` (the models' weight fingerprints and the
  sampling settings);
- checkpoints: ``<output_dir>/checkpoints/provenance.json`` (training's
  provenance: the samples' content, the expert's weights and the
  ``train.*`` settings that shape the result);
- the published model: ``<output_dir>/model/provenance.json`` (the same record and
  the update it holds), written inside the directory before it is published;
- predictions: the evaluated model's weights fingerprint in every prediction row and in
  ``generation.json``;
- rejection sampling: ``rejection_sft/rejection_settings.json`` (as samples), and the problem
  set's fingerprint in ``rejection_summary.json`` (a finished stage over it is reused whole);
- rounds: ``round_done.json`` (a round that finished with these settings is skipped whole);
- the demo: ``demo_settings.json`` (its whole output_dir: other settings are refused).

Every stage claims its record through :class:`StageRecord` (training's provenance is
:class:`lightreasoner_ray.stages.training.provenance.TrainingProvenance`, which compares itself); every path is named by :class:`~lightreasoner_ray.io.layout.RunLayout`,
and the fingerprints are made by :mod:`lightreasoner_ray.io.fingerprints`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lightreasoner_ray.config import redact_tree
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage

logger = logging.getLogger(__name__)


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


def added_at_default(key: str, recorded: Mapping[str, Any], value: Any, defaults: Mapping[str, Any]) -> bool:
    """Whether ``key``, absent from an older ``recorded``, holds its default ``value`` now: a setting
    added since the record was written, left as the older version behaved."""
    return key not in recorded and key in defaults and value == defaults[key]


@dataclass
class StageRecord:
    """What one stage's outputs were made from, kept as JSON beside them, and the rule for a re-run.

    ``settings`` holds everything that decides the stage's result: its settings and the
    fingerprints of its inputs (weights, samples, problems, benchmark rows). Keys in
    ``informational`` are written for the reader (a model's path, when its weights'
    fingerprint identifies it) and never compared: the keys that may change on resume are
    these, and what a stage leaves out of ``settings`` (training's resumable ``train.*`` keys).
    Every stage claims its
    record before it resumes: with no outputs yet the record is (re)written, since
    nothing could be mixed; with outputs and the same inputs the stage resumes; with
    outputs and other inputs :meth:`claim` raises the stage's refusal, which names what
    changed and the two ways out (a new output_dir, or ``--restart``).

    Keys in ``identity`` name the input itself (the evaluated model's weights): when one
    changes, the outputs are of another input, neither resumed nor refused; :meth:`claim`
    hands them to its ``replaced`` callback (which discards them) and records the new
    inputs. With ``compare_dropped``, a key only the record holds is compared too (for
    settings that leave a key out at its default value); ``missing`` is what an absent key
    compares as. A record that exists but cannot be read is refused like a changed one, unless
    ``unreadable_is_unrecorded`` (outputs that are cheap to redo).
    """

    path: str
    settings: dict[str, Any]
    informational: frozenset[str] = frozenset()
    identity: frozenset[str] = frozenset()
    compare_dropped: bool = False
    missing: Any = None
    # Keys added to the record by a later version: a record written before them (an older
    # output_dir) lacks them and still resumes, unchecked on those keys (logged); the record is
    # then rewritten with the current values, so later runs compare them.
    added: frozenset[str] = frozenset()
    # Every setting's default: a key an older record lacks is unchanged while the current value is
    # its default (a setting added by a later version, left as the older version behaved).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    unreadable_is_unrecorded: bool = False
    # How a refusal names one change (the demo lists the changed keys alone).
    describe: Callable[[str, Any, Any], str] = describe_change
    # A record with structure of its own (training's provenance) compares itself: (recorded) -> changes.
    compare: Optional[Callable[[dict[str, Any]], list[str]]] = None

    def __post_init__(self) -> None:
        # Never a URI's password in a record: settings are compared as recorded, redacted.
        self.settings = redact_tree(self.settings)

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
        return [key for key in keys if key not in self.informational | self.identity]

    def changed_keys(self, recorded: dict[str, Any]) -> list[str]:
        recorded = redact_tree(recorded)  # a record written before redaction still matches
        return [key for key in self.compared_keys(recorded)
                if not (key in self.added and key not in recorded)
                and not added_at_default(key, recorded, self.settings.get(key, self.missing), self.defaults)
                and recorded.get(key, self.missing) != self.settings.get(key, self.missing)]

    def unrecorded_added_keys(self, recorded: dict[str, Any]) -> list[str]:
        """The ``added`` keys an older ``recorded`` lacks (not checked this once)."""
        return sorted(key for key in self.added if key in self.settings and key not in recorded)

    def changes(self, recorded: dict[str, Any]) -> list[str]:
        """What differs from ``recorded`` (``describe`` phrases; empty when nothing does). ``recorded``
        is compared redacted, as :attr:`settings` are: a record written before redaction existed
        (a URI's password in it) still matches, and no refusal repeats its password."""
        recorded = redact_tree(recorded)
        if self.compare is not None:
            return self.compare(recorded)
        return [self.describe(key, recorded.get(key, self.missing), self.settings.get(key, self.missing))
                for key in self.changed_keys(recorded)]

    def claim(self, has_outputs: bool, refuse: Callable[[list[str]], Exception], *,
              unrecorded: Optional[Callable[[], None]] = None,
              replaced: Optional[Callable[[dict[str, Any]], None]] = None) -> Optional[dict[str, Any]]:
        """Record these inputs, or refuse to resume outputs made from others; returns the earlier record.

        ``unrecorded`` handles outputs without a record (an older version's run): by default the
        record is written and the stage resumes unchecked, with a warning. ``replaced`` (needed
        with ``identity`` keys) gets the earlier record when an identity key changed.
        """
        recorded = self.read()
        if has_outputs and recorded is None and not self.unreadable_is_unrecorded and storage.exists(self.path):
            raise refuse([f"its record {self.path} is unreadable, so nothing says what they were made from"])
        if has_outputs and recorded is None:
            if unrecorded is not None:
                unrecorded()
            else:
                logger.warning("%s has outputs but no record; resuming without checking what made them", self.path)
        elif has_outputs:
            changes = self.changes(recorded)
            if changes:
                raise refuse(changes)
            redacted = redact_tree(recorded)
            if any(redacted.get(key) != self.settings.get(key) for key in self.identity):
                if replaced is None:
                    raise ValueError(f"{self.path}: a record with identity keys needs a replaced callback")
                replaced(recorded)
                self.write()
                return recorded
            unchecked = self.unrecorded_added_keys(recorded)
            if unchecked:
                logger.warning("%s predates the record of %s: resuming without checking them, and recording "
                               "their current values from now on", self.path, ", ".join(unchecked))
            # Settings added since, at their defaults: recorded from now on.
            newer = any(added_at_default(key, redacted, value, self.defaults) for key, value in self.settings.items())
            # An informational key that changed is rewritten too: the record tells the reader the current value.
            informational_changed = any(redacted.get(key) != self.settings.get(key) for key in self.informational)
            if unchecked or newer or informational_changed or redacted != recorded:  # (rewritten redacted: no password stays on disk)
                self.write()
            return recorded
        self.write()
        return recorded
