"""Training cost, packed vs one sequence per selected step, side by side on the same samples.

    python bench/training.py [--trajectories 16] [--steps 20] [--completion-tokens 128] [--repeats 3]

Both variants train the same model from the same weights on the same soft labels with
the same loss, optimizer and micro-batch budget (8 selected steps, 2 accumulated):
(1) packed: one forward pass per trajectory, the LM head applied at its selected
positions only; (2) the reference trainer's layout: every selected step is its own
sequence (prompt + completion prefix), 8 sequences a padded micro-batch. Prompts are
real GSM8K questions through a ChatML template; completions have the paper's ratio of
about 20 selected steps per 128 tokens. The two variants alternate, one epoch each from
fresh weights, ``--repeats`` times (so a busy machine slows both alike); prints forward
tokens and the median wall time per epoch, and their ratios.
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

from lightreasoner_ray.loss import SelectedStepLogits, step_kl
from lightreasoner_ray.prompts import prompt_ids
from lightreasoner_ray.tiny import TinyModelSpec, build_model, train_tokenizer
from lightreasoner_ray.train_data import Trajectory, collate, one_step_trajectories, pack_trajectories

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


def train_epoch(model, micro_batches: Iterable[list[Trajectory]], grad_accum: int, lr: float) -> dict[str, float]:
    """One epoch of forward/backward/optimizer steps; returns token counts, time and the mean loss."""
    wrapped = SelectedStepLogits(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = [collate(trajectories, pad_id=0) for trajectories in micro_batches]
    real_tokens = sum(b.forward_tokens for b in batches)
    padded_tokens = sum(b.input_ids.numel() for b in batches)
    steps = sum(b.num_steps for b in batches)
    loss_sum = 0.0
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        kl = step_kl(wrapped, batch)
        (kl.mean() / grad_accum).backward()
        loss_sum += kl.detach().sum().item()
        if (index + 1) % grad_accum == 0 or index == len(batches) - 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"forward_tokens": real_tokens, "padded_tokens": padded_tokens, "forward_passes": sum(
        b.input_ids.shape[0] for b in batches), "micro_batches": len(batches), "steps": steps, "seconds": seconds,
        "mean_loss": loss_sum / steps}


def initial_loss(model, micro_batches: Iterable[list[Trajectory]]) -> float:
    wrapped = SelectedStepLogits(model).eval()
    with torch.no_grad():
        values = torch.cat([step_kl(wrapped, collate(batch, pad_id=0)) for batch in micro_batches])
    return values.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="selected steps per trajectory")
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--support", type=int, default=4, help="tokens in each soft label")
    parser.add_argument("--micro-batch-steps", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
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

    def packed_batches(epoch: int) -> list[list[Trajectory]]:
        order = random.Random(args.seed + epoch).sample(trajectories, len(trajectories))
        return list(pack_trajectories(order, args.micro_batch_steps))

    def per_step_batches(epoch: int) -> list[list[Trajectory]]:
        order = random.Random(args.seed + epoch).sample(singles, len(singles))
        return [order[i: i + args.micro_batch_steps] for i in range(0, len(order), args.micro_batch_steps)]

    before_packed = initial_loss(model, packed_batches(0))
    before_per_step = initial_loss(model, per_step_batches(0))
    print(f"initial mean KL over all steps: packed {before_packed:.6f}, one sequence per step {before_per_step:.6f}")

    # Warm-up (allocator, kernels) on a throwaway copy so both variants start alike.
    train_epoch(copy.deepcopy(model), packed_batches(0)[:2], args.grad_accum, 1e-4)
    train_epoch(copy.deepcopy(model), per_step_batches(0)[:2], args.grad_accum, 1e-4)

    runs: dict[str, list[dict[str, float]]] = {"packed": [], "one sequence per step": []}
    for repeat in range(args.repeats):
        for name, batches in (("packed", packed_batches), ("one sequence per step", per_step_batches)):
            runs[name].append(train_epoch(copy.deepcopy(model), batches(repeat), args.grad_accum, 1e-4))
    results = {name: {**epochs[0], "seconds": statistics.median(e["seconds"] for e in epochs)}
               for name, epochs in runs.items()}

    header = f"{'per epoch (median)':<24}{'forward passes':>16}{'forward tokens':>16}{'padded tokens':>15}{'wall time':>12}{'steps/s':>10}"
    print(header)
    for name, r in results.items():
        print(f"{name:<24}{r['forward_passes']:>16,.0f}{r['forward_tokens']:>16,.0f}{r['padded_tokens']:>15,.0f}"
              f"{r['seconds']:>11.2f}s{r['steps'] / r['seconds']:>10.1f}")
    for name, epochs in runs.items():
        times = ", ".join(f"{epoch['seconds']:.2f}s" for epoch in epochs)
        print(f"  {name}: epoch times {times}")
    packed, per_step = results["packed"], results["one sequence per step"]
    print(f"packed: {per_step['forward_tokens'] / packed['forward_tokens']:.1f}x fewer forward tokens "
          f"({per_step['padded_tokens'] / packed['padded_tokens']:.1f}x counting padding), "
          f"{per_step['seconds'] / packed['seconds']:.1f}x faster per epoch")


if __name__ == "__main__":
    main()
