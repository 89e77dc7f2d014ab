"""The packed loss against its oracle: every selected step trained as its own sequence."""

from __future__ import annotations

import random

import pytest
import torch

from lightreasoner_ray.core.loss import SelectedStepLogits, sparse_kl_divergence, step_kl, update_loss_scale
from lightreasoner_ray.core.update_plan import UpdatePlan, collate, one_step_trajectories, placeholder_micro_batch, trajectory_from_row

VOCAB = 97
PAD_ID = 0


def tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    # float64 (Qwen2's RMSNorm still computes in float32, hence the ~1e-7 relative tolerances below)
    return Qwen2ForCausalLM(config).double().eval()


def sample_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows in the samples schema with uneven lengths, steps (first, last, past-the-end) and supports."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 12))]
        completion = [rng.randrange(1, VOCAB) for _ in range(rng.randint(4, 20))]
        steps = sorted(rng.sample(range(len(completion)), rng.randint(1, min(6, len(completion)))))
        if index == 0:
            steps = sorted(set(steps) | {0, len(completion)})  # first position and the one after the end
        target_ids, target_probs = [], []
        for _ in steps:
            support = rng.sample(range(VOCAB), rng.randint(1, 5))
            weights = [rng.random() + 0.05 for _ in support]
            target_ids.append(support)
            # float32 values, as the samples Parquet stores them
            target_probs.append(torch.tensor([w / sum(weights) for w in weights], dtype=torch.float32).tolist())
        rows.append({"problem_id": str(index), "prompt_ids": prompt, "completion_ids": completion, "steps": steps,
                     "target_ids": target_ids, "target_probs": target_probs})
    return rows


