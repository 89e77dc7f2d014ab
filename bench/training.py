"""Training cost: our packed layout vs the reference trainer's batching, side by side on the same samples.

    python bench/training.py [--trajectories 16] [--steps 20] [--completion-tokens 128] [--repeats 3]

Every variant trains the same model from the same weights on the same soft labels with
the same optimizer and update size (``--steps-per-update`` 16 selected steps, at most
``--micro-batch-steps`` 8 per forward micro-batch, as the reference's 8 x grad-accum 2):
(1) packed (this project's trainer, ``core.update_plan.UpdatePlan``): selected steps of one
trajectory share one forward pass, the LM head applied at the selected positions only;
(2) the reference's batching (HKUDS/LightReasoner ``LightR_finetuning.py``, re-implemented
for timing): every selected step its own sequence (prompt + completion prefix), 8
sequences right-padded into one pass of the full model (logits at every position),
the last real position gathered, dense vocabulary-sized soft labels, ``kl_div``
batchmean; (3) the same one-sequence-per-step layout through our own loss (the LM
head at the one selected position). Prompts are real GSM8K questions through a ChatML
template; completions have the paper's ratio of about 20 selected steps per 128 tokens.
The variants alternate, one epoch each from fresh weights, ``--repeats`` times (so a
busy machine slows all alike); prints model calls, sequences, forward tokens and the
median wall time per epoch, and ratios naming their baseline.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from lightreasoner_ray.core.loss import SelectedStepLogits, step_kl
from lightreasoner_ray.data.prompts import prompt_ids
from lightreasoner_ray.toy.tiny_models import TinyModelSpec, build_model, train_tokenizer
from lightreasoner_ray.core.update_plan import Trajectory, UpdatePlan, collate, one_step_trajectories

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks" / "gsm8k" / "train.jsonl"


def make_trajectories(tokenizer, questions: Sequence[str], steps: int, completion_tokens: int, support: int,
                      seed: int) -> list[Trajectory]:
    """Trajectories in the samples layout: real prompts, random completions, ``steps`` labelled positions."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    trajectories = []
    for index, question in enumerate(questions):
        prompt = prompt_ids(tokenizer, question, "Please reason step by step.")
        completion = [rng.randrange(3, vocab) for _ in range(completion_tokens)]
        chosen = sorted(rng.sample(range(completion_tokens), steps))
        labels = [rng.sample(range(3, vocab), support) for _ in chosen]
        weights = [[rng.random() + 0.1 for _ in range(support)] for _ in chosen]
        last = max(chosen)
        trajectories.append(Trajectory(
            input_ids=tuple(prompt + completion[:last]),
            positions=tuple(len(prompt) - 1 + t for t in chosen),
            target_ids=tuple(tuple(ids) for ids in labels),
            target_probs=tuple(tuple(w / sum(ws) for w in ws) for ws in weights),
            problem_id=str(index),
        ))
    return trajectories


def reference_kl(model, batch: list[Trajectory], vocab_size: int) -> torch.Tensor:
    """LightR_finetuning.py's loss on one micro-batch: one sequence per step, right-padded, full logits.

    (The reference reads ``logits[:, -1]``, a padding position for all but the longest
    sequence; the last real position is read here: the same cost, the intended maths.)
    """
    sequences = [torch.tensor(t.input_ids[: t.positions[0] + 1]) for t in batch]
    input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(q) for q in sequences], batch_first=True)
    labels = torch.zeros(len(batch), vocab_size)
    for row, t in enumerate(batch):
        labels[row, list(t.target_ids[0])] = torch.tensor(t.target_probs[0])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    last = torch.tensor([len(q) - 1 for q in sequences])
    log_probs = F.log_softmax(logits[torch.arange(len(batch)), last, :vocab_size].float(), dim=-1)
    return F.kl_div(log_probs, labels, reduction="batchmean")


def train_epoch(model, updates: list[list[list[Trajectory]]], lr: float, layout: str) -> dict[str, float]:
    """One epoch of updates (each a list of micro-batches); returns counts, time and the mean loss."""
    wrapped = SelectedStepLogits(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab_size = model.config.vocab_size
    micro_batches = [batch for update in updates for batch in update]
    collated = [collate(batch, pad_id=0) for batch in micro_batches] if layout != "reference" else []
    if layout == "reference":
        lengths = [[t.positions[0] + 1 for t in batch] for batch in micro_batches]
        real_tokens = sum(sum(batch) for batch in lengths)
        padded_tokens = sum(max(batch) * len(batch) for batch in lengths)
    else:
        real_tokens = sum(b.forward_tokens for b in collated)
        padded_tokens = sum(b.input_ids.numel() for b in collated)
    steps = sum(t.num_steps for batch in micro_batches for t in batch)
    loss_sum = 0.0
    started = time.perf_counter()
    index = 0
    for update in updates:
        update_steps = sum(t.num_steps for batch in update for t in batch)
        for batch in update:
            if layout == "reference":
                kl = reference_kl(model, batch, vocab_size)  # a mean over the batch's steps
                batch_steps = len(batch)
                (kl * batch_steps / update_steps).backward()
                loss_sum += kl.item() * batch_steps
            else:
                kl = step_kl(wrapped, collated[index])
                (kl.sum() / update_steps).backward()
                loss_sum += kl.detach().sum().item()
            index += 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"forward_tokens": real_tokens, "padded_tokens": padded_tokens, "model_calls": len(micro_batches),
            "sequences": sum(len(batch) for batch in micro_batches), "updates": len(updates), "steps": steps,
            "seconds": seconds, "mean_loss": loss_sum / steps}


