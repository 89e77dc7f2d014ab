"""Tests for the trained toy expert/amateur pair (a reduced recipe: tiny models, few steps)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.toy.tiny_models import TinyModelSpec
from lightreasoner_ray.toy import boxed_answer, check_solution, generate_problems
from lightreasoner_ray.toy import pair as toy_pair
from lightreasoner_ray.toy.pair import (
    METADATA_FILE,
    SYSTEM_PROMPT,
    ToyModelRecipe,
    ToyPairSpec,
    build_toy_pair,
    evaluate_toy_accuracy,
    grade_completions,
)

SMALL = ToyPairSpec(
    expert=ToyModelRecipe(
        spec=TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                           max_position_embeddings=256, seed=1),
        steps=120, batch_size=16, lr=1e-2, warmup_steps=4,
    ),
    amateur=ToyModelRecipe(
        spec=TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                           max_position_embeddings=256, seed=2),
        steps=4, batch_size=8, lr=1e-2, warmup_steps=1,
    ),
    vocab_size=320,
    tokenizer_problems=300,
    train_problems=400,
    validation_problems=8,
    test_problems=6,
    max_new_tokens=40,
    eval_batch_size=4,
)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _staging_leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy") / "pair"
    return build_toy_pair(directory, seed=0, progress=True, spec=SMALL)


def test_build_writes_loadable_hugging_face_dirs(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocabularies = []
    for path in (built.expert_path, built.amateur_path):
        assert path.parent == built.directory
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "qwen2"
        assert model.config.max_position_embeddings == 256
        assert model.config.vocab_size == len(tokenizer)
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        vocabularies.append(tokenizer.get_vocab())
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode("Tom has 3 pens.")])).logits
        assert torch.isfinite(logits).all()
    assert vocabularies[0] == vocabularies[1]
    # Training saw exactly the ids that a user loading the directory gets.
    sample = json.loads((built.directory / METADATA_FILE).read_text())["train"]["sample"]
    assert toy_pair.encode_example(tokenizer, sample)[0] == sample["ids"]
    assert tokenizer.decode(sample["ids"][-12:], skip_special_tokens=True) in sample["solution"]
    assert _weights(built.expert_path)["model.embed_tokens.weight"].shape[1] == 32
    assert _weights(built.amateur_path)["model.embed_tokens.weight"].shape[1] == 16

    metadata = json.loads((built.directory / METADATA_FILE).read_text())
    assert metadata["version"] == toy_pair.PAIR_VERSION
    assert metadata["spec_hash"] == built.spec_hash == SMALL.fingerprint(0)
    assert metadata["seed"] == 0 and metadata["system_prompt"] == SYSTEM_PROMPT
    assert metadata["expert"]["accuracy"] == built.expert_accuracy
    assert metadata["amateur"]["accuracy"] == built.amateur_accuracy
    assert 0.0 <= built.expert_accuracy <= 1.0 and 0.0 <= built.amateur_accuracy <= 1.0
    assert metadata["test"]["problems"] == SMALL.test_problems
    assert metadata["expert"]["parameters"] > metadata["amateur"]["parameters"]
    assert _staging_leftovers(built.directory) == []


def test_build_is_deterministic_for_a_seed(built, tmp_path):
    again = build_toy_pair(tmp_path / "again", seed=0, progress=False, spec=SMALL)
    assert _same_weights(built.expert_path, again.expert_path)
    assert _same_weights(built.amateur_path, again.amateur_path)
    assert (again.expert_accuracy, again.amateur_accuracy) == (built.expert_accuracy, built.amateur_accuracy)
    assert (built.expert_path / "tokenizer.json").read_text() == (again.expert_path / "tokenizer.json").read_text()


def test_build_runs_with_deterministic_algorithms_and_fixed_threads_then_restores_them(built, tmp_path, monkeypatch):
    seen = {}
    real_build = toy_pair._build_into

    def watched(*args, **kwargs):
        seen.update(deterministic=torch.are_deterministic_algorithms_enabled(), threads=torch.get_num_threads())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(toy_pair, "_build_into", watched)
    threads_before = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    again = build_toy_pair(tmp_path / "watched", seed=0, progress=False, spec=SMALL, num_threads=1)
    assert seen == {"deterministic": True, "threads": 1}
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads_before
    assert json.loads((again.directory / METADATA_FILE).read_text())["deterministic_algorithms"] is True
    assert _same_weights(built.expert_path, again.expert_path)


def test_deterministic_algorithms_change_no_weight_of_a_cpu_build(built, tmp_path, monkeypatch):
    """A pair cached before the build enforced deterministic algorithms is still its recipe's pair."""
    import contextlib

    @contextlib.contextmanager
    def threads_only(num_threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    monkeypatch.setattr(toy_pair, "_reproducible_torch", threads_only)
    loose = build_toy_pair(tmp_path / "loose", seed=0, progress=False, spec=SMALL, num_threads=1)
    assert _same_weights(built.expert_path, loose.expert_path)
    assert _same_weights(built.amateur_path, loose.amateur_path)


def test_cached_pair_is_returned_without_retraining(built, monkeypatch):
    files = [built.directory / METADATA_FILE, built.expert_path / "model.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_build(*args, **kwargs):
        raise AssertionError("the cached pair was rebuilt")

    monkeypatch.setattr(toy_pair, "_build_into", no_build)
    cached = build_toy_pair(built.directory, seed=0, progress=False, spec=SMALL)
    assert cached == built
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_failed_rebuild_keeps_old_pair_and_new_recipe_replaces_it(built, tmp_path, monkeypatch):
    directory = tmp_path / "pair"
    shutil.copytree(built.directory, directory)
    before = (directory / METADATA_FILE).read_text()
    # Another recipe: the amateur stops early, at its first validation (step 2 of 4).
    early_stop = dataclasses.replace(
        SMALL, amateur=dataclasses.replace(SMALL.amateur, stop_at_accuracy=0.0, min_steps=2, eval_every=2)
    )

    real_train = toy_pair.train_model
    calls = []

    def train_then_die(*args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 2:  # the expert is already saved in the staging dir
            raise KeyboardInterrupt("killed mid-build")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(toy_pair, "train_model", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_toy_pair(directory, seed=1, progress=False, spec=early_stop)
    assert calls == ["expert", "amateur"]
    assert (directory / METADATA_FILE).read_text() == before
    assert _same_weights(directory / "expert", built.expert_path)
    assert _staging_leftovers(directory) == []

    monkeypatch.setattr(toy_pair, "train_model", real_train)
    rebuilt = build_toy_pair(directory, seed=1, progress=False, spec=early_stop)
    assert rebuilt.spec_hash == early_stop.fingerprint(1) != built.spec_hash
    metadata = json.loads((directory / METADATA_FILE).read_text())
    assert metadata["seed"] == 1
    assert metadata["expert"]["steps"] == SMALL.expert.steps and metadata["expert"]["validation_accuracy"] == []
    assert metadata["amateur"]["steps"] == 2 and [s for s, _ in metadata["amateur"]["validation_accuracy"]] == [2]
    assert not _same_weights(rebuilt.expert_path, built.expert_path)
    assert _staging_leftovers(directory) == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    with pytest.raises(LightReasonerError, match="refusing"):
        build_toy_pair(directory, seed=0, progress=False, spec=SMALL)
    assert (directory / "notes.txt").read_text() == "keep me"


def test_grading_agrees_with_the_domain_checker():
    rows = generate_problems(12, seed=3, split="test")
    assert grade_completions([row["solution"] for row in rows], rows) == [True] * len(rows)
    wrong = [row["solution"].replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{int(row['answer']) + 1}}}")
             for row in rows]
    assert not any(check_solution({**row, "solution": text}) for row, text in zip(rows, wrong))
    assert grade_completions(wrong, rows) == [False] * len(rows)
    assert grade_completions(["The answer is 7.", ""], rows[:2]) == [False, False]


def test_shared_prefix_loss_matches_a_full_pass():
    from lightreasoner_ray.toy.tiny_models import build_model, train_tokenizer

    rows = generate_problems(24, seed=2, split="train")
    tokenizer = train_tokenizer(toy_pair._tokenizer_texts(rows), vocab_size=300)
    examples = [toy_pair.encode_example(tokenizer, row) for row in rows]
    prefix = toy_pair.shared_prefix_length(examples)
    system_turn = toy_pair._prompt_ids(tokenizer, "")
    assert 10 < prefix < min(p for _, p in examples)
    assert all(ids[:prefix] == examples[0][0][:prefix] for ids, _ in examples)
    assert prefix <= len(system_turn)
    assert toy_pair.shared_prefix_length(examples[:1]) == examples[0][1] - 1

    model = build_model(tokenizer, TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=64, initializer_range=0.2, seed=3))
    batch = toy_pair._collate(examples[:9], tokenizer.pad_token_id)
    losses, grads = [], []
    for shared in (0, prefix):
        model.zero_grad()
        loss = toy_pair.answer_loss(model, *batch, shared_prefix=shared)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    # The oracle: the plain token-level cross-entropy of the full logits on the solution tokens.
    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    assert torch.allclose(losses[0], reference, atol=1e-5)
    assert torch.allclose(losses[1], reference, atol=1e-5)
    for full, shared in zip(*grads):
        assert torch.allclose(full, shared, atol=1e-5, rtol=1e-4)


def _naive_greedy_answer(model, tokenizer, question: str, max_new_tokens: int) -> str | None:
    """One problem at a time, no padding, no KV cache: a full forward pass per new token."""
    ids = toy_pair._prompt_ids(tokenizer, question)
    completion: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + completion])).logits[0, -1]
            completion.append(int(logits[: len(tokenizer)].argmax()))
            if completion[-1] == tokenizer.eos_token_id:
                break
    return boxed_answer(tokenizer.decode(completion, skip_special_tokens=True))


