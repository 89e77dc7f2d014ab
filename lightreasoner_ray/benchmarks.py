"""Public import path for the benchmarks: ``from lightreasoner_ray.benchmarks import load_benchmark``."""

from lightreasoner_ray.data.benchmarks import *  # noqa: F401,F403
from lightreasoner_ray.data.benchmarks import BENCHMARKS, load_benchmark  # noqa: F401
