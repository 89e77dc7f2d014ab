"""The demo's results: the held-out table (mean ± spread over seeds, hasty slips, tuned tokens,
wall time), written as ``demo_results.json`` / ``.md`` / ``.png``."""

from __future__ import annotations

import statistics
from typing import Any

from lightreasoner_ray.config import Config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.stages.evaluation.store import read_jsonl_rows
from lightreasoner_ray.toy import boxed_answer, hasty_answer
from lightreasoner_ray.ui.reports import TITLES as REPORT_TITLES
from lightreasoner_ray.ui.reports import markdown_table, percent

# The demo's models, beside the benchmark titles of ui.reports.
TITLES = {
    **REPORT_TITLES,
    "amateur": "amateur",
    "expert": "expert",
    "lightreasoner": "expert + LightReasoner",
    "rejection_sft": "expert + SFT (rejection-sampled)",
    "sft": "expert + SFT (gold solutions)",
    "random_steps": "expert + random-step ablation",
    "lightreasoner_reverse_kl": "expert + LightReasoner, reverse KL",
    "lightreasoner_jsd": "expert + LightReasoner, JSD",
    "lightreasoner_anchor": "expert + LightReasoner, anchored",
    "lightreasoner_sampled_rollouts": "expert + LightReasoner, sampled rollouts",
}


def title(name: str) -> str:
    if name.startswith("lightreasoner_round"):
        return f"expert + LightReasoner, round {name.removeprefix('lightreasoner_round')}"
    return TITLES[name]


def hasty_slips(evaluation: Config, test_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per evaluated model, from the evaluator's predictions: among the held-out problems that
    end in a doubling or tripling, the share whose last ``\\boxed{}`` holds the value before it
    (the slip the toy pair learned, see :func:`lightreasoner_ray.toy.domain.hasty_solution`),
    and the problems solved among those and among the others."""
    from lightreasoner_ray.toy.pair import hasty_answer_rate

    ending_in_scaling = {str(row["id"]) for row in test_rows if hasty_answer(row) is not None}
    slips: dict[str, dict[str, Any]] = {}
    for spec in evaluation.eval.models:
        tag = spec.split("=", 1)[0]
        predictions = {str(row["id"]): row
                       for row in read_jsonl_rows(RunLayout(evaluation.output_dir).eval_model_layout(tag).predictions("toy"))}
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
                rejection: dict[str, Any] | None = None, fingerprint: str = "", machine: str = "") -> dict[str, Any]:
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
        "options": option_settings(config),
        "toy_pair": {"expert": str(pair.expert_path), "amateur": str(pair.amateur_path),
                     "expert_accuracy_at_build": pair.expert_accuracy, "amateur_accuracy_at_build": pair.amateur_accuracy,
                     "fingerprint": fingerprint, "machine": machine},
        "timings_s": timings,
        "evaluation": results,
    }


def option_settings(config: Config) -> dict[str, dict[str, Any]]:
    """What each of demo.options changed, as its rows were trained."""
    demo, train = config.demo, config.train
    settings = {"reverse_kl": {"divergence": "reverse_kl"},
                "jsd": {"divergence": "jsd", "jsd_beta": train.jsd_beta},
                "anchor": {"anchor_weight": demo.anchor_weight},
                "sampled_rollouts": {"temperature": demo.rollout_temperature, "top_p": demo.rollout_top_p,
                                     "seed": "the training seed"}}
    return {option: settings[option] for option in demo.options}


def demo_markdown(report: dict[str, Any]) -> str:
    def accuracy(row: dict[str, Any]) -> str:
        return percent(row["accuracy_mean"]) + (f" ± {percent(row['accuracy_std'])}" if len(row["accuracies"]) > 1 else "")

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
    options = report.get("options") or {}
    if options:
        described = {
            "reverse_kl": "reverse KL(model ‖ soft label) in place of the paper's forward KL",
            "jsd": f"the generalised Jensen-Shannon divergence (mixing weight {options.get('jsd', {}).get('jsd_beta')})",
            "anchor": f"an anchor term, {options.get('anchor', {}).get('anchor_weight')} x KL(expert ‖ model) at the "
                      "selected steps",
            "sampled_rollouts": f"the expert's rollouts sampled at temperature "
                                f"{options.get('sampled_rollouts', {}).get('temperature')}, top-p "
                                f"{options.get('sampled_rollouts', {}).get('top_p')} (seeded by the training seed) "
                                "instead of greedy, steps selected with the same β",
        }
        text += ("Options beyond the paper, each LightReasoner with one change: "
                 + "; ".join(described[option] for option in options) + ". ")
    text += ("Wall time of a trained variant = its sampling (none for SFT on gold) + training. SFT solutions: the "
             "one-hot solutions SFT trains on. Hasty slips: of the problems that end in a doubling or tripling, the "
             "share answered with the value before it (the weakness the toy pair was given, milder in the expert "
             "than in the amateur).\n")
    if resumed:
        text += "Wall times marked resumed include stages resumed from an earlier run: not what they cost.\n"
    pair = report.get("toy_pair") or {}
    if pair.get("fingerprint"):
        text += f"Toy pair {pair['fingerprint']}, on {pair.get('machine') or 'an unrecorded machine'}.\n"
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
    figure = Figure(figsize=(max(10.5, 1.05 * len(rows)), 4.6), dpi=120)
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
    paths = RunLayout(directory).demo_results
    storage.write_json_atomic(paths["json"], report)
    storage.write_bytes_atomic(paths["markdown"], demo_markdown(report).encode("utf-8"))
    storage.write_bytes_atomic(paths["chart"], demo_chart_png(report))
    return paths
