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
   demo.options adds LightReasoner with options beyond the paper (another divergence, an
   anchor to the expert, sampled rollouts), each trained the same way.
4. Evaluation (Ray actor pool) of the amateur, the expert and every trained model on a
   toy split that no model trained on: ``validation`` to make choices on, ``test`` to
   report (demo.eval_split); one table, written as demo_results.json/.md/.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from lightreasoner_ray.config import Config, apply_override, build_config, flatten_tree, parse_override
from lightreasoner_ray.data.sample_sets import random_steps, select_by_beta, sft_rows, tuned_tokens, write_sample_set
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import weights_fingerprint
from lightreasoner_ray.io.layout import DEMO_SETTINGS, RUN_RECORDS, RunLayout, cache_root
from lightreasoner_ray.io.record import StageRecord
from lightreasoner_ray.runs.demo_report import demo_markdown, demo_report, hasty_slips, write_demo_report
from lightreasoner_ray.runs.rounds import next_expert, round_config
from lightreasoner_ray.stages.evaluation.stage import run_evaluation
from lightreasoner_ray.stages.ray_helpers import init_ray
from lightreasoner_ray.toy import generate_problems
from lightreasoner_ray.toy.pair import SYSTEM_PROMPT as TOY_SYSTEM_PROMPT
from lightreasoner_ray.ui.console import echo
from lightreasoner_ray.ui.tracking import tracked_stage

logger = logging.getLogger(__name__)

VARIANTS = ("lightreasoner", "rejection_sft", "sft", "random_steps")


def option_variant(option: str) -> str:
    """The variant one of demo.options trains (its rows, directories and evaluation tags)."""
    return f"lightreasoner_{option}"


# The options' own settings, read by their variants alone: recorded in demo_settings.json for the
# reader, not compared there (each variant's stage record refuses a change once it is trained).
OPTION_SETTINGS = frozenset({"demo.anchor_weight", "demo.rollout_temperature", "demo.rollout_top_p"})


def option_config(base: Config, option: str) -> Config:
    """The settings LightReasoner trains (and, for sampled_rollouts, samples) with under ``option``."""
    demo, train = base.demo, base.train
    if option in ("reverse_kl", "jsd"):
        return dataclasses.replace(base, train=dataclasses.replace(train, divergence=option))
    if option == "anchor":
        return dataclasses.replace(base, train=dataclasses.replace(train, anchor_weight=demo.anchor_weight))
    if option == "sampled_rollouts":
        return dataclasses.replace(base, sampling=dataclasses.replace(
            base.sampling, temperature=demo.rollout_temperature, top_p=demo.rollout_top_p))
    raise LightReasonerError(f"demo.options: unknown option {option!r}")


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


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    storage.write_bytes_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def _timed(label: str, timings: dict[str, float], function, *args, **kwargs):
    started = time.time()
    result = function(*args, **kwargs)
    timings[label] = time.time() - started
    return result


def _sorted_samples(config: Config) -> list[dict[str, Any]]:
    rows = storage.read_parquet(RunLayout(config.output_dir).samples).to_pylist()
    rows.sort(key=lambda row: row["problem_id"])
    return rows


