"""The Ray helpers every stage shares: connecting to the cluster, mapping problems through an actor
pool with Ray Data, writing a dataset's rows to Parquet as they arrive, waiting (a bounded time)
for a cluster able to host an actor, and turning an error from inside a Ray worker into one line.

Failure handling is bounded everywhere: an actor is restarted at most ``ACTOR_MAX_RESTARTS``
times and a task on it retried at most ``ACTOR_MAX_TASK_RETRIES`` times; an actor that no node
of the cluster can host fails the run after ``placement_timeout_s()`` seconds.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Iterator

from lightreasoner_ray.config import RayConfig
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.test_seam import reached
from lightreasoner_ray.ui.console import active_console, progress_stream

logger = logging.getLogger(__name__)


def init_ray(config: RayConfig) -> None:
    """Connect to ``ray.address`` or ``RAY_ADDRESS``; otherwise start local Ray.

    A job started with ``ray job submit`` has RAY_ADDRESS set by Ray; a local run
    starts its own instance (``address="local"``) rather than attaching to whatever
    cluster ``ray start`` last left on this machine.
    """
    import ray

    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": config.num_cpus} if address == "local" and config.num_cpus else {}
    if address == "local":
        kwargs["include_dashboard"] = False if os.environ.get("LIGHTREASONER_NO_DASHBOARD") else None
    ray.init(address=address, log_to_driver=True, **kwargs)
    if active_console() is not None:
        # Quiet console: Ray Data's per-operator bars would only fill the log file with redraws.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    logger.info("connected to Ray at %s: %g CPUs, %g GPUs", address, resources.get("CPU", 0), resources.get("GPU", 0))
    logger.debug("cluster resources: %s", resources)


# Restarts of one actor whose process died (a node lost, a crash, the OOM killer), and retries
# of a task that was running on it. Ray Data's own defaults are unlimited: an actor that dies
# while loading its models would be restarted forever.
ACTOR_MAX_RESTARTS = 1
ACTOR_MAX_TASK_RETRIES = 1
# Fresh actors Ray Data starts in place of one whose constructor raised or that died while loading
# (after its restarts) before it fails the run with that actor's error: none, a load that failed
# would fail again.
ACTOR_INIT_REPLACEMENTS = 0
# How long a stage waits for a cluster with a node able to host one actor (an autoscaler may be
# adding one) before it fails, naming what was asked and what the cluster has.
PLACEMENT_TIMEOUT_S = 600.0
PLACEMENT_TIMEOUT_ENV = "LIGHTREASONER_PLACEMENT_TIMEOUT_S"


def placement_timeout_s() -> float:
    """``PLACEMENT_TIMEOUT_S``, or ``$LIGHTREASONER_PLACEMENT_TIMEOUT_S`` where set."""
    value = os.environ.get(PLACEMENT_TIMEOUT_ENV)
    if not value:
        return PLACEMENT_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise LightReasonerError(f"{PLACEMENT_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def actor_pool_map(items: list[dict[str, Any]], actor_class: type, sampling: Any, constructor_kwargs: dict[str, Any]) -> Any:
    """A Ray Dataset of ``items`` mapped, ``sampling.batch_size`` rows at a time, through a pool of
    ``sampling.num_actors`` ``actor_class`` actors (``sampling.gpus_per_actor``/``cpus_per_actor`` each).

    First waits (bounded) for a node able to host one actor. An actor whose constructor raises
    fails the run at once; one whose process dies is restarted at most ``ACTOR_MAX_RESTARTS`` times.
    """
    import ray
    from ray.data import DataContext

    wait_for_placement(actor_class.__name__, sampling.cpus_per_actor, sampling.gpus_per_actor)
    context = DataContext.get_current()
    context.max_consecutive_actor_init_deaths = ACTOR_INIT_REPLACEMENTS
    context.actor_init_retry_on_errors = False
    hide_ray_data_error_reports()
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * sampling.num_actors)))
    return dataset.map_batches(
        actor_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=sampling.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sampling.num_actors),
        num_gpus=sampling.gpus_per_actor or None,
        num_cpus=sampling.cpus_per_actor,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )


def node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster."""
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def describe_cluster(nodes: list[dict[str, float]]) -> str:
    if not nodes:
        return "no alive node"
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)))
    return (f"{len(nodes)} node(s), {total_cpus:g} CPUs and {total_gpus:g} GPUs in all, the largest "
            f"{largest.get('CPU', 0.0):g} CPUs and {largest.get('GPU', 0.0):g} GPUs")


def placeable(nodes: list[dict[str, float]], cpus: float, gpus: float) -> bool:
    """Whether some node has, in total, ``cpus`` CPUs and ``gpus`` GPUs (one actor's share)."""
    return any(node.get("CPU", 0.0) >= cpus and node.get("GPU", 0.0) >= gpus for node in nodes)


def wait_for_placement(what: str, cpus: float, gpus: float, timeout_s: float | None = None) -> None:
    """Return once some node of the cluster can host one ``what`` actor (``cpus`` CPUs, ``gpus``
    GPUs); meanwhile ask the autoscaler, if any, for such a node. After ``timeout_s`` (default
    :func:`placement_timeout_s`) raise a :class:`LightReasonerError` naming both sides."""
    cpus, gpus = float(cpus or 0), float(gpus or 0)
    nodes = node_resources()
    if placeable(nodes, cpus, gpus):
        return
    timeout_s = placement_timeout_s() if timeout_s is None else timeout_s
    wanted = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    logger.warning("a %s actor needs %g CPUs and %g GPUs on one node, the cluster has %s; waiting up to %gs "
                   "for a node that can host it", what, cpus, gpus, describe_cluster(nodes), timeout_s)
    requested = _request_resources([wanted])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            nodes = node_resources()
            if placeable(nodes, cpus, gpus):
                return
    finally:
        if requested:
            _request_resources([])
    raise LightReasonerError(
        f"no node of the Ray cluster can host a {what} actor after {timeout_s:g}s: it asks for {cpus:g} CPUs and "
        f"{gpus:g} GPUs on one node, the cluster has {describe_cluster(nodes)}; lower the *.gpus_per_actor / "
        "*.cpus_per_actor settings or add such a node"
    )


