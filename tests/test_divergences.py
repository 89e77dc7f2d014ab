"""The loss options beyond the paper (train.divergence, train.jsd_beta, train.anchor_weight), each
against a direct dense computation over the full vocabulary, one step at a time."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from lightreasoner_ray.config import TrainConfig
from lightreasoner_ray.core.loss import (
    SelectedStepLogits,
    dense_kl_divergence,
    sparse_divergence,
    sparse_kl_divergence,
    step_kl,
    step_loss,
)
from lightreasoner_ray.errors import LightReasonerError

VOCAB = 11


def _label(generator: torch.Generator, steps: int, width: int = 4):
    """Sparse labels with distinct ids per step, some steps padded (id 0, probability 0)."""
    ids = torch.stack([torch.randperm(VOCAB, generator=generator)[:width] for _ in range(steps)])
    probs = torch.rand(steps, width, generator=generator, dtype=torch.float64) + 0.05
    probs[1, -1] = 0.0  # a padded entry...
    ids[1, -1] = ids[1, 0]  # ...repeating a real id
    probs[2, -2:] = 0.0
    ids[2, -2:] = 0
    return ids, probs / probs.sum(-1, keepdim=True)


def _dense(ids: torch.Tensor, probs: torch.Tensor, vocab: int = VOCAB) -> torch.Tensor:
    dense = torch.zeros(ids.shape[0], vocab, dtype=torch.float64)
    for step in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            if probs[step, k] > 0:
                dense[step, ids[step, k]] += probs[step, k]
    return dense


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(p, q) if a > 0)


def _oracle(logits: torch.Tensor, ids, probs, divergence: str, beta: float) -> list[float]:
    values = []
    for v, row in zip(_dense(ids, probs, logits.shape[-1]), logits.double()):
        pi = torch.softmax(row, -1)
        if divergence == "forward_kl":
            values.append(_kl(v, pi))
        elif divergence == "reverse_kl":
            restricted = torch.where(v > 0, pi, torch.zeros_like(pi))
            values.append(_kl(restricted / restricted.sum(), v))
        else:
            m = beta * v + (1 - beta) * pi
            values.append(beta * _kl(v, m) + (1 - beta) * _kl(pi, m))
    return values


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9)])
def test_each_divergence_equals_a_dense_per_step_computation(divergence, beta):
    generator = torch.Generator().manual_seed(3)
    ids, probs = _label(generator, steps=5)
    logits = torch.randn(5, VOCAB, generator=generator, dtype=torch.float64) * 3
    got = sparse_divergence(logits, ids, probs, divergence, beta)
    assert got.shape == (5,)
    assert got.tolist() == pytest.approx(_oracle(logits, ids, probs, divergence, beta), rel=1e-9, abs=1e-12)
    assert (got >= -1e-12).all()


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_gradients_match_the_dense_computation_and_vanish_where_the_model_is_the_label(divergence):
    generator = torch.Generator().manual_seed(5)
    ids, probs = _label(generator, steps=4)
    logits = (torch.randn(4, VOCAB, generator=generator, dtype=torch.float64)).requires_grad_()
    sparse_divergence(logits, ids, probs, divergence, 0.3).sum().backward()

    dense_logits = logits.detach().clone().requires_grad_()
    v = _dense(ids, probs)
    pi = torch.softmax(dense_logits, -1)
    if divergence == "reverse_kl":
        restricted = torch.where(v > 0, pi, torch.zeros_like(pi))
        restricted = restricted / restricted.sum(-1, keepdim=True)
        safe = torch.where(v > 0, restricted / v.clamp_min(1e-300), torch.ones_like(v))
        total = (restricted * safe.log()).sum()
    else:
        m = 0.3 * v + 0.7 * pi
        kl_v = torch.where(v > 0, v * (v.clamp_min(1e-300) / m).log(), torch.zeros_like(v)).sum()
        total = 0.3 * kl_v + 0.7 * (pi * (pi / m).log()).sum()
    total.backward()
    torch.testing.assert_close(logits.grad, dense_logits.grad, rtol=1e-7, atol=1e-10)

    # A model that already puts exactly the label's distribution on its support (and nothing elsewhere):
    # both divergences are 0 there.
    exact = torch.full((4, VOCAB), -1e4, dtype=torch.float64)
    for step in range(4):
        for k in range(ids.shape[1]):
            if probs[step, k] > 0:
                exact[step, ids[step, k]] = math.log(float(probs[step, k]))
    assert sparse_divergence(exact, ids, probs, divergence, 0.3).abs().max() < 1e-9


def test_forward_kl_is_the_papers_loss_and_the_default():
    generator = torch.Generator().manual_seed(7)
    ids, probs = _label(generator, steps=3)
    logits = torch.randn(3, VOCAB, generator=generator)
    torch.testing.assert_close(sparse_divergence(logits, ids, probs), sparse_kl_divergence(logits, ids, probs))
    assert TrainConfig().divergence == "forward_kl" and TrainConfig().anchor_weight == 0.0


def test_the_anchor_adds_the_kl_from_the_base_models_distribution_with_the_adapter_off():
    """step_loss with anchor_weight w = divergence + w * KL(pi_base || pi_lora) at each step; the base logits
    come from the same model with its LoRA adapter disabled, and carry no gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = Qwen2ForCausalLM(config).double()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapped = SelectedStepLogits(lora)
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
    ids, probs = _label(generator, steps=3)
    batch = SimpleNamespace(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            step_rows=torch.tensor([0, 1, 1]), step_positions=torch.tensor([4, 2, 8]),
                            target_ids=ids, target_probs=probs)

    with lora.disable_adapter():
        base_logits = lora.base_model.model(input_ids=input_ids).logits[batch.step_rows, batch.step_positions]
    lora_logits = lora(input_ids=input_ids).logits[batch.step_rows, batch.step_positions]
    assert (base_logits - lora_logits).abs().max() > 1e-3  # the adapter changes the model
    anchor = [_kl(torch.softmax(b, -1), torch.softmax(m, -1)) for b, m in zip(base_logits.detach(), lora_logits.detach())]
    plain = step_kl(wrapped, batch)
    with_anchor = step_loss(wrapped, batch, anchor_weight=0.25)
    assert (with_anchor - plain).tolist() == pytest.approx([0.25 * a for a in anchor], rel=1e-9)
    torch.testing.assert_close(dense_kl_divergence(base_logits, lora_logits), torch.tensor(anchor, dtype=torch.float64))
    torch.testing.assert_close(step_loss(wrapped, batch), plain)

    with_anchor.sum().backward()
    frozen = [p for n, p in lora.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen) and all(p.grad is not None for n, p in lora.named_parameters()
                                                       if "lora_" in n)


