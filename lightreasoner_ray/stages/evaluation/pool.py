"""The pool of evaluator actors: shards of benchmark rows in, graded prediction rows out.

``eval.num_actors`` evaluator actors each load the model once. The driver hands the
next queued shard, whatever its benchmark, to whichever actor finishes one (work
pulling: a slow benchmark never idles the pool). Each actor holds at most two shards,
so it never waits for the driver between shards. Every generated shard is graded by a
Ray task (CPU) and handed to the caller as soon as it is graded.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from lightreasoner_ray.config import EvalConfig
from lightreasoner_ray.core.scoring import grade_rows
from lightreasoner_ray.data.prompts import encode_prompt, eval_prompt
from lightreasoner_ray.engines.base import Completion, EngineFactory, EngineSpec
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.ui.console import progress_stream

logger = logging.getLogger(__name__)

# Shards an actor holds at once: one generating, one waiting, so it never idles.
SHARDS_PER_ACTOR = 2


@dataclass(frozen=True)
class Shard:
    benchmark: str
    index: int
    rows: list[dict[str, Any]]

    @property
    def ids(self) -> list[str]:
        return [str(row["id"]) for row in self.rows]


def make_shards(benchmark: str, rows: list[dict[str, Any]], shard_size: int) -> list[Shard]:
    return [
        Shard(benchmark, index, rows[start : start + shard_size])
        for index, start in enumerate(range(0, len(rows), shard_size))
    ]


def interleave(shards_by_benchmark: dict[str, list[Shard]]) -> list[Shard]:
    """Shard 0 of every benchmark, then shard 1 of every benchmark, and so on."""
    queues = [deque(shards) for shards in shards_by_benchmark.values()]
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.popleft())
    return ordered


def group_by_benchmark(shards: list[Shard]) -> dict[str, list[Shard]]:
    grouped: dict[str, list[Shard]] = {}
    for shard in shards:
        grouped.setdefault(shard.benchmark, []).append(shard)
    return grouped


# ---- the actor (plain code; Ray wraps it at run time) -----------------------------------


class Evaluator:
    """One model on this process's device, turning shards of rows into completions."""

    def __init__(
        self, engine_factory: EngineFactory, spec: EngineSpec, system_prompt: str, prompt_style: str = "chat_template"
    ) -> None:
        self.engine_factory = engine_factory
        self.spec = spec
        self.system_prompt = system_prompt
        self.prompt_style = prompt_style
        self.engine: Any = None

    def start(self) -> float:
        """Load the model; returns the seconds it took."""
        started = time.perf_counter()
        self.engine = self.engine_factory(self.spec)
        return time.perf_counter() - started

    def generate(self, rows: list[dict[str, Any]], benchmark: str = "") -> list[dict[str, Any]]:
        """``{"prompt": the exact prompt text, "output": the completion}`` per row, plus
        ``"outputs"`` (all ``spec.n`` completions) when more than one is drawn.

        The whole shard goes to the engine in one call (vLLM batches it continuously).
        """
        if self.engine is None:  # a restarted actor
            self.start()
        tokenizer = self.engine.tokenizer
        texts = [eval_prompt(tokenizer, row, benchmark, self.prompt_style, self.system_prompt) for row in rows]
        outputs = self.engine.generate([encode_prompt(tokenizer, text, self.prompt_style) for text in texts])
        if len(outputs) != len(rows):
            raise LightReasonerError(f"the engine returned {len(outputs)} completions for {len(rows)} prompts")
        generated = []
        for text, output in zip(texts, outputs):
            samples = completion_texts(output)
            if len(samples) != self.spec.n:
                raise LightReasonerError(f"the engine returned {len(samples)} completions for a prompt, not eval.n={self.spec.n}")
            generated.append({"prompt": text, "output": samples[0], **({"outputs": samples} if self.spec.n > 1 else {})})
        return generated


def completion_texts(output: Any) -> list[str]:
    """An engine's answer for one prompt (a text, a Completion, or a list of them) as texts."""
    if isinstance(output, (str, Completion)):
        output = [output]
    return [item.text if isinstance(item, Completion) else str(item) for item in output]


# ---- the Ray pool ---------------------------------------------------------------------


