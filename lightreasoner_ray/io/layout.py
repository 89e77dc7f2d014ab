"""The run layout: every path a run writes under its ``output_dir``, named once.

Stages, tracking, reports, rounds and the demo ask a :class:`RunLayout` for a path
instead of joining string literals, so an on-disk name is changed (or looked up) here
and nowhere else. The names are part of the public interface: an output_dir written
by an earlier version must still resume, so a name here changes only with a migration.

    <output_dir>/
      samples/                 sampling: the samples Parquet dataset (one row per trajectory)
      sampling_settings.json   sampling: the stage record (what the samples were made from)
      samples_summary.json     sampling: counts, KL distribution, timings
      checkpoints/             training: Ray Train / DeepSpeed checkpoints + provenance.json
      model/                   training: the published adapter (LoRA) or full model
      train_summary.json       training: counts, timings, final loss
      train_metrics.jsonl      training: one line per logged update
      eval/<tag>/              evaluation: predictions, shards and generation.json per model
      eval/results.{json,md,png}
      compare/<before>_vs_<after>.{md,json}   compare: two evaluated models side by side
      samples_report.html      inspect: the samples page
      report.{json,md}         run: the pipeline's report
      rejection_sft/           the rejection-sampled SFT baseline (its own samples/, checkpoints/, model/)
      round-<n>/               rounds > 1: round n's own layout
      rounds.{json,md}         rounds: one row per round
      merged/                  export: the adapter merged into a standalone model
      samples_dataset/         export-samples: the samples with a dataset card, ready for the Hub
      demo_settings.json, demo_results.{json,md,png}   the demo, with (demo only):
        data/toy_train.jsonl, data/toy_train_round<r>.jsonl, data/toy/test.jsonl   its problems
        all_steps/             the expert's samples with a soft label at every position (beta = 0)
        <variant>-seed<s>/     one trained variant (its samples/, checkpoints/, model/; merged/ for rounds)
        lightreasoner-seed<s>-round<r>/        round r's samples; its training in train/
        sampled_rollouts-seed<s>/              demo.options sampled_rollouts: the expert's sampled rollouts
      logs/                    the console's log files
      .lightreasoner.lock      the output_dir lock: who is writing here now (io.lock)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lightreasoner_ray.config import join_path

CACHE_ENV = "LIGHTREASONER_CACHE"


def cache_root() -> Path:
    """Where this machine keeps what the package builds once and reuses across runs (the demo's
    toy pair, vLLM's merged adapters): ``$LIGHTREASONER_CACHE``, else ``~/.cache/lightreasoner_ray``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                     "lightreasoner_ray")
    return Path(root).expanduser()

# Record files (a stage's record sits beside what it describes).
SAMPLING_SETTINGS = "sampling_settings.json"
REJECTION_SETTINGS = "rejection_settings.json"
GENERATION_SETTINGS = "generation.json"
DEMO_SETTINGS = "demo_settings.json"
PROVENANCE = "provenance.json"
ROUND_DONE = "round_done.json"
# Directories and files.
SAMPLES = "samples"
SAMPLES_SUMMARY = "samples_summary.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
TRAIN_SUMMARY = "train_summary.json"
TRAIN_METRICS = "train_metrics.jsonl"
EVAL = "eval"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
REJECTION_SFT = "rejection_sft"
SOLUTIONS = "solutions"
REJECTION_SUMMARY = "rejection_summary.json"
ROUNDS_JSON, ROUNDS_MD = "rounds.json", "rounds.md"
MERGED = "merged"
SAMPLES_DATASET = "samples_dataset"
DEMO_RESULTS = "demo_results"
DEMO_DATA = "data"
DEMO_ALL_STEPS = "all_steps"
DEMO_ROUND_TRAINING = "train"
LOGS = "logs"
LOCK = ".lightreasoner.lock"
# Tracking's default stores under output_dir (tracking.uri empty); W&B keeps its files in its own "wandb".
MLFLOW_DB, MLFLOW_ARTIFACTS, TENSORBOARD, WANDB = "mlflow.db", "mlruns", "tensorboard", "wandb"
# What a command writes into output_dir before any stage runs (console logs, tracking stores).
RUN_RECORDS = frozenset({LOGS, LOCK, MLFLOW_DB, MLFLOW_ARTIFACTS, TENSORBOARD, WANDB})
IMPORTED_SAMPLES = "imported_samples"
RESULTS = "results"  # results.json, results.md, results.png
SHARD = "shard-{index:05d}.jsonl"
COMPARE = "compare"
SAMPLES_REPORT = "samples_report.html"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (local path or URI)."""

    output_dir: str

    def path(self, *parts: str) -> str:
        return join_path(self.output_dir, *parts)

    # ---- sampling
    @property
    def samples(self) -> str:
        return self.path(SAMPLES)

    @property
    def sampling_settings(self) -> str:
        return self.path(SAMPLING_SETTINGS)

    @property
    def samples_summary(self) -> str:
        return self.path(SAMPLES_SUMMARY)

    def imported_samples(self, name: str) -> str:
        return self.path(IMPORTED_SAMPLES, name)

    # ---- training
    @property
    def checkpoints(self) -> str:
        return self.path(CHECKPOINTS)

    @property
    def checkpoints_provenance(self) -> str:
        return self.path(CHECKPOINTS, PROVENANCE)

    @property
    def model(self) -> str:
        return self.path(MODEL)

    @property
    def model_provenance(self) -> str:
        return self.path(MODEL, PROVENANCE)

    @property
    def train_summary(self) -> str:
        return self.path(TRAIN_SUMMARY)

    @property
    def train_metrics(self) -> str:
        return self.path(TRAIN_METRICS)

    @property
    def training_outputs(self) -> list[str]:
        """What the training stage writes (``--restart`` removes these)."""
        return [self.checkpoints, self.model, self.train_summary, self.train_metrics]

    # ---- evaluation
    @property
    def eval(self) -> str:
        return self.path(EVAL)

    def eval_model(self, tag: str) -> str:
        return self.path(EVAL, tag)

    def eval_model_layout(self, tag: str) -> "EvalModelLayout":
        return EvalModelLayout(self.eval_model(tag))

    @property
    def results(self) -> dict[str, str]:
        return results_files(self.eval)

    # ---- the pipeline's report, rounds, export
    @property
    def report(self) -> dict[str, str]:
        return {"json": self.path(REPORT_JSON), "markdown": self.path(REPORT_MD)}

    @property
    def rounds_report(self) -> dict[str, str]:
        return {"json": self.path(ROUNDS_JSON), "markdown": self.path(ROUNDS_MD)}

    @property
    def round_done(self) -> str:
        return self.path(ROUND_DONE)

    def round(self, number: int) -> "RunLayout":
        """Round ``number``'s own layout (round 1 is the run directory itself)."""
        return self if number == 1 else RunLayout(self.path(f"round-{number}"))

    @property
    def merged(self) -> str:
        return self.path(MERGED)

    @property
    def samples_dataset(self) -> str:
        """The samples as a Hub dataset (Parquet shards and README.md): ``samples/`` stays pure Parquet."""
        return self.path(SAMPLES_DATASET)

    # ---- the rejection-sampled SFT baseline: a layout of its own under rejection_sft/
    @property
    def rejection_sft(self) -> "RunLayout":
        return RunLayout(self.path(REJECTION_SFT))

    @property
    def solutions(self) -> str:
        return self.path(SOLUTIONS)

    @property
    def rejection_settings(self) -> str:
        return self.path(REJECTION_SETTINGS)

    @property
    def rejection_summary(self) -> str:
        return self.path(REJECTION_SUMMARY)

    # ---- the demo
    @property
    def demo_settings(self) -> str:
        return self.path(DEMO_SETTINGS)

    @property
    def demo_results(self) -> dict[str, str]:
        return {"json": self.path(f"{DEMO_RESULTS}.json"), "markdown": self.path(f"{DEMO_RESULTS}.md"),
                "chart": self.path(f"{DEMO_RESULTS}.png")}

    @property
    def demo_data(self) -> str:
        """The demo's problem files; also its ``eval.data_dir`` (the toy benchmark reads ``toy/test.jsonl``)."""
        return self.path(DEMO_DATA)

    def demo_problems(self, round_number: int = 1) -> str:
        """The training problems of LightReasoner round ``round_number`` (round 1's for every other variant too)."""
        name = "toy_train.jsonl" if round_number == 1 else f"toy_train_round{round_number}.jsonl"
        return self.path(DEMO_DATA, name)

    @property
    def demo_held_out(self) -> str:
        return self.path(DEMO_DATA, "toy", "test.jsonl")

    @property
    def demo_all_steps(self) -> "RunLayout":
        return RunLayout(self.path(DEMO_ALL_STEPS))

    def demo_variant(self, name: str, seed: int) -> "RunLayout":
        return RunLayout(self.path(f"{name}-seed{seed}"))

    def demo_rollouts(self, seed: int) -> "RunLayout":
        """Where the demo's sampled_rollouts option samples the expert's rollouts drawn with ``seed``."""
        return RunLayout(self.path(f"sampled_rollouts-seed{seed}"))

    def demo_round(self, seed: int, round_number: int) -> "RunLayout":
        """Where LightReasoner round ``round_number`` (> 1) of ``seed`` samples."""
        return RunLayout(self.path(f"lightreasoner-seed{seed}-round{round_number}"))

    def demo_round_training(self, seed: int, round_number: int) -> "RunLayout":
        return RunLayout(self.demo_round(seed, round_number).path(DEMO_ROUND_TRAINING))

    @property
    def logs(self) -> str:
        return self.path(LOGS)

    @property
    def lock(self) -> str:
        return self.path(LOCK)

    # ---- compare, inspect
    def comparison(self, before: str, after: str) -> dict[str, str]:
        stem = f"{before}_vs_{after}"
        return {"markdown": self.path(COMPARE, f"{stem}.md"), "json": self.path(COMPARE, f"{stem}.json")}

    @property
    def samples_report(self) -> str:
        return self.path(SAMPLES_REPORT)


def results_files(directory: str) -> dict[str, str]:
    """The evaluation's results files in ``directory`` (``<output_dir>/eval`` in a run)."""
    return {"json": join_path(directory, f"{RESULTS}.json"), "markdown": join_path(directory, f"{RESULTS}.md"),
            "chart": join_path(directory, f"{RESULTS}.png")}


@dataclass(frozen=True)
class EvalModelLayout:
    """One evaluated model's directory (``eval/<tag>/``): its generation record, the shards of
    each benchmark (``<benchmark>/shard-00003.jsonl``) and their concatenation (``<benchmark>.jsonl``)."""

    directory: str

    @property
    def generation_settings(self) -> str:
        return join_path(self.directory, GENERATION_SETTINGS)

    def shards(self, benchmark: str) -> str:
        return join_path(self.directory, benchmark)

    def shard(self, benchmark: str, index: int) -> str:
        return join_path(self.directory, benchmark, SHARD.format(index=index))

    def predictions(self, benchmark: str) -> str:
        return join_path(self.directory, f"{benchmark}.jsonl")