@pytest.mark.parametrize("override,needle", [
    ({"divergence": "kl"}, "train.divergence must be one of forward_kl, reverse_kl, jsd"),
    ({"divergence": "jsd", "jsd_beta": 1.0}, "train.jsd_beta must be in (0, 1)"),
    ({"anchor_weight": -0.1}, "train.anchor_weight must be >= 0"),
])
def test_bad_loss_settings_are_one_line_naming_the_key(override, needle):
    with pytest.raises(LightReasonerError) as error:
        TrainConfig(**override).validate("train")
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_the_anchor_without_lora_is_refused():
    from lightreasoner_ray.config import LoraConfig

    with pytest.raises(LightReasonerError, match="needs train.lora.enabled=true"):
        TrainConfig(anchor_weight=0.1, lora=LoraConfig(enabled=False)).validate("train")


def test_loss_settings_shape_the_checkpoints_and_an_older_record_without_them_still_resumes():
    from lightreasoner_ray.config import Config
    from lightreasoner_ray.stages.training.provenance import TrainingProvenance, shaping_train_settings

    config = Config()
    settings = shaping_train_settings(config)
    assert {"train.divergence", "train.anchor_weight"} <= set(settings)
    assert "train.jsd_beta" not in settings  # read by the jsd loss alone
    jsd = dataclasses.replace(config, train=dataclasses.replace(config.train, divergence="jsd"))
    assert shaping_train_settings(jsd)["train.jsd_beta"] == 0.5
    now = TrainingProvenance(samples="s", expert="e", settings=settings)
    older = {k: v for k, v in settings.items() if k not in ("train.divergence", "train.jsd_beta", "train.anchor_weight")}
    assert now.changes_from(TrainingProvenance(samples="s", expert="e", settings=older)) == []
    changed = TrainingProvenance(samples="s", expert="e", settings={**settings, "train.divergence": "jsd"})
    assert changed.changes_from(now) == ["train.divergence: 'forward_kl' -> 'jsd'"]
    reverse = TrainingProvenance(samples="s", expert="e", settings={**older, "train.divergence": "reverse_kl"})
    assert reverse.changes_from(TrainingProvenance(samples="s", expert="e", settings=older)) == [
        "train.divergence: '<unset>' -> 'reverse_kl'"]
    # A record that holds jsd_beta without jsd (an older version recorded it always) resumes: it never shaped them.
    always = TrainingProvenance(samples="s", expert="e", settings={**settings, "train.jsd_beta": 0.3})
    assert now.changes_from(always) == []
    # A record of a jsd run is still refused by a forward-KL run: the divergence changed.
    was_jsd = TrainingProvenance(samples="s", expert="e", settings=shaping_train_settings(jsd))
    assert now.changes_from(was_jsd) == ["train.divergence: 'jsd' -> 'forward_kl'"]


