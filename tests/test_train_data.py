"""Trajectories, packing, the resumable micro-batch stream, sample checks, reference JSONL import."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
import torch

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
from lightreasoner_ray.data.samples import check_samples, check_samples_table, reference_rows
from lightreasoner_ray.core.update_plan import Trajectory, UpdatePlan, collate, micro_batches_per_update, pack_trajectories, placeholder_micro_batch, trajectory_from_row


def row(prompt, completion, steps, problem_id="p", support=2):
    return {
        "problem_id": problem_id,
        "prompt_ids": prompt,
        "completion_ids": completion,
        "steps": steps,
        "kl": [1.0] * len(steps),
        "target_ids": [[3 + k for k in range(support)] for _ in steps],
        "target_probs": [[1.0 / support] * support for _ in steps],
        "position_kl": [],
    }


def synthetic(num_steps: int, name: str) -> Trajectory:
    return Trajectory(input_ids=(1,) * (num_steps + 1), positions=tuple(range(num_steps)),
                      target_ids=((2,),) * num_steps, target_probs=((1.0,),) * num_steps, problem_id=name)


def test_trajectory_runs_up_to_the_last_step_and_labels_shifted_positions():
    trajectory = trajectory_from_row(row([10, 11, 12], [20, 21, 22, 23, 24], [1, 3]))
    assert trajectory.input_ids == (10, 11, 12, 20, 21, 22)  # prompt + completion[:3]
    # logits predicting completion token t sit at len(prompt) - 1 + t
    assert trajectory.positions == (3, 5)
    assert trajectory_from_row(row([10], [20], [])) is None


def test_a_step_after_the_completion_labels_the_last_position():
    trajectory = trajectory_from_row(row([10, 11], [20, 21], [2]))
    assert trajectory.input_ids == (10, 11, 20, 21)
    assert trajectory.positions == (3,)


def test_packing_keeps_trajectories_whole_within_the_budget():
    trajectories = [synthetic(n, str(i)) for i, n in enumerate([3, 4, 2, 9, 1, 5])]
    batches = list(pack_trajectories(trajectories, micro_batch_steps=8))
    assert [[t.problem_id for t in batch] for batch in batches] == [["0", "1"], ["2"], ["3"], ["4", "5"]]
    assert [t for batch in batches for t in batch] == trajectories
    for batch in batches:
        assert sum(t.num_steps for t in batch) <= 8 or len(batch) == 1


def steps_of(pieces) -> list[tuple[str, int]]:
    return [(piece.problem_id, position) for piece in pieces for position in piece.positions]


def varied_trajectories() -> list[Trajectory]:
    """Distinct trajectories of 1 to 23 steps at scattered positions (several longer than a micro-batch)."""
    rng = random.Random(1)
    trajectories = []
    for index, count in enumerate([3, 1, 4, 1, 5, 9, 2, 6, 23, 7, 11, 2]):
        positions = tuple(sorted(rng.sample(range(2, 60), count)))
        trajectories.append(Trajectory(
            input_ids=tuple(rng.randrange(5, 90) for _ in range(positions[-1] + 1)), positions=positions,
            target_ids=tuple((5 + k,) for k in range(count)), target_probs=((1.0,),) * count, problem_id=f"t{index}"))
    return trajectories


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_plan_trains_exactly_n_steps_an_update_each_step_once_an_epoch_with_equal_micro_batches(world_size):
    trajectories = varied_trajectories()
    by_id = {t.problem_id: t for t in trajectories}
    every_step = sorted(steps_of(trajectories))  # 74 steps an epoch
    n, cap = 16, 5
    plan = UpdatePlan(random.Random(7).sample(trajectories, len(trajectories)), n, world_size, cap, seed=3)
    grad_accum = micro_batches_per_update(n, world_size, cap)
    assert plan.micro_batches_per_rank == grad_accum == {1: 4, 2: 2, 8: 1}[world_size]
    sequence, split_seen = [], False
    for update in range(1, 20):  # 304 steps: four whole epochs and a part
        shares = [plan.micro_batches(update, rank) for rank in range(world_size)]
        assert [len(share) for share in shares] == [grad_accum] * world_size  # same forward/backward calls on all ranks
        update_steps = [step for share in shares for batch in share for step in steps_of(batch)]
        assert len(update_steps) == n
        for share in shares:
            assert abs(sum(len(steps_of(batch)) for batch in share) - n / world_size) < 1
            for batch in share:
                assert len(steps_of(batch)) <= cap
                for piece in batch:
                    whole = by_id[piece.problem_id]
                    # a piece runs only the prefix its last step needs, labels its own steps
                    assert piece.input_ids == whole.input_ids[: piece.positions[-1] + 1]
                    first = whole.positions.index(piece.positions[0])
                    assert whole.positions[first: first + piece.num_steps] == piece.positions
                    assert whole.target_ids[first: first + piece.num_steps] == piece.target_ids
                    split_seen |= piece.num_steps < whole.num_steps
        assert plan.epoch_of(update) == (len(sequence) + n - 1) // len(every_step)
        sequence.extend(update_steps)
    assert split_seen
    assert max(len(steps_of(batch)) for rank in range(world_size) for batch in plan.micro_batches(3, rank)) == min(cap, n // world_size)
    epochs = [sequence[i: i + len(every_step)] for i in range(0, 4 * len(every_step), len(every_step))]
    assert all(sorted(epoch) == every_step for epoch in epochs)  # every step exactly once an epoch
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    # one global order: the same steps in the same updates whatever the number of workers
    single = UpdatePlan(trajectories, n, 1, cap, seed=3)
    assert sequence == [s for update in range(1, 20) for batch in single.micro_batches(update, 0) for s in steps_of(batch)]
    assert sequence != [s for update in range(1, 20) for batch in UpdatePlan(trajectories, n, 1, cap, seed=4).micro_batches(update, 0)
                        for s in steps_of(batch)]


def test_plan_of_an_update_depends_on_its_number_alone_and_pads_short_shares():
    trajectories = varied_trajectories()
    fresh = UpdatePlan(trajectories, 10, 3, 3, seed=0)
    used = UpdatePlan(trajectories, 10, 3, 3, seed=0)
    for update in range(1, 30):
        used.micro_batches(update, 0)
    assert [fresh.micro_batches(31, rank) for rank in range(3)] == [used.micro_batches(31, rank) for rank in range(3)]
    # 10 steps over 3 ranks: shares of 4, 3, 3 in two micro-batches of at most 3; a short share gets nothing more
    assert [[len(steps_of(batch)) for batch in fresh.micro_batches(5, rank)] for rank in range(3)] == [[3, 1], [3, 0], [3, 0]]
    assert fresh.micro_batches(5, 1)[1] == []  # the worker runs a placeholder there
    with pytest.raises(ValueError):
        UpdatePlan([], 4, 1, 2, seed=0)


def test_an_update_larger_than_an_epoch_wraps_into_the_next():
    trajectories = [synthetic(2, "a"), synthetic(3, "b")]
    plan = UpdatePlan(trajectories, 12, 2, 4, seed=0)
    steps = [s for rank in range(2) for batch in plan.micro_batches(1, rank) for s in steps_of(batch)]
    assert len(steps) == 12 and plan.epoch_of(1) == 2 and plan.epoch_of(2) == 4


def test_collate_pads_rows_and_indexes_the_selected_steps():
    a = trajectory_from_row(row([1, 2], [5, 6, 7], [0, 2], support=3))
    b = trajectory_from_row(row([1, 2, 3, 4], [8], [1], support=1))
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 5, 6, 0], [1, 2, 3, 4, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.step_rows.tolist() == [0, 0, 1] and batch.step_positions.tolist() == [1, 3, 4]
    assert batch.target_ids.shape == (3, 3) and batch.target_probs[2].tolist() == [1.0, 0.0, 0.0]
    assert batch.num_steps == 3 and batch.forward_tokens == 9


def test_placeholder_batch_carries_no_weight():
    batch = placeholder_micro_batch(pad_id=0)
    assert batch.num_steps == 0 and batch.forward_tokens == 0
    assert torch.all(batch.target_probs == 0)


def table(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


def test_check_counts_steps_and_tokens():
    info = check_samples_table(table([row([1, 2], [3, 4, 5], [0, 2]), row([1], [3], [])]), "s.parquet", 50, 100)
    assert (info.rows, info.trajectories, info.selected_steps, info.forward_tokens) == (2, 1, 2, 4)


@pytest.mark.parametrize(
    "bad_row, field, words",
    [
        (row([1, 2], [3, 900, 5], [0]), "completion_ids", "token id 900 is outside"),
        (row([1, 2], [3, 4], [0]) | {"target_ids": [[3, 700]]}, "target_ids", "token id 700 is outside"),
        (row([1, 2], [3, 4], [5]), "steps", "step 5 is outside"),
        (row([1, 2], [3, 4], [0]) | {"target_probs": [[0.9, 0.3]]}, "target_probs", "not a probability"),
        (row([1, 2], [3, 4], [0, 1]) | {"target_ids": [[3, 4]]}, "steps/target_ids/target_probs", "2 steps but 1"),
        (row([1, 2], [3, 4], [0]) | {"target_probs": [[1.0]]}, "target_ids", "2 label ids and 1"),
        (row(list(range(1, 40)), [3] * 30, [29]), "completion_ids", "more than the model's context"),
    ],
)
def test_check_names_file_row_and_field(bad_row, field, words):
    rows = [row([1, 2], [3, 4], [1], problem_id="fine"), {**bad_row, "problem_id": "broken"}]
    with pytest.raises(LightReasonerError) as error:
        check_samples_table(table(rows), "/data/part-7.parquet", vocab_size=600, context=64)
    message = str(error.value)
    assert "/data/part-7.parquet: row 1 (problem 'broken')" in message
    assert f"field {field}" in message and words in message


def test_check_rejects_missing_columns_and_unreadable_files(tmp_path):
    with pytest.raises(LightReasonerError, match="missing column"):
        check_samples_table(pa.table({"problem_id": ["a"]}), "x.parquet", 10, 10)
    broken = tmp_path / "part-0.parquet"
    broken.write_text("not parquet")
    with pytest.raises(LightReasonerError, match="cannot read"):
        check_samples([str(broken)], 10, 10)


@pytest.fixture(scope="module")
def tokenizer():
    from lightreasoner_ray.toy.tiny_models import train_tokenizer

    return train_tokenizer(["Natalia sold 48 clips in April and half as many in May. How many clips altogether?",
                            "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips."] * 20, vocab_size=400)


def reference_line(question: str, prefix: str, ids, weights, **extra) -> str:
    return json.dumps({"prompt_id": question, "step": 3, "prefix": prefix, "tokens": ["x"] * len(ids),
                       "token_ids": ids, "weights": weights, **extra})


def test_reference_jsonl_rows_tokenize_template_plus_prefix_and_label_the_last_position(tokenizer):
    from lightreasoner_ray.data.prompts import chat_messages

    question, prefix = "How many clips altogether?", "She sold 48 / 2 = 24"
    lines = [reference_line(question, prefix, [5, 9], [0.25, 0.75], kl_divergence=0.9), "",
             reference_line(question, "", [7], [1.0])]
    rows = reference_rows(lines, "cd_samples.jsonl", tokenizer, vocab_size=len(tokenizer))
    assert len(rows) == 2
    template = tokenizer.apply_chat_template(chat_messages(question, "Please reason step by step."),
                                             tokenize=False, add_generation_prompt=True)
    expected = tokenizer(template + prefix)["input_ids"]
    first = trajectory_from_row(rows[0])
    assert list(first.input_ids) == expected and first.positions == (len(expected) - 1,)
    assert rows[0]["target_ids"] == [[5, 9]] and rows[0]["kl"] == [pytest.approx(0.9)]
    assert rows[0]["problem_id"] == "cd_samples.jsonl:1" and rows[1]["problem_id"] == "cd_samples.jsonl:3"
    second = trajectory_from_row(rows[1])  # empty prefix: the label predicts the first answer token
    assert list(second.input_ids) == tokenizer(template)["input_ids"]
    check_samples_table(table(rows), "imported", vocab_size=len(tokenizer), context=4096)


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "line 1: not valid JSON"),
        (json.dumps({"prompt_id": "q", "prefix": "", "token_ids": [1]}), "missing field 'weights'"),
        (reference_line("q", "", [1, 2], [1.0]), "equal length"),
        (reference_line("q", "", [5000], [1.0]), "token id 5000 is outside the model's vocabulary"),
        (reference_line("q", "", [1, 2], [0.7, 0.7]), "not a probability distribution"),
    ],
)
def test_reference_jsonl_errors_name_the_line(tokenizer, line, words):
    with pytest.raises(LightReasonerError) as error:
        reference_rows([line], "/data/cd.jsonl", tokenizer, vocab_size=len(tokenizer))
    assert "/data/cd.jsonl: line 1" in str(error.value) and words in str(error.value)