def _ray_get(ray: Any, refs: Any) -> Any:
    """``ray.get`` that re-raises a user-facing error from a task as itself, not wrapped."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LightReasonerError):
            raise LightReasonerError(str(cause)) from None
        raise


def run_pool(
    shards: list[Shard],
    engine_factory: EngineFactory,
    spec: EngineSpec,
    eval_config: EvalConfig,
    on_graded: Callable[[Shard, list[dict[str, Any]]], None],
    description: str = "evaluating",
) -> dict[str, float]:
    """Generate and grade ``shards`` on a pool of evaluator actors; ``on_graded`` gets each result."""
    import ray

    actor_class = ray.remote(Evaluator).options(
        num_cpus=eval_config.cpus_per_actor,
        num_gpus=eval_config.gpus_per_actor,
        max_restarts=1,
        max_task_retries=1,
    )
    grade_task = ray.remote(grade_rows).options(num_cpus=eval_config.grading_cpus)
    _warn_if_unplaceable(ray, eval_config)
    actors: list[Any] = [
        actor_class.remote(engine_factory, spec, eval_config.system_prompt, eval_config.prompt)
        for _ in range(min(eval_config.num_actors, len(shards)))
    ]
    queue = deque(shards)
    starting = {actor.start.remote(): index for index, actor in enumerate(actors)}
    generating: dict[Any, tuple[int, Shard]] = {}
    grading: dict[Any, Shard] = {}
    held = [0] * len(actors)
    load_seconds: list[float] = []

    def hand_out(actor_index: int) -> None:
        shard = queue.popleft()
        rows_ref = ray.put(shard.rows)
        outputs_ref = actors[actor_index].generate.remote(rows_ref, shard.benchmark)
        generating[outputs_ref] = (actor_index, shard)
        grading[grade_task.remote(shard.benchmark, rows_ref, outputs_ref)] = shard
        held[actor_index] += 1

    started = time.perf_counter()
    first_ready = started
    try:
        # Actors join as the cluster places them: a pool larger than the cluster (or an
        # autoscaler still adding nodes) works with the actors it has, never waits for all.
        with tqdm(total=len(shards), desc=description, unit="shard", file=progress_stream()) as progress:
            while generating or grading or (queue and starting):
                (ready,), _ = ray.wait([*starting, *generating, *grading], num_returns=1)
                if ready in starting:
                    actor_index = starting.pop(ready)
                    load_seconds.append(_ray_get(ray, ready))
                    if len(load_seconds) == 1:
                        first_ready = time.perf_counter()
                        logger.info("first evaluator of %s ready after %.1fs", spec.model_path, first_ready - started)
                    for _ in range(SHARDS_PER_ACTOR):
                        if queue:
                            hand_out(actor_index)
                    if held[actor_index] == 0:  # came too late to help
                        ray.kill(actors[actor_index])
                        actors[actor_index] = None
                elif ready in generating:
                    actor_index, _shard = generating.pop(ready)
                    _ray_get(ray, ready)
                    held[actor_index] -= 1
                    if queue:
                        hand_out(actor_index)
                    elif held[actor_index] == 0:
                        # Free its CPUs/GPUs now: grading tasks may be waiting for them.
                        ray.kill(actors[actor_index])
                        actors[actor_index] = None
                else:
                    shard = grading.pop(ready)
                    on_graded(shard, _ray_get(ray, ready))
                    progress.update(1)
    finally:
        for actor in actors:
            if actor is not None:
                ray.kill(actor)
    if queue:
        raise LightReasonerError(f"{len(queue)} shards of {spec.model_path} were left undone: no evaluator actor could start")
    finished = time.perf_counter()
    logger.info("%d of %d evaluator actors started", len(load_seconds), len(actors))
    return {
        "actors": float(len(load_seconds)),
        "load_s": max(load_seconds, default=0.0),
        "generate_and_grade_s": finished - first_ready,
        "total_s": finished - started,
    }


def _warn_if_unplaceable(ray: Any, eval_config: EvalConfig) -> None:
    """A pool nothing in the cluster can host waits for an autoscaler; say so up front."""
    available = ray.cluster_resources()
    for resource, wanted in (("CPU", eval_config.cpus_per_actor), ("GPU", eval_config.gpus_per_actor)):
        if wanted > available.get(resource, 0.0):
            logger.warning(
                "an evaluator actor needs %s %s but the cluster has %s; actors wait until the cluster grows",
                wanted, resource, available.get(resource, 0.0),
            )