def test_batched_accuracy_matches_a_naive_oracle(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.expert_path)
    model = AutoModelForCausalLM.from_pretrained(built.expert_path).eval()
    rows = generate_problems(7, seed=5, split="test", levels=(1, 2, 3))
    max_new_tokens = 40
    predictions = [_naive_greedy_answer(model, tokenizer, row["question"], max_new_tokens) for row in rows]
    assert any(p is not None for p in predictions), "the reduced expert never boxes an answer"

    # Make every other row's reference the oracle's answer, the rest unmatchable.
    graded = [
        {**row, "answer": prediction if i % 2 == 0 and prediction is not None else "no such answer"}
        for i, (row, prediction) in enumerate(zip(rows, predictions))
    ]
    expected = sum(1 for row, p in zip(graded, predictions) if row["answer"] == p) / len(rows)
    assert 0 < expected < 1
    accuracy = evaluate_toy_accuracy(built.expert_path, graded, max_new_tokens=max_new_tokens, batch_size=3)
    assert accuracy == pytest.approx(expected)

    with pytest.raises(LightReasonerError):
        evaluate_toy_accuracy(built.expert_path, [])


def test_hasty_share_follows_each_models_rate():
    from lightreasoner_ray.toy.pair import _with_hasty

    gold, hasty = ([1, 2, 3], 1), ([1, 2, 4], 1)
    encoded = {2: [(gold, hasty)] * 500 + [(gold, None)] * 500}
    for rate, low, high in ((0.0, 0, 0), (1.0, 500, 500), (0.6, 250, 350)):
        chosen, count = _with_hasty(encoded, rate, seed=3)
        assert low <= count <= high
        assert sum(example is hasty for example in chosen[2]) == count
        assert all(example is gold for example in chosen[2][500:])  # rows without a hasty solution stay gold
    with pytest.raises(LightReasonerError, match="hasty_rate"):
        _with_hasty(encoded, 1.5, seed=0)
