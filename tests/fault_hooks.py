"""Faults the tests inject through lightreasoner_ray.io.test_seam: a job killed mid-run, a failing or NaN update.

``LIGHTREASONER_TEST_HOOKS`` names :func:`hook` by this file's path, so it loads in any process
(a ``jobs/*.py`` subprocess, a Ray Train worker) whatever its ``sys.path``; the faults are
chosen by two more variables:

- ``LIGHTREASONER_TEST_KILL_AFTER_FILES=<n>``: the sampling job SIGKILLs itself right after
  writing its n-th Parquet file (a kill mid-run, at a known point);
- ``LIGHTREASONER_TEST_FAULT``: ``fail:<step>:<rank>:<marker file>`` raises once on that rank at
  that update (the marker records that it did); ``nan:<step>`` makes that update's loss NaN.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from lightreasoner_ray.io.test_seam import HOOKS_ENV

HOOKS = f"{Path(__file__).resolve()}:hook"
KILL_AFTER_FILES_ENV = "LIGHTREASONER_TEST_KILL_AFTER_FILES"
FAULT_ENV = "LIGHTREASONER_TEST_FAULT"


def kill_after_files(files: int) -> dict[str, str]:
    """The environment of a job that kills itself after writing ``files`` Parquet files."""
    return {HOOKS_ENV: HOOKS, KILL_AFTER_FILES_ENV: str(files)}


def inject(monkeypatch: Any, fault: str) -> None:
    """Inject ``fault`` (see ``LIGHTREASONER_TEST_FAULT``) into the training runs that follow."""
    parse_fault(fault)
    monkeypatch.setenv(HOOKS_ENV, HOOKS)
    monkeypatch.setenv(FAULT_ENV, fault)


def parse_fault(spec: str) -> tuple[str, int, int, str]:
    """(kind, step, rank, marker) of a ``LIGHTREASONER_TEST_FAULT`` value."""
    parts = spec.split(":", 3)
    if parts[0] == "fail" and len(parts) == 4:
        return "fail", int(parts[1]), int(parts[2]), parts[3]
    if parts[0] == "nan" and len(parts) == 2:
        return "nan", int(parts[1]), 0, ""
    raise ValueError(f"{FAULT_ENV}={spec!r} is not fail:<step>:<rank>:<marker> or nan:<step>")


KILL_AT_ENV = "LIGHTREASONER_TEST_KILL_AT"
FULL_AT_ENV = "LIGHTREASONER_TEST_DISK_FULL_AT"


def kill_at(point: str, times: int = 1) -> dict[str, str]:
    """The environment of a process that SIGKILLs itself the ``times``-th time it reaches ``point``
    (``storage.writing``: a file half written; ``storage.publish_file_copied``; ``export.staged``...)."""
    return {HOOKS_ENV: HOOKS, KILL_AT_ENV: f"{point}:{times}"}


def disk_full_at(point: str) -> dict[str, str]:
    """The environment of a process whose writes fail with ENOSPC at ``point``."""
    return {HOOKS_ENV: HOOKS, FULL_AT_ENV: point}


_reached: dict[str, int] = {}


def hook(point: str, **details: Any) -> Any:
    kill = os.environ.get(KILL_AT_ENV, "")
    if kill and kill.rsplit(":", 1)[0] == point:
        _reached[point] = _reached.get(point, 0) + 1
        if _reached[point] == int(kill.rsplit(":", 1)[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(FULL_AT_ENV) == point:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")
    if point == "sampling.file_written":
        if details["files"] == int(os.environ.get(KILL_AFTER_FILES_ENV, "0")):
            os.kill(os.getpid(), signal.SIGKILL)
        return None
    fault = os.environ.get(FAULT_ENV, "")
    if not fault:
        return None
    kind, step, rank, marker = parse_fault(fault)
    if point == "train.update_started" and kind == "fail" and (details["step"], details["rank"]) == (step, rank):
        if not Path(marker).exists():
            Path(marker).write_text(f"failed once at update {step} on rank {rank}\n")
            raise RuntimeError(f"injected worker failure at update {step} on rank {rank}")
    if point == "train.micro_batch_loss" and kind == "nan" and details["step"] == step:
        return details["value"] * float("nan")
    return None
