"""Rejection-sampling SFT: the expert's own sampled solutions that reach the gold answer.

The usual SFT baseline for reasoning, and the one the paper's efficiency claims are
against. The expert samples ``rejection_sft.samples_per_problem`` solutions to each
problem at ``rejection_sft.temperature`` (Ray Data actors holding one generation
engine each: ``hf``, ``vllm`` or a factory, as the other stages); the grading module
keeps those whose final answer is equivalent to the gold one; the distinct kept
solutions are trained as one-hot labels (:func:`~lightreasoner_ray.data.sample_sets.sft_rows`: KL(onehot || pi)
is next-token cross-entropy) through the same trainer as LightReasoner. Unlike
LightReasoner it needs ground-truth answers.

Outputs, under ``<output_dir>/rejection_sft/``: ``solutions/`` (Parquet, one row per
problem: its k sampled solutions as token ids, their extracted answers and grades),
``samples/`` (the SFT data in the samples schema, one row per kept solution),
``rejection_settings.json``, ``rejection_summary.json``, and the training stage's
``checkpoints/``, ``model/`` and ``train_summary.json``. Sampling resumes problem by
problem, training from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa

from lightreasoner_ray.config import Config
from lightreasoner_ray.core.grading import extract_answer, is_equivalent
from lightreasoner_ray.data.sample_sets import sft_rows, tuned_tokens, write_sample_set
from lightreasoner_ray.data.samples import finished_problem_ids
from lightreasoner_ray.engines.base import EngineSpec
from lightreasoner_ray.engines.hf import check_inference_model
from lightreasoner_ray.engines.registry import resolve_engine_factory
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import settings_fingerprint, weights_fingerprint
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.record import StageRecord, remove_path, restart_stage
from lightreasoner_ray.stages.problem_prompts import prepare_problems
from lightreasoner_ray.stages.ray_helpers import actor_pool_map, init_ray, write_batches
from lightreasoner_ray.stages.samples_record import check_sampling_settings
from lightreasoner_ray.ui.tracking import numeric_leaves, tracked_stage

logger = logging.getLogger(__name__)

SOLUTIONS_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("gold", pa.string()),
        ("solutions", pa.list_(pa.list_(pa.int32()))),
        ("answers", pa.list_(pa.string())),
        ("correct", pa.list_(pa.bool_())),
    ]
)


# ----------------------------------------------------------------------------- pure core


def grade_solutions(texts: Sequence[str], gold: str, grader: str) -> tuple[list[str], list[bool]]:
    """Each sampled solution's extracted answer and whether it is equivalent to ``gold``."""
    answers = []
    for text in texts:
        try:
            answers.append(extract_answer(text, grader))
        except Exception as exc:  # a grader bug must not sink a long run: that solution is dropped
            logger.warning("extracting a sampled solution's answer failed (%s: %s); not kept", type(exc).__name__, exc)
            answers.append("")
    return answers, [answer_matches(answer, gold) for answer in answers]


def answer_matches(answer: str, gold: str) -> bool:
    """Whether an extracted answer is the gold one (a grader failure counts as no)."""
    try:
        return bool(answer) and is_equivalent(answer, gold)
    except Exception as exc:  # as above: one solution dropped, not the run
        logger.warning("grading %r against %r failed (%s: %s); not kept", answer, gold, type(exc).__name__, exc)
        return False


@dataclass(frozen=True)
class RejectionResult:
    rows: list[dict[str, Any]]  # samples-schema rows, one per kept solution
    problems: int  # problems sampled
    sampled: int  # solutions sampled
    correct: int  # of those, with the gold answer
    kept: int  # distinct correct solutions (the SFT data)
    problems_with_a_kept_solution: int


def keep_correct(problem_ids: Sequence[str], prompts: Sequence[Sequence[int]], samples: Sequence[Sequence[Sequence[int]]],
                 corrects: Sequence[Sequence[bool]]) -> RejectionResult:
    """The distinct correct sampled solutions of each problem as one-hot SFT rows (one row per
    kept solution, ``problem_id#j``). An empty completion is never kept."""
    ids, kept_prompts, solutions = [], [], []
    sampled = correct = covered = 0
    for problem_id, prompt, completions, grades in zip(problem_ids, prompts, samples, corrects, strict=True):
        seen: set[tuple[int, ...]] = set()
        for completion, good in zip(completions, grades, strict=True):
            sampled += 1
            if not completion or not good:
                continue
            correct += 1
            if tuple(completion) in seen:
                continue
            seen.add(tuple(completion))
            ids.append(f"{problem_id}#{len(seen) - 1}")
            kept_prompts.append(prompt)
            solutions.append(list(completion))
        covered += bool(seen)
    return RejectionResult(rows=sft_rows(ids, kept_prompts, solutions), problems=len(problem_ids), sampled=sampled,
                           correct=correct, kept=len(solutions), problems_with_a_kept_solution=covered)


