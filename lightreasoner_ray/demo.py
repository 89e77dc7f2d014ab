"""``lightreasoner demo``: the embedded default, on local Ray and the CPU.

For now it runs the sampling stage end to end (Ray Data actors, local Ray, CPU) on a
tiny random Qwen2 pair built on the fly (tokenizer trained in-process on the toy
domain) over toy arithmetic problems. The toy-scale reproduction with a trained toy
pair, distillation and evaluation is the next step (issue #6).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lightreasoner_ray.config import Config, apply_override, build_config, parse_override

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("LIGHTREASONER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lightreasoner_ray"
    )
    return Path(root)


def build_demo_inputs(directory: Path, num_problems: int = 32, seed: int = 0) -> tuple[Path, Path, Path]:
    """Toy problems (JSONL) and a tiny random expert/amateur pair, built once and cached."""
    from lightreasoner_ray.tiny import DEFAULT_AMATEUR, DEFAULT_EXPERT, save_pair
    from lightreasoner_ray.toy import corpus_texts, generate_problems

    problems_path = directory / f"toy_train_{num_problems}_{seed}.jsonl"
    pair_dir = directory / "tiny-random-v2"
    expert_path, amateur_path = pair_dir / "expert", pair_dir / "amateur"
    rows = generate_problems(max(num_problems, 400), seed=seed, split="train")
    if not (expert_path / "config.json").exists() or not (amateur_path / "config.json").exists():
        save_pair(pair_dir, corpus_texts(rows), DEFAULT_EXPERT, DEFAULT_AMATEUR)
    if not problems_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        temporary = problems_path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows[:num_problems]))
        os.replace(temporary, problems_path)
    return problems_path, expert_path, amateur_path


def demo_config(overrides: list[str] | None = None) -> Config:
    problems, expert, amateur = build_demo_inputs(cache_dir() / "demo")
    tree: dict[str, Any] = {
        "expert": {"path": str(expert)},
        "amateur": {"path": str(amateur)},
        "data": {"problems": str(problems), "limit": 32},
        "sampling": {"max_new_tokens": 48, "batch_size": 8, "num_actors": 2, "beta": 0.3},
        "output_dir": "outputs/demo",
    }
    for item in overrides or []:
        apply_override(tree, *parse_override(item))
    return build_config(tree)


def run_demo(config: Config) -> dict[str, Any]:
    from lightreasoner_ray.sampling import run_sampling

    summary = run_sampling(config)
    counts = summary["counts"]
    print(
        f"demo: sampled {counts['problems']} toy problems with a tiny random pair: {counts['completion_tokens']} "
        f"completion tokens, {counts['selected_steps']} contrastive steps selected "
        f"(ratio {counts['selection_ratio']:.3f}).\n"
        f"samples: {config.samples_dir}\nsummary: {config.output_dir}/samples_summary.json"
    )
    return summary
