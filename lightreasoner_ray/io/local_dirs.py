"""Replacing a local directory whole, so readers see the old one or the new one and never half of
either (the published model, an export, vLLM's merged-adapter cache, the toy pair). Standard
library only: the engines use it on machines that have no pyarrow."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping, Optional, Union

from lightreasoner_ray.errors import LightReasonerError


def staging_path(target: Union[str, Path]) -> Path:
    """A hidden sibling of ``target`` to build it under: ``.<name>.<hex>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")


def replace_directory(staging: Union[str, Path], target: Union[str, Path], keep_existing: bool = False) -> None:
    """Move the finished local directory ``staging`` to ``target``: readers see the old directory or the new one.

    An existing ``target`` is renamed aside to a hidden ``.<name>.<hex>.old`` sibling, the
    staging directory renamed into its place, and the old one deleted. With ``keep_existing``
    (a cache keyed by content, where whatever is already there holds the same thing) an
    existing non-empty ``target`` is left alone and the rename's OSError propagates.
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(staging)  # the files reach the disk before the rename that makes them the result
    if keep_existing or not target.exists():
        os.replace(staging, target)
        fsync_directory(target.parent)
        return
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, retired)
    os.replace(staging, target)
    fsync_directory(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


def fsync_directory(directory: Union[str, Path]) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Union[str, Path]) -> None:
    """fsync every file under ``root`` and every directory, so a crash after the next rename loses nothing."""
    root = Path(root)
    if root.is_file():
        with root.open("rb") as handle:
            os.fsync(handle.fileno())
        return
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_symlink() or not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(directory)


def remove_leftovers(target: Union[str, Path]) -> list[Path]:
    """Delete what an interrupted :func:`replace_directory` of ``target`` left beside it (its hidden
    ``.<name>.<hex>.tmp`` staging and ``.<name>.<hex>.old`` retired copies); returns them.
    Call it only while holding the output_dir lock: another writer's staging looks the same."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    leftovers = [path for pattern in (f".{target.name}.*.tmp", f".{target.name}.*.old")
                 for path in target.parent.glob(pattern)]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


# ---- where a run may write: not inside Ray's per-job working-directory cache ------------------

OUTPUT_ROOT_ENV = "LIGHTREASONER_OUTPUT_ROOT"
# Ray unpacks a job's `--working-dir` under <temp dir>/session_*/runtime_resources/working_dir_files/...
RAY_RUNTIME_RESOURCES = "runtime_resources"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir(environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> Optional[str]:
    """The Ray job working-directory cache this process runs in (``ray job submit --working-dir``),
    or None: the current directory when it lies under Ray's ``runtime_resources`` directory, or
    when the job's runtime environment names a ``working_dir``."""
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    if RAY_RUNTIME_RESOURCES in Path(cwd).parts:
        return cwd
    raw = environ.get(RAY_JOB_CONFIG_ENV)
    if raw:
        try:
            runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
        except (ValueError, AttributeError):
            return None
        if isinstance(runtime_env, dict) and runtime_env.get("working_dir"):
            return cwd
    return None


def resolve_output_dir(output_dir: str, environ: Optional[Mapping[str, str]] = None,
                       cwd: Optional[str] = None) -> str:
    """``output_dir`` as a run may use it: a relative one inside a Ray job's working-directory
    cache (which Ray deletes when it cleans up its runtime environments) goes under
    ``$LIGHTREASONER_OUTPUT_ROOT`` when that names shared storage, and is refused otherwise."""
    environ = os.environ if environ is None else environ
    if "://" in output_dir or os.path.isabs(os.path.expanduser(output_dir)):
        return output_dir
    working_dir = job_working_dir(environ, cwd)
    if working_dir is None:
        return output_dir
    root = environ.get(OUTPUT_ROOT_ENV, "")
    if root:
        return root.rstrip("/") + "/" + output_dir if "://" in root else os.path.join(root, output_dir)
    raise LightReasonerError(
        f"output_dir={output_dir} is relative, and this is a Ray job whose working directory ({working_dir}) is "
        "Ray's per-job cache, which Ray may delete with everything written into it: set output_dir to an absolute "
        f"path on shared storage (e.g. output_dir=/mnt/shared/runs/x) or a URI (s3://...), or set {OUTPUT_ROOT_ENV} "
        "to a shared directory to hold relative output_dirs"
    )
