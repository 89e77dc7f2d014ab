"""The ``lightreasoner`` command line: one subcommand per stage, thin by design.

    lightreasoner sample   --config C [key=value ...]
    lightreasoner train    --config C [key=value ...]
    lightreasoner evaluate --config C [key=value ...]
    lightreasoner run      --config C [key=value ...]
    lightreasoner export   --config C [key=value ...]
    lightreasoner demo     [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from lightreasoner_ray.config import Config, load_config
from lightreasoner_ray.errors import LightReasonerError

logger = logging.getLogger("lightreasoner_ray")


def _sample(config: Config) -> dict:
    from lightreasoner_ray.sampling import run_sampling

    summary = run_sampling(config)
    counts = summary["counts"]
    print(
        f"samples: {config.samples_dir} ({counts['problems']} problems, {counts['completion_tokens']} completion "
        f"tokens, {counts['selected_steps']} selected steps, ratio {counts['selection_ratio']:.3f})"
    )
    return summary


def _train(config: Config) -> dict:
    from lightreasoner_ray.training import run_training

    return run_training(config)


def _evaluate(config: Config) -> dict:
    from lightreasoner_ray.evaluation import run_evaluation

    return run_evaluation(config)


def _export(config: Config) -> dict:
    from lightreasoner_ray.export import run_export

    return run_export(config)


def _run(config: Config) -> dict:
    from lightreasoner_ray.pipeline import run_pipeline

    return run_pipeline(config)


def _demo(config: Config) -> dict:
    from lightreasoner_ray.demo import run_demo

    return run_demo(config)


STAGES: dict[str, Callable[[Config], dict]] = {
    "sample": _sample,
    "train": _train,
    "evaluate": _evaluate,
    "run": _run,
    "export": _export,
    "demo": _demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightreasoner", description="LightReasoner as a Ray cluster job.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        stage = sub.add_parser(name, help=f"run the {name} stage" if name != "demo" else "the embedded default, local Ray, CPU")
        stage.add_argument("--config", "-c", default=None, help="YAML config file (configs/*.yaml)")
        stage.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampling.beta=0.5")
        stage.add_argument("--log-level", default="INFO")
    return parser


def run_command(command: str, config_path: str | None, overrides: list[str]) -> dict:
    """Load the config and run one stage (the jobs/*.py scripts call this too)."""
    if command == "demo":
        from lightreasoner_ray.demo import demo_config, demo_defaults

        config = demo_config(overrides) if config_path is None else load_config(config_path, overrides, demo_defaults())
    else:
        config = load_config(config_path, overrides)
    return STAGES[command](config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_command(args.command, args.config, args.overrides)
    except LightReasonerError as exc:
        print(f"lightreasoner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lightreasoner {args.command}: interrupted; finished work is kept, re-run to resume", file=sys.stderr)
        return 130
    return 0


def job_main(command: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<command>.py``: ``--config C key=value ...``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
