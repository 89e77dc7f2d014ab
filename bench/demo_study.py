"""The demo's comparison over several toy pairs x training seeds, with 95% confidence intervals.

    python bench/demo_study.py [--pairs 0 1 2] [--seeds 0 1 2] [--out outputs/demo_study] [key=value ...]

One `lightreasoner demo` per pair seed (``demo.pair_seed``: each builds and caches another toy
pair by the same recipe), every one with the same training seeds, budgets and settings as the
demo (the learning rate was chosen on the validation split; the study reports the held-out
test split). Each pair's demo resumes what its directory already holds, so a killed study
re-run redoes nothing finished.

The analysis reads every model's graded predictions (``eval/<tag>/toy.jsonl``) and reports:

- each variant's accuracy, averaged over pairs, seeds and test problems;
- for the comparisons that matter (LightReasoner against the expert, the random-step control,
  SFT on rejection-sampled solutions and SFT on gold solutions; round 2 against round 1), the
  mean paired difference (same pair, same seed, same problem);
- 95% intervals from a hierarchical bootstrap that resamples pairs, then seeds within each
  pair, then the test problems (one draw for every pair, since the demo tests every pair on
  the same problems; the same problems for both sides of a difference): the spread of
  pairs, of training seeds and of the problems all count;
- the hasty-slip rates (the weakness the toy pair was built with) per variant.

It writes ``<out>/study.json``, ``study.md`` (the table for docs/demo.md) and ``study.png``
(the differences with their intervals). With 3 pairs the pair level of the bootstrap has few
values to draw from: the intervals are as wide as the pairs are different, which is the point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

OPTIONS = ("reverse_kl", "jsd", "anchor", "sampled_rollouts")
VARIANTS = ("lightreasoner", "lightreasoner_round2", "rejection_sft", "sft", "random_steps",
            *(f"lightreasoner_{option}" for option in OPTIONS))
UNSEEDED = ("amateur", "expert")
COMPARISONS = (
    ("lightreasoner", "expert"),
    ("lightreasoner", "random_steps"),
    ("lightreasoner", "rejection_sft"),
    ("lightreasoner", "sft"),
    ("lightreasoner_round2", "lightreasoner"),
    *((f"lightreasoner_{option}", "lightreasoner") for option in OPTIONS),
)
TITLES = {
    "amateur": "amateur", "expert": "expert", "lightreasoner": "expert + LightReasoner",
    "lightreasoner_round2": "expert + LightReasoner, round 2", "rejection_sft": "expert + SFT (rejection-sampled)",
    "sft": "expert + SFT (gold solutions)", "random_steps": "expert + random-step ablation",
    "lightreasoner_reverse_kl": "expert + LightReasoner, reverse KL", "lightreasoner_jsd": "expert + LightReasoner, JSD",
    "lightreasoner_anchor": "expert + LightReasoner, anchored",
    "lightreasoner_sampled_rollouts": "expert + LightReasoner, sampled rollouts",
}


@dataclass
class PairOutcomes:
    """One pair's graded test predictions: ``correct[tag]`` is a 0/1 vector over ``problems``."""

    pair_seed: int
    problems: list[str]
    correct: dict[str, np.ndarray]
    slips: dict[str, Optional[float]]
    fingerprint: str = ""
    machine: str = ""

    def vector(self, name: str, seed: int) -> np.ndarray:
        return self.correct[name if name in UNSEEDED else f"{name}-seed{seed}"]


def read_pair(directory: Path, pair_seed: int) -> PairOutcomes:
    """The graded predictions of every model a finished demo in ``directory`` evaluated."""
    from lightreasoner_ray.io.layout import RunLayout
    from lightreasoner_ray.stages.evaluation.store import read_jsonl_rows

    layout = RunLayout(str(directory))
    report = json.loads(Path(layout.demo_results["json"]).read_text())
    correct: dict[str, np.ndarray] = {}
    problems: Optional[list[str]] = None
    for tag in report["evaluation"]["models"]:
        rows = {str(row["id"]): bool(row["correct"])
                for row in read_jsonl_rows(layout.eval_model_layout(tag).predictions("toy"))}
        if problems is None:
            problems = sorted(rows)
        if sorted(rows) != problems:
            raise ValueError(f"{directory}: {tag} was graded on other problems than the rest")
        correct[tag] = np.array([rows[p] for p in problems], dtype=np.float64)
    slips = {row["model"]: row.get("hasty_slip_rate") for row in report["rows"]}
    pair = report.get("toy_pair") or {}
    return PairOutcomes(pair_seed, problems or [], correct, slips, pair.get("fingerprint", ""), pair.get("machine", ""))


