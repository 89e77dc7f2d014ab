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
from lightreasoner_ray.io.test_seam import reached
from lightreasoner_ray.stages.ray_helpers import (
    ACTOR_MAX_RESTARTS,
    ACTOR_MAX_TASK_RETRIES,
    raise_worker_error,
    wait_for_placement,
    worker_error,
)
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
        reached("evaluation.actor_loading")
        self.engine = self.engine_factory(self.spec)
        return time.perf_counter() - started

    def generate(self, rows: list[dict[str, Any]], benchmark: str = "") -> list[dict[str, Any]]:
        """``{"prompt": the exact prompt text, "output": the completion}`` per row, plus
        ``"outputs"`` (all ``spec.n`` completions) when more than one is drawn.

        The whole shard goes to the engine in one call (vLLM batches it continuously).
        """
        if self.engine is None:  # a restarted actor
            self.start()
        reached("evaluation.generating", benchmark=benchmark, rows=len(rows))
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

# Fresh actors the pool creates per evaluated model, at least, to replace evaluator actors that
# died (each after Ray's own restarts of it: ACTOR_MAX_RESTARTS); see actor_recreations.
ACTOR_RECREATIONS = 2


def actor_recreations(pool_size: int) -> int:
    """How many fresh actors a pool of ``pool_size`` actors may create, in all, per evaluated model,
    to replace actors that died: one per actor slot, and never fewer than ``ACTOR_RECREATIONS`` (a
    large pool that loses a node loses several actors at once). One more death fails the evaluation."""
    return max(ACTOR_RECREATIONS, pool_size)


class _ActorLost(Exception):
    """An evaluator actor (or its node) died; its shards go back to the queue."""


def _ray_get(ray: Any, refs: Any, stage: str = "evaluation") -> Any:
    """``ray.get`` that raises a dead actor as :class:`_ActorLost` and any other error from a
    worker as its one-line :class:`LightReasonerError`."""
    try:
        return ray.get(refs)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        raise _ActorLost(exc) from exc
    except ray.exceptions.RayError as exc:
        raise_worker_error(exc, stage)
        raise


