"""A trained toy expert/amateur pair for the CPU demo.

Two small Qwen2-architecture models are trained from scratch, on CPU, on the toy
arithmetic word problems of :mod:`lightreasoner_ray.toy.domain`. The recipe makes
the **expert** clearly stronger but imperfect and the **amateur** weak, the way
Qwen2.5-Math-1.5B relates to Qwen2.5-0.5B, so that their contrast is informative
and the expert has room to improve::

    pair = build_toy_pair("~/.cache/lightreasoner_ray/toy_pair")
    pair.expert_path, pair.amateur_path          # Hugging Face model dirs (+ tokenizer)
    pair.expert_accuracy, pair.amateur_accuracy  # greedy, held-out test split

- **Tokenizer** (shared): a byte-level BPE trained on the toy corpus and the system
  prompt (:func:`lightreasoner_ray.toy.tiny_models.train_tokenizer`), used exactly as
  ``AutoTokenizer`` loads it back from a Qwen2 model directory, i.e. as a
  ``Qwen2Tokenizer`` that splits numbers into single digits, like Qwen2.5.
- **Training**: plain PyTorch, AdamW on the causal-LM loss of the assistant turn
  only (prompt = chat template with the Qwen2.5-Math system prompt and the
  question; target = the chain-of-thought solution and ``<|im_end|>``).
- **Strength**: a model may stop early once its greedy accuracy on validation
  problems (train split, never trained on) reaches a set level; the reported
  accuracies are measured afterwards on the held-out ``test`` split.
- **A shared weakness**: in each model's training data a share of the problems
  that end in a doubling or tripling have a *hasty* solution that stops one step
  early (:func:`lightreasoner_ray.toy.domain.hasty_solution`), a small share for
  the expert and nearly all for the amateur. The expert inherits the slip mildly,
  the amateur strongly: what the contrast between them can point at, the way a
  real amateur's habits point at the expert's remaining ones.

The build is deterministic for a seed (at a fixed thread count) and cached:
``directory/toy_pair.json`` records the recipe's hash, and a directory holding a
pair built by the same recipe and seed is returned as is. The pair is built in a
temporary sibling directory and renamed into place, so a killed build never
leaves a half pair behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lightreasoner_ray.core.schedule import lr_multiplier
from lightreasoner_ray.data.prompts import prompt_ids
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import local_dirs
from lightreasoner_ray.toy.domain import boxed_answer, corpus_texts, generate_problems, hasty_answer, hasty_solution
from lightreasoner_ray.toy.tiny_models import TinyModelSpec, build_model, train_tokenizer

logger = logging.getLogger(__name__)

PAIR_VERSION = 2
"""Bumped whenever the build changes in a way the recipe hash cannot see."""

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""The Qwen2.5-Math chain-of-thought system prompt, used for training and evaluation."""

METADATA_FILE = "toy_pair.json"


@dataclass(frozen=True)
class ToyModelRecipe:
    """How one model of the pair is shaped and trained."""

    spec: TinyModelSpec
    steps: int
    """Most optimizer steps; the cosine learning-rate schedule spans them."""
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    levels: tuple[int, ...] = (1, 2, 3, 4)
    """Levels of its training problems; repeating a level gives it a larger share."""
    stop_at_accuracy: float | None = None
    """Stop once greedy accuracy on the validation problems (train split, never
    trained on) reaches this; None trains all ``steps``."""
    eval_every: int = 50
    min_steps: int = 0
    """No validation before this step."""
    hasty_rate: float = 0.0
    """Share of its training problems that end in a doubling or tripling whose
    solution is the hasty one (:func:`lightreasoner_ray.toy.domain.hasty_solution`:
    it stops one step early). The weakness the expert shares, milder, with the amateur."""


