"""A quiet console: progress bars and a few lines of what happened; everything else in a log file.

Under :func:`quiet_console` the process's file descriptors 1 and 2 point at
``<output_dir>/logs/<command>-<time>.log``, so whatever Ray forwards from its workers,
DeepSpeed's and Ray's own chatter, library warnings and C-level output land there.
The console keeps what is written to it on purpose: :func:`echo` (stage results,
tables), progress bars drawn on :func:`progress_stream`, and this package's own
log records from the driver process. ``--verbose`` skips all of this: every line is
shown live, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

from lightreasoner_ray.config import redact
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout

PACKAGE_LOGGER = "lightreasoner_ray"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Set (unless already set) for the processes started while quiet: they write to the log
# anyway, and these keep it readable.
QUIET_ENVIRON = {
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_DEDUP_LOGS": "1",
}


@dataclass
class Console:
    out: TextIO  # the terminal's stdout, kept aside while fd 1 writes to the log
    err: TextIO
    log_path: Path


# The process has one terminal; this is where it went while the log file has fds 1 and 2.
_console: Optional[Console] = None


def active_console() -> Optional[Console]:
    return _console


def echo(text: str) -> None:
    """A line meant for the user: on the terminal in quiet mode (and in the log), else on stdout."""
    text = redact(text)
    if _console is None:
        print(text, flush=True)
        return
    _console.out.write(text + "\n")
    _console.out.flush()
    print(text, flush=True)  # fd 1 is the log: keep the results there too


def progress_stream() -> TextIO:
    """Where progress bars go: the terminal, even in quiet mode."""
    return _console.err if _console is not None else sys.stderr


@contextlib.contextmanager
def training_progress(max_steps: int) -> Iterator[Optional[Callable[[dict], None]]]:
    """In quiet mode, a bar of training updates fed with ``train_metrics.jsonl`` rows; else None."""
    if _console is None:
        yield None
        return
    from tqdm.auto import tqdm

    bars: list = []  # drawn at the first update, after the stage's own start-up lines

    def update(row: dict) -> None:
        if not bars:
            bars.append(tqdm(total=max_steps, desc="training updates", unit="update", file=_console.err))
        bar = bars[0]
        bar.n = min(int(row["step"]), max_steps)
        if isinstance(row.get("loss"), (int, float)):
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def log_dir_for(output_dir: str) -> Path:
    """``<output_dir>/logs``; a local temporary directory for an object-store output_dir."""
    if storage.is_uri(output_dir):
        return Path(tempfile.gettempdir(), "lightreasoner-logs")
    return Path(RunLayout(output_dir).logs)


# How many stage functions deep the driver is: `run` and `demo` are 1, the stages they call 2.
_stage_depth: contextvars.ContextVar[int] = contextvars.ContextVar("lightreasoner_stage_depth", default=0)


@contextlib.contextmanager
def stage_scope() -> Iterator[None]:
    """Entered by every stage function (tracking.tracked_stage), so the console knows what is nested."""
    token = _stage_depth.set(_stage_depth.get() + 1)
    try:
        yield
    finally:
        _stage_depth.reset(token)


class _ConsoleFilter(logging.Filter):
    """This package's records from the driver (workers' reach the log through Ray): warnings and errors
    always, INFO from the command itself and not from the stages a pipeline runs (their bars show them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == PACKAGE_LOGGER or record.name.startswith(PACKAGE_LOGGER + ".")):
            return False
        return record.levelno >= logging.WARNING or _stage_depth.get() <= 1


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines never hold a URI's password or token (config.redact)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _ConsoleHandler(logging.StreamHandler):
    """Writes between progress-bar redraws (tqdm.write), so a line never lands inside a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def quiet_console(output_dir: str, command: str, verbose: bool = False, level: str = "INFO") -> Iterator[Optional[Console]]:
    """Send fds 1 and 2 to a log file for the duration; the terminal gets only what is meant for it.

    With ``verbose`` nothing is redirected and every log line is shown. Errors are
    printed in full on the terminal, with the log file to look at, and re-raised.
    """
    global _console
    if verbose or _console is not None:
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
        yield _console
        return

    directory = log_dir_for(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = Console(
        out=os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace"),
        err=os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace"),
        log_path=log_path,
    )
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    # Child processes (Ray's raylet and workers started from here) inherit the log as their
    # stdout/stderr; these keep libraries that read them from adding more noise.
    saved_environ = {name: os.environ.get(name) for name in QUIET_ENVIRON}
    for name, value in QUIET_ENVIRON.items():
        os.environ.setdefault(name, value)

    ray_was_running = _ray_is_running()
    root = logging.getLogger()
    previous_level = root.level
    log_stream = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    file_handler = logging.StreamHandler(log_stream)
    file_handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    console_handler = _ConsoleHandler(console.err)
    console_handler.setFormatter(RedactingFormatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    console_handler.addFilter(_ConsoleFilter())
    console_handler.setLevel(level.upper())
    root.addHandler(file_handler)
    root.addHandler(console_handler)
    # In-process callers (tests, notebooks) may have replaced sys.stdout/sys.stderr with objects that
    # are not fds 1 and 2; send those, and the logging handlers that hold them, to the log as well.
    python_streams = (sys.stdout, sys.stderr)
    repointed = _repoint_stream_handlers(python_streams, log_stream)
    sys.stdout = sys.stderr = log_stream
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    _console = console
    console.err.write(f"lightreasoner {command}: logs in {log_path} (--verbose shows them live)\n")
    try:
        yield console
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)) and not _is_user_error(exc):
            text = "".join(traceback.format_exception(exc))
            sys.stderr.write(text)
            console.err.write(text)
            console.err.write(f"lightreasoner {command}: failed; the full log is {log_path}\n")
        raise
    finally:
        if not ray_was_running and _ray_is_running():
            # Ray started here: stop it while fd 2 is still the log, or the worker lines it has
            # yet to forward would print on the terminal at exit.
            import ray

            ray.shutdown()
        _console = None
        sys.stdout, sys.stderr = python_streams
        for handler, stream in repointed:
            handler.setStream(stream)
        for name, value in saved_environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        logging.captureWarnings(False)
        root.removeHandler(file_handler)
        root.removeHandler(console_handler)
        root.setLevel(previous_level)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        console.out.close()
        console.err.close()
        log_stream.close()


def _repoint_stream_handlers(streams: tuple, target: TextIO) -> list[tuple[logging.StreamHandler, TextIO]]:
    """Point every logging handler that writes to one of ``streams`` at ``target``; return how to undo it."""
    loggers = [logging.getLogger()] + [item for item in logging.Logger.manager.loggerDict.values()
                                       if isinstance(item, logging.Logger)]
    moved = []
    for logger_ in loggers:
        for handler in logger_.handlers:
            if isinstance(handler, logging.StreamHandler) and any(handler.stream is stream for stream in streams):
                try:
                    moved.append((handler, handler.setStream(target)))
                except AttributeError:
                    pass  # logging's last-resort handler reads sys.stderr itself: already the log
    return moved


def _ray_is_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, LightReasonerError)