# ----------------------------------------------------------------------------- Ray Data actor


class SolutionSampler:
    """One generation engine (the expert alone) on this process's device: samples k
    solutions to each problem of a batch and grades them against its gold answer."""

    def __init__(self, spec: Any, engine: str, grader: str) -> None:
        self.engine = resolve_engine_factory(engine, "rejection_sft.engine")(spec)
        self.grader = grader

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        prompts = batch.column("prompt_ids").to_pylist()
        outputs = self.engine.generate([list(prompt) for prompt in prompts])
        rows = []
        for problem_id, prompt, gold, completions in zip(batch.column("problem_id").to_pylist(), prompts,
                                                         batch.column("answer").to_pylist(), outputs, strict=True):
            answers, correct = grade_solutions([completion.text for completion in completions], gold, self.grader)
            rows.append({"problem_id": problem_id, "prompt_ids": prompt, "gold": gold,
                         "solutions": [completion.token_ids for completion in completions], "answers": answers,
                         "correct": correct})
        logger.info("sampled %d solutions for %d problems in %.2fs", sum(len(r["solutions"]) for r in rows), len(rows),
                    time.perf_counter() - started)
        return pa.Table.from_pylist(rows, schema=SOLUTIONS_SCHEMA)


# ----------------------------------------------------------------------------- stage


def engine_name(config: Config) -> str:
    return config.rejection_sft.engine or config.sampling.engine


def rejection_settings(config: Config) -> dict[str, Any]:
    """What the sampled solutions depend on: a resume must not mix two of these."""
    settings = config.rejection_sft
    return {
        "expert": config.expert.path,  # informational: the fingerprint identifies the weights
        "expert_weights": weights_fingerprint(config.expert.path),
        "samples_per_problem": settings.samples_per_problem,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "system_prompt": config.sampling.system_prompt,
        "grader": settings.grader,
        "answer_field": config.data.answer_field,
        "engine": engine_name(config),
    }


def engine_spec(config: Config) -> Any:
    settings = config.rejection_sft
    return EngineSpec(
        model_path=config.expert.path, max_new_tokens=settings.max_new_tokens, batch_size=config.sampling.batch_size,
        dtype=config.expert.dtype, trust_remote_code=config.expert.trust_remote_code,
        temperature=settings.temperature, top_p=settings.top_p, n=settings.samples_per_problem, seed=settings.seed,
        vllm=settings.vllm,
    )


