"""Public import path for answer grading: ``from lightreasoner_ray.grading import extract_answer, is_equivalent``."""

from lightreasoner_ray.core.grading import *  # noqa: F401,F403
from lightreasoner_ray.core.grading import extract_answer, is_equivalent  # noqa: F401
