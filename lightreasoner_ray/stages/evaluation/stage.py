"""The evaluation stage: benchmarks scored by a Ray pool of evaluator actors.

For each evaluated model:

1. On the driver, before any Ray work: benchmark names, model paths (and the base
   model of an adapter) and every benchmark row are checked.
2. The rows of all benchmarks are cut into shards of ``eval.shard_size``; shards
   already on disk with the same row ids are kept, the rest are queued.
3. ``eval.num_actors`` evaluator actors each load the model once. The driver hands
   the next queued shard, whatever its benchmark, to whichever actor finishes one
   (work pulling: a slow benchmark never idles the pool). Each actor holds at most
   two shards, so it never waits for the driver between shards.
4. Every generated shard is graded by a Ray task (CPU) and written atomically as
   ``<output_dir>/eval/<tag>/<benchmark>/shard-00003.jsonl``; a killed run loses at
   most the shards in flight. Once all shards of a benchmark exist they are
   concatenated into ``<output_dir>/eval/<tag>/<benchmark>.jsonl``.
5. ``results.json``, ``results.md`` and ``results.png`` go to ``<output_dir>/eval``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.data.benchmarks import BENCHMARKS, load_benchmark
from lightreasoner_ray.config import Config, EvalConfig, join_path
from lightreasoner_ray.engines.base import Completion, EngineFactory, EngineSpec
from lightreasoner_ray.engines.registry import factory_name, resolve_engine_factory
from lightreasoner_ray.engines.hf import check_inference_model
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.ui.prometheus import record_evaluation
from lightreasoner_ray.io.record import PROVENANCE_FILE, read_record, remove_path, restart_stage, weights_fingerprint
from lightreasoner_ray.core.grading import extract_answer, is_equivalent
from lightreasoner_ray.data.prompts import encode_prompt, eval_prompt
from lightreasoner_ray.ui.reports import paper_order, write_reports
from lightreasoner_ray.ui.tracking import metric_name, tracked_stage

logger = logging.getLogger(__name__)

PREDICTION_FIELDS = ("id", "question", "output", "extracted", "answer", "correct")
SETTINGS_FILE = "generation.json"
MODEL_FINGERPRINT = "model_fingerprint"
# generation.json keys that identify the model rather than how it generates.
_MODEL_IDENTITY = frozenset({"model_path", MODEL_FINGERPRINT})
# Shards an actor holds at once: one generating, one waiting, so it never idles.
SHARDS_PER_ACTOR = 2
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class EvalModel:
    tag: str
    path: str


@dataclass(frozen=True)
class Shard:
    benchmark: str
    index: int
    rows: list[dict[str, Any]]

    @property
    def ids(self) -> list[str]:
        return [str(row["id"]) for row in self.rows]


# ---- inputs ---------------------------------------------------------------------------


def parse_model_entry(entry: str) -> EvalModel:
    """``"tag=path"`` or a bare path (the tag is then the directory's basename)."""
    entry = entry.strip()
    tag, separator, path = entry.partition("=")
    if separator and tag.strip() and "/" not in tag:
        tag, path = tag.strip(), path.strip()
    else:
        path = entry
        local = Path(path).expanduser()
        tag = (local.resolve() if local.exists() else Path(path.rstrip("/"))).name
    if not path:
        raise LightReasonerError(f"eval model entry {entry!r} has no path (use tag=path or a path)")
    if not _TAG.fullmatch(tag):
        raise LightReasonerError(
            f"eval model entry {entry!r}: tag {tag!r} must start with a letter or digit and use only "
            "letters, digits, '.', '_', '+', '-' (write the entry as tag=path)"
        )
    return EvalModel(tag=tag, path=path)


def evaluated_models(config: Config) -> list[EvalModel]:
    """``eval.model`` then ``eval.models``; neither set means the expert."""
    entries = ([config.eval.model] if config.eval.model else []) + list(config.eval.models)
    if not entries:
        if not config.expert.path:
            raise LightReasonerError("nothing to evaluate: set eval.model, eval.models or expert.path")
        entries = [config.expert.path]
    models = [parse_model_entry(entry) for entry in entries]
    tags = [model.tag for model in models]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        raise LightReasonerError(
            f"eval models share the tag {repeated[0]!r}; name them apart with tag=path entries in eval.models"
        )
    return models


def check_benchmark_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise LightReasonerError(
            f"unknown benchmark {unknown[0]!r} in eval.benchmarks; known benchmarks: {', '.join(BENCHMARKS)}"
        )


def load_benchmarks(eval_config: EvalConfig) -> dict[str, list[dict[str, Any]]]:
    """Every requested benchmark's rows (``eval.limit`` each), in the requested order."""
    check_benchmark_names(eval_config.benchmarks)
    loaded = {}
    for name in eval_config.benchmarks:
        rows = load_benchmark(name, eval_config.data_dir or None, eval_config.limit)
        if not rows:
            raise LightReasonerError(f"benchmark {name} has no rows (data_dir {eval_config.data_dir or 'default'})")
        loaded[name] = rows
    return loaded


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


# ---- the actor and the grading task (plain code; Ray wraps them at run time) ----------


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


def grade_rows(benchmark: str, rows: list[dict[str, Any]], outputs: list[Any]) -> list[dict[str, Any]]:
    """Prediction rows: the prompt, the completion, the extracted answer and whether it matches the reference.

    ``outputs`` holds :meth:`Evaluator.generate`'s ``{"prompt", "output"}`` dicts, or bare completion texts.
    """
    graded = []
    for row, generated in zip(rows, outputs, strict=True):
        output = generated["output"] if isinstance(generated, dict) else generated
        prediction = {"id": row["id"], "question": row["question"], "output": output, "extracted": "",
                      "answer": row["answer"], "correct": False}
        if isinstance(generated, dict):
            prediction["prompt"] = generated["prompt"]
        try:
            prediction["extracted"] = extract_answer(output, benchmark, row.get("choices"))
            extracted = prediction["extracted"]
            prediction["correct"] = bool(extracted) and is_equivalent(extracted, row["answer"])
            if isinstance(generated, dict) and "outputs" in generated:
                prediction.update(grade_samples(benchmark, row, generated["outputs"]))
        except Exception as exc:  # a grader bug must not sink a long run; the row says what happened
            prediction["grading_error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s row %s: grading failed (%s); graded wrong", benchmark, row["id"], prediction["grading_error"])
        graded.append(prediction)
    return graded


def grade_samples(benchmark: str, row: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """The fields of a row with k sampled completions: each output, its answer and grade, and the majority vote.

    ``output``/``extracted``/``correct`` stay those of the first sample. The majority
    answer is the most frequent non-empty answer, answers counted equal when
    mathematically equivalent; ties go to the answer seen first.
    """
    answers = [extract_answer(output, benchmark, row.get("choices")) for output in outputs]
    corrects = [bool(answer) and is_equivalent(answer, row["answer"]) for answer in answers]
    groups: list[list[int]] = []  # sample indices, one list per distinct answer, in order of first appearance
    for index, answer in enumerate(answers):
        if not answer:
            continue
        for group in groups:
            if is_equivalent(answer, answers[group[0]]):
                group.append(index)
                break
        else:
            groups.append([index])
    majority = max(groups, key=len, default=None)  # max keeps the first of equal counts
    return {
        "outputs": outputs,
        "answers": answers,
        "corrects": corrects,
        "majority": answers[majority[0]] if majority else "",
        "majority_correct": bool(majority) and corrects[majority[0]],
    }


# ---- outputs --------------------------------------------------------------------------


def eval_dir(config: Config) -> str:
    return join_path(config.output_dir, "eval")


def shard_path(model_dir: str, benchmark: str, index: int) -> str:
    return join_path(model_dir, benchmark, f"shard-{index:05d}.jsonl")


def predictions_path(model_dir: str, benchmark: str) -> str:
    return join_path(model_dir, f"{benchmark}.jsonl")


def read_jsonl_rows(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def read_finished_shard(path: str, shard: Shard, model_fingerprint: str = "") -> Optional[list[dict[str, Any]]]:
    """The graded rows of a shard written by an earlier run, or None when it must be (re)done.

    With ``model_fingerprint``, rows recorded for other weights (or for none) are redone.
    """
    if not storage.exists(path):
        return None
    try:
        rows = read_jsonl_rows(path)
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); recomputing it", path, exc)
        return None
    if [str(row.get("id")) for row in rows] != shard.ids or any(set(PREDICTION_FIELDS) - set(row) for row in rows):
        logger.warning("%s does not hold this shard's rows (limit or shard_size changed?); recomputing it", path)
        return None
    if model_fingerprint and any(row.get(MODEL_FINGERPRINT) != model_fingerprint for row in rows):
        logger.warning("%s holds predictions of other weights; recomputing it", path)
        return None
    return rows


def check_generation_settings(model_dir: str, settings: dict[str, Any]) -> None:
    """Refuse to mix predictions made with different settings in one directory; start over for new weights.

    ``settings`` holds the evaluated model's ``model_fingerprint`` (of its weights, not
    its path: see :func:`lightreasoner_ray.io.record.weights_fingerprint`). When that
    differs from the recorded one (the model at that path was retrained, or the record
    predates fingerprints) the directory's predictions are discarded and the model is
    evaluated afresh; a change of any generation setting is refused instead.
    """
    path = join_path(model_dir, SETTINGS_FILE)
    previous = read_record(path)
    if previous is not None:
        compared = (set(previous) | set(settings)) - _MODEL_IDENTITY
        changed = sorted(key for key in compared if previous.get(key) != settings.get(key))
        if changed:
            raise LightReasonerError(
                f"{model_dir} holds predictions made with other settings ({', '.join(changed)} differ: "
                f"{ {k: previous.get(k) for k in changed} } then, { {k: settings.get(k) for k in changed} } now); "
                "use another output_dir or model tag, or re-run with `lightreasoner evaluate --restart` "
                "(`run --restart` for the pipeline) to discard them"
            )
        if previous.get(MODEL_FINGERPRINT) == settings.get(MODEL_FINGERPRINT):
            return
        logger.warning(
            "the model at %s is not the one whose predictions are in %s (weights fingerprint %s then, %s now): "
            "discarding them and evaluating it afresh", settings.get("model_path"), model_dir,
            previous.get(MODEL_FINGERPRINT, "<none recorded>"), settings.get(MODEL_FINGERPRINT),
        )
        remove_path(model_dir)
    storage.write_json_atomic(path, settings)


class PredictionStore:
    """One model's shard files; concatenates a benchmark as soon as all its shards are in.

    Every row records the ``model_fingerprint`` of the weights that produced it;
    :meth:`resume` keeps only shards whose rows all carry the current one.
    """

    def __init__(self, model_dir: str, shards: dict[str, list[Shard]], model_fingerprint: str = "") -> None:
        self.model_dir = model_dir
        self.shards = shards
        self.model_fingerprint = model_fingerprint
        self.rows: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in shards}

    def resume(self) -> list[Shard]:
        """Load shards finished earlier; return the ones still to do."""
        todo = []
        for name, shards in self.shards.items():
            directory = join_path(self.model_dir, name)
            if storage.remove_stale_temporaries(directory):
                logger.info("removed partial files an interrupted run left in %s", directory)
            for shard in shards:
                rows = read_finished_shard(shard_path(self.model_dir, name, shard.index), shard, self.model_fingerprint)
                if rows is None:
                    todo.append(shard)
                else:
                    self.rows[name][shard.index] = rows
            if len(self.rows[name]) == len(shards):
                self._merge(name)
        return todo

    def add(self, shard: Shard, rows: list[dict[str, Any]]) -> None:
        if self.model_fingerprint:
            rows = [{**row, MODEL_FINGERPRINT: self.model_fingerprint} for row in rows]
        storage.write_bytes_atomic(shard_path(self.model_dir, shard.benchmark, shard.index), _jsonl_bytes(rows))
        self.rows[shard.benchmark][shard.index] = rows
        if len(self.rows[shard.benchmark]) == len(self.shards[shard.benchmark]):
            self._merge(shard.benchmark)

    def _merge(self, benchmark: str) -> None:
        rows = self.benchmark_rows(benchmark)
        storage.write_bytes_atomic(predictions_path(self.model_dir, benchmark), _jsonl_bytes(rows))
        logger.info("%s: %d predictions in %s", benchmark, len(rows), predictions_path(self.model_dir, benchmark))

    def benchmark_rows(self, benchmark: str) -> list[dict[str, Any]]:
        finished = self.rows[benchmark]
        return [row for index in sorted(finished) for row in finished[index]]


def score(rows: list[dict[str, Any]], k: int = 1) -> dict[str, Any]:
    """Accuracy (pass@1) over ``rows``; with ``k`` samples a row, pass@k and maj@k beside it.

    With k samples pass@1 is the mean share of correct samples per question (the
    unbiased estimate); pass@k counts a question solved when any sample is right, maj@k
    when the majority answer is. ``correct`` then counts correct samples out of ``n * k``.
    """
    if k == 1:
        correct = sum(bool(row["correct"]) for row in rows)
        return {"accuracy": correct / len(rows) if rows else 0.0, "n": len(rows), "correct": correct}
    sample_grades = [row.get("corrects") or [False] * k for row in rows]  # a grading error grades all wrong
    correct = sum(sum(grades) for grades in sample_grades)
    return {
        "accuracy": sum(sum(grades) / k for grades in sample_grades) / len(rows) if rows else 0.0,
        "n": len(rows),
        "correct": correct,
        "k": k,
        "pass@k": sum(any(grades) for grades in sample_grades) / len(rows) if rows else 0.0,
        "maj@k": sum(bool(row.get("majority_correct")) for row in rows) / len(rows) if rows else 0.0,
    }


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
    from tqdm.auto import tqdm

    from lightreasoner_ray.ui.console import progress_stream

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


# ---- the stage ------------------------------------------------------------------------


def generation_settings(model: EvalModel, config: Config, engine_factory: EngineFactory,
                        model_fingerprint: str = "") -> dict[str, Any]:
    """What a model's predictions depend on; ``model_path`` is informational, the fingerprint identifies it."""
    return {
        "model_path": model.path,
        MODEL_FINGERPRINT: model_fingerprint or weights_fingerprint(model.path),
        "engine": factory_name(engine_factory),
        "max_new_tokens": config.eval.max_new_tokens,
        "system_prompt": config.eval.system_prompt,
        "prompt": config.eval.prompt,
        "dtype": config.expert.dtype,
        **decoding_settings(config.eval),
    }


def decoding_settings(eval_config: EvalConfig) -> dict[str, Any]:
    """Decoding settings; default greedy decoding adds nothing (outputs made before these keys stay valid)."""
    if eval_config.temperature == 0 and eval_config.n == 1:
        return {}
    return {"temperature": eval_config.temperature, "top_p": eval_config.top_p, "n": eval_config.n, "seed": eval_config.seed}


def evaluate_model(
    model: EvalModel,
    config: Config,
    shards_by_benchmark: dict[str, list[Shard]],
    engine_factory: EngineFactory,
) -> dict[str, Any]:
    """Generate and grade every shard of ``model`` not already on disk; score all benchmarks."""
    eval_config = config.eval
    model_dir = join_path(eval_dir(config), model.tag)
    fingerprint = weights_fingerprint(model.path)
    check_generation_settings(model_dir, generation_settings(model, config, engine_factory, fingerprint))
    store = PredictionStore(model_dir, shards_by_benchmark, fingerprint)
    todo = store.resume()
    total_shards = sum(len(shards) for shards in shards_by_benchmark.values())
    logger.info("model %s (%s): %d of %d shards already done", model.tag, model.path, total_shards - len(todo), total_shards)
    timing: dict[str, float] = {}
    if todo:
        from lightreasoner_ray.stages.ray_helpers import init_ray

        init_ray(config.ray)
        spec = EngineSpec(
            model_path=model.path,
            max_new_tokens=eval_config.max_new_tokens,
            batch_size=eval_config.batch_size,
            dtype=config.expert.dtype,
            trust_remote_code=config.expert.trust_remote_code,
            temperature=eval_config.temperature,
            top_p=eval_config.top_p,
            n=eval_config.n,
            seed=eval_config.seed,
            vllm=eval_config.vllm,
        )
        ordered_todo = interleave(_group(todo))
        def on_graded(shard: Shard, rows: list[dict[str, Any]]) -> None:
            store.add(shard, rows)
            record_evaluation(model.tag, shard.benchmark, len(rows), sum(bool(row["correct"]) for row in rows))

        timing = run_pool(ordered_todo, engine_factory, spec, eval_config, on_graded, f"evaluating {model.tag}")
    rows_generated = sum(len(shard.rows) for shard in todo)
    busy_seconds = timing.get("generate_and_grade_s", 0.0)
    scores = {name: score(store.benchmark_rows(name), eval_config.n) for name in paper_order(shards_by_benchmark)}
    trained = read_record(join_path(model.path, PROVENANCE_FILE)) if not storage.is_uri(model.path) else None
    return {
        "path": model.path,
        MODEL_FINGERPRINT: fingerprint,
        "trained_step": (trained or {}).get("step"),
        "benchmarks": scores,
        "average": sum(s["accuracy"] for s in scores.values()) / len(scores),
        "predictions": model_dir,
        "run": {
            "shards_generated": len(todo),
            "shards_resumed": total_shards - len(todo),
            "rows_generated": rows_generated,
            "rows_per_s": rows_generated / busy_seconds if busy_seconds > 0 else 0.0,
            **timing,
        },
    }


def evaluation_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished evaluation: accuracy, correct and n per model and benchmark, and the results files."""
    metrics = {}
    for tag, model in result.get("models", {}).items():
        for benchmark, score in model.get("benchmarks", {}).items():
            for key in ("accuracy", "correct", "n"):
                if isinstance(score.get(key), (int, float)):
                    metrics[metric_name("eval", tag, benchmark, key)] = float(score[key])
        if isinstance(model.get("average"), (int, float)):
            metrics[metric_name("eval", tag, "average")] = float(model["average"])
    return metrics, list(RunLayout(config.output_dir).results.values())


@tracked_stage("evaluate", outputs=evaluation_outputs)
def run_evaluation(config: Config, engine_factory: Optional[EngineFactory] = None, restart: bool = False
                   ) -> dict[str, Any]:
    """Evaluate every model on every benchmark; write predictions and reports; return the results.

    ``engine_factory`` (called with an :class:`EngineSpec` inside each actor) overrides
    ``eval.engine``; it must be importable by, or picklable to, the Ray workers.
    Models load with the expert's ``dtype`` and ``trust_remote_code`` settings.
    All input is checked on the driver before any model loads or Ray starts.
    ``restart`` discards the earlier predictions of the evaluated models' tags (only theirs).
    """
    started = time.time()
    eval_config = config.eval
    factory = engine_factory or resolve_engine_factory(eval_config.engine)
    check_benchmark_names(eval_config.benchmarks)
    models = evaluated_models(config)
    for model in models:
        check_inference_model(model.path, f"eval model {model.tag!r}")
    shards_by_benchmark = {
        name: make_shards(name, rows, eval_config.shard_size) for name, rows in load_benchmarks(eval_config).items()
    }
    if restart:
        restart_stage("evaluate", [join_path(eval_dir(config), model.tag) for model in models])
    results: dict[str, Any] = {
        "benchmarks": paper_order(shards_by_benchmark),
        "models": {model.tag: evaluate_model(model, config, shards_by_benchmark, factory) for model in models},
        "settings": {
            "limit": eval_config.limit,
            "max_new_tokens": eval_config.max_new_tokens,
            "system_prompt": eval_config.system_prompt,
            "engine": factory_name(factory),
            "data_dir": eval_config.data_dir or None,
            "temperature": eval_config.temperature,
            "top_p": eval_config.top_p,
            "n": eval_config.n,
            "seed": eval_config.seed,
        },
        "wall_time_s": time.time() - started,
    }
    paths = write_reports(results, eval_dir(config))
    logger.info("evaluation results: %s, %s, %s", paths["json"], paths["markdown"], paths["chart"])
    return results


def _group(shards: list[Shard]) -> dict[str, list[Shard]]:
    grouped: dict[str, list[Shard]] = {}
    for shard in shards:
        grouped.setdefault(shard.benchmark, []).append(shard)
    return grouped
