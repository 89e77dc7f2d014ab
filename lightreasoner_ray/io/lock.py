"""One writer per output_dir: the lock a command holds while it writes there.

Two runs writing one output_dir would mix their samples, delete each other's in-flight
temporaries and share one Ray Train run. Every command that writes (sample, train, evaluate,
run, export, demo) holds :class:`OutputDirLock` for its whole life; a second one refuses at
once, naming the holder (host, pid, command, start time). Read-only commands (inspect,
compare) take no lock.

Local (and shared-filesystem) output_dirs: ``<output_dir>/.lightreasoner.lock`` is locked
with ``fcntl.flock`` and holds a JSON record of its holder. The kernel releases the lock
when the holder's process ends however it ends (SIGKILL, OOM, a lost node), so a lock left
by a dead process is simply taken over; the stale record is then overwritten. On NFS,
``flock`` is honoured across clients only with NFSv4 (or v3 with lockd); on a filesystem
that does not support it, taking the lock fails with a message saying so.

URI output_dirs (``s3://``, ``gs://``): object stores have no lock, so the record is written
as an object only when none is there and removed when the command ends. The check and the
write are two requests (two runs started in the same instant could both pass), and a
record left by a killed run stays until removed: the refusal names the object to delete
once its holder is known to be gone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.record import remove_path

logger = logging.getLogger(__name__)


def _holder(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}


def _describe(holder: Optional[dict[str, Any]]) -> str:
    if not holder:
        return "another process (its holder record is unreadable)"
    return (f"`lightreasoner {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, since {holder.get('started', '?')})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """Exclusive use of ``output_dir`` by one command; a context manager (or :meth:`acquire` /
    :meth:`release`). Raises :class:`LightReasonerError` when another process holds it."""

    def __init__(self, output_dir: str, command: str) -> None:
        self.output_dir = output_dir
        self.command = command
        self.path = RunLayout(output_dir).lock
        self._fd: Optional[int] = None
        self._holder: Optional[dict[str, Any]] = None

    # ---- local: flock + holder record
    def _acquire_local(self) -> None:
        import fcntl

        Path(self.output_dir).expanduser().mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(self.path).expanduser(), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read_local(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                extra = ""
                if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                        and not _pid_alive(holder["pid"]):
                    extra = " (that pid has exited, but a process it started still holds the lock: stop it first)"
                raise LightReasonerError(
                    f"output_dir {self.output_dir} is in use by {_describe(holder)}{extra}; two runs writing one "
                    f"output_dir would mix their outputs. Wait for it to finish, or use another output_dir "
                    f"(lock: {self.path})"
                ) from None
            raise LightReasonerError(
                f"output_dir {self.output_dir}: cannot lock {self.path} ({exc.strerror or exc}); the filesystem may "
                "not support file locks (use a local or NFSv4 path)"
            ) from None
        previous = self._read_local(fd)
        if previous and previous.get("pid") != os.getpid():
            logger.info("took over the output_dir lock left by %s, which has ended", _describe(previous))
        self._holder = _holder(self.command)
        data = (json.dumps(self._holder) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _read_local(fd: int) -> Optional[dict[str, Any]]:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            record = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # ---- URI: a holder object written only when none is there
    def _acquire_uri(self) -> None:
        existing = self._read_uri()
        if storage.exists(self.path):
            raise LightReasonerError(
                f"output_dir {self.output_dir} is in use by {_describe(existing)}; two runs writing one output_dir "
                f"would mix their outputs. Wait for it to finish, or use another output_dir; if that run is known "
                f"to be gone (killed), delete {self.path} and re-run"
            )
        self._holder = _holder(self.command)
        storage.make_dirs(self.output_dir)
        storage.write_json_atomic(self.path, self._holder)
        if (self._read_uri() or {}).get("token") != self._holder["token"]:
            self._holder = None
            raise LightReasonerError(f"output_dir {self.output_dir}: another run took the lock {self.path} at the "
                                     "same moment; use another output_dir")

    def _read_uri(self) -> Optional[dict[str, Any]]:
        try:
            record = storage.read_json(self.path)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # ---- public
    def acquire(self) -> "OutputDirLock":
        if storage.is_uri(self.output_dir):
            self._acquire_uri()
        else:
            self._acquire_local()
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)  # no holder any more; the file itself stays (others may have it open)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        elif self._holder is not None:
            if (self._read_uri() or {}).get("token") == self._holder["token"]:
                remove_path(self.path)
            self._holder = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_holder(output_dir: str) -> Optional[dict[str, Any]]:
    """The current holder record of ``output_dir``'s lock (None when none is recorded)."""
    path = RunLayout(output_dir).lock
    try:
        record = storage.read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
