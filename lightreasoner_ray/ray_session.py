"""Connecting to Ray: the cluster a job was submitted to, else a new local instance."""

from __future__ import annotations

import logging
import os

from lightreasoner_ray.config import RayConfig

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
    from lightreasoner_ray.console import active_console

    if active_console() is not None:
        # Quiet console: Ray Data's per-operator bars would only fill the log file with redraws.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    logger.info("connected to Ray at %s: %g CPUs, %g GPUs", address, resources.get("CPU", 0), resources.get("GPU", 0))
    logger.debug("cluster resources: %s", resources)
