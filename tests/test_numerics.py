"""The sampler and the trainer see the same distribution, projected in fp32."""

from __future__ import annotations

import pytest
import torch

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.engines.generation import completion_hidden_states, completion_logits
from lightreasoner_ray.core.lm_head import LMHead, ProjectedRows, head_logits, logit_transform
from lightreasoner_ray.core.loss import SelectedStepLogits
from lightreasoner_ray.data.prompts import prompt_ids
from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler
from lightreasoner_ray.core.update_plan import collate, trajectory_from_row

from conftest import gsm8k_rows


def _untrained_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM"))
    return wrapped.eval()


def _sampled(tiny_pair, softcap: float | None):
    sampler = ContrastiveSampler(ModelConfig(str(tiny_pair["expert"])), ModelConfig(str(tiny_pair["amateur"])),
                                 alpha=0.2, beta=0.0, max_new_tokens=16, position_chunk=5)
    for model in (sampler.expert, sampler.amateur):
        model.config.final_logit_softcapping = softcap
    prompts = [prompt_ids(sampler.tokenizer, row["question"], "Please reason step by step.") for row in gsm8k_rows(3)]
    rows = sampler.sample(["a", "b", "c"], prompts)
    return sampler, prompts, rows


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_samplers_pi_e_equals_trainers_pi_theta_for_the_untrained_model(tiny_pair, softcap):
    sampler, prompts, rows = _sampled(tiny_pair, softcap)
    assert sampler.vocab_size == 600 < sampler.expert.get_output_embeddings().weight.shape[0]  # a padded head
    sequences = [p + r["completion_ids"] for p, r in zip(prompts, rows)]
    expert_rows = completion_logits(sampler.expert, sequences, [len(p) for p in prompts],
                                    sampler.tokenizer.pad_token_id, sampler.vocab_size)
    trajectories = [trajectory_from_row(row) for row in rows]
    assert all(t is not None and t.num_steps > 0 for t in trajectories)
    batch = collate(trajectories, sampler.tokenizer.pad_token_id)
    sampler_logprobs = torch.cat([
        torch.log_softmax(lazy[: len(lazy)], -1)[torch.tensor(row["steps"])] for lazy, row in zip(expert_rows, rows)
    ])

    trainer = SelectedStepLogits(_untrained_lora(sampler.expert), sampler.vocab_size)
    with torch.no_grad():
        trainer_logits = trainer(batch.input_ids, batch.attention_mask, batch.step_rows, batch.step_positions)
    assert trainer_logits.dtype == torch.float32 and trainer_logits.shape[1] == 600
    trainer_logprobs = torch.log_softmax(trainer_logits, -1)
    assert trainer_logprobs.shape == sampler_logprobs.shape
    torch.testing.assert_close(trainer_logprobs, sampler_logprobs, rtol=0, atol=1e-5)
    if softcap is not None:
        assert trainer_logits.abs().max() <= softcap  # the soft-capping really applied, on both sides

    # The test can fail: the whole padded head is another distribution.
    whole_head = SelectedStepLogits(sampler.expert)
    with torch.no_grad():
        other = torch.log_softmax(whole_head(batch.input_ids, batch.attention_mask, batch.step_rows,
                                             batch.step_positions), -1)[:, :600]
    assert (other - sampler_logprobs).abs().max() > 1e-5


def test_the_sampled_kl_is_the_kl_of_the_shared_distributions(tiny_pair):
    sampler, prompts, rows = _sampled(tiny_pair, None)
    sequences = [p + r["completion_ids"] for p, r in zip(prompts, rows)]
    lengths, pad = [len(p) for p in prompts], sampler.tokenizer.pad_token_id
    expert = completion_logits(sampler.expert, sequences, lengths, pad, 600)
    amateur = completion_logits(sampler.amateur, sequences, lengths, pad, 600)
    for e, a, row in zip(expert, amateur, rows):
        # Independent oracle: full-model forward, logits cut to 600, float64 maths.
        p = torch.log_softmax(e[: len(e)].double(), -1)
        q = torch.log_softmax(a[: len(a)].double(), -1)
        expected = (p.exp() * (p - q)).sum(-1)
        assert row["position_kl"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)


