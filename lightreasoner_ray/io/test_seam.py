"""The one seam through which tests reach into a running stage (kill a job, fail or poison an update).

Production code marks named points with :func:`reached` (or :func:`altered`, where a test may
substitute a value). Both do nothing unless ``LIGHTREASONER_TEST_HOOKS`` names a hook,
``module:function`` or ``/path/to/file.py:function``; the hook is then called as
``hook(point, **details)`` (``altered`` passes ``value=`` too and uses a non-None return).
Hooks read their own parameters from further ``LIGHTREASONER_TEST_*`` variables.

Points: ``sampling.file_written`` (``files``: Parquet files written so far by this job),
``train.update_started`` (``step``, ``rank``), ``train.micro_batch_loss`` (``step``, ``rank``,
``value``: the micro-batch's summed KL), ``storage.writing`` (``path``, ``temporary``: a local file
half written under its temporary name), ``storage.publish_staged`` (``destination``, ``staging``: a
local publish staged, not yet renamed), ``storage.publish_file_copied`` (``destination``, ``files``:
files uploaded so far by a URI publish), ``export.staged`` (``output``, ``staging``: the merged
model saved, not yet renamed into place).

Processes a cluster started before a test set the variables (Ray Train workers) get them
from the driver: :func:`forwarded_environment` there, :func:`adopt` in the worker.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

HOOKS_ENV = "LIGHTREASONER_TEST_HOOKS"
ENV_PREFIX = "LIGHTREASONER_TEST_"


def reached(point: str, **details: Any) -> None:
    """Tell the test hook, if one is named, that ``point`` is reached."""
    spec = os.environ.get(HOOKS_ENV)
    if spec:
        _hook(spec)(point, **details)


def altered(point: str, value: Any, **details: Any) -> Any:
    """``value``, or what the test hook named (if any) replaces it with at ``point``."""
    spec = os.environ.get(HOOKS_ENV)
    if not spec:
        return value
    replaced = _hook(spec)(point, value=value, **details)
    return value if replaced is None else replaced


def forwarded_environment() -> dict[str, str]:
    """This process's ``LIGHTREASONER_TEST_*`` variables (empty outside tests)."""
    return {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIX)}


def adopt(environment: dict[str, str] | None) -> None:
    """Take the driver's :func:`forwarded_environment` in a worker process."""
    os.environ.update(environment or {})


@functools.lru_cache(maxsize=None)
def _hook(spec: str) -> Callable[..., Any]:
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"{HOOKS_ENV}={spec!r} is not module:function or /path/file.py:function")
    if module_name.endswith(".py"):
        name = "_lightreasoner_test_hooks_" + os.path.basename(module_name)[:-3]
        loader_spec = importlib.util.spec_from_file_location(name, module_name)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"{HOOKS_ENV}={spec!r}: cannot load {module_name}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, function)