def _estimate(pairs: Sequence[PairOutcomes], seeds: Sequence[int], statistic: Callable[[PairOutcomes, int], np.ndarray],
              pair_index: Sequence[int], seed_index: Sequence[Sequence[int]],
              problem_index: Sequence[np.ndarray]) -> float:
    """Mean over the chosen pairs, their chosen seeds and their chosen problems (each pair weighs the same)."""
    values = []
    for slot, p in enumerate(pair_index):
        per_seed = [statistic(pairs[p], seeds[s])[problem_index[slot]].mean() for s in seed_index[slot]]
        values.append(float(np.mean(per_seed)))
    return float(np.mean(values))


def hierarchical_interval(pairs: Sequence[PairOutcomes], seeds: Sequence[int],
                          statistic: Callable[[PairOutcomes, int], np.ndarray], resamples: int = 2000,
                          rng_seed: int = 0) -> dict[str, float]:
    """Point estimate and 95% percentile interval of the mean of ``statistic`` (a per-problem vector
    for a pair and a seed) under a bootstrap that resamples pairs, seeds within a pair and problems
    within a pair."""
    rng = np.random.default_rng(rng_seed)
    everything = [np.arange(len(pair.problems)) for pair in pairs]
    point = _estimate(pairs, seeds, statistic, range(len(pairs)), [range(len(seeds))] * len(pairs), everything)
    # The demo tests every pair on the same held-out problems: problems are crossed with pairs, so one
    # draw of problems serves every pair of a resample (drawing them per pair would treat the pairs'
    # problems as independent and narrow the interval).
    shared = all(pair.problems == pairs[0].problems for pair in pairs)
    draws = np.empty(resamples)
    for r in range(resamples):
        chosen = rng.integers(0, len(pairs), size=len(pairs))
        seed_index = [rng.integers(0, len(seeds), size=len(seeds)) for _ in chosen]
        if shared:
            common = rng.integers(0, len(pairs[0].problems), size=len(pairs[0].problems))
            problem_index = [common for _ in chosen]
        else:
            problem_index = [rng.integers(0, len(pairs[p].problems), size=len(pairs[p].problems)) for p in chosen]
        draws[r] = _estimate(pairs, seeds, statistic, chosen, seed_index, problem_index)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": point, "low": float(low), "high": float(high)}


