"""Replacing a local directory whole, so readers see the old one or the new one and never half of
either (the published model, an export, vLLM's merged-adapter cache, the toy pair). Standard
library only: the engines use it on machines that have no pyarrow."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Union


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
    if keep_existing or not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