def run_pool(
    shards: list[Shard],
    engine_factory: EngineFactory,
    spec: EngineSpec,
    eval_config: EvalConfig,
    on_graded: Callable[[Shard, list[dict[str, Any]]], None],
    description: str = "evaluating",
) -> dict[str, float]:
    """Generate and grade ``shards`` on a pool of evaluator actors; ``on_graded`` gets each result.

    An actor that dies is restarted by Ray (``ACTOR_MAX_RESTARTS`` times, its tasks retried);
    past that the pool replaces it with a fresh actor, :func:`actor_recreations` times in all (as many
    as the pool has actors, at least ``ACTOR_RECREATIONS``), and hands its shards out again; one
    more death is a one-line :class:`LightReasonerError`.
    """
    import ray

    actor_class = ray.remote(Evaluator).options(
        num_cpus=eval_config.cpus_per_actor,
        num_gpus=eval_config.gpus_per_actor,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    grade_task = ray.remote(grade_rows).options(num_cpus=eval_config.grading_cpus)
    wait_for_placement("evaluator", eval_config.cpus_per_actor, eval_config.gpus_per_actor)

    def new_actor() -> Any:
        return actor_class.remote(engine_factory, spec, eval_config.system_prompt, eval_config.prompt)

    actors: list[Any] = [new_actor() for _ in range(min(eval_config.num_actors, len(shards)))]
    queue = deque(shards)
    starting = {actor.start.remote(): index for index, actor in enumerate(actors)}
    generating: dict[Any, tuple[int, Shard]] = {}
    grading: dict[Any, Shard] = {}
    grading_of: dict[Any, Any] = {}  # generate ref -> its grading ref
    generated_by: dict[Any, Any] = {}  # grading ref -> its generate ref
    held = [0] * len(actors)
    load_seconds: list[float] = []
    recreated, recreations = 0, actor_recreations(len(actors))

    def hand_out(actor_index: int) -> None:
        shard = queue.popleft()
        rows_ref = ray.put(shard.rows)
        outputs_ref = actors[actor_index].generate.remote(rows_ref, shard.benchmark)
        generating[outputs_ref] = (actor_index, shard)
        grading_ref = grade_task.remote(shard.benchmark, rows_ref, outputs_ref)
        grading[grading_ref] = shard
        grading_of[outputs_ref] = grading_ref
        generated_by[grading_ref] = outputs_ref
        held[actor_index] += 1

    def dispatch() -> None:
        """Hand queued shards to live actors with room; start one where none is alive or starting."""
        for index, actor in enumerate(actors):
            while queue and actor is not None and index not in starting.values() and held[index] < SHARDS_PER_ACTOR:
                hand_out(index)
        if queue and not starting and not any(actor is not None and held[i] for i, actor in enumerate(actors)):
            index = next((i for i, actor in enumerate(actors) if actor is None), None)
            if index is None:
                actors.append(None)
                held.append(0)
                index = len(actors) - 1
            actors[index] = new_actor()
            starting[actors[index].start.remote()] = index

    def replace(actor_index: int, lost: _ActorLost) -> None:
        """Put back every shard the dead actor held; start a fresh actor in its place (bounded)."""
        nonlocal recreated
        for ref, (index, shard) in list(generating.items()):
            if index == actor_index:
                del generating[ref]
                grading_ref = grading_of.pop(ref, None)
                grading.pop(grading_ref, None)
                generated_by.pop(grading_ref, None)
                queue.appendleft(shard)
        for ref, index in list(starting.items()):
            if index == actor_index:
                del starting[ref]
        held[actor_index] = 0
        cause = worker_error(lost.__cause__ or lost, "evaluation")
        reason = str(cause) if cause is not None else str(lost)
        if recreated >= recreations:
            raise LightReasonerError(
                f"evaluation of {spec.model_path}: evaluator actors died {recreated + 1} times (past Ray's "
                f"{ACTOR_MAX_RESTARTS} restarts of each), the last: {reason.removeprefix('evaluation: ')}"
            ) from None
        recreated += 1
        logger.warning("evaluator actor %d died (%s); starting a fresh one (%d of %d)", actor_index, reason,
                       recreated, recreations)
        try:
            ray.kill(actors[actor_index])
        except Exception:  # already gone
            pass
        actors[actor_index] = new_actor()
        starting[actors[actor_index].start.remote()] = actor_index
        dispatch()

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
                    try:
                        load_seconds.append(_ray_get(ray, ready))
                    except _ActorLost as lost:
                        replace(actor_index, lost)
                        continue
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
                    actor_index, _shard = generating[ready]
                    try:
                        _ray_get(ray, ready)
                    except _ActorLost as lost:
                        replace(actor_index, lost)
                        continue
                    del generating[ready]
                    grading_of.pop(ready, None)
                    held[actor_index] -= 1
                    if queue:
                        hand_out(actor_index)
                    elif held[actor_index] == 0:
                        # Free its CPUs/GPUs now: grading tasks may be waiting for them.
                        ray.kill(actors[actor_index])
                        actors[actor_index] = None
                else:
                    shard = grading.pop(ready)
                    outputs_ref = generated_by.pop(ready, None)
                    try:
                        graded = _ray_get(ray, ready)
                    except (_ActorLost, ray.exceptions.ObjectLostError) as lost:
                        # Its generated rows were lost with an actor or a node. While that generate
                        # call is pending, its own failure hands the shard out again; once it has
                        # returned, the shard goes back to the queue here.
                        if outputs_ref not in generating:
                            logger.warning("the generated rows of a %s shard were lost (%s); generating it again",
                                           shard.benchmark, type(lost.__cause__ or lost).__name__)
                            queue.appendleft(shard)
                            dispatch()
                        continue
                    on_graded(shard, graded)
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
