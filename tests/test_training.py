"""The training stage for real: Ray Train, 2 workers, DeepSpeed ZeRO-2/3 on CPU with gloo.

Samples come from the contrastive sampler on the tiny pair (or are synthesised where a
test needs exact control). Learning rates are high so the loss moves in a few updates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import fault_hooks
from conftest import gsm8k_rows
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.core.loss import SelectedStepLogits, step_kl
from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
from lightreasoner_ray.data.samples import trajectories_from_table
from lightreasoner_ray.core.update_plan import collate


MAX_STEPS = 16
# 24 steps per worker and update: two micro-batches of at most 16 on each of the 2 workers.
STEPS_PER_UPDATE = 48


@pytest.fixture(scope="module")
def sampled(tiny_pair, tmp_path_factory) -> dict:
    """Contrastive samples of 12 GSM8K problems by the tiny pair, as a samples directory."""
    from lightreasoner_ray.config import ModelConfig
    from lightreasoner_ray.data.prompts import prompt_ids
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

    sampler = ContrastiveSampler(ModelConfig(path=str(tiny_pair["expert"])), ModelConfig(path=str(tiny_pair["amateur"])),
                                 alpha=0.6, beta=0.3, max_new_tokens=24)
    problems = gsm8k_rows(12)
    prompts = [prompt_ids(sampler.tokenizer, p["question"], "Please reason step by step.") for p in problems]
    rows = sampler.sample([str(i) for i in range(len(problems))], prompts)
    assert sum(len(r["steps"]) for r in rows) > 100
    directory = tmp_path_factory.mktemp("samples")
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), directory / "part-0.parquet")
    return {"dir": directory, "rows": rows, "questions": [p["question"] for p in problems],
            "tokenizer": sampler.tokenizer}


def train_config(tiny_pair, output_dir, samples, *overrides):
    return load_config(None, [
        f"expert.path={tiny_pair['expert']}", f"train.samples={samples}", f"output_dir={output_dir}",
        f"train.max_steps={MAX_STEPS}", "train.lr=0.01", "train.num_workers=2", "train.checkpoint_every=8",
        f"train.steps_per_update={STEPS_PER_UPDATE}", "train.micro_batch_steps=16", *overrides,
    ])


def mean_kl(model, samples_dir) -> float:
    trajectories = trajectories_from_table(pq.read_table(Path(samples_dir) / "part-0.parquet"))
    wrapped = SelectedStepLogits(model).eval()
    with torch.no_grad():
        return torch.cat([step_kl(wrapped, collate([t], 0)) for t in trajectories]).mean().item()


def load_base(tiny_pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_pair["expert"])


def load_adapter(tiny_pair, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(tiny_pair), str(adapter_dir))


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "train_metrics.jsonl").read_text().splitlines()]


def assert_loss_falls(rows: list[dict]) -> None:
    # An epoch here is ~3 updates; compare the first and the last four (about an epoch each).
    losses = [row["loss"] for row in rows]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


@pytest.fixture(scope="module")
def zero2_run(tiny_pair, sampled, ray_local, tmp_path_factory):
    from lightreasoner_ray.stages.training.driver import run_training

    output_dir = tmp_path_factory.mktemp("zero2")
    config = train_config(tiny_pair, output_dir, sampled["dir"])
    return {"config": config, "summary": run_training(config), "output_dir": output_dir}


@pytest.mark.slow
def test_zero2_lora_trains_and_the_adapter_beats_the_base(tiny_pair, sampled, zero2_run):
    summary, output_dir = zero2_run["summary"], zero2_run["output_dir"]
    rows = metrics(output_dir)
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))
    assert {"loss", "lr", "steps_per_s", "tokens_per_s", "selected_steps", "forward_tokens"} <= rows[0].keys()
    assert [row["selected_steps"] for row in rows] == [STEPS_PER_UPDATE] * MAX_STEPS
    steps_per_epoch = sum(len(row["steps"]) for row in sampled["rows"])
    assert [row["epoch"] for row in rows] == [(step * STEPS_PER_UPDATE - 1) // steps_per_epoch for step in range(1, MAX_STEPS + 1)]
    assert_loss_falls(rows)
    saved = json.loads((output_dir / "train_summary.json").read_text())
    assert saved["steps"] == summary["steps"] == MAX_STEPS and saved["model_kind"] == "peft_lora_adapter"
    assert summary["tuned_tokens"] == sum(row["selected_steps"] for row in rows)
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["precision"] == "fp32" and summary["trainable_parameters"] < summary["parameters"] / 10
    model_dir = output_dir / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
    assert mean_kl(load_adapter(tiny_pair, model_dir), sampled["dir"]) < mean_kl(load_base(tiny_pair), sampled["dir"])


@pytest.mark.slow
def test_zero3_lora_stops_at_a_nonfinite_loss_and_a_rerun_resumes_and_trains(
    tiny_pair, sampled, ray_local, monkeypatch, tmp_path
):
    from lightreasoner_ray.stages.training.driver import run_training

    config = train_config(tiny_pair, tmp_path, sampled["dir"], "train.deepspeed.stage=3", "train.checkpoint_every=4",
                          "train.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    fault_hooks.inject(monkeypatch, "nan:6")
    with pytest.raises(LightReasonerError) as error:
        run_training(config)
    assert "non-finite at update 6" in str(error.value) and "last good checkpoint (update 4)" in str(error.value)
    assert (tmp_path / "checkpoints" / "train" / "step_0000004").is_dir()
    assert not (tmp_path / "model").exists()

    monkeypatch.delenv(fault_hooks.FAULT_ENV)
    summary = run_training(config)  # a re-run resumes from the latest checkpoint
    assert summary["resumed_from_step"] == 4 and summary["steps"] == MAX_STEPS
    rows = metrics(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))
    assert_loss_falls(rows)
    # deepspeed.zero.Init: each of the 2 ranks materialised about half of the model, never all of it
    assert summary["parameters_loaded_per_rank"] <= summary["parameters"] * 0.55
    adapter = load_adapter(tiny_pair, tmp_path / "model")
    assert mean_kl(adapter, sampled["dir"]) < mean_kl(load_base(tiny_pair), sampled["dir"])


def synthetic_rows(tokenizer, questions, step_counts, seed=0) -> list[dict]:
    """Rows with uneven numbers of steps and sharp labels, in the samples schema."""
    from lightreasoner_ray.data.prompts import prompt_ids

    rng = random.Random(seed)
    rows = []
    for index, (question, count) in enumerate(zip(questions, step_counts)):
        completion = [rng.randrange(10, len(tokenizer)) for _ in range(count + 4)]
        steps = sorted(rng.sample(range(len(completion)), count))
        target_ids = [rng.sample(range(10, len(tokenizer)), 2) for _ in steps]
        rows.append({"problem_id": f"s{index}", "prompt_ids": prompt_ids(tokenizer, question, "Please reason step by step."),
                     "completion_ids": completion, "steps": steps, "kl": [1.0] * count,
                     "target_ids": target_ids, "target_probs": [[0.75, 0.25]] * count, "position_kl": []})
    return rows


@pytest.mark.slow
def test_full_finetuning_takes_the_mean_over_the_update_and_saves_an_hf_model(tiny_pair, sampled, ray_local, tmp_path):
    """Two trajectories of 3 and 9 steps, an update of 12 steps in micro-batches of one step: the 9-step
    trajectory is split across micro-batches and workers, and the first update's gradient must be
    the gradient of the mean over all 12 steps (a mean per worker or per micro-batch would weigh
    steps unevenly)."""
    from transformers import AutoModelForCausalLM

    from lightreasoner_ray.stages.training.driver import logit_vocab_size, run_training

    rows = synthetic_rows(sampled["tokenizer"], sampled["questions"][:2], [3, 9])
    samples = tmp_path / "samples"
    samples.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), samples / "part-0.parquet")
    config = train_config(tiny_pair, tmp_path / "run", samples, "train.lora.enabled=false", "train.lr=0.003",
                          "train.steps_per_update=12", "train.micro_batch_steps=1", "train.max_steps=6",
                          "train.checkpoint_every=6")
    summary = run_training(config)

    base = load_base(tiny_pair)
    # The trainer normalises over the ids the samples were drawn over (the tokenizer's, not the padded head's).
    wrapped = SelectedStepLogits(base, logit_vocab_size(config))
    step_kl(wrapped, collate(trajectories_from_table(pa.Table.from_pylist(rows)), 0)).mean().backward()
    expected_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in base.parameters())).item()
    first = metrics(tmp_path / "run")[0]
    assert first["selected_steps"] == 12
    assert first["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)

    assert summary["model_kind"] == "hf_model" and summary["trainable_parameters"] == summary["parameters"]
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    assert mean_kl(trained, samples) < mean_kl(load_base(tiny_pair), samples) * 0.8


@pytest.mark.slow
def test_one_and_two_workers_train_the_same_updates(tiny_pair, sampled, ray_local, tmp_path):
    """One global order of steps: 1 worker (4 micro-batches of <= 5 steps an update) and 2 workers (2 each)
    train the same 16 steps in every update, so their losses and gradient norms agree."""
    from lightreasoner_ray.stages.training.driver import run_training

    runs = {}
    for workers in (1, 2):
        output_dir = tmp_path / f"workers{workers}"
        config = train_config(tiny_pair, output_dir, sampled["dir"], f"train.num_workers={workers}",
                              "train.steps_per_update=16", "train.micro_batch_steps=5", "train.max_steps=6",
                              "train.checkpoint_every=6", "train.lora.dropout=0.0")
        run_training(config)
        runs[workers] = metrics(output_dir)
    for rows in runs.values():
        assert [row["selected_steps"] for row in rows] == [16] * 6
    one, two = runs[1], runs[2]
    assert [row["forward_tokens"] for row in one] != [row["forward_tokens"] for row in two]  # other pieces...
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-4)  # ...same updates
    assert [row["grad_norm"] for row in two] == pytest.approx([row["grad_norm"] for row in one], rel=1e-3)
    assert len({round(row["loss"], 4) for row in one}) == 6  # the updates differ from each other


@pytest.mark.slow
def test_export_merges_the_adapter_into_a_standalone_model(tiny_pair, zero2_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightreasoner_ray.stages.export import run_export

    config = load_config(None, [f"output_dir={zero2_run['output_dir']}", f"export.output={tmp_path / 'merged'}"])
    result = run_export(config)
    assert result["base"] == str(tiny_pair["expert"]) and result["output"] == str(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = load_adapter(tiny_pair, zero2_run["output_dir"] / "model").eval()
    ids = torch.tensor([[5, 40, 77, 120, 9, 300]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert (merged(input_ids=ids).logits - load_base(tiny_pair)(input_ids=ids).logits).abs().max() > 1e-4
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    with pytest.raises(LightReasonerError, match="already a full model"):
        run_export(load_config(None, [f"output_dir={tmp_path}", f"export.adapter={tmp_path / 'merged'}"]))


@pytest.mark.slow
def test_a_worker_failure_resumes_from_the_checkpoint_without_repeating_updates(
    tiny_pair, sampled, zero2_run, monkeypatch, tmp_path
):
    from lightreasoner_ray.stages.training.driver import run_training

    marker = tmp_path / "failed-once"
    fault_hooks.inject(monkeypatch, f"fail:11:1:{marker}")
    config = train_config(tiny_pair, tmp_path / "run", sampled["dir"])
    summary = run_training(config)
    assert marker.exists()  # the worker really failed at update 11 ...
    assert summary["resumed_from_step"] == 8 and summary["steps"] == MAX_STEPS  # ... and resumed from update 8
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))
    # Same data position, optimizer state and dropout masks: the interrupted run retraces the uninterrupted one.
    reference = metrics(zero2_run["output_dir"])
    assert [row["selected_steps"] for row in rows] == [row["selected_steps"] for row in reference]
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in reference], rel=1e-5)
    assert summary["tuned_tokens"] == zero2_run["summary"]["tuned_tokens"]


def reference_jsonl(sampled, path: Path, limit: int = 40) -> Path:
    """The sampled steps written as the reference implementation's one-row-per-step JSONL."""
    tokenizer, lines = sampled["tokenizer"], []
    for row, question in zip(sampled["rows"], sampled["questions"]):
        for t, ids, probs in zip(row["steps"], row["target_ids"], row["target_probs"]):
            lines.append(json.dumps({"prompt_id": question, "step": t, "prefix": tokenizer.decode(row["completion_ids"][:t]),
                                     "token_ids": ids, "weights": probs, "kl_divergence": 1.0}))
    path.write_text("\n".join(lines[:limit]) + "\n")
    return path