# Through the trainer (Ray Train + DeepSpeed, CPU).

@pytest.mark.slow
def test_the_trainer_optimises_the_chosen_divergence_and_the_anchor_keeps_the_model_near_the_expert(
        tiny_pair, ray_local, tmp_path):
    """The first update's logged loss is the JSD of the untrained model (a LoRA adapter starts as the base)
    over the update's 12 steps, computed here directly; and with a strong anchor the trained model stays
    nearer the expert's own distribution at the selected steps than without one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
    from lightreasoner_ray.stages.training.driver import logit_vocab_size, run_training
    from conftest import gsm8k_rows
    from lightreasoner_ray.core.update_plan import collate
    from lightreasoner_ray.data.samples import trajectories_from_table
    from test_training import load_adapter, load_base, metrics, synthetic_rows, train_config

    tokenizer = _tokenizer(tiny_pair)
    rows = synthetic_rows(tokenizer, [r["question"] for r in gsm8k_rows(2)], [3, 9])
    samples = tmp_path / "samples"
    samples.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), samples / "part-0.parquet")
    common = ["train.steps_per_update=12", "train.micro_batch_steps=4", "train.lora.dropout=0.0",
              "train.checkpoint_every=8", "train.lr=0.02"]
    jsd = train_config(tiny_pair, tmp_path / "jsd", samples, *common, "train.max_steps=1", "train.divergence=jsd",
                       "train.jsd_beta=0.3")
    run_training(jsd)
    batch = collate(trajectories_from_table(pa.Table.from_pylist(rows)), 0)
    wrapped = SelectedStepLogits(load_base(tiny_pair), logit_vocab_size(jsd))
    with torch.no_grad():
        logits = wrapped(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_positions)
        expected = _oracle(logits, batch.target_ids, batch.target_probs.double(), "jsd", 0.3)
    assert metrics(tmp_path / "jsd")[0]["loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert metrics(tmp_path / "jsd")[0]["loss"] < sparse_kl_divergence(logits, batch.target_ids,
                                                                       batch.target_probs).mean().item()

    drift = {}
    for weight in (0.0, 5.0):
        output_dir = tmp_path / f"anchor{weight}"
        run_training(train_config(tiny_pair, output_dir, samples, *common, "train.max_steps=8",
                                  f"train.anchor_weight={weight}"))
        trained = SelectedStepLogits(load_adapter(tiny_pair, output_dir / "model"), logit_vocab_size(jsd))
        with torch.no_grad():
            moved = trained(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_positions)
        drift[weight] = dense_kl_divergence(logits, moved).mean().item()
    assert drift[0.0] > 0 and drift[5.0] < 0.5 * drift[0.0]


def _tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair["expert"])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("anchor_weight", [0.0, 0.5])
def test_a_placeholder_micro_batch_adds_no_loss_and_no_gradient(divergence, anchor_weight):
    """A rank with no steps left runs a one-token placeholder (an empty label): whatever the loss options, it
    contributes exactly nothing, while the real steps of a batch are untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightreasoner_ray.core.update_plan import placeholder_micro_batch

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lora = get_peft_model(Qwen2ForCausalLM(config).double(),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapped = SelectedStepLogits(lora)
    placeholder = placeholder_micro_batch(pad_id=0)
    loss = step_loss(wrapped, placeholder, divergence, 0.5, anchor_weight)
    assert loss.tolist() == [0.0]
    loss.sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in lora.parameters())

    generator = torch.Generator().manual_seed(2)
    ids, probs = _label(generator, steps=3)
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=generator)
    real = SimpleNamespace(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           step_rows=torch.tensor([0, 0]), step_positions=torch.tensor([2, 5]),
                           target_ids=ids[:2], target_probs=probs[:2])
    assert (step_loss(wrapped, real, divergence, 0.5, anchor_weight) > 0).all()


def test_the_anchor_kl_is_finite_where_both_distributions_exclude_a_token():
    reference = torch.tensor([[0.0, 1.0, float("-inf")]], dtype=torch.float64)
    logits = torch.tensor([[0.5, 0.2, float("-inf")]], dtype=torch.float64)
    value = dense_kl_divergence(reference, logits)
    p, q = torch.softmax(reference[0, :2], -1), torch.softmax(logits[0, :2], -1)
    assert value.item() == pytest.approx(_kl(p, q))