def _request_resources(bundles: list[dict[str, float]]) -> bool:
    """Ask a cluster's autoscaler for ``bundles`` (no-op without one); whether the request was made."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        return True
    except Exception as exc:  # no autoscaler, or an older one: waiting is all there is
        logger.debug("could not ask the autoscaler for %s: %s", bundles, exc)
        return False


# ---- errors from inside Ray workers ----------------------------------------------------


def _deaths() -> tuple[type, ...]:
    import ray.exceptions

    return (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError)


class _HideFromConsole(logging.Filter):
    """Marks Ray Data's error reports ``hide`` (its console handler drops them, its log file keeps
    them): the stage reports the error in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.hide = True
        return True


def hide_ray_data_error_reports() -> None:
    """Keep Ray Data's tracebacks of a failed dataset off the console (once per process)."""
    data_logger = logging.getLogger("ray.data.exceptions")
    if not any(isinstance(f, _HideFromConsole) for f in data_logger.filters):
        data_logger.addFilter(_HideFromConsole())


def _is_ray_error(exc: BaseException) -> bool:
    import ray.exceptions

    return isinstance(exc, ray.exceptions.RayError)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _actor_death(exc: BaseException) -> str:
    """One line for a dead actor or worker: what died and, where Ray says, why."""
    text = str(exc)
    detail = ""
    for marker in ("Worker exit detail:", "The actor is dead because", "error_message:"):
        if marker in text:
            detail = _first_line(text.split(marker, 1)[1]).split(". ")[0].rstrip(".")
            break
    return f"{_first_line(text).rstrip('.')}{f' ({detail})' if detail else ''}"


def worker_error(exc: BaseException, stage: str) -> LightReasonerError | None:
    """The one-line :class:`LightReasonerError` for an exception raised out of Ray (a task's or
    an actor's, possibly wrapped by Ray Data), or None for one that did not come from Ray.

    A :class:`LightReasonerError` raised in a worker comes back with its own message; another
    exception as ``<stage> failed in a Ray worker: <type>: <its first line>``; a dead actor or
    worker as what Ray says about its death.
    """
    import ray.exceptions

    _DEATHS = _deaths()  # noqa: N806
    seen: set[int] = set()
    current: BaseException | None = exc
    innermost: BaseException | None = None
    came_from_ray = False
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ray.exceptions.RayTaskError):
            came_from_ray = True
            cause = getattr(current, "cause", None)
            if cause is not None and cause is not current:
                current = cause
                continue
        elif _is_ray_error(current):
            came_from_ray = True
        if type(current).__name__ == "SystemException":  # Ray Data's marker of a non-user error: no cause
            break
        innermost = current
        if isinstance(current, (LightReasonerError, *_DEATHS)):
            break
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    if not came_from_ray or innermost is None:
        return None
    logger.debug("%s: error from a Ray worker", stage, exc_info=exc)
    if isinstance(innermost, LightReasonerError):
        return LightReasonerError(_first_line(innermost.args[0] if innermost.args else str(innermost)))
    if getattr(innermost, "actor_init_failed", False):
        # The constructor raised: Ray keeps only its traceback's text, whose last line is "Type: message".
        lines = [line.strip() for line in str(innermost).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        prefix = f"{LightReasonerError.__module__}.{LightReasonerError.__name__}: "
        if last.startswith(prefix):
            return LightReasonerError(last[len(prefix):])
        return LightReasonerError(f"{stage}: an actor failed while loading its model: {last}")
    if isinstance(innermost, _DEATHS):
        return LightReasonerError(f"{stage}: a Ray worker died: {_actor_death(innermost)}; finished work is kept, "
                                  "re-run to resume")
    if _is_ray_error(innermost):
        return LightReasonerError(f"{stage}: Ray failed: {type(innermost).__name__}: {_first_line(str(innermost))}")
    return LightReasonerError(f"{stage} failed in a Ray worker: {type(innermost).__name__}: "
                              f"{_first_line(str(innermost))}")


def raise_worker_error(exc: BaseException, stage: str) -> None:
    """Re-raise ``exc`` as its one-line :func:`worker_error` where it came from Ray (else return)."""
    error = worker_error(exc, stage)
    if error is not None:
        raise error from None


def write_batches(dataset: Any, directory: str, total: int, description: str, rows_per_file: int) -> Iterator[Any]:
    """Write a Ray Dataset's rows to ``directory`` as Parquet files of ``rows_per_file`` rows,
    each atomically (a killed run loses only the rows in flight), with a progress bar;
    yields each table once it is on disk.

    A failure inside a worker is raised as its one-line :func:`worker_error` (the files
    written so far stay: a re-run resumes after them).
    """
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="problem", file=progress_stream()) as progress:
        batches = iter(dataset.iter_batches(batch_size=rows_per_file, batch_format="pyarrow"))
        files = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:
                raise_worker_error(exc, description)
                raise
            files += 1
            storage.write_parquet_atomic(batch, directory, f"part-{uuid.uuid4().hex}.parquet")
            reached("sampling.file_written", files=files)
            progress.update(batch.num_rows)
            yield batch