@dataclass(frozen=True)
class ToyPairSpec:
    """The whole recipe of a toy pair; its hash keys the cache."""

    expert: ToyModelRecipe
    amateur: ToyModelRecipe
    vocab_size: int = 512
    tokenizer_problems: int = 4000
    train_problems: int = 20000
    validation_problems: int = 200
    test_problems: int = 200
    test_levels: tuple[int, ...] = (1, 2, 3, 4)
    max_new_tokens: int = 64
    eval_batch_size: int = 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, seed: int) -> str:
        payload = json.dumps({"version": PAIR_VERSION, "seed": seed, "spec": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ToyPair:
    """A built pair: where the models are and how well they do on held-out problems."""

    directory: Path
    expert_path: Path
    amateur_path: Path
    expert_accuracy: float
    amateur_accuracy: float
    seed: int
    spec_hash: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------
# The default recipe
# --------------------------------------------------------------------------

DEFAULT_SPEC = ToyPairSpec(
    expert=ToyModelRecipe(
        spec=TinyModelSpec(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256,
                           max_position_embeddings=256, seed=1),
        steps=2000,
        batch_size=16,
        lr=7e-4,
        hasty_rate=0.6,
    ),
    amateur=ToyModelRecipe(
        spec=TinyModelSpec(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96,
                           max_position_embeddings=256, seed=2),
        steps=2000,
        batch_size=16,
        lr=3e-3,
        stop_at_accuracy=0.22,
        min_steps=800,
        eval_every=100,
        hasty_rate=0.95,
    ),
)
"""The demo's pair. Expert: 3 layers x 128 (0.58M parameters), 2000 steps, the full
cosine schedule; amateur: 2 layers x 48 (0.09M), stopped at 22% validation accuracy or
2000 steps. Both learn from data where the problems that end in a doubling or tripling
often have a hasty solution that stops one step early: 60% of them for the expert, 95%
for the amateur. The expert's greedy answers keep some of that slip; the amateur's
nearly always do (when it gets that far)."""


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, question: str) -> list[int]:
    return prompt_ids(tokenizer, question, SYSTEM_PROMPT)


def encode_example(tokenizer: Any, row: dict) -> tuple[list[int], int]:
    """Token ids of prompt + solution + eos, and the prompt's length."""
    prompt = _prompt_ids(tokenizer, row["question"])
    target = tokenizer.encode(row["solution"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + target, len(prompt)


def train_pair_tokenizer(rows: Sequence[dict], vocab_size: int, scratch: str | Path) -> Any:
    """The pair's tokenizer, as ``AutoTokenizer`` loads it from a Qwen2 model directory.

    ``AutoTokenizer`` gives a directory whose config says ``qwen2`` the
    ``Qwen2Tokenizer`` class, which keeps the trained vocabulary and merges but
    pre-tokenizes the Qwen way (digits one by one). Training must see exactly the
    ids that users of the saved models will see, so the freshly trained tokenizer
    is saved next to a Qwen2 config under ``scratch`` and loaded back.
    """
    from transformers import AutoTokenizer, Qwen2Config

    trained = train_tokenizer(_tokenizer_texts(rows), vocab_size=vocab_size)
    scratch = Path(scratch)
    trained.save_pretrained(scratch)
    Qwen2Config(vocab_size=len(trained)).save_pretrained(scratch)
    tokenizer = AutoTokenizer.from_pretrained(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return tokenizer


def _tokenizer_texts(rows: Sequence[dict]) -> list[str]:
    # The system prompt is seen with every example, so it belongs in the corpus as often.
    return corpus_texts(rows) + [SYSTEM_PROMPT] * len(rows)


def _collate(examples: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, attention_mask, labels


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def shared_prefix_length(examples: Sequence[tuple[list[int], int]]) -> int:
    """Length of the token prefix every example's prompt starts with (at most a prompt's length - 1).

    With one system prompt that is the chat template up to the user's question.
    """
    if not examples:
        return 0
    first = examples[0][0]
    length = min(prompt_length for _, prompt_length in examples) - 1
    for ids, _ in examples[1:]:
        while length > 0 and ids[:length] != first[:length]:
            length -= 1
    return max(length, 0)


def answer_loss(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    shared_prefix: int = 0,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100.

    Only the positions that predict a labelled token go through the LM head. With
    ``shared_prefix`` > 0 (every row starts with the same ``shared_prefix`` tokens,
    none of them labelled) the prefix is run once and its keys and values are
    repeated across the batch: causal attention makes the loss and its gradients
    the same as one full pass, at a fraction of the compute.
    """
    decoder = model.get_decoder()
    if shared_prefix > 0:
        from transformers import DynamicCache

        cache = DynamicCache()
        decoder(input_ids=input_ids[:1, :shared_prefix], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(input_ids.shape[0])
        hidden = decoder(
            input_ids=input_ids[:, shared_prefix:], attention_mask=attention_mask,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, shared_prefix + 1 :]
    predicting = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][predicting])
    return torch.nn.functional.cross_entropy(logits.float(), targets[predicting])


def _length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool_batches: int = 16
) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within pools of batches.

    Batches of similar lengths waste little compute on padding; shuffling the pools
    and the batches keeps the order random.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    pool = batch_size * pool_batches
    for start in range(0, len(order) - batch_size + 1, pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def train_model(
    model: Any,
    examples: Sequence[tuple[list[int], int]],
    recipe: ToyModelRecipe,
    pad_id: int,
    seed: int,
    progress: bool = True,
    name: str = "model",
    on_step: Callable[[int, float], bool | None] | None = None,
) -> list[float]:
    """Train ``model`` in place on ``examples``; returns the per-step losses.

    ``on_step(step, loss)`` is called after every optimizer step (1-based, model in
    train mode); training stops early when it returns True.
    """
    from tqdm.auto import tqdm

    if len(examples) < recipe.batch_size:
        raise LightReasonerError(f"toy pair: {len(examples)} examples for a batch of {recipe.batch_size}")
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    # Linear warm-up, then cosine decay to 10% of the peak.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, recipe.warmup_steps, recipe.steps, "cosine", floor=0.1)
    )
    lengths = [len(ids) for ids, _ in examples]
    prefix = shared_prefix_length(examples)
    model.train()
    losses: list[float] = []
    batches: list[list[int]] = []
    bar = tqdm(range(recipe.steps), desc=f"toy pair: train {name}", disable=not progress)
    for step in bar:
        if not batches:
            batches = _length_bucketed_batches(lengths, recipe.batch_size, generator)
        input_ids, attention_mask, labels = _collate([examples[i] for i in batches.pop()], pad_id)
        loss = answer_loss(model, input_ids, attention_mask, labels, shared_prefix=prefix)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 200 == 0 or step == recipe.steps - 1:
            logger.info("toy pair: %s step %d/%d loss %.4f", name, step + 1, recipe.steps, losses[-1])
        if on_step is not None and on_step(step + 1, losses[-1]):
            logger.info("toy pair: %s stops early at step %d", name, step + 1)
            break
    bar.close()
    model.eval()
    return losses


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def toy_completions(
    model: Any, tokenizer: Any, problems: Sequence[dict], max_new_tokens: int = 64, batch_size: int = 100
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped), batched and left-padded."""
    from lightreasoner_ray.engines.generation import greedy_generate

    completions: list[str] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [_prompt_ids(tokenizer, row["question"]) for row in chunk]
        for ids in greedy_generate(model, tokenizer, prompts, max_new_tokens):
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    return completions


def grade_completions(completions: Sequence[str], problems: Sequence[dict]) -> list[bool]:
    """Whether each completion's last ``\\boxed{N}`` equals its problem's ``answer``."""
    if len(completions) != len(problems):
        raise LightReasonerError(f"{len(completions)} completions for {len(problems)} problems")
    return [boxed_answer(text) == str(row["answer"]).strip() for text, row in zip(completions, problems)]


def _load(model_dir: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def evaluate_toy_accuracy(
    model_dir: str | Path, problems: Sequence[dict], max_new_tokens: int = 64, batch_size: int = 100
) -> float:
    """Greedy exact-answer accuracy of the model in ``model_dir`` on toy ``problems``.

    Prompts use the chat template with :data:`SYSTEM_PROMPT`; the answer is the last
    ``\\boxed{N}`` of the completion, compared with the row's ``answer``.
    """
    if not problems:
        raise LightReasonerError("evaluate_toy_accuracy: no problems given")
    model, tokenizer = _load(model_dir)
    correct = grade_completions(toy_completions(model, tokenizer, problems, max_new_tokens, batch_size), problems)
    return sum(correct) / len(problems)


def _accuracy_report(model_dir: Path, problems: Sequence[dict], spec: ToyPairSpec) -> dict[str, Any]:
    model, tokenizer = _load(model_dir)
    completions = toy_completions(model, tokenizer, problems, spec.max_new_tokens, spec.eval_batch_size)
    correct = grade_completions(completions, problems)
    by_level: dict[str, float] = {}
    for level in sorted({row["level"] for row in problems}):
        hits = [c for c, row in zip(correct, problems) if row["level"] == level]
        by_level[str(level)] = sum(hits) / len(hits)
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_by_level": by_level,
        "boxed_rate": sum(boxed_answer(text) is not None for text in completions) / len(completions),
        "hasty_answer_rate": hasty_answer_rate([boxed_answer(text) for text in completions], problems),
    }


def hasty_answer_rate(answers: Sequence[str | None], problems: Sequence[dict]) -> float | None:
    """Among the problems that end in a doubling or tripling, the share answered with the
    value before it (the hasty slip); None when no problem ends that way."""
    slips = [answer == hasty for answer, row in zip(answers, problems)
             if (hasty := hasty_answer(row)) is not None]
    return sum(slips) / len(slips) if slips else None


# --------------------------------------------------------------------------
# Build and cache
# --------------------------------------------------------------------------


def _read_cached(directory: Path, seed: int, spec_hash: str) -> ToyPair | None:
    path = directory / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if metadata.get("version") != PAIR_VERSION or metadata.get("spec_hash") != spec_hash:
        return None
    expert, amateur = directory / "expert", directory / "amateur"
    if not (expert / "config.json").is_file() or not (amateur / "config.json").is_file():
        return None
    return ToyPair(
        directory=directory,
        expert_path=expert,
        amateur_path=amateur,
        expert_accuracy=float(metadata["expert"]["accuracy"]),
        amateur_accuracy=float(metadata["amateur"]["accuracy"]),
        seed=seed,
        spec_hash=spec_hash,
        metadata=metadata,
    )


def _count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _mix(examples_by_level: dict[int, list], levels: Sequence[int]) -> list:
    """Training examples for a level list; a level listed k times gets k times its share."""
    mixed: list = []
    for level in levels:
        mixed.extend(examples_by_level.get(level, []))
    if not mixed:
        raise LightReasonerError(f"toy pair: no training problems for levels {list(levels)}")
    return mixed


def _with_hasty(encoded: dict[int, list], rate: float, seed: int) -> tuple[dict[int, list], int]:
    """One model's training examples: the hasty solution for a ``rate`` share of the rows that have one."""
    if not 0.0 <= rate <= 1.0:
        raise LightReasonerError(f"toy pair: hasty_rate must be in [0, 1], got {rate}")
    generator = torch.Generator().manual_seed(seed)
    chosen: dict[int, list] = {}
    count = 0
    for level, examples in encoded.items():
        draws = torch.rand(len(examples), generator=generator).tolist()
        for (gold, hasty), draw in zip(examples, draws):
            use_hasty = hasty is not None and draw < rate
            count += use_hasty
            chosen.setdefault(level, []).append(hasty if use_hasty else gold)
    return chosen, count


def _validation_stopper(model: Any, tokenizer: Any, recipe: ToyModelRecipe, rows: Sequence[dict],
                        spec: ToyPairSpec, name: str, history: list[list[float]]) -> Callable[[int, float], bool]:
    """An ``on_step`` callback: every ``eval_every`` steps, stop once validation accuracy is high enough."""

    def on_step(step: int, loss: float) -> bool:
        if recipe.stop_at_accuracy is None or step < recipe.min_steps or step % recipe.eval_every:
            return False
        model.eval()
        correct = grade_completions(toy_completions(model, tokenizer, rows, spec.max_new_tokens,
                                                    spec.eval_batch_size), rows)
        model.train()
        accuracy = sum(correct) / len(correct)
        history.append([step, accuracy])
        logger.info("toy pair: %s step %d validation accuracy %.1f%% (stop at %.1f%%)", name, step,
                    100 * accuracy, 100 * recipe.stop_at_accuracy)
        return accuracy >= recipe.stop_at_accuracy

    return on_step


def _build_into(root: Path, seed: int, spec: ToyPairSpec, progress: bool) -> dict[str, Any]:
    """Train, save and evaluate the pair under ``root``; returns its metadata (not yet written)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    train_levels = sorted(set(spec.expert.levels) | set(spec.amateur.levels))
    # One call, so validation problems are distinct from the training problems.
    rows = generate_problems(spec.train_problems + spec.validation_problems, seed=seed, split="train",
                             levels=train_levels)
    train_rows, validation_rows = rows[: spec.train_problems], rows[spec.train_problems :]
    test_rows = generate_problems(spec.test_problems, seed=seed, split="test", levels=spec.test_levels)

    tokenizer = train_pair_tokenizer(train_rows[: spec.tokenizer_problems], spec.vocab_size, root / "tokenizer")
    # Each row encoded once with its solution and, when it has one, with its hasty solution.
    encoded: dict[int, list[tuple[tuple[list[int], int], tuple[list[int], int] | None]]] = {}
    for row in train_rows:
        hasty = hasty_solution(row)
        encoded.setdefault(row["level"], []).append(
            (encode_example(tokenizer, row),
             None if hasty is None else encode_example(tokenizer, dict(row, solution=hasty)))
        )
    lengths = [len(gold[0]) for examples in encoded.values() for gold, _ in examples]
    longest = max(lengths)
    metadata: dict[str, Any] = {
        "tokenizer": {"vocab_size": len(tokenizer), "class": type(tokenizer).__name__},
        "train": {"problems": len(train_rows), "validation_problems": len(validation_rows),
                  "levels": train_levels, "longest_example_tokens": longest,
                  "mean_example_tokens": round(sum(lengths) / len(lengths), 1),
                  # What training saw for its first problem: users of the saved models get the same ids.
                  "sample": {"question": train_rows[0]["question"], "solution": train_rows[0]["solution"],
                             "ids": encode_example(tokenizer, train_rows[0])[0]}},
        "test": {"problems": len(test_rows), "levels": list(spec.test_levels), "split": "test",
                 "max_new_tokens": spec.max_new_tokens},
        "timings": {"data_s": round(time.perf_counter() - started, 2)},
    }
    logger.info("toy pair: tokenizer (%d tokens) and %d training examples (longest %d tokens) in %.1fs",
                len(tokenizer), len(train_rows), longest, metadata["timings"]["data_s"])

    for offset, name in enumerate(("expert", "amateur")):
        recipe: ToyModelRecipe = getattr(spec, name)
        context = longest + spec.max_new_tokens
        if context > recipe.spec.max_position_embeddings:
            raise LightReasonerError(
                f"toy pair: the {name}'s context ({recipe.spec.max_position_embeddings}) is shorter than "
                f"the longest prompt plus max_new_tokens ({context})"
            )
        t0 = time.perf_counter()
        model = build_model(tokenizer, dataclasses.replace(recipe.spec, seed=recipe.spec.seed + 1000 * seed))
        history: list[list[float]] = []
        stopper = _validation_stopper(model, tokenizer, recipe, validation_rows, spec, name, history)
        examples_by_level, hasty_count = _with_hasty(encoded, recipe.hasty_rate, seed=seed * 7919 + offset)
        losses = train_model(model, _mix(examples_by_level, recipe.levels), recipe, tokenizer.pad_token_id,
                             seed=seed * 7919 + offset, progress=progress, name=name, on_step=stopper)
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = _accuracy_report(path, test_rows, spec)
        report.update(
            hasty_training_examples=hasty_count,
            parameters=_count_parameters(model),
            steps=len(losses),
            final_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4),
            validation_accuracy=history,
            train_s=round(train_s, 2),
            eval_s=round(time.perf_counter() - t0, 2),
        )
        metadata[name] = report
        logger.info("toy pair: %s (%d parameters) trained %d steps in %.0fs (loss %.3f); "
                    "held-out accuracy %.1f%%", name, report["parameters"], len(losses), train_s,
                    report["final_loss"], 100 * report["accuracy"])
    metadata["timings"]["total_s"] = round(time.perf_counter() - started, 2)
    metadata["timings"]["cpu_s"] = round(time.process_time() - cpu_started, 2)
    return metadata


@contextlib.contextmanager
def _reproducible_torch(num_threads: int | None):
    """torch as deterministic as it goes on one machine, restored after: deterministic algorithms
    only (an op without one raises rather than varying) and, unless None, a fixed thread count
    (how a reduction is split across threads changes its rounding)."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)


def build_toy_pair(
    directory: str | Path,
    seed: int = 0,
    progress: bool = True,
    spec: ToyPairSpec | None = None,
    num_threads: int | None = 1,
) -> ToyPair:
    """Build (or reuse) the toy expert/amateur pair under ``directory``.

    ``directory`` belongs to the pair: a pair built there by another recipe, seed
    or version is replaced (a directory holding anything else is refused). Returns
    at once, without training, when ``directory/toy_pair.json`` matches.

    ``num_threads`` sets torch's intra-op threads during the build (restored
    after; None leaves them alone). The matrices are tiny: on a shared 2-core
    machine two threads measured 10-50x slower than one, whenever anything else
    was running. The build runs with torch's deterministic algorithms and seeded
    data order: weights are bit-identical for a seed at a fixed thread count on one
    machine (another CPU's instructions may round differently).
    """
    spec = spec or DEFAULT_SPEC
    directory = Path(directory).expanduser().absolute()
    spec_hash = spec.fingerprint(seed)
    cached = _read_cached(directory, seed, spec_hash)
    if cached is not None:
        logger.info("toy pair: reusing %s (expert %.1f%%, amateur %.1f%% held-out accuracy)", directory,
                    100 * cached.expert_accuracy, 100 * cached.amateur_accuracy)
        return cached
    if directory.exists() and any(directory.iterdir()) and not (directory / METADATA_FILE).exists():
        raise LightReasonerError(
            f"toy pair: {directory} is not empty and holds no {METADATA_FILE}; refusing to replace it"
        )

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would be kept by the final directory
    try:
        logger.info("toy pair: building under %s (seed %d, recipe %s)", directory, seed, spec_hash)
        with _reproducible_torch(num_threads):
            metadata = _build_into(staging, seed, spec, progress)
        metadata.update(version=PAIR_VERSION, spec_hash=spec_hash, seed=seed, spec=spec.to_dict(),
                        system_prompt=SYSTEM_PROMPT, num_threads=num_threads, deterministic_algorithms=True)
        # Written last: a directory with this file holds a complete pair.
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        local_dirs.replace_directory(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    pair = _read_cached(directory, seed, spec_hash)
    if pair is None:
        raise LightReasonerError(f"toy pair: {directory} was built but cannot be read back")
    logger.info("toy pair: built in %.0fs: expert %.1f%%, amateur %.1f%% held-out accuracy",
                pair.metadata["timings"]["total_s"], 100 * pair.expert_accuracy, 100 * pair.amateur_accuracy)
    return pair
