"""Experiment tracking: MLflow, TensorBoard and Weights & Biases, one tracked run per stage.

Every stage function (``run_sampling``, ``run_training``, ``run_evaluation``,
``run_pipeline``, ``run_demo``) is wrapped by :func:`tracked_stage`. With
``tracking.backend: none`` (the default) the wrapper calls the stage and nothing
else. Otherwise it opens a run per backend, logs the resolved config as
parameters, the stage's statistics as metrics and its summaries, reports and charts
as artefacts. A stage called while another tracked stage is running (the stages
of ``run`` and ``demo``) becomes a child run: an MLflow nested run, a TensorBoard
sub-directory, a W&B run in the pipeline's group.

Training metrics come from ``<output_dir>/train_metrics.jsonl``, which rank 0
appends per logged update: a thread on the driver follows the file while the
workers train, so only the driver process talks to the tracking service (W&B
offline runs are single-process, and workers need no tracking packages).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from lightreasoner_ray.config import flatten_tree, redact
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import MLFLOW_ARTIFACTS, MLFLOW_DB, TENSORBOARD, WANDB
from lightreasoner_ray.ui.console import stage_scope

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 2.0
# MLflow's limits: 100 parameters and 1000 metrics per batch call, 6000 characters a value.
_PARAM_BATCH, _METRIC_BATCH, _PARAM_CHARS = 100, 1000, 6000

_active_run: contextvars.ContextVar[Optional["TrackedRun"]] = contextvars.ContextVar("lightreasoner_run", default=None)


def metric_name(*parts: str) -> str:
    """A metric key every backend accepts (MLflow allows letters, digits, ``_-./`` and spaces)."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", part) for part in parts if part)


def numeric_leaves(tree: Any, prefix: str) -> dict[str, float]:
    """The finite numbers in a summary, keyed ``prefix/a.b``."""
    values = {}
    for key, value in flatten_tree(tree).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
            values[metric_name(prefix, key)] = float(value)
    return values


# ------------------------------------------------------------------------ backends


class Sink(Protocol):
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int]) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def child(self, name: str, stage: str) -> "Sink": ...
    def finish(self, failed: bool) -> None: ...


class MlflowSink:
    """An MLflow run through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, client: Any, experiment_id: str, name: str, parent_id: Optional[str] = None) -> None:
        self.client = client
        self.experiment_id = experiment_id
        tags = {"mlflow.parentRunId": parent_id} if parent_id else {}
        self.run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    @classmethod
    def open(cls, uri: str, project: str, output_dir: str, name: str) -> "MlflowSink":
        from mlflow.tracking import MlflowClient

        artifact_location = None
        if not uri:
            root = Path(output_dir).resolve()
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{root / MLFLOW_DB}"
            artifact_location = (root / MLFLOW_ARTIFACTS).as_uri()
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(project)
        experiment_id = (
            experiment.experiment_id if experiment is not None
            else client.create_experiment(project, artifact_location=artifact_location)
        )
        logger.info("MLflow: experiment %r at %s", project, redact(uri))
        return cls(client, experiment_id, name)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key[:250], value[:_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + _METRIC_BATCH])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def child(self, name: str, stage: str) -> "MlflowSink":
        return MlflowSink(self.client, self.experiment_id, name, parent_id=self.run_id)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TensorBoardSink:
    """Event files under ``<log dir>/<run>/<child run>``."""

    TEXT_SUFFIXES = (".md", ".json", ".jsonl", ".txt")

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=str(logdir))

    @classmethod
    def open(cls, uri: str, output_dir: str, name: str) -> "TensorBoardSink":
        root = Path(uri) if uri else Path(output_dir, TENSORBOARD)
        logger.info("TensorBoard: event files under %s (tensorboard --logdir %s)", root / name, root)
        return cls(root / name)

    def log_params(self, params: dict[str, str]) -> None:
        table = "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v.replace('|', '/')} |\n" for k, v in params.items())
        self.writer.add_text("config", table, 0)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step or 0)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import matplotlib.image

            image = matplotlib.image.imread(str(path))
            self.writer.add_image(path.name, image[..., :3], 0, dataformats="HWC")
        elif path.suffix in self.TEXT_SUFFIXES and path.stat().st_size < 1_000_000:
            text = path.read_text(encoding="utf-8")
            # Markdown renders as is; anything else as a code block.
            self.writer.add_text(path.name, text if path.suffix == ".md" else "    " + text.replace("\n", "\n    "), 0)

    def child(self, name: str, stage: str) -> "TensorBoardSink":
        return TensorBoardSink(self.logdir / re.sub(r"[^A-Za-z0-9_.\-]", "_", name))

    def finish(self, failed: bool) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run; offline (``WANDB_MODE=offline``) unless an API key or WANDB_MODE says otherwise."""

    def __init__(self, settings: dict[str, Any], name: str, group: str, job_type: str) -> None:
        import wandb

        self.settings = settings
        self.group = group
        self.run = wandb.init(name=name, group=group, job_type=job_type, reinit="create_new", **settings)

    @classmethod
    def open(cls, uri: str, project: str, output_dir: str, name: str, stage: str) -> "WandbSink":
        import wandb

        directory = Path.cwd() if storage.is_uri(output_dir) else Path(output_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        settings: dict[str, Any] = {"project": project, "dir": str(directory), "mode": mode}
        if uri:
            settings["settings"] = wandb.Settings(base_url=uri)
        logger.info("W&B: project %r, %s, run files under %s", project, mode, directory / WANDB)
        return cls(settings, name, group=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", job_type=stage)

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int]) -> None:
        if step is None:
            self.run.summary.update(metrics)
        else:
            self.run.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def child(self, name: str, stage: str) -> "WandbSink":
        return WandbSink(self.settings, name, group=self.group, job_type=stage)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_sinks(tracking: Any, output_dir: str, name: str, stage: str) -> list[Sink]:
    if storage.is_uri(output_dir) and not tracking.uri and set(tracking.backends) & {"mlflow", "tensorboard"}:
        raise LightReasonerError(
            f"output_dir {output_dir} is not a local path, so the default MLflow store and TensorBoard log directory "
            "(under output_dir) cannot be used: set tracking.uri (an MLflow tracking URI or a log directory)"
        )
    sinks: list[Sink] = []
    for backend in tracking.backends:
        if backend == "mlflow":
            sinks.append(MlflowSink.open(tracking.uri, tracking.project, output_dir, name))
        elif backend == "tensorboard":
            sinks.append(TensorBoardSink.open(tracking.uri, output_dir, name))
        elif backend == "wandb":
            sinks.append(WandbSink.open(tracking.uri, tracking.project, output_dir, name, stage))
    return sinks


