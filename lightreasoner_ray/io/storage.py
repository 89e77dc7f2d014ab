"""Writing outputs to a local/shared directory or a cloud URI, atomically and durably.

Local paths: write to a hidden temporary name, fsync it, rename it into place and fsync
the directory (POSIX rename is atomic, so readers never see half a file, and after a
crash or power loss a file under its final name is whole); a directory is built under a
hidden staging name and moved into place the same way (:func:`replace_directory`).
URIs (``s3://``, ``gs://``): pyarrow filesystems, whose object uploads only become visible
once complete. A directory published to a URI (:func:`publish_directory`) is uploaded under
a new version prefix and then named by a small pointer object, ``<destination>/CURRENT``:
readers follow the pointer (:func:`published_directory`) and never see half a model, and
files of an older version never mix with the new one's.

A full disk (``ENOSPC``, a quota) ends in :class:`StorageFullError`, a one-line error
naming the file; the temporary is removed and nothing under a final name is half written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from lightreasoner_ray.config import join_path
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import test_seam
from lightreasoner_ray.io.local_dirs import fsync_directory, remove_leftovers, replace_directory, staging_path

logger = logging.getLogger(__name__)

# The errors that mean "the disk (or the quota, or the file size limit) is full".
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StorageFullError(LightReasonerError, OSError):
    """A write failed for want of space; also an OSError, for code that handles those."""


class UnreadableRecordError(LightReasonerError, ValueError):
    """A JSON file that does not parse (truncated by a kill, or not JSON); also a ValueError."""


def _full(path: str, exc: OSError) -> StorageFullError:
    return StorageFullError(
        f"cannot write {path}: {exc.strerror or 'no space left'} ({errno.errorcode.get(exc.errno, exc.errno)}); free "
        "space (or raise the quota) and re-run: finished work is kept and nothing was left half written"
    )


def is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(path: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(path)


def make_dirs(path: str) -> None:
    if is_uri(path):
        filesystem, inner = _filesystem(path)
        filesystem.create_dir(inner, recursive=True)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all, and stays after a crash."""
    if is_uri(path):
        filesystem, inner = _filesystem(path)
        try:
            with filesystem.open_output_stream(inner) as handle:
                handle.write(data)
        except OSError as exc:
            if exc.errno in _FULL:
                raise _full(path, exc) from None
            raise
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as handle:
            half = len(data) // 2
            handle.write(data[:half])
            handle.flush()
            test_seam.reached("storage.writing", path=str(target), temporary=str(temporary))
            handle.write(data[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        if exc.errno in _FULL:
            raise _full(path, exc) from None
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def write_json_atomic(path: str, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, default=str) + "\n").encode("utf-8"))


