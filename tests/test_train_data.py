"""Trajectories, packing, the resumable micro-batch stream, sample checks, reference JSONL import."""

from __future__ import annotations

import itertools
import json
import random

import pyarrow as pa
import pytest
import torch

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.sampler import SAMPLES_SCHEMA
from lightreasoner_ray.train_data import (
    Trajectory,
    check_samples,
    check_samples_table,
    collate,
    micro_batch_stream,
    pack_trajectories,
    placeholder_micro_batch,
    reference_rows,
    trajectory_from_row,
)


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


def test_stream_is_seeded_covers_every_trajectory_each_epoch_and_ignores_input_order():
    trajectories = [synthetic(n, str(i)) for i, n in enumerate([3, 1, 4, 1, 5, 9, 2, 6])]
    first = list(itertools.islice(micro_batch_stream(trajectories, 6, seed=3), 30))
    shuffled = random.Random(0).sample(trajectories, len(trajectories))
    assert first == list(itertools.islice(micro_batch_stream(shuffled, 6, seed=3), 30))
    assert first != list(itertools.islice(micro_batch_stream(trajectories, 6, seed=4), 30))
    by_epoch: dict[int, list[str]] = {}
    for epoch, batch in first:
        by_epoch.setdefault(epoch, []).extend(t.problem_id for t in batch)
    complete = [ids for epoch, ids in by_epoch.items() if epoch < max(by_epoch)]
    assert len(complete) >= 2 and all(sorted(ids) == sorted(t.problem_id for t in trajectories) for ids in complete)
    assert complete[0] != complete[1]  # reshuffled each epoch


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
    from lightreasoner_ray.tiny import train_tokenizer

    return train_tokenizer(["Natalia sold 48 clips in April and half as many in May. How many clips altogether?",
                            "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips."] * 20, vocab_size=400)


def reference_line(question: str, prefix: str, ids, weights, **extra) -> str:
    return json.dumps({"prompt_id": question, "step": 3, "prefix": prefix, "tokens": ["x"] * len(ids),
                       "token_ids": ids, "weights": weights, **extra})


def test_reference_jsonl_rows_tokenize_template_plus_prefix_and_label_the_last_position(tokenizer):
    from lightreasoner_ray.prompts import chat_messages

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