# ------------------------------------------------------------------------ runs


class TrackedRun:
    """One stage's run on every chosen backend; a tracking failure is logged, never fatal."""

    def __init__(self, name: str, sinks: list[Sink]) -> None:
        self.name = name
        self.sinks = sinks
        self._lock = threading.Lock()

    def _each(self, action: str, call: Callable[[Sink], None]) -> None:
        with self._lock:
            for sink in self.sinks:
                try:
                    call(sink)
                except Exception as exc:  # the work matters more than its tracking
                    logger.warning("tracking (%s) could not %s for run %s: %s", type(sink).__name__, action, self.name, exc)

    def log_params(self, params: dict[str, Any]) -> None:
        # Whatever the caller passed, a URI's password never reaches a tracker.
        text = {key: redact(json.dumps(value) if not isinstance(value, str) else value)
                for key, value in flatten_tree(params).items()}
        self._each("log parameters", lambda sink: sink.log_params(text))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if metrics:
            self._each("log metrics", lambda sink: sink.log_metrics(metrics, step))

    def log_artifacts(self, paths: Iterable[str]) -> None:
        for path in paths:
            if storage.is_uri(path) or not Path(path).is_file():
                continue
            self._each(f"log artefact {path}", lambda sink: sink.log_artifact(Path(path)))

    def child(self, name: str, stage: str) -> "TrackedRun":
        sinks = []
        for sink in self.sinks:
            try:
                sinks.append(sink.child(name, stage))
            except Exception as exc:
                logger.warning("tracking (%s) could not open run %s: %s", type(sink).__name__, name, exc)
        return TrackedRun(name, sinks)

    def finish(self, failed: bool) -> None:
        self._each("finish", lambda sink: sink.finish(failed))


class MetricsFollower:
    """Hands each new row rank 0 appends to ``train_metrics.jsonl`` to ``on_row`` while training runs."""

    def __init__(self, on_row: Callable[[dict[str, Any]], None], path: str, interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.on_row = on_row
        self.path = path
        self.interval_s = interval_s
        self.last_step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="train-metrics-follower", daemon=True)

    def __enter__(self) -> "MetricsFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            text = storage.read_text(self.path) if storage.exists(self.path) else ""
        except OSError:
            return
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or step <= self.last_step:
                continue
            self.on_row(row)
            self.last_step = step


# ------------------------------------------------------------------------ stages


def _run_name(config: Any, stage: str, parent: Optional[TrackedRun]) -> str:
    if parent is None:
        return config.tracking.run_name or stage
    # Children of one pipeline are told apart by their output directories (demo: one per variant).
    return f"{stage}:{Path(config.output_dir).name}"


# A stage's declaration of what it produced: (metrics, artefact files) from (config, result).
StageOutputs = Callable[[Any, Any], tuple[dict[str, float], list[str]]]
# A context the stage runs inside, given (config, tracked run or None): e.g. following training's metrics.
StageFollower = Callable[[Any, Optional["TrackedRun"]], contextlib.AbstractContextManager]


def no_outputs(config: Any, result: Any) -> tuple[dict[str, float], list[str]]:
    return {}, []


def tracked_stage(stage: str, outputs: StageOutputs = no_outputs, follow: Optional[StageFollower] = None) -> Callable:
    """Decorate a stage function ``f(config, ...)`` so that it runs inside a tracked run.

    Each stage declares its own ``outputs`` (the metrics and artefact files logged when it
    finishes) and, optionally, a ``follow`` context it runs inside (training's metrics
    file, followed while the workers write it); tracking knows no stage's files.
    """

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
            parent = _active_run.get()
            if parent is None and not config.tracking.backends:
                with stage_scope(), follow(config, None) if follow else contextlib.nullcontext():
                    return function(config, *args, **kwargs)
            name = _run_name(config, stage, parent)
            if parent is None:
                run = TrackedRun(name, open_sinks(config.tracking, config.output_dir, name, stage))
            else:
                run = parent.child(name, stage)
            token = _active_run.set(run)
            failed = True
            try:
                run.log_params(config.to_dict())
                with stage_scope(), follow(config, run) if follow else contextlib.nullcontext():
                    result = function(config, *args, **kwargs)
                metrics, artefacts = outputs(config, result or {})
                run.log_metrics(metrics)
                run.log_artifacts(artefacts)
                failed = False
                return result
            finally:
                _active_run.reset(token)
                run.finish(failed)

        return wrapper

    return decorate
