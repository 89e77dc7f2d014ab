"""``lightreasoner demo``: LightReasoner reproduced at toy scale on local Ray and the CPU.

1. A toy expert and a weaker toy amateur are trained from scratch on toy arithmetic
   word problems (built once, cached in the user's cache directory).
2. Sampling (Ray Data actors): the expert answers toy train problems; both models
   are contrasted at every position (one run with beta = 0, so every position has a
   soft label; the LightReasoner set is then the positions with KL > sampling.beta).
3. Training (Ray Train + DeepSpeed) of four variants from the same expert:
   LightReasoner (KL-selected steps), SFT on the expert's own sampled solutions that
   reach the gold answer (rejection sampling: the paper's SFT baseline), SFT on the
   gold solutions of the same problems, and the random-step ablation (the same number
   of steps drawn uniformly, with soft labels built the same way). With demo.rounds > 1,
   LightReasoner goes on: round r + 1 samples fresh problems with round r's model, merged.
4. Evaluation (Ray actor pool) of the amateur, the expert and every trained model on a
   toy split that no model trained on: ``validation`` to make choices on, ``test`` to
   report (demo.eval_split); one table, written as demo_results.json/.md/.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any


from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.data.sample_sets import random_steps, select_by_beta, sft_rows, tuned_tokens, write_sample_set
from lightreasoner_ray.config import Config, apply_override, build_config, join_path, parse_override
from lightreasoner_ray.ui.console import echo
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.toy.pair import SYSTEM_PROMPT as TOY_SYSTEM_PROMPT
from lightreasoner_ray.ui.tracking import tracked_stage

logger = logging.getLogger(__name__)

VARIANTS = ("lightreasoner", "rejection_sft", "sft", "random_steps")
TITLES = {
    "amateur": "amateur",
    "expert": "expert",
    "lightreasoner": "expert + LightReasoner",
    "rejection_sft": "expert + SFT (rejection-sampled)",
    "sft": "expert + SFT (gold solutions)",
    "random_steps": "expert + random-step ablation",
}


def title(name: str) -> str:
    if name.startswith("lightreasoner_round"):
        return f"expert + LightReasoner, round {name.removeprefix('lightreasoner_round')}"
    return TITLES[name]


def cache_dir() -> Path:
    root = os.environ.get("LIGHTREASONER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lightreasoner_ray"
    )
    return Path(root)


def demo_defaults() -> dict[str, Any]:
    """The demo's settings, before ``key=value`` overrides (model paths are filled in later)."""
    return {
        "data": {"limit": None, "shuffle": False},
        "sampling": {"beta": 0.4, "alpha": 0.2, "max_new_tokens": 64, "batch_size": 32, "num_actors": 2,
                     "system_prompt": TOY_SYSTEM_PROMPT},
        "train": {"max_steps": 60, "lr": 2e-4, "steps_per_update": 128, "micro_batch_steps": 64, "num_workers": 2,
                  "checkpoint_every": 60, "warmup_steps": 5, "lr_schedule": "cosine",
                  "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
                  "deepspeed": {"stage": 2}},
        "eval": {"benchmarks": ["toy"], "max_new_tokens": 64, "batch_size": 64, "shard_size": 50, "num_actors": 2,
                 "system_prompt": TOY_SYSTEM_PROMPT},
        "demo": {"seeds": [0, 1, 2], "rounds": 2, "eval_split": "test"},
        "rejection_sft": {"samples_per_problem": 4, "temperature": 0.7, "max_new_tokens": 64, "grader": "toy"},
        "output_dir": "outputs/demo",
    }


def demo_config(overrides: list[str] | None = None) -> Config:
    tree = demo_defaults()
    for item in overrides or []:
        apply_override(tree, *parse_override(item))
    return build_config(tree)


