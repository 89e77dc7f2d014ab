"""Writing outputs to a local/shared directory or a cloud URI, atomically.

Local paths: write to a hidden temporary name, then rename (POSIX rename is atomic,
so readers never see half a file); a directory is built under a hidden staging name and
moved into place the same way (:func:`replace_directory`). URIs (``s3://``, ``gs://``):
pyarrow filesystems, whose object uploads only become visible once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from lightreasoner_ray.config import join_path
from lightreasoner_ray.io.local_dirs import replace_directory, staging_path


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
    if is_uri(path):
        filesystem, inner = _filesystem(path)
        with filesystem.open_output_stream(inner) as handle:
            handle.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


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
    return json.loads(read_text(path))


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


def publish_directory(source: str, destination: str, extra_files: Optional[dict[str, bytes]] = None) -> None:
    """Copy a local directory to ``destination`` (local or URI), replacing it whole, with ``extra_files`` added."""
    extra_files = extra_files or {}
    if is_uri(destination):
        from pyarrow import fs

        filesystem, inner = _filesystem(destination)
        filesystem.create_dir(inner, recursive=True)
        fs.copy_files(source, inner, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
        for name, data in extra_files.items():
            write_bytes_atomic(join_path(destination, name), data)
        return
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    shutil.copytree(source, staging)
    for name, data in extra_files.items():
        Path(staging, name).write_bytes(data)
    replace_directory(staging, target)