def test_reference_jsonl_samples_are_imported_once_as_single_step_trajectories(tiny_pair, sampled, tmp_path):
    from lightreasoner_ray.data.samples import check_samples
    from lightreasoner_ray.stages.training.driver import find_samples, model_vocab_and_context

    config = train_config(tiny_pair, tmp_path / "run", reference_jsonl(sampled, tmp_path / "cd_samples.jsonl"))
    vocab_size, context = model_vocab_and_context(config)
    files = find_samples(config, sampled["tokenizer"], vocab_size)
    assert len(files) == 1 and "/run/imported_samples/cd_samples-" in files[0]
    info = check_samples(files, vocab_size, context)
    assert info.trajectories == info.selected_steps == 40
    first = trajectories_from_table(pq.read_table(files[0]))
    assert all(t.num_steps == 1 and t.positions[0] == t.num_tokens - 1 for t in first)
    assert find_samples(config, sampled["tokenizer"], vocab_size) == files  # reused, not re-imported


@pytest.mark.parametrize(
    "case, overrides, words",
    [
        ("missing", [], "no samples at"),
        ("empty", [], "holds no .parquet files"),
        ("other_tokenizer", [], "row 1 (problem 'far'), field completion_ids: token id 5000 is outside"),
        ("no_steps", [], "no selected steps"),
        ("jsonl_other_tokenizer", [], "cd.jsonl: line 2: field 'token_ids': token id 70000 is outside"),
        ("fine", ["train.deepspeed.stage=3", "train.deepspeed.offload=true"], "ZeRO stage 3 on CPU workers"),
        ("fine", ["train.gpus_per_worker=0.5"], "drives exactly one GPU"),
        ("fine", ["train.deepspeed.stage=1", "train.deepspeed.offload=true"], "needs ZeRO stage 2 or 3"),
        ("fine", ["train.lora.target_modules=[q_proj,qkv_proj]"], "qkv_proj match no module of the expert"),
    ],
)
def test_bad_inputs_fail_before_any_worker_starts(tiny_pair, sampled, tmp_path, case, overrides, words):
    from lightreasoner_ray.stages.training.driver import run_training

    samples = tmp_path / "samples"
    fine = synthetic_rows(sampled["tokenizer"], sampled["questions"][:1], [2])[0]
    rows = {
        "empty": None,
        "other_tokenizer": [fine, {**fine, "problem_id": "far", "completion_ids": [5, 5000, 7, 8, 9, 10]}],
        "no_steps": [{**fine, "steps": [], "kl": [], "target_ids": [], "target_probs": []}],
        "fine": [fine],
    }.get(case)
    if case != "missing":
        samples.mkdir()
    if case == "jsonl_other_tokenizer":
        samples = samples / "cd.jsonl"
        good = {"prompt_id": "How many?", "prefix": "She", "token_ids": [5], "weights": [1.0]}
        samples.write_text(json.dumps(good) + "\n" + json.dumps({**good, "token_ids": [70000]}) + "\n")
    if rows:
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), samples / "part-0.parquet")
    config = train_config(tiny_pair, tmp_path / "run", samples, *overrides)
    with pytest.raises(LightReasonerError) as error:
        run_training(config)
    assert words in str(error.value)
    if case == "other_tokenizer":
        assert str(samples / "part-0.parquet") in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_learning_rate_warms_up_then_follows_the_schedule():
    from lightreasoner_ray.core.schedule import lr_multiplier

    assert [lr_multiplier(u, 4, 20, "constant") for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(4, 4, 20, "linear") == 1.0 and lr_multiplier(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_multiplier(20, 4, 20, "linear") == 0.0
    assert lr_multiplier(12, 4, 20, "cosine") == pytest.approx(0.5) and lr_multiplier(20, 4, 20, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(0, 0, 10, "cosine") == 1.0