def quick_pair_spec():
    """A pair trained for a few steps only: for tests of the demo's plumbing, not its numbers."""
    from lightreasoner_ray.toy.pair import DEFAULT_SPEC

    return dataclasses.replace(
        DEFAULT_SPEC,
        expert=dataclasses.replace(DEFAULT_SPEC.expert, steps=20),
        amateur=dataclasses.replace(DEFAULT_SPEC.amateur, steps=10),
        tokenizer_problems=500, train_problems=1000, test_problems=20,
    )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    storage.write_bytes_atomic(str(path), "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def _timed(label: str, timings: dict[str, float], function, *args, **kwargs):
    started = time.time()
    result = function(*args, **kwargs)
    timings[label] = time.time() - started
    return result


def demo_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished demo: its results files."""
    return {}, list(RunLayout(config.output_dir).demo_results.values())


@tracked_stage("demo", outputs=demo_outputs)
def run_demo(config: Config) -> dict[str, Any]:
    from lightreasoner_ray.stages.evaluation.stage import run_evaluation
    from lightreasoner_ray.engines.models import load_tokenizer
    from lightreasoner_ray.stages.ray_helpers import init_ray
    from lightreasoner_ray.stages.sampling.stage import run_sampling
    from lightreasoner_ray.toy import generate_problems
    from lightreasoner_ray.toy.pair import build_toy_pair

    check_demo_config(config)
    demo = config.demo
    out = config.output_dir
    timings: dict[str, float] = {}
    started = time.time()
    # Ray starts before any stage is timed, so its start-up is charged to no variant.
    init_ray(config.ray)

    pair = _timed("build_pair", timings, build_toy_pair, cache_dir() / ("toy_pair_quick" if demo.quick else "toy_pair"),
                  spec=quick_pair_spec() if demo.quick else None)
    claim_output_dir(config, pair_fingerprint(pair))
    data_dir = Path(out) / "data"
    # Round r trains on problems [(r - 1) n, r n) of one draw: every round's problems are fresh.
    train_draw = generate_problems(demo.train_problems * demo.rounds, seed=1000, split="train")
    train_rows = train_draw[: demo.train_problems]
    held_out_rows = held_out_problems(demo)
    _write_jsonl(data_dir / "toy_train.jsonl", train_rows)
    # The toy benchmark reads <data_dir>/toy/test.jsonl: it holds the split evaluated (demo.eval_split).
    _write_jsonl(data_dir / "toy" / "test.jsonl", held_out_rows)

    base = dataclasses.replace(
        config,
        expert=dataclasses.replace(config.expert, path=str(pair.expert_path)),
        amateur=dataclasses.replace(config.amateur, path=str(pair.amateur_path)),
        data=dataclasses.replace(config.data, problems=str(data_dir / "toy_train.jsonl")),
    )

    # Sampling once with beta = 0: a soft label at every position with any divergence.
    all_steps = dataclasses.replace(base, output_dir=join_path(out, "all_steps"),
                                    sampling=dataclasses.replace(base.sampling, beta=0.0))
    sampling_summary = _timed("sample", timings, run_sampling, all_steps)
    sampling_resumed = bool(sampling_summary.get("counts", {}).get("resumed_problems"))
    sampled = storage.read_parquet(all_steps.samples_dir).to_pylist()
    sampled.sort(key=lambda row: row["problem_id"])

    lightreasoner_rows = select_by_beta(sampled, config.sampling.beta)
    steps = tuned_tokens(lightreasoner_rows)
    if steps == 0:
        raise LightReasonerError(
            f"demo: no position of the {len(sampled)} sampled trajectories has KL > sampling.beta = "
            f"{config.sampling.beta}; lower sampling.beta (the KL quantiles are in "
            f"{join_path(all_steps.output_dir, 'samples_summary.json')})"
        )
    tokenizer = load_tokenizer(base.expert, "expert")
    by_id = {row["id"]: row for row in train_rows}
    sft = sft_rows(
        [row["problem_id"] for row in sampled],
        [row["prompt_ids"] for row in sampled],
        [tokenizer.encode(by_id[row["problem_id"]]["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
         for row in sampled],
    )
    rejection = _timed("rejection_sample", timings, rejection_sampled, base)
    if not rejection["rows"]:
        raise LightReasonerError(
            f"demo: none of the expert's {rejection['sampled']} sampled solutions reached the gold answer; raise "
            f"rejection_sft.samples_per_problem or lower rejection_sft.temperature ({config.rejection_sft.temperature})"
        )

    per_variant = {
        # name: (rows, sampling time charged to it, problems used, solutions kept, resumed sampling)
        "lightreasoner": (lightreasoner_rows, timings["sample"], len(sampled), None, sampling_resumed),
        "rejection_sft": (rejection["rows"], timings["rejection_sample"], len(sampled), rejection["kept"],
                          rejection["resumed"]),
        "sft": (sft, 0.0, len(sampled), len(sft), False),
        "random_steps": (None, timings["sample"], len(sampled), None, sampling_resumed),
    }
    round_names = [f"lightreasoner_round{number}" for number in range(2, demo.rounds + 1)]
    variant_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ("lightreasoner", *round_names,
                                                                           "rejection_sft", "sft", "random_steps")}
    for number in range(2, demo.rounds + 1):
        _write_jsonl(data_dir / f"toy_train_round{number}.jsonl",
                     train_draw[(number - 1) * demo.train_problems : number * demo.train_problems])
    for seed in demo.seeds:
        for name, (rows, sampling_time, problems, solutions, resumed) in per_variant.items():
            if rows is None:
                rows = random_steps(sampled, steps, seed=seed)
            run = _train_variant(base, join_path(out, f"{name}-seed{seed}"), rows, seed, name)
            run.update(sampling_time_s=sampling_time, problems=problems, solutions_kept=solutions,
                       resumed=run["resumed"] or resumed)
            variant_runs[name].append(run)
        # Rounds: the previous round's model, merged, samples fresh problems against the same amateur.
        expert_path, run_dir = str(pair.expert_path), join_path(out, f"lightreasoner-seed{seed}")
        for number in range(2, demo.rounds + 1):
            run = _lightreasoner_round(base, number, seed, expert_path, run_dir,
                                       str(data_dir / f"toy_train_round{number}.jsonl"))
            variant_runs[f"lightreasoner_round{number}"].append(run)
            expert_path, run_dir = run["expert"], run["run_dir"]

    models = [f"amateur={pair.amateur_path}", f"expert={pair.expert_path}"] + [
        f"{name}-seed{run['seed']}={run['model']}" for name, runs in variant_runs.items() for run in runs
    ]
    evaluation = dataclasses.replace(base, eval=dataclasses.replace(base.eval, models=models, data_dir=str(data_dir),
                                                                     limit=demo.test_problems))
    results = _timed("evaluate", timings, run_evaluation, evaluation)
    timings["total"] = time.time() - started

    slips = hasty_slips(evaluation, held_out_rows)
    report = demo_report(config, pair, results, variant_runs, sampled, timings, steps, slips,
                         rejection={key: value for key, value in rejection.items() if key != "rows"})
    paths = write_demo_report(out, report)
    echo(f"demo results: {paths['markdown']}, {paths['json']}, {paths['chart']}")
    echo(demo_markdown(report))  # last: the table is what the console ends with
    return report


def held_out_problems(demo) -> list[dict[str, Any]]:
    """The toy problems the demo evaluates on: ``demo.eval_split`` (validation to choose, test to report).
    The test draw's seed is not the one the earlier demo's choices were looked at with (2000)."""
    from lightreasoner_ray.toy import generate_problems

    seed = {"validation": 3000, "test": 4000}[demo.eval_split]
    return generate_problems(demo.test_problems, seed=seed, split=demo.eval_split)


def _train_variant(base: Config, run_dir: str, rows: list[dict[str, Any]], seed: int, name: str,
                   expert_path: str | None = None) -> dict[str, Any]:
    from lightreasoner_ray.stages.training.driver import run_training

    write_sample_set(rows, join_path(run_dir, "samples"))
    variant = dataclasses.replace(
        base, output_dir=run_dir,
        expert=dataclasses.replace(base.expert, path=expert_path or base.expert.path),
        train=dataclasses.replace(base.train, seed=seed, samples=join_path(run_dir, "samples")),
    )
    logger.info("demo: training %s (seed %d) on %d tuned tokens", name, seed, tuned_tokens(rows))
    run_timing: dict[str, float] = {}
    summary = _timed("train", run_timing, run_training, variant)
    return {"seed": seed, "model": summary["model"], "tuned_tokens": tuned_tokens(rows), "run_dir": run_dir,
            "train_time_s": run_timing["train"], "final_loss": summary["final_loss"],
            # A resumed stage's time is not the time the variant costs.
            "resumed": bool(summary.get("resumed_from_step"))}


def _lightreasoner_round(base: Config, number: int, seed: int, expert_path: str, previous_dir: str,
                         problems: str) -> dict[str, Any]:
    """Round ``number`` of LightReasoner for one seed: merge the previous round's adapter into
    its expert, sample ``problems`` with it (KL > sampling.beta) and train from them."""
    from lightreasoner_ray.config import ExportConfig
    from lightreasoner_ray.stages.export import run_export
    from lightreasoner_ray.stages.sampling.stage import run_sampling

    started = time.time()
    # Absolute: Ray Train workers do not share the driver's working directory.
    merged = os.path.abspath(join_path(previous_dir, "merged"))
    if not Path(merged, "config.json").is_file():  # written whole (staged, renamed)
        run_export(dataclasses.replace(base, output_dir=previous_dir, export=ExportConfig(),
                                       expert=dataclasses.replace(base.expert, path=expert_path)))
    run_dir = join_path(base.output_dir, f"lightreasoner-seed{seed}-round{number}")
    round_config = dataclasses.replace(base, output_dir=run_dir, expert=dataclasses.replace(base.expert, path=merged),
                                       data=dataclasses.replace(base.data, problems=problems))
    summary = run_sampling(round_config)
    sampling_time = time.time() - started
    rows = storage.read_parquet(round_config.samples_dir).to_pylist()
    rows.sort(key=lambda row: row["problem_id"])
    if not tuned_tokens(rows):
        raise LightReasonerError(f"demo: round {number} (seed {seed}) selected no step with KL > sampling.beta = "
                                 f"{base.sampling.beta} in {round_config.samples_dir}")
    run = _train_variant(base, join_path(run_dir, "train"), rows, seed, f"lightreasoner round {number}", merged)
    run.update(expert=merged, run_dir=join_path(run_dir, "train"), sampling_time_s=sampling_time, problems=len(rows),
               solutions_kept=None, resumed=run["resumed"] or bool(summary["counts"].get("resumed_problems")))
    return run


def rejection_sampled(base: Config) -> dict[str, Any]:
    """Rejection-sampling SFT data for the problems LightReasoner sampled (the same file, all of
    it), by the stage ``run`` uses (lightreasoner_ray.stages.rejection_sampling: Ray Data actors, the
    engine layer), into ``<output_dir>/rejection_sft``; a re-run reads them back."""
    from lightreasoner_ray.stages.rejection_sampling import rejection_dir, run_rejection_sampling

    summary = run_rejection_sampling(base)
    counts = summary["counts"]
    rows = storage.read_parquet(join_path(rejection_dir(base), "samples")).to_pylist() if counts["kept"] else []
    return {"samples_per_problem": base.rejection_sft.samples_per_problem, "temperature": base.rejection_sft.temperature,
            **{key: counts[key] for key in ("problems", "sampled", "correct", "kept", "problems_with_a_kept_solution")},
            "rows": rows, "resumed": bool(counts["resumed_problems"])}


SETTINGS_FILE = "demo_settings.json"
# What the command itself writes into output_dir before the demo starts (console logs, tracking stores).
RUN_RECORDS = {"logs", "mlflow.db", "mlruns", "tensorboard", "wandb"}


def check_demo_config(config: Config) -> None:
    """What the demo needs beyond a valid config, checked before anything runs."""
    if "://" in config.output_dir:
        raise LightReasonerError(f"demo: output_dir must be a local directory, got {config.output_dir!r}")
    if list(config.eval.benchmarks) != ["toy"]:
        raise LightReasonerError(f"demo: eval.benchmarks must be [toy] (the held-out toy split), "
                                 f"got {list(config.eval.benchmarks)}")
    if len(set(config.demo.seeds)) != len(config.demo.seeds):
        raise LightReasonerError(f"demo: demo.seeds has repeats: {list(config.demo.seeds)}")


def pair_fingerprint(pair) -> str:
    """The toy pair's recipe hash and both models' weight fingerprints: a pair rebuilt by the
    same recipe on another torch or CPU may have other weights (the toy models are small, so
    :func:`~lightreasoner_ray.io.record.weights_fingerprint` hashes their files whole)."""
    import hashlib

    from lightreasoner_ray.io.record import weights_fingerprint

    weights = "-".join(weights_fingerprint(str(directory)) for directory in (pair.expert_path, pair.amateur_path))
    return f"{pair.spec_hash}-{hashlib.sha256(weights.encode()).hexdigest()[:16]}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def claim_output_dir(config: Config, pair_hash: str) -> None:
    """Every stage of the demo resumes from what ``output_dir`` holds, so a directory
    that holds a demo run with other settings (or another toy pair) is refused rather
    than silently reused. Seeds may be added; ``ray`` settings do not matter."""
    tree = dataclasses.asdict(config)
    for key in ("output_dir", "ray"):
        tree.pop(key, None)
    tree["demo"].pop("seeds", None)
    settings = {"toy_pair": pair_hash, **_flatten(tree)}
    directory = Path(config.output_dir)
    path = directory / SETTINGS_FILE
    if not path.is_file() and directory.is_dir() and any(item.name not in RUN_RECORDS for item in directory.iterdir()):
        raise LightReasonerError(
            f"demo: {directory} is not empty and holds no {SETTINGS_FILE} (a run of an older version, or "
            "something else): pass another output_dir=... or delete that directory"
        )
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None
        if previous != settings:
            changed = sorted(key for key in set(settings) | set(previous or {})
                             if (previous or {}).get(key, "<missing>") != settings.get(key, "<missing>"))
            raise LightReasonerError(
                f"demo: {config.output_dir} holds a demo run with other settings ({', '.join(changed[:8]) or path}"
                f"{', ...' if len(changed) > 8 else ''} differ, see {path}); its stages would be resumed, not "
                "redone: pass another output_dir=... or delete that directory"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(str(path), settings)


def hasty_slips(evaluation: Config, test_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per evaluated model, from the evaluator's predictions: among the held-out problems that
    end in a doubling or tripling, the share whose last ``\\boxed{}`` holds the value before it
    (the slip the toy pair learned, see :func:`lightreasoner_ray.toy.domain.hasty_solution`),
    and the problems solved among those and among the others."""
    from lightreasoner_ray.stages.evaluation.stage import eval_dir, predictions_path, read_jsonl_rows
    from lightreasoner_ray.toy import boxed_answer, hasty_answer
    from lightreasoner_ray.toy.pair import hasty_answer_rate

    ending_in_scaling = {str(row["id"]) for row in test_rows if hasty_answer(row) is not None}
    slips: dict[str, dict[str, Any]] = {}
    for spec in evaluation.eval.models:
        tag = spec.split("=", 1)[0]
        predictions = {str(row["id"]): row
                       for row in read_jsonl_rows(predictions_path(join_path(eval_dir(evaluation), tag), "toy"))}
        missing = [str(row["id"]) for row in test_rows if str(row["id"]) not in predictions]
        if missing:
            raise LightReasonerError(f"demo: no prediction of {tag!r} for held-out problems {missing[:5]}")
        answers = [boxed_answer(predictions[str(row["id"])]["output"]) for row in test_rows]
        solved = {str(row["id"]): bool(predictions[str(row["id"])]["correct"]) for row in test_rows}
        slips[tag] = {
            "rate": hasty_answer_rate(answers, test_rows),
            "ending_in_scaling": {"problems": len(ending_in_scaling),
                                  "correct": sum(solved[i] for i in ending_in_scaling)},
            "others": {"problems": len(solved) - len(ending_in_scaling),
                       "correct": sum(ok for i, ok in solved.items() if i not in ending_in_scaling)},
        }
    return slips


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.fmean(known) if known else None


def _accuracy(results: dict[str, Any], tag: str) -> float:
    return results["models"][tag]["benchmarks"]["toy"]["accuracy"]


def demo_report(config: Config, pair, results: dict[str, Any], variant_runs: dict[str, list[dict[str, Any]]],
                sampled: list[dict[str, Any]], timings: dict[str, float], lightreasoner_steps: int,
                slips: dict[str, dict[str, Any]] | None = None,
                rejection: dict[str, Any] | None = None) -> dict[str, Any]:
    problems = len(sampled)
    slips = slips or {}
    rows = [
        {"model": name, "accuracy_mean": _accuracy(results, name), "accuracy_std": 0.0, "accuracies": [],
         "hasty_slip_rate": slips.get(name, {}).get("rate"), "slips": [slips[name]] if name in slips else [],
         "problems_used": 0, "solutions_kept": None, "tuned_tokens": 0, "wall_time_s": None,
         "wall_time_resumed": False}
        for name in ("amateur", "expert")
    ]
    for name, runs in variant_runs.items():
        if not runs:
            continue
        accuracies = [_accuracy(results, f"{name}-seed{run['seed']}") for run in runs]
        # Sampling is charged to the variants that need it (none for SFT on gold solutions).
        default_sampling = timings["sample"] if name != "sft" else 0.0
        tuned = [run["tuned_tokens"] for run in runs]
        rows.append({
            "model": name,
            "accuracy_mean": statistics.fmean(accuracies),
            # Sample standard deviation over seeds.
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracies": accuracies,
            "hasty_slip_rate": _mean_or_none([slips.get(f"{name}-seed{run['seed']}", {}).get("rate") for run in runs]),
            "slips": [slips[f"{name}-seed{run['seed']}"] for run in runs if f"{name}-seed{run['seed']}" in slips],
            "problems_used": runs[0].get("problems", problems),
            "solutions_kept": runs[0].get("solutions_kept"),
            # The same rows for every seed, except in later rounds (each seed's model samples its own).
            "tuned_tokens": tuned[0] if len(set(tuned)) == 1 else round(statistics.fmean(tuned)),
            "tuned_tokens_per_seed": tuned,
            "wall_time_s": statistics.fmean(run.get("sampling_time_s", default_sampling) + run["train_time_s"]
                                            for run in runs),
            "wall_time_resumed": any(run["resumed"] for run in runs),
        })
    completion_tokens = sum(len(row["completion_ids"]) for row in sampled)
    return {
        "rows": rows,
        "seeds": list(config.demo.seeds),
        "eval_split": config.demo.eval_split,
        "held_out_problems": config.demo.test_problems,
        "train_problems": problems,
        "beta": config.sampling.beta,
        "alpha": config.sampling.alpha,
        "lr": config.train.lr,
        "max_steps": config.train.max_steps,
        "rounds": config.demo.rounds,
        "lightreasoner_steps": lightreasoner_steps,
        "expert_completion_tokens": completion_tokens,
        "rejection_sampling": rejection,
        "toy_pair": {"expert": str(pair.expert_path), "amateur": str(pair.amateur_path),
                     "expert_accuracy_at_build": pair.expert_accuracy, "amateur_accuracy_at_build": pair.amateur_accuracy},
        "timings_s": timings,
        "evaluation": results,
    }


def demo_markdown(report: dict[str, Any]) -> str:
    from lightreasoner_ray.ui.reports import markdown_table

    def accuracy(row: dict[str, Any]) -> str:
        text = f"{100 * row['accuracy_mean']:.1f}"
        return text + (f" ± {100 * row['accuracy_std']:.1f}" if len(row["accuracies"]) > 1 else "")

    def slip(row: dict[str, Any]) -> str:
        rate = row.get("hasty_slip_rate")
        return "–" if rate is None else f"{100 * rate:.0f}"

    def kept(row: dict[str, Any]) -> str:
        value = row.get("solutions_kept")
        return "–" if value is None else str(value)

    table = markdown_table(
        [[title(row["model"]), accuracy(row), slip(row), row["problems_used"] or "–", kept(row),
          row["tuned_tokens"] or "–", _wall_time(row)] for row in report["rows"]],
        ["model", f"{report.get('eval_split', 'test')} accuracy (%)", "hasty slips (%)", "problems used",
         "SFT solutions", "tuned tokens", "wall time"],
    )
    seeds = report["seeds"]
    resumed = any(row.get("wall_time_resumed") for row in report["rows"])
    rejection = report.get("rejection_sampling")
    split = report.get("eval_split", "test")
    text = (
        f"# LightReasoner demo (toy arithmetic, CPU)\n\n{table}\n"
        f"Evaluated on {report['held_out_problems']} toy {split} problems, greedy"
        + (" (the validation split: for choices, not for reporting)" if split == "validation" else
           " (the held-out test split: reported, never used for a choice)") + ". "
        f"Training problems: {report['train_problems']} (the expert's own completions: "
        f"{report['expert_completion_tokens']} tokens; LightReasoner keeps the {report['lightreasoner_steps']} with "
        f"KL > β = {report['beta']}). Seeds: {', '.join(map(str, seeds))}"
        + (" (mean ± sample std)" if len(seeds) > 1 else "") + ". "
    )
    if rejection:
        text += (f"SFT (rejection-sampled): the expert sampled {rejection['samples_per_problem']} solutions a problem "
                 f"at temperature {rejection['temperature']} ({rejection['sampled']} in all), {rejection['correct']} "
                 f"reached the gold answer, {rejection['kept']} distinct ones (covering "
                 f"{rejection['problems_with_a_kept_solution']} problems) are its SFT data. ")
    if report.get("rounds", 1) > 1:
        text += ("LightReasoner round r > 1: round r - 1's model (merged) samples "
                 f"{report['train_problems']} fresh problems against the same amateur; its row's problems, tuned "
                 "tokens and wall time (merge + sampling + training) are that round's alone. ")
    text += ("Wall time of a trained variant = its sampling (none for SFT on gold) + training. SFT solutions: the "
             "one-hot solutions SFT trains on. Hasty slips: of the problems that end in a doubling or tripling, the "
             "share answered with the value before it (the weakness the toy pair was given, milder in the expert "
             "than in the amateur).\n")
    if resumed:
        text += "Wall times marked resumed include stages resumed from an earlier run: not what they cost.\n"
    return text


def _wall_time(row: dict[str, Any]) -> str:
    if row["wall_time_s"] is None:
        return "–"
    return f"{row['wall_time_s']:.0f} s" + (" (resumed)" if row.get("wall_time_resumed") else "")


def demo_chart_png(report: dict[str, Any]) -> bytes:
    """One bar per model (mean held-out accuracy), the spread over seeds as error bars and
    each seed's accuracy as a dot."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["rows"]
    figure = Figure(figsize=(10.5, 4.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    means = [100 * row["accuracy_mean"] for row in rows]
    spreads = [100 * row["accuracy_std"] for row in rows]
    bars = axes.bar(range(len(rows)), means, yerr=spreads, capsize=4, color=[f"C{i}" for i in range(len(rows))])
    axes.bar_label(bars, labels=[f"{value:.1f}" for value in means], fontsize=8, padding=3)
    for position, row in enumerate(rows):
        if len(row["accuracies"]) > 1:
            axes.plot([position] * len(row["accuracies"]), [100 * a for a in row["accuracies"]], "k.", markersize=4)
    axes.set_xticks(range(len(rows)), [title(row["model"]).replace(" + ", "\n+ ").replace(", ", ",\n") for row in rows],
                    fontsize=7)
    axes.set_ylabel(f"{report.get('eval_split', 'test')} accuracy (%)")
    axes.set_ylim(0, 100)
    seeds = report["seeds"]
    axes.set_title(f"LightReasoner at toy scale: {report['held_out_problems']} {report.get('eval_split', 'test')} problems"
                   + (f", {len(seeds)} seeds (mean, std, each seed)" if len(seeds) > 1 else ""), fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_demo_report(directory: str, report: dict[str, Any]) -> dict[str, str]:
    paths = {
        "json": join_path(directory, "demo_results.json"),
        "markdown": join_path(directory, "demo_results.md"),
        "chart": join_path(directory, "demo_results.png"),
    }
    storage.write_json_atomic(paths["json"], report)
    storage.write_bytes_atomic(paths["markdown"], demo_markdown(report).encode("utf-8"))
    storage.write_bytes_atomic(paths["chart"], demo_chart_png(report))
    return paths