def demo_outputs(config: Config, result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What tracking logs of a finished demo: its results files."""
    return {}, list(RunLayout(config.output_dir).demo_results.values())


@tracked_stage("demo", outputs=demo_outputs)
def run_demo(config: Config) -> dict[str, Any]:
    from lightreasoner_ray.engines.models import load_tokenizer
    from lightreasoner_ray.stages.sampling.stage import run_sampling
    from lightreasoner_ray.toy.pair import build_toy_pair

    check_demo_config(config)
    demo = config.demo
    layout = RunLayout(config.output_dir)
    timings: dict[str, float] = {}
    started = time.time()
    # Ray starts before any stage is timed, so its start-up is charged to no variant.
    init_ray(config.ray)

    pair_dir = ("toy_pair_quick" if demo.quick else "toy_pair") + (f"_seed{demo.pair_seed}" if demo.pair_seed else "")
    pair = _timed("build_pair", timings, build_toy_pair, cache_root() / pair_dir, seed=demo.pair_seed,
                  spec=quick_pair_spec() if demo.quick else None)
    fingerprint = pair_fingerprint(pair)
    echo(f"toy pair {fingerprint} on {machine_description()}: a pair with another fingerprint (another CPU or "
         "torch) gives other figures than the README's")
    claim_output_dir(config, fingerprint)
    # Round r trains on problems [(r - 1) n, r n) of one draw: every round's problems are fresh.
    train_draw = generate_problems(demo.train_problems * demo.rounds, seed=1000, split="train")
    train_rows = train_draw[: demo.train_problems]
    held_out_rows = held_out_problems(demo)
    _write_jsonl(layout.demo_problems(1), train_rows)
    # The toy benchmark reads <data_dir>/toy/test.jsonl: it holds the split evaluated (demo.eval_split).
    _write_jsonl(layout.demo_held_out, held_out_rows)

    base = dataclasses.replace(
        config,
        expert=dataclasses.replace(config.expert, path=str(pair.expert_path)),
        amateur=dataclasses.replace(config.amateur, path=str(pair.amateur_path)),
        data=dataclasses.replace(config.data, problems=layout.demo_problems(1)),
    )

    # Sampling once with beta = 0: a soft label at every position with any divergence.
    all_steps = dataclasses.replace(base, output_dir=layout.demo_all_steps.output_dir,
                                    sampling=dataclasses.replace(base.sampling, beta=0.0))
    sampling_summary = _timed("sample", timings, run_sampling, all_steps)
    sampling_resumed = bool(sampling_summary.get("counts", {}).get("resumed_problems"))
    sampled = _sorted_samples(all_steps)

    lightreasoner_rows = select_by_beta(sampled, config.sampling.beta)
    steps = tuned_tokens(lightreasoner_rows)
    if steps == 0:
        raise LightReasonerError(
            f"demo: no position of the {len(sampled)} sampled trajectories has KL > sampling.beta = "
            f"{config.sampling.beta}; lower sampling.beta (the KL quantiles are in "
            f"{layout.demo_all_steps.samples_summary})"
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
    option_names = [option_variant(option) for option in demo.options]
    variant_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ("lightreasoner", *round_names,
                                                                           "rejection_sft", "sft", "random_steps",
                                                                           *option_names)}
    for number in range(2, demo.rounds + 1):
        _write_jsonl(layout.demo_problems(number),
                     train_draw[(number - 1) * demo.train_problems : number * demo.train_problems])
    for seed in demo.seeds:
        for name, (rows, sampling_time, problems, solutions, resumed) in per_variant.items():
            if rows is None:
                rows = random_steps(sampled, steps, seed=seed)
            run = _train_variant(base, layout.demo_variant(name, seed).output_dir, rows, seed, name)
            run.update(sampling_time_s=sampling_time, problems=problems, solutions_kept=solutions,
                       resumed=run["resumed"] or resumed)
            variant_runs[name].append(run)
        # Rounds: the previous round's model, merged, samples fresh problems against the same amateur.
        previous = _variant_config(base, layout.demo_variant("lightreasoner", seed).output_dir, seed)
        for number in range(2, demo.rounds + 1):
            run = _lightreasoner_round(base, number, seed, previous)
            variant_runs[f"lightreasoner_round{number}"].append(run)
            previous = _variant_config(base, run["run_dir"], seed, run["expert"])
        for option in demo.options:
            variant_runs[option_variant(option)].append(
                _option_variant(base, option, seed, lightreasoner_rows, timings["sample"], len(sampled),
                                sampling_resumed))

    models = [f"amateur={pair.amateur_path}", f"expert={pair.expert_path}"] + [
        f"{name}-seed{run['seed']}={run['model']}" for name, runs in variant_runs.items() for run in runs
    ]
    evaluation = dataclasses.replace(base, eval=dataclasses.replace(base.eval, models=models, data_dir=layout.demo_data,
                                                                     limit=demo.test_problems))
    results = _timed("evaluate", timings, run_evaluation, evaluation)
    timings["total"] = time.time() - started

    slips = hasty_slips(evaluation, held_out_rows)
    report = demo_report(config, pair, results, variant_runs, sampled, timings, steps, slips,
                         rejection={key: value for key, value in rejection.items() if key != "rows"},
                         fingerprint=fingerprint, machine=machine_description())
    paths = write_demo_report(config.output_dir, report)
    echo(f"demo results: {paths['markdown']}, {paths['json']}, {paths['chart']}")
    echo(demo_markdown(report))  # last: the table is what the console ends with
    return report


def held_out_problems(demo) -> list[dict[str, Any]]:
    """The toy problems the demo evaluates on: ``demo.eval_split`` (validation to choose, test to report).
    The test draw's seed is not the one the earlier demo's choices were looked at with (2000)."""
    seed = {"validation": 3000, "test": 4000}[demo.eval_split]
    return generate_problems(demo.test_problems, seed=seed, split=demo.eval_split)


def _variant_config(base: Config, run_dir: str, seed: int, expert_path: str | None = None) -> Config:
    """The config a variant trains with in ``run_dir``: its seed, its samples there, its expert."""
    return dataclasses.replace(
        base, output_dir=run_dir,
        expert=dataclasses.replace(base.expert, path=expert_path or base.expert.path),
        train=dataclasses.replace(base.train, seed=seed, samples=RunLayout(run_dir).samples),
    )


def _train_variant(base: Config, run_dir: str, rows: list[dict[str, Any]], seed: int, name: str,
                   expert_path: str | None = None) -> dict[str, Any]:
    from lightreasoner_ray.stages.training.driver import run_training, training_done

    variant = _variant_config(base, run_dir, seed, expert_path)
    write_sample_set(rows, variant.train.samples)
    finished = training_done(variant)
    if finished is not None:
        # Trained earlier from these very samples and settings: no Ray Train start to find that out.
        logger.info("demo: %s (seed %d) already trained (%d updates), skipped", name, seed, finished["steps"])
        return {"seed": seed, "model": finished["model"], "tuned_tokens": tuned_tokens(rows), "run_dir": run_dir,
                "train_time_s": finished["wall_time_s"], "final_loss": finished["final_loss"], "resumed": True}
    logger.info("demo: training %s (seed %d) on %d tuned tokens", name, seed, tuned_tokens(rows))
    run_timing: dict[str, float] = {}
    summary = _timed("train", run_timing, run_training, variant)
    return {"seed": seed, "model": summary["model"], "tuned_tokens": tuned_tokens(rows), "run_dir": run_dir,
            "train_time_s": run_timing["train"], "final_loss": summary["final_loss"],
            # A resumed stage's time is not the time the variant costs.
            "resumed": bool(summary.get("resumed_from_step"))}


def _lightreasoner_round(base: Config, number: int, seed: int, previous: Config) -> dict[str, Any]:
    """Round ``number`` of LightReasoner for one seed, by the rounds' own steps
    (:func:`~lightreasoner_ray.runs.rounds.next_expert`, :func:`~lightreasoner_ray.runs.rounds.round_config`):
    the model ``previous`` trained, merged, samples the round's fresh problems (KL > sampling.beta)
    and is trained on them."""
    from lightreasoner_ray.stages.sampling.stage import run_sampling

    layout = RunLayout(base.output_dir)
    started = time.time()
    expert = next_expert(previous, reuse=True)
    current = round_config(base, number, expert, output_dir=layout.demo_round(seed, number).output_dir,
                           problems=layout.demo_problems(number))
    summary = run_sampling(current)
    sampling_time = time.time() - started
    rows = _sorted_samples(current)
    if not tuned_tokens(rows):
        raise LightReasonerError(f"demo: round {number} (seed {seed}) selected no step with KL > sampling.beta = "
                                 f"{base.sampling.beta} in {RunLayout(current.output_dir).samples}")
    training_dir = layout.demo_round_training(seed, number).output_dir
    run = _train_variant(base, training_dir, rows, seed, f"lightreasoner round {number}", expert)
    run.update(expert=expert, run_dir=training_dir, sampling_time_s=sampling_time, problems=len(rows),
               solutions_kept=None, resumed=run["resumed"] or bool(summary["counts"].get("resumed_problems")))
    return run


def _option_variant(base: Config, option: str, seed: int, lightreasoner_rows: list[dict[str, Any]],
                    sampling_time: float, problems: int, sampling_resumed: bool) -> dict[str, Any]:
    """LightReasoner under one of demo.options for ``seed``: the same selected steps with other
    training settings, or (sampled_rollouts) the steps of the expert's sampled rollouts of the same
    problems, drawn with sampling.seed = ``seed`` and selected with the same beta."""
    from lightreasoner_ray.stages.sampling.stage import run_sampling

    layout = RunLayout(base.output_dir)
    name = option_variant(option)
    settings = option_config(base, option)
    rows, resumed = lightreasoner_rows, sampling_resumed
    if option == "sampled_rollouts":
        started = time.time()
        rollouts = dataclasses.replace(settings, output_dir=layout.demo_rollouts(seed).output_dir,
                                       sampling=dataclasses.replace(settings.sampling, seed=seed))
        summary = run_sampling(rollouts)
        sampling_time = time.time() - started
        resumed = bool(summary["counts"].get("resumed_problems"))
        rows = _sorted_samples(rollouts)
        if not tuned_tokens(rows):
            raise LightReasonerError(f"demo: the sampled rollouts (seed {seed}) selected no step with KL > "
                                     f"sampling.beta = {base.sampling.beta} in {RunLayout(rollouts.output_dir).samples}")
    run = _train_variant(settings, layout.demo_variant(name, seed).output_dir, rows, seed, name)
    run.update(sampling_time_s=sampling_time, problems=problems, solutions_kept=None,
               resumed=run["resumed"] or resumed)
    return run


def rejection_sampled(base: Config) -> dict[str, Any]:
    """Rejection-sampling SFT data for the problems LightReasoner sampled (the same file, all of
    it), by the stage ``run`` uses (lightreasoner_ray.stages.rejection_sampling: Ray Data actors, the
    engine layer), into ``<output_dir>/rejection_sft``; a re-run reads them back."""
    from lightreasoner_ray.stages.rejection_sampling import run_rejection_sampling

    summary = run_rejection_sampling(base)
    counts = summary["counts"]
    rows = storage.read_parquet(RunLayout(base.output_dir).rejection_sft.samples).to_pylist() if counts["kept"] else []
    return {"samples_per_problem": base.rejection_sft.samples_per_problem, "temperature": base.rejection_sft.temperature,
            **{key: counts[key] for key in ("problems", "sampled", "correct", "kept", "problems_with_a_kept_solution")},
            "rows": rows, "resumed": bool(counts["resumed_problems"])}


def check_demo_config(config: Config) -> None:
    """What the demo needs beyond a valid config, checked before anything runs."""
    if "://" in config.output_dir:
        raise LightReasonerError(f"demo: output_dir must be a local directory, got {config.output_dir!r}")
    if list(config.eval.benchmarks) != ["toy"]:
        raise LightReasonerError(f"demo: eval.benchmarks must be [toy] (the held-out toy split), "
                                 f"got {list(config.eval.benchmarks)}")
    if len(set(config.demo.seeds)) != len(config.demo.seeds):
        raise LightReasonerError(f"demo: demo.seeds has repeats: {list(config.demo.seeds)}")
    if "anchor" in config.demo.options and not config.train.lora.enabled:
        raise LightReasonerError("demo: demo.options has anchor, which needs train.lora.enabled=true (the anchor is "
                                 "the expert with its adapter switched off)")


def machine_description() -> str:
    """The CPU model, torch version and thread count, as the demo records them beside its pair."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def pair_fingerprint(pair) -> str:
    """The toy pair's recipe hash and both models' weight fingerprints: a pair rebuilt by the
    same recipe on another torch or CPU may have other weights (the toy models are small, so
    :func:`~lightreasoner_ray.io.fingerprints.weights_fingerprint` hashes their files whole)."""
    weights = "-".join(weights_fingerprint(str(directory)) for directory in (pair.expert_path, pair.amateur_path))
    return f"{pair.spec_hash}-{hashlib.sha256(weights.encode()).hexdigest()[:16]}"


def claim_output_dir(config: Config, pair_hash: str) -> None:
    """Every stage of the demo resumes from what ``output_dir`` holds, so a directory
    that holds a demo run with other settings (or another toy pair) is refused rather
    than silently reused. Seeds and options may be added, with their settings (an option's
    variants keep records of their own, which refuse a change once trained); ``ray`` settings
    do not matter."""
    tree = dataclasses.asdict(config)
    for key in ("output_dir", "ray"):
        tree.pop(key, None)
    tree["demo"].pop("seeds", None)
    tree["demo"].pop("options", None)
    settings = {"toy_pair": pair_hash, **flatten_tree(tree)}
    directory = Path(config.output_dir)
    # The refusal lists the changed keys alone (the settings are many; the record has their values).
    record = StageRecord(RunLayout(config.output_dir).demo_settings, settings, compare_dropped=True,
                         informational=OPTION_SETTINGS,
                         missing="<missing>", describe=lambda key, before, after: key,
                         unreadable_is_unrecorded=True,
                         defaults=flatten_tree(dataclasses.asdict(Config())))
    path = record.path

    def refuse(changed: list[str]) -> LightReasonerError:
        changed = sorted(changed)
        return LightReasonerError(
            f"demo: {config.output_dir} holds a demo run with other settings ({', '.join(changed[:8]) or path}"
            f"{', ...' if len(changed) > 8 else ''} differ, see {path}); its stages would be resumed, not "
            "redone: pass another output_dir=... or delete that directory"
        )

    def unrecorded() -> None:
        if storage.exists(path):  # there but unreadable: nothing of it can be trusted
            raise refuse(list(settings))
        raise LightReasonerError(
            f"demo: {directory} is not empty and holds no {DEMO_SETTINGS} (a run of an older version, or "
            "something else): pass another output_dir=... or delete that directory"
        )

    has_outputs = directory.is_dir() and any(item.name not in RUN_RECORDS for item in directory.iterdir())
    record.claim(has_outputs, refuse, unrecorded=unrecorded)