def _bf16_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=20_000, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of 16-32, where bf16 spacing is 0.125
    return model.to(torch.bfloat16)


def test_a_bf16_head_is_projected_in_fp32():
    model = _bf16_model()
    hidden = torch.randn(7, 64).to(torch.bfloat16)
    head = LMHead(model, 19_000)
    logits = head(hidden)
    oracle = hidden.double() @ model.lm_head.weight[:19_000].double().T  # exact products of the bf16 values
    assert logits.dtype == torch.float32 and logits.shape == (7, 19_000)
    torch.testing.assert_close(logits.double(), oracle, rtol=1e-6, atol=1e-4)
    with torch.no_grad():
        rounded = model.lm_head(hidden)[:, :19_000].double()
    assert (rounded - oracle).abs().max() > 0.05  # what the bf16 head would have produced


def test_projected_rows_equal_dense_logits_and_sliced_heads_equal_one_matmul(monkeypatch):
    import lightreasoner_ray.core.lm_head as lm_head

    model = _bf16_model(1)
    head = LMHead(model, 20_000)
    hidden = torch.randn(11, 64).to(torch.bfloat16)
    dense = head(hidden)
    monkeypatch.setattr(lm_head, "SLICE_ROWS", 777)  # many slices, one ragged
    rows = ProjectedRows(hidden, LMHead(model, 20_000))
    assert len(rows) == 11
    # fp32 sums in another blocking order: equal to rounding
    torch.testing.assert_close(torch.cat([rows[0:4], rows[4:11]]), dense, rtol=1e-6, atol=1e-5)


def test_fp32_projection_gradients_match_autograd_of_the_plain_product():
    torch.manual_seed(0)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False, dtype=torch.float64)
    head.weight = torch.nn.Parameter(weight.detach().clone())
    transform = logit_transform(type("M", (), {"config": None, "get_output_embeddings": lambda self: head})(), 40)
    out = head_logits(hidden, head, transform)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    hidden_oracle = hidden.detach().clone().requires_grad_(True)
    weight_oracle = weight.detach().clone().requires_grad_(True)
    ((hidden_oracle @ weight_oracle[:40].T) * grad).sum().backward()
    torch.testing.assert_close(hidden.grad, hidden_oracle.grad)
    torch.testing.assert_close(head.weight.grad, weight_oracle.grad)
    assert head.weight.grad[40:].abs().max() == 0  # padded rows get no gradient


def test_teacher_forced_pass_builds_no_kv_cache(tiny_pair):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair["expert"])).eval()
    seen = []
    decoder = model.get_decoder()
    handle = decoder.register_forward_hook(lambda module, args, kwargs, output: seen.append(
        (kwargs.get("use_cache"), getattr(output, "past_key_values", None))), with_kwargs=True)
    try:
        hidden = completion_hidden_states(model, [[5, 6, 7, 8, 9], [5, 6, 7]], [2, 1], 0)
    finally:
        handle.remove()
    assert [h.shape for h in hidden] == [torch.Size([3, 64]), torch.Size([2, 64])]
    assert seen == [(False, None)]


def test_the_trainer_normalises_over_the_vocabulary_the_samples_recorded(tiny_pair, tmp_path):
    import json

    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.stages.training.driver import logit_vocab_size

    from conftest import REPO_ROOT

    def config(*extra):
        return load_config(REPO_ROOT / "configs" / "tiny.yaml", [
            f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", *extra])

    # No record: derived as the sampler derives it (tokenizer 600 ids, expert head 602 rows).
    assert logit_vocab_size(config(f"output_dir={tmp_path / 'none'}")) == 600
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sampling_settings.json").write_text(json.dumps({"vocab_size": 599}))
    assert logit_vocab_size(config(f"output_dir={tmp_path / 'run'}")) == 599
    assert logit_vocab_size(config("output_dir=/tmp/elsewhere",
                                   f"train.samples={tmp_path / 'run' / 'samples' / 'part-0.parquet'}")) == 599