def analyse(pairs: Sequence[PairOutcomes], seeds: Sequence[int], resamples: int = 2000) -> dict[str, Any]:
    present = [name for name in UNSEEDED + VARIANTS
               if all((name if name in UNSEEDED else f"{name}-seed{seeds[0]}") in pair.correct for pair in pairs)]
    accuracy = {name: hierarchical_interval(pairs, seeds, lambda pair, seed, n=name: pair.vector(n, seed), resamples)
                for name in present}
    differences = []
    for a, b in COMPARISONS:
        if a not in present or b not in present:
            continue
        interval = hierarchical_interval(
            pairs, seeds, lambda pair, seed, a=a, b=b: pair.vector(a, seed) - pair.vector(b, seed), resamples)
        per_pair = [float(np.mean([(pair.vector(a, s) - pair.vector(b, s)).mean() for s in seeds])) for pair in pairs]
        differences.append({"a": a, "b": b, **interval, "per_pair": per_pair,
                            "distinguishable": interval["low"] > 0 or interval["high"] < 0})
    slips = {name: [pair.slips.get(name) for pair in pairs] for name in present}
    return {
        "pairs": [{"pair_seed": p.pair_seed, "fingerprint": p.fingerprint, "machine": p.machine,
                   "test_problems": len(p.problems)} for p in pairs],
        "seeds": list(seeds),
        "resamples": resamples,
        "accuracy": accuracy,
        "differences": differences,
        "hasty_slip_rates": slips,
    }


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def study_markdown(study: dict[str, Any]) -> str:
    pairs = study["pairs"]
    lines = ["| model | test accuracy (%) [95% CI] | hasty slips (%), per pair |", "|:---|---:|---:|"]
    for name, interval in study["accuracy"].items():
        rates = study["hasty_slip_rates"].get(name) or []
        slips = ", ".join("–" if r is None else f"{100 * r:.0f}" for r in rates)
        lines.append(f"| {TITLES.get(name, name)} | {100 * interval['mean']:.1f} [{100 * interval['low']:.1f}, "
                     f"{100 * interval['high']:.1f}] | {slips} |")
    lines += ["", "| difference (points) | mean [95% CI] | per pair | distinguishable from 0 |", "|:---|---:|---:|:---|"]
    for d in study["differences"]:
        lines.append(f"| {TITLES[d['a']]} − {TITLES[d['b']].replace('expert + ', '')} | {_points(d['mean'])} "
                     f"[{_points(d['low'])}, {_points(d['high'])}] | {', '.join(_points(v) for v in d['per_pair'])} | "
                     f"{'yes' if d['distinguishable'] else 'no'} |")
    fingerprints = "; ".join(f"pair seed {p['pair_seed']}: {p['fingerprint'] or 'unrecorded'}" for p in pairs)
    machines = sorted({p["machine"] for p in pairs if p["machine"]})
    lines += ["", f"{len(pairs)} toy pairs x training seeds {', '.join(map(str, study['seeds']))}; "
              f"{pairs[0]['test_problems'] if pairs else 0} held-out test problems per pair, greedy. 95% intervals: "
              f"hierarchical bootstrap ({study['resamples']} resamples of pairs, of seeds within a pair and of the "
              f"test problems, the same problems for every pair as in the demo). With {len(pairs)} pairs the pair "
              f"level has few values to draw from and its percentile interval runs narrow: read the per-pair "
              f"column beside it. Pairs: {fingerprints}. Machine: {'; '.join(machines) or 'unrecorded'}."]
    return "\n".join(lines) + "\n"


def study_chart(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    differences = study["differences"]
    figure, axis = plt.subplots(figsize=(8.5, 0.6 * len(differences) + 1.4))
    for row, d in enumerate(differences):
        axis.plot([100 * d["low"], 100 * d["high"]], [row, row], color="tab:blue", linewidth=2)
        axis.plot([100 * d["mean"]], [row], "o", color="tab:blue")
        axis.plot([100 * v for v in d["per_pair"]], [row] * len(d["per_pair"]), "x", color="tab:gray")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(differences)))
    axis.set_yticklabels([f"{TITLES[d['a']].replace('expert + ', '')} − {TITLES[d['b']].replace('expert + ', '')}"
                          for d in differences])
    axis.invert_yaxis()
    axis.set_xlabel("test accuracy difference (points): mean and 95% CI; x = one pair")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_pair(out: Path, pair_seed: int, seeds: Sequence[int], overrides: Sequence[str]) -> Path:
    """One `lightreasoner demo` for ``pair_seed`` (resuming what its directory holds)."""
    directory = out / f"pair{pair_seed}"
    command = [sys.executable, "-m", "lightreasoner_ray.cli", "demo", f"output_dir={directory}",
               f"demo.pair_seed={pair_seed}", f"demo.seeds=[{','.join(map(str, seeds))}]", *overrides]
    print(f"pair seed {pair_seed}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True)
    return directory


def main(argv: Optional[Sequence[str]] = None,
         runner: Callable[[Path, int, Sequence[int], Sequence[str]], Path] = run_pair) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo_study"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--analyse-only", action="store_true", help="read the pairs' finished demos, run nothing")
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=OPTIONS,
                        help="demo.options trained and compared with LightReasoner (default: all; none: --options)")
    parser.add_argument("overrides", nargs="*", help="demo overrides, the same for every pair")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for pair_seed in args.pairs:
        overrides = [f"demo.options=[{','.join(args.options)}]", *args.overrides]
        directory = args.out / f"pair{pair_seed}" if args.analyse_only else runner(args.out, pair_seed, args.seeds,
                                                                                   overrides)
        pairs.append(read_pair(directory, pair_seed))
    study = analyse(pairs, args.seeds, args.resamples)
    (args.out / "study.json").write_text(json.dumps(study, indent=2))
    markdown = study_markdown(study)
    (args.out / "study.md").write_text(markdown)
    study_chart(study, args.out / "study.png")
    print(markdown)
    return study


if __name__ == "__main__":
    main()