def initial_loss(model, micro_batches: Iterable[list[Trajectory]]) -> float:
    wrapped = SelectedStepLogits(model).eval()
    with torch.no_grad():
        values = torch.cat([step_kl(wrapped, collate(batch, pad_id=0)) for batch in micro_batches])
    return values.mean().item()


def reference_initial_loss(model, micro_batches: Iterable[list[Trajectory]]) -> float:
    with torch.no_grad():
        losses = [(reference_kl(model, batch, model.config.vocab_size).item(), len(batch)) for batch in micro_batches]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="selected steps per trajectory")
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--support", type=int, default=4, help="tokens in each soft label")
    parser.add_argument("--micro-batch-steps", type=int, default=8)
    parser.add_argument("--steps-per-update", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [json.loads(line) for line, _ in zip(DATA.open(), range(max(400, args.trajectories)))]
    tokenizer = train_tokenizer([r["question"] for r in rows] + [r["answer"] for r in rows], vocab_size=args.vocab)
    spec = TinyModelSpec(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=2,
                         intermediate_size=4 * args.hidden, max_position_embeddings=1024, seed=args.seed)
    model = build_model(tokenizer, spec)
    trajectories = make_trajectories(tokenizer, [r["question"] for r in rows[: args.trajectories]], args.steps,
                                     args.completion_tokens, args.support, args.seed)
    singles = [single for trajectory in trajectories for single in one_step_trajectories(trajectory)]
    prompt_lengths = [len(prompt_ids(tokenizer, r["question"], "Please reason step by step."))
                      for r in rows[: args.trajectories]]
    print(f"{len(trajectories)} trajectories, {len(singles)} selected steps "
          f"({args.steps} per {args.completion_tokens}-token completion), prompts of "
          f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens; model {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, vocabulary {len(tokenizer)}; {args.threads} CPU threads")

    def packed_updates(epoch: int) -> list[list[list[Trajectory]]]:
        plan = UpdatePlan(trajectories, args.steps_per_update, 1, args.micro_batch_steps, seed=args.seed + epoch)
        return [plan.micro_batches(update, 0) for update in range(1, plan.steps_per_epoch // args.steps_per_update + 1)]

    def per_step_updates(epoch: int) -> list[list[list[Trajectory]]]:
        # The reference's data loader: all selected steps shuffled, 8 a batch, 2 batches an update.
        order = random.Random(args.seed + epoch).sample(singles, len(singles))
        per_update = len(order) // args.steps_per_update
        return [
            [order[start + i: start + min(i + args.micro_batch_steps, args.steps_per_update)]
             for i in range(0, args.steps_per_update, args.micro_batch_steps)]
            for start in range(0, per_update * args.steps_per_update, args.steps_per_update)
        ]

    def flat(updates):
        return [batch for update in updates for batch in update]

    before = {
        "packed": initial_loss(model, flat(packed_updates(0))),
        "reference batching": reference_initial_loss(model, flat(per_step_updates(0))),
        "one sequence per step": initial_loss(model, flat(per_step_updates(0))),
    }
    print("initial mean KL over all steps: " + ", ".join(f"{name} {value:.6f}" for name, value in before.items()))
    assert max(before.values()) - min(before.values()) <= 1e-4 * max(before.values()), "the layouts must agree on the loss"

    variants = (("packed", packed_updates, "packed"), ("reference batching", per_step_updates, "reference"),
                ("one sequence per step", per_step_updates, "per_step"))
    # Warm-up (allocator, kernels) on a throwaway copy so every variant starts alike.
    for _name, updates, layout in variants:
        train_epoch(copy.deepcopy(model), updates(0)[:1], 1e-4, layout)

    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    for repeat in range(args.repeats):
        for name, updates, layout in variants:
            runs[name].append(train_epoch(copy.deepcopy(model), updates(repeat), 1e-4, layout))
    results = {name: {**epochs[0], "seconds": statistics.median(e["seconds"] for e in epochs)}
               for name, epochs in runs.items()}

    header = (f"{'per epoch (median)':<24}{'updates':>9}{'model calls':>13}{'sequences':>11}{'forward tokens':>16}"
              f"{'padded tokens':>15}{'wall time':>12}{'steps/s':>10}")
    print(header)
    for name, r in results.items():
        print(f"{name:<24}{r['updates']:>9,.0f}{r['model_calls']:>13,.0f}{r['sequences']:>11,.0f}"
              f"{r['forward_tokens']:>16,.0f}{r['padded_tokens']:>15,.0f}{r['seconds']:>11.2f}s"
              f"{r['steps'] / r['seconds']:>10.1f}")
    for name, epochs in runs.items():
        times = ", ".join(f"{epoch['seconds']:.2f}s" for epoch in epochs)
        print(f"  {name}: epoch times {times}")
    packed = results["packed"]
    for baseline in ("reference batching", "one sequence per step"):
        other = results[baseline]
        print(f"packed vs {baseline}: {other['forward_tokens'] / packed['forward_tokens']:.1f}x fewer forward tokens "
              f"({other['padded_tokens'] / packed['padded_tokens']:.1f}x counting padding), "
              f"{other['seconds'] / packed['seconds']:.1f}x faster per epoch")


if __name__ == "__main__":
    main()
