"""Reading JSONL files line by line, the one reader for problems and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from lightreasoner_ray.errors import LightReasonerError


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line number, value, None)`` for each non-blank line, or ``(line number, None, error)``
    for a line that is not JSON; the caller decides whether a bad line is skipped or fatal.

    A missing, unreadable or non-UTF-8 file is a :class:`LightReasonerError` naming it.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise LightReasonerError(f"{path}: file not found") from None
    except OSError as exc:
        raise LightReasonerError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield number, None, f"malformed JSON ({exc.msg} at column {exc.colno})"
        except UnicodeDecodeError as exc:
            raise LightReasonerError(f"{path}: not UTF-8 text ({exc.reason})") from None
