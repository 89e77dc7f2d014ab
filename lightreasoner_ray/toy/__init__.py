"""A toy reasoning domain for the CPU demo.

Tiny models trained from scratch learn multi-step arithmetic word problems whose
chain-of-thought solutions end in ``\\boxed{N}``; see :mod:`lightreasoner_ray.toy.domain`.
"""

from lightreasoner_ray.toy.domain import (
    DEFAULT_LEVELS,
    MAX_LEVEL,
    MAX_VALUE,
    Step,
    boxed_answer,
    check_solution,
    corpus_texts,
    generate_problems,
    hasty_answer,
    hasty_solution,
    parse_solution,
    solution_steps,
)

__all__ = [
    "DEFAULT_LEVELS",
    "MAX_LEVEL",
    "MAX_VALUE",
    "Step",
    "boxed_answer",
    "check_solution",
    "corpus_texts",
    "generate_problems",
    "hasty_answer",
    "hasty_solution",
    "parse_solution",
    "solution_steps",
]