def rejection_sampling_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of finished rejection sampling: its counts and timing, and its summary."""
    summary = {k: result.get(k) for k in ("counts", "timing")}
    return numeric_leaves(summary, "rejection_sampling"), [RunLayout(config.output_dir).rejection_sft.rejection_summary]


@tracked_stage("rejection_sample", outputs=rejection_sampling_outputs)
def run_rejection_sampling(config: Config, restart: bool = False) -> dict[str, Any]:
    """Sample and grade the solutions of every problem not yet in ``solutions/``, then
    (re)build ``samples/`` from all of them; return (and write) the summary."""
    started = time.time()
    layout = RunLayout(config.output_dir).rejection_sft
    directory, solutions_dir, samples_dir = layout.output_dir, layout.solutions, layout.samples
    engine = engine_name(config)
    if engine != "hf":  # a missing vLLM or a bad factory path fails before any work
        resolve_engine_factory(engine, "rejection_sft.engine")
    problems, info = prepare_problems(config, with_answers=True)
    check_inference_model(config.expert.path, "expert", config.expert.trust_remote_code)
    if restart:
        restart_stage("rejection_sft", [directory])
    storage.make_dirs(solutions_dir)
    storage.remove_stale_temporaries(solutions_dir)
    settings = rejection_settings(config)
    check_sampling_settings(
        layout.rejection_settings, solutions_dir, settings,
        f"delete {directory} (the rejection-sampling SFT baseline's work only; LightReasoner's stays) to sample it "
        "again, or run `lightreasoner run --restart` to start every stage over")
    done = finished_problem_ids(solutions_dir)
    todo = [problem for problem in problems if problem["problem_id"] not in done]
    logger.info("rejection sampling: %d problems, %d already sampled, %d to go", len(problems),
                len(problems) - len(todo), len(todo))
    # The SFT data is built from the solutions of exactly these problems, prompts and gold answers
    # (data.limit may shrink; a corrected gold answer regrades the stored answers): the summary
    # records their fingerprint, so a finished stage over the same problem set is reused whole.
    problem_set = settings_fingerprint({"problems": sorted((p["problem_id"], p["prompt_ids"], p["answer"]) for p in problems)})
    finished = StageRecord(layout.rejection_summary, {"problem_set": problem_set})
    previous = finished.read() if not todo else None
    if previous is not None and not finished.changes(previous) and (
            not previous["counts"]["kept"] or storage.list_parquet_files(samples_dir)):
        # Finished before: nothing new to build. This invocation sampled nothing.
        previous["counts"]["resumed_problems"] = len(problems)
        previous["timing"] = {**previous["timing"], "problems_this_run": 0, "reused": True}
        return previous

    if todo:
        init_ray(config.ray)
        sampling = config.sampling
        dataset = actor_pool_map(todo, SolutionSampler, sampling,
                                 dict(spec=engine_spec(config), engine=engine, grader=config.rejection_sft.grader))
        for _ in write_batches(dataset, solutions_dir, len(todo), "rejection sampling", sampling.rows_per_file):
            pass

    solved = current_solutions(solutions_dir, problems, config.rejection_sft.grader)
    result = keep_correct([row["problem_id"] for row in solved], [row["prompt_ids"] for row in solved],
                          [row["solutions"] for row in solved], [row["correct"] for row in solved])
    if result.rows:
        write_sample_set(result.rows, samples_dir)
    else:  # no SFT data: nothing of an earlier problem set may stay to be trained on
        remove_path(samples_dir)
    logger.info("rejection sampling: %d of %d sampled solutions correct, %d distinct kept, %d of %d problems covered",
                result.correct, result.sampled, result.kept, result.problems_with_a_kept_solution, result.problems)
    summary = {
        "settings": settings,
        "problems_source": info["source"],
        "problem_set": problem_set,
        "counts": {"problems": result.problems, "sampled": result.sampled, "correct": result.correct,
                   "kept": result.kept, "problems_with_a_kept_solution": result.problems_with_a_kept_solution,
                   "tuned_tokens": tuned_tokens(result.rows), "resumed_problems": len(problems) - len(todo)},
        "timing": {"wall_time_s": time.time() - started, "problems_this_run": len(todo)},
    }
    storage.write_json_atomic(layout.rejection_summary, summary)
    return summary


def current_solutions(solutions_dir: str, problems: Sequence[dict[str, Any]], grader: str) -> list[dict[str, Any]]:
    """The stored solution rows of ``problems``, by problem id, graded against each problem's
    current gold answer (a corrected answer regrades the stored extracted answers; no model
    runs). A stored prompt that is not the problem's current one is refused: those solutions
    answer another question."""
    current = {problem["problem_id"]: problem for problem in problems}
    table = pa.concat_tables([storage.read_parquet(path) for path in storage.list_parquet_files(solutions_dir)])
    rows = sorted((row for row in table.to_pylist() if row["problem_id"] in current), key=lambda row: row["problem_id"])
    for row in rows:
        problem = current[row["problem_id"]]
        if row["prompt_ids"] != problem["prompt_ids"]:
            raise LightReasonerError(
                f"{solutions_dir}: problem {row['problem_id']} was sampled for another prompt than its current one "
                f"(the question under that id changed); delete {solutions_dir.rsplit('/', 1)[0]} to sample again"
            )
        if row["gold"] != problem["answer"]:
            logger.info("problem %s: gold answer %r -> %r, stored answers regraded", row["problem_id"], row["gold"],
                        problem["answer"])
            row["gold"] = problem["answer"]
            row["correct"] = [answer_matches(answer, row["gold"]) for answer in row["answers"]]
    return rows


