"""Shared fixtures: a tiny expert/amateur pair with an in-process tokenizer, real problems, local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LIGHTREASONER_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "benchmarks"))
GSM8K_TRAIN = DATA_DIR / "gsm8k" / "train.jsonl"

os.environ.setdefault("LIGHTREASONER_NO_DASHBOARD", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def gsm8k_rows(n: int) -> list[dict]:
    rows = []
    with GSM8K_TRAIN.open() as handle:
        for line, _ in zip(handle, range(n)):
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2 expert (2 layers) and amateur (1 layer, narrower), sharing a trained BPE tokenizer.

    The two heads are padded differently past the tokenizer's vocabulary, as real
    checkpoints are, so the sampler must cut logits to the shared vocabulary.
    """
    from lightreasoner_ray.toy.tiny_models import TinyModelSpec, save_pair

    texts = []
    for row in gsm8k_rows(400):
        texts.extend([row["question"], row["answer"]])
    root = tmp_path_factory.mktemp("tiny_pair")
    expert = TinyModelSpec(hidden_size=64, num_layers=2, initializer_range=0.08, vocab_padding=2, seed=1)
    amateur = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                            initializer_range=0.08, vocab_padding=6, seed=2)
    expert_path, amateur_path = save_pair(root, texts, expert, amateur, vocab_size=600)
    return {"expert": expert_path, "amateur": amateur_path, "root": root}


@pytest.fixture(scope="session")
def problems_file(tmp_path_factory) -> Path:
    """Twelve real GSM8K train problems."""
    path = tmp_path_factory.mktemp("problems") / "gsm8k_12.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in gsm8k_rows(12)))
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
