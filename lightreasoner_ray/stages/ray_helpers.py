"""The Ray helpers every stage shares: connecting to the cluster, mapping problems through an actor
pool with Ray Data, and writing a dataset's rows to Parquet as they arrive."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Iterator

from lightreasoner_ray.config import RayConfig
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


def actor_pool_map(items: list[dict[str, Any]], actor_class: type, sampling: Any, constructor_kwargs: dict[str, Any]) -> Any:
    """A Ray Dataset of ``items`` mapped, ``sampling.batch_size`` rows at a time, through a pool of
    ``sampling.num_actors`` ``actor_class`` actors (``sampling.gpus_per_actor``/``cpus_per_actor`` each)."""
    import ray

    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * sampling.num_actors)))
    return dataset.map_batches(
        actor_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=sampling.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sampling.num_actors),
        num_gpus=sampling.gpus_per_actor or None,
        num_cpus=sampling.cpus_per_actor,
    )


def write_batches(dataset: Any, directory: str, total: int, description: str, rows_per_file: int) -> Iterator[Any]:
    """Write a Ray Dataset's rows to ``directory`` as Parquet files of ``rows_per_file`` rows,
    each atomically (a killed run loses only the rows in flight), with a progress bar;
    yields each table once it is on disk."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="problem", file=progress_stream()) as progress:
        for files, batch in enumerate(dataset.iter_batches(batch_size=rows_per_file, batch_format="pyarrow"), 1):
            storage.write_parquet_atomic(batch, directory, f"part-{uuid.uuid4().hex}.parquet")
            reached("sampling.file_written", files=files)
            progress.update(batch.num_rows)
            yield batch
