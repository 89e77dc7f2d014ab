"""The ``lightreasoner`` command line: one subcommand per stage, thin by design.

    lightreasoner sample   --config C [--restart] [key=value ...]
    lightreasoner train    --config C [--restart] [key=value ...]
    lightreasoner evaluate --config C [--restart] [key=value ...]
    lightreasoner run      --config C [--restart] [key=value ...]
    lightreasoner export   --config C [--push-to-hub REPO] [key=value ...]
    lightreasoner export-samples --config C [--push-to-hub REPO]   # the samples as a Hub dataset, with its card
    lightreasoner check    --config C [key=value ...]          # pre-flight: what run needs, in seconds
    lightreasoner demo     [key=value ...]
    lightreasoner inspect  --config C [key=value ...]          # <output_dir>/samples_report.html
    lightreasoner compare  --config C [--before A --after B]   # fixed/broken questions, A vs B

Every command is quiet unless ``--verbose``: Ray, DeepSpeed and library output go to
``<output_dir>/logs/`` (console.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable

from lightreasoner_ray.config import Config, load_config, redact
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io.local_dirs import resolve_output_dir
from lightreasoner_ray.io.lock import OutputDirLock
from lightreasoner_ray.ui.console import echo

logger = logging.getLogger("lightreasoner_ray")


def _sample(config: Config, restart: bool = False) -> dict:
    from lightreasoner_ray.stages.sampling.stage import run_sampling

    summary = run_sampling(config, restart=restart)
    counts = summary["counts"]
    echo(
        f"samples: {config.samples_dir} ({counts['problems']} problems, {counts['completion_tokens']} completion "
        f"tokens, {counts['selected_steps']} selected steps, ratio {counts['selection_ratio']:.3f})"
    )
    return summary


def _train(config: Config, restart: bool = False) -> dict:
    from lightreasoner_ray.stages.training.driver import run_training

    return run_training(config, restart=restart)


def _evaluate(config: Config, restart: bool = False) -> dict:
    from lightreasoner_ray.stages.evaluation.stage import run_evaluation

    return run_evaluation(config, restart=restart)


def _export(config: Config) -> dict:
    from lightreasoner_ray.stages.export import run_export

    return run_export(config)


def _export_samples(config: Config) -> dict:
    from lightreasoner_ray.stages.hub import export_samples

    summary = export_samples(config)
    echo(f"samples dataset: {summary['directory']} ({summary['rows']} rows)"
         + (f", uploaded to {summary['url']}" if summary.get("url") else ""))
    return summary


def _check(config: Config) -> dict:
    from lightreasoner_ray.runs.pipeline import check_before_start
    from lightreasoner_ray.stages.preflight import preflight

    report = preflight(config, extra_checks=[("run", check_before_start)])
    for line in report.checked:
        echo(f"ok: {line}")
    for line in report.asks:
        echo(f"cluster: {line}")
    for line in report.warnings:
        echo(f"warning: {line}")
    for line in report.problems:
        print(redact(f"lightreasoner check: problem: {line}"), file=sys.stderr)
    if report.problems:
        raise LightReasonerError(f"{len(report.problems)} problem(s) found in {report.seconds:.1f}s; nothing was started")
    echo(f"all checks passed in {report.seconds:.1f}s (no model weights loaded)")
    return report.to_dict()


def _run(config: Config, restart: bool = False) -> dict:
    from lightreasoner_ray.runs.pipeline import run_pipeline

    return run_pipeline(config, restart=restart)


def _demo(config: Config) -> dict:
    from lightreasoner_ray.runs.demo import run_demo

    return run_demo(config)


def _inspect(config: Config) -> dict:
    from lightreasoner_ray.stages.inspect import run_inspect

    return run_inspect(config)


def _compare(config: Config, before: str = "baseline", after: str = "lightreasoner") -> dict:
    from lightreasoner_ray.stages.compare import run_compare

    return run_compare(config, before, after)


STAGES: dict[str, Callable[[Config], dict]] = {
    "sample": _sample,
    "train": _train,
    "evaluate": _evaluate,
    "run": _run,
    "check": _check,
    "export": _export,
    "export-samples": _export_samples,
    "demo": _demo,
    "inspect": _inspect,
    "compare": _compare,
}
HELP = {
    "check": "pre-flight: config, models, tokenizers, data, output_dir, extras and cluster, in seconds; "
             "one line per problem",
    "export-samples": "write <output_dir>/samples_dataset (the samples and a dataset card); --push-to-hub uploads it",
    "demo": "the embedded default, local Ray, CPU",
    "inspect": "write <output_dir>/samples_report.html: KL, selected steps and soft labels of the samples",
    "compare": "per-benchmark table and the questions fixed and broken between two evaluated models",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightreasoner", description="LightReasoner as a Ray cluster job.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        stage = sub.add_parser(name, help=HELP.get(name, f"run the {name} stage"))
        stage.add_argument("--config", "-c", default=None, help="YAML config file (configs/*.yaml)")
        stage.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampling.beta=0.5")
        stage.add_argument("--log-level", default="WARNING" if name in UNLOGGED else "INFO")
        stage.add_argument("--verbose", "-v", action="store_true",
                           help="show Ray, DeepSpeed and library output live instead of only in <output_dir>/logs/")
        if name == "compare":
            stage.add_argument("--before", default="baseline", help="eval tag (or eval/<tag> directory) before training")
            stage.add_argument("--after", default="lightreasoner", help="eval tag (or eval/<tag> directory) after training")
        if name in ("export", "export-samples"):
            stage.add_argument("--push-to-hub", metavar="REPO", default=None,
                               help="upload the result to this Hugging Face Hub repo (same as export.push_to_hub=REPO)")
        if name in RESTARTABLE:
            stage.add_argument(
                "--restart", action="store_true",
                help="start over: remove this stage's earlier outputs in output_dir (all stages' for run) instead of "
                     "resuming them or refusing to resume outputs made from other inputs",
            )
    return parser


# Commands that write nothing at all, not even <output_dir>/logs/: their output is the terminal's.
UNLOGGED = ("check",)

# Commands that only read a run in output_dir (and write their own report files beside it).
READ_ONLY = ("inspect", "compare")

# Stages that resume from output_dir and so can be asked to start over.
RESTARTABLE = ("sample", "train", "evaluate", "run")


def load_command_config(command: str, config_path: str | None, overrides: list[str]) -> Config:
    """The command's config, its output_dir checked against a Ray job's deletable working directory.

    inspect and compare only read a run: a relative output_dir there is read where it is (under
    ``$LIGHTREASONER_OUTPUT_ROOT`` when that is set, as the commands that wrote it put it). The demo
    runs on one machine: in a Ray job its relative output_dir is refused like any other, saying so."""
    if command == "demo":
        from lightreasoner_ray.runs.demo import demo_config, demo_defaults

        config = demo_config(overrides) if config_path is None else load_config(config_path, overrides, demo_defaults())
    else:
        config = load_config(config_path, overrides)
    try:
        output_dir = resolve_output_dir(config.output_dir)
    except LightReasonerError as exc:
        if command in READ_ONLY:
            output_dir = config.output_dir  # nothing of the run is written, so nothing is lost with the job
        elif command == "demo":
            raise LightReasonerError(
                f"{exc}; the demo is made to run on one machine: run `lightreasoner demo` there directly, "
                "not through `ray job submit`"
            ) from None
        else:
            raise
    if output_dir != config.output_dir:
        logger.info("output_dir %s resolved to %s (a Ray job's working directory is not kept)",
                    config.output_dir, output_dir)
        config = dataclasses.replace(config, output_dir=output_dir)
    return config


# Commands that write into output_dir hold its lock (io.lock) for their whole life; inspect and
# compare only read what is there (and write their own report files) and take none.
LOCKED = ("sample", "train", "evaluate", "run", "export", "export-samples", "demo")


def run_stage(command: str, config: Config, restart: bool = False, **options: str) -> dict:
    if command not in LOCKED:
        return STAGES[command](config, **options)
    with OutputDirLock(config.output_dir, command):
        if command in RESTARTABLE:
            return STAGES[command](config, restart=restart)
        return STAGES[command](config, **options)


def run_command(command: str, config_path: str | None, overrides: list[str], restart: bool = False,
                **options: str) -> dict:
    """Load the config and run one stage (the jobs/*.py scripts call this too)."""
    return run_stage(command, load_command_config(command, config_path, overrides), restart, **options)


def main(argv: list[str] | None = None) -> int:
    from lightreasoner_ray.ui.console import quiet_console

    args = build_parser().parse_args(argv)
    options = {"before": args.before, "after": args.after} if args.command == "compare" else {}
    console = None
    try:
        push = getattr(args, "push_to_hub", None)
        overrides = args.overrides + ([f"export.push_to_hub={push}"] if push else [])
        config = load_command_config(args.command, args.config, overrides)
        with quiet_console(config.output_dir, args.command, verbose=args.verbose or args.command in UNLOGGED,
                           level=args.log_level) as console:
            run_stage(args.command, config, getattr(args, "restart", False), **options)
    except LightReasonerError as exc:
        where = f" (full log: {console.log_path})" if console is not None else ""
        print(redact(f"lightreasoner {args.command}: error: {exc}{where}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lightreasoner {args.command}: interrupted; finished work is kept, re-run to resume", file=sys.stderr)
        return 130
    except Exception:
        if console is None:
            raise
        return 1  # the traceback is on the console already, and in the log
    return 0


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<command>.py``: ``--config C key=value ...``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