def read_bytes(path: str) -> bytes:
    if is_uri(path):
        filesystem, inner = _filesystem(path)
        with filesystem.open_input_stream(inner) as handle:
            return handle.read()
    return Path(path).expanduser().read_bytes()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    """The JSON in ``path``; a file that does not parse raises :class:`UnreadableRecordError` naming it."""
    raw = read_bytes(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        empty = "it is empty" if not raw.strip() else f"not valid JSON: {exc}"
        raise UnreadableRecordError(
            f"{path}: {empty} (truncated by a killed run?); delete it, or re-run the command that wrote it "
            "with --restart"
        ) from None


def exists(path: str) -> bool:
    if is_uri(path):
        from pyarrow import fs

        filesystem, inner = _filesystem(path)
        return filesystem.get_file_info(inner).type != fs.FileType.NotFound
    return Path(path).exists()


def write_parquet_atomic(table: pa.Table, directory: str, name: str) -> str:
    """Write ``table`` as ``directory/name`` so that it appears whole or not at all."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = f"{directory.rstrip('/')}/{name}"
    write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return path


def list_parquet_files(directory: str) -> list[str]:
    """Finished Parquet files in ``directory`` (hidden temporaries excluded), sorted."""
    if is_uri(directory):
        from pyarrow import fs

        filesystem, inner = _filesystem(directory)
        if filesystem.get_file_info(inner).type == fs.FileType.NotFound:
            return []
        infos = filesystem.get_file_info(fs.FileSelector(inner, recursive=False))
        scheme = directory.split("://", 1)[0]
        return sorted(
            f"{scheme}://{info.path}" for info in infos
            if info.base_name.endswith(".parquet") and not info.base_name.startswith(".")
        )
    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted(str(p) for p in path.glob("*.parquet") if not p.name.startswith("."))


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    if is_uri(path):
        filesystem, inner = _filesystem(path)
        return pq.read_table(inner, filesystem=filesystem, columns=columns)
    return pq.read_table(path, columns=columns)


def remove_stale_temporaries(directory: str) -> int:
    """Delete temporaries a killed run left behind; returns how many."""
    if is_uri(directory) or not Path(directory).is_dir():
        return 0
    stale = list(Path(directory).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# ---- publishing a directory (the trained model) ------------------------------------------

POINTER = "CURRENT"


def published_directory(destination: str) -> str:
    """Where the current version of a directory published at ``destination`` is: for a URI, the
    version its ``CURRENT`` pointer names (``destination`` itself when there is no pointer: a
    directory published by an older version); a local path is the directory itself."""
    if not is_uri(destination):
        return destination
    pointer = join_path(destination, POINTER)
    try:
        if not exists(pointer):
            return destination
        version = read_text(pointer).strip()
    except (OSError, ValueError) as exc:  # pyarrow's errors: an unknown scheme, no access
        raise LightReasonerError(f"{destination}: cannot read its {POINTER} pointer: {exc}") from None
    if not version or "/" in version:
        raise LightReasonerError(f"{pointer}: does not name a version (holds {version!r})")
    return join_path(destination, version)


def publish_directory(source: str, destination: str, extra_files: Optional[dict[str, bytes]] = None) -> None:
    """Copy a local directory to ``destination`` (local or URI), replacing it whole, with ``extra_files`` added.

    Local: built under a hidden staging sibling (fsynced), then renamed into place; leftovers of
    an interrupted earlier publish are removed first. URI: uploaded to ``<destination>/v-<time>-<hex>/``,
    then ``<destination>/CURRENT`` is switched to it (one object write: readers see the old version
    or the new, never half of either), then the older versions (and any half-uploaded one a killed
    publish left) are deleted. ``extra_files`` are also written beside ``CURRENT`` once it names the new
    version (so ``<destination>/provenance.json`` always describes the current version).

    Hold the output_dir lock (io.lock) while publishing: the clean-up takes everything but the
    current version for a leftover.
    """
    extra_files = extra_files or {}
    if is_uri(destination):
        _publish_to_uri(source, destination, extra_files)
        return
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in remove_leftovers(target):
        logger.info("removed %s, left by an interrupted publish of %s", leftover.name, target)
    staging = staging_path(target)
    try:
        shutil.copytree(source, staging)
        for name, data in extra_files.items():
            Path(staging, name).write_bytes(data)
        test_seam.reached("storage.publish_staged", destination=str(target), staging=str(staging))
        replace_directory(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in _FULL:
            raise _full(str(target), exc) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish_to_uri(source: str, destination: str, extra_files: dict[str, bytes]) -> None:
    from pyarrow import fs

    filesystem, inner = _filesystem(destination)
    filesystem.create_dir(inner, recursive=True)
    # The extra files at the top describe the current version: none while it changes.
    for name in extra_files:
        path = f"{inner.rstrip('/')}/{name}"
        if filesystem.get_file_info(path).type == fs.FileType.File:
            filesystem.delete_file(path)
    version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    prefix = f"{inner.rstrip('/')}/{version}"
    root = Path(source)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for count, file in enumerate(files, start=1):
        target = f"{prefix}/{file.relative_to(root).as_posix()}"
        filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with file.open("rb") as reader, filesystem.open_output_stream(target) as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
        test_seam.reached("storage.publish_file_copied", destination=destination, files=count)
    for name, data in extra_files.items():
        write_bytes_atomic(join_path(destination, version, name), data)
    write_bytes_atomic(join_path(destination, POINTER), (version + "\n").encode("utf-8"))
    for name, data in extra_files.items():
        write_bytes_atomic(join_path(destination, name), data)
    # Older versions, a killed publish's partial one, and files of a pre-pointer publish.
    keep = {version, POINTER, *extra_files}
    for info in filesystem.get_file_info(fs.FileSelector(inner, recursive=False)):
        if info.base_name in keep:
            continue
        if info.type == fs.FileType.Directory:
            filesystem.delete_dir(info.path)
        else:
            filesystem.delete_file(info.path)
