"""Reading JSONL files line by line, the one reader for problems, benchmarks and reference samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from lightreasoner_ray.errors import LightReasonerError


def _not_utf8(path: str | Path, number: int, exc: UnicodeDecodeError) -> LightReasonerError:
    return LightReasonerError(
        f"{path}, line {number}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line); "
        "save the file as UTF-8"
    )


def decode_lines(lines: Iterable[bytes], path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line of ``lines`` (bytes); a line that is not UTF-8 is a
    :class:`LightReasonerError` naming ``path`` and the line."""
    for number, raw in enumerate(lines, start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, number, exc) from None


def utf8_text(data: bytes, path: str | Path) -> str:
    """``data`` decoded as UTF-8, or a :class:`LightReasonerError` naming ``path`` and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise _not_utf8(path, number, UnicodeDecodeError(exc.encoding, exc.object, exc.start - line_start,
                                                         exc.end - line_start, exc.reason)) from None


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line number, value, None)`` for each non-blank line, or ``(line number, None, error)``
    for a line that is not JSON; the caller decides whether a bad line is skipped or fatal.

    A missing or unreadable file, or a line that is not UTF-8, is a :class:`LightReasonerError`
    naming the file (and the line).
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise LightReasonerError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise LightReasonerError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as exc:
        raise LightReasonerError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number, line in decode_lines(handle, path):
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield number, None, f"malformed JSON ({exc.msg} at column {exc.colno})"