def oracle_kl(model, row: dict) -> torch.Tensor:
    """One forward pass per selected step over prompt + completion[:t]; dense KL at the last position."""
    values = []
    for t, ids, probs in zip(row["steps"], row["target_ids"], row["target_probs"]):
        sequence = torch.tensor([row["prompt_ids"] + row["completion_ids"][:t]])
        logprobs = torch.log_softmax(model(input_ids=sequence).logits[0, -1], dim=-1)
        label = torch.zeros(VOCAB, dtype=torch.float64)
        label[torch.tensor(ids)] = torch.tensor(probs, dtype=torch.float64)
        support = label > 0
        values.append((label[support] * (label[support].log() - logprobs[support])).sum())
    return torch.stack(values)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient equal up to float32 rounding (relative error of the whole tensor)."""
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        assert reference.norm() > 0, name
        relative = ((actual[name] - reference).norm() / reference.norm()).item()
        assert relative < 1e-5, f"{name}: relative gradient error {relative:.2e}"


def test_packed_loss_and_gradients_equal_one_sequence_per_step():
    model = tiny_model()
    rows = sample_rows(5)
    trajectories = [trajectory_from_row(row) for row in rows]

    model.zero_grad()
    packed = step_kl(SelectedStepLogits(model), collate(trajectories, PAD_ID))
    packed.mean().backward()
    packed_grads = gradients(model)

    model.zero_grad()
    oracle = torch.cat([oracle_kl(model, row) for row in rows])
    oracle.mean().backward()
    oracle_grads = gradients(model)

    assert packed.shape == oracle.shape == (sum(len(r["steps"]) for r in rows),)
    torch.testing.assert_close(packed, oracle, rtol=1e-6, atol=1e-9)
    assert_same_gradients(packed_grads, oracle_grads)


def test_one_step_trajectories_reproduce_the_oracle_through_the_same_loss():
    model = tiny_model(1)
    row = sample_rows(1, seed=3)[0]
    singles = one_step_trajectories(trajectory_from_row(row))
    assert [s.num_steps for s in singles] == [1] * len(row["steps"])
    with torch.no_grad():
        per_step = torch.cat([step_kl(SelectedStepLogits(model), collate([s], PAD_ID)) for s in singles])
        torch.testing.assert_close(per_step, oracle_kl(model, row), rtol=1e-6, atol=1e-9)


def test_sparse_kl_matches_dense_kl_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    target_ids = torch.tensor([[2, 5, 0], [7, 0, 0], [1, 3, 9]])
    target_probs = torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    dense = torch.zeros(3, 11).scatter_add_(1, target_ids, target_probs)
    logprobs = torch.log_softmax(logits, dim=-1)
    expected = torch.where(dense > 0, dense * (dense.clamp_min(1e-30).log() - logprobs), torch.zeros_like(dense)).sum(-1)
    torch.testing.assert_close(sparse_kl_divergence(logits, target_ids, target_probs), expected)


def test_sparse_kl_is_zero_when_the_model_matches_the_label():
    label = torch.tensor([[0.6, 0.4]])
    logits = torch.full((1, 8), -1e4)
    logits[0, 3], logits[0, 6] = torch.tensor(0.6).log(), torch.tensor(0.4).log()
    kl = sparse_kl_divergence(logits, torch.tensor([[3, 6]]), label)
    assert kl.abs().item() < 1e-6


def test_update_scale_makes_the_update_gradient_the_mean_over_all_its_steps():
    """Simulate DeepSpeed: each micro-batch loss divided by grad_accum, gradients averaged over ranks.

    Four micro-batches of uneven step counts on two 'workers': with the scale the summed
    gradient equals the gradient of the plain mean over every step of the update.
    """
    model = tiny_model(2)
    wrapped = SelectedStepLogits(model)
    trajectories = [trajectory_from_row(row) for row in sample_rows(6, seed=7)]
    workers = [[trajectories[0:1], trajectories[1:3]], [trajectories[3:4], trajectories[4:6]]]
    world_size, grad_accum = len(workers), len(workers[0])
    update_steps = sum(t.num_steps for t in trajectories)
    scale = update_loss_scale(world_size, grad_accum, update_steps)

    model.zero_grad()
    for worker in workers:
        for micro_batch in worker:
            loss = step_kl(wrapped, collate(micro_batch, PAD_ID)).sum() * scale
            (loss / grad_accum / world_size).backward()  # DeepSpeed's scaling and rank averaging
    simulated = gradients(model)

    model.zero_grad()
    step_kl(wrapped, collate(trajectories, PAD_ID)).mean().backward()
    assert_same_gradients(simulated, gradients(model))


@pytest.mark.parametrize("world_size, micro_batch_steps", [(1, 4), (3, 2)])
def test_a_planned_update_split_across_ranks_and_micro_batches_has_the_gradient_of_one_sequence_per_step(
    world_size, micro_batch_steps
):
    """An UpdatePlan update (trajectories cut into pieces across ranks and micro-batches, placeholders
    included, DeepSpeed's scaling simulated) against the oracle: each of the update's N steps run as
    its own sequence over prompt + completion[:t], the mean of their KLs."""
    model = tiny_model(3)
    wrapped = SelectedStepLogits(model)
    rows = sample_rows(8, seed=11)
    plan = UpdatePlan([trajectory_from_row(row) for row in rows], steps_per_update=13, world_size=world_size,
                      micro_batch_steps=micro_batch_steps, seed=5)
    update = 2
    shares = [plan.micro_batches(update, rank) for rank in range(world_size)]
    pieces = [piece for share in shares for batch in share for piece in batch]
    assert len({piece.problem_id for piece in pieces}) < len(pieces)  # some trajectory is split in this update
    grad_accum = plan.micro_batches_per_rank
    assert all(len(share) == grad_accum for share in shares)
    scale = update_loss_scale(world_size, grad_accum, 13)

    model.zero_grad()
    for share in shares:
        for batch in share:
            micro_batch = collate(batch, PAD_ID) if batch else placeholder_micro_batch(PAD_ID)
            loss = step_kl(wrapped, micro_batch).sum() * scale
            (loss / grad_accum / world_size).backward()  # DeepSpeed's scaling and rank averaging
    simulated = gradients(model)

    by_id = {row["problem_id"]: row for row in rows}
    model.zero_grad()
    oracle = []
    for piece in pieces:
        row = by_id[piece.problem_id]
        for position in piece.positions:
            t = position - (len(row["prompt_ids"]) - 1)
            step = row["steps"].index(t)
            single = {**row, "steps": [t], "target_ids": [row["target_ids"][step]],
                      "target_probs": [row["target_probs"][step]]}
            oracle.append(oracle_kl(model, single))
    assert len(oracle) == 13
    torch.cat(oracle).mean().backward()
    assert_same_gradients(simulated, gradients(model))


def test_update_scale_needs_steps():
    with pytest.raises(ValueError):
        update_loss_scale(2, 2, 0)
