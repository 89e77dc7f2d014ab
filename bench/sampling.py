"""Sampling cost, side by side in one process on the same pair and problems.

    python bench/sampling.py [--problems 8] [--max-new-tokens 128] [--batch-size 8]

Compares (1) this project's sampler: batched greedy generation, then ONE
teacher-forced pass per model and the contrast maths; (2) the per-prefix algorithm of
the reference script: a forward pass of each model per completion prefix; (3) the
expert's greedy generation alone. Prints wall times and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.contrast import contrast_positions
from lightreasoner_ray.generation import greedy_generate
from lightreasoner_ray.prompts import prompt_ids
from lightreasoner_ray.sampler import ContrastiveSampler
from lightreasoner_ray.tiny import TinyModelSpec, save_pair

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks" / "gsm8k" / "train.jsonl"


def per_prefix(sampler: ContrastiveSampler, prompts, completions, alpha, beta) -> int:
    """The reference algorithm: for every prefix, a fresh forward pass of each model."""
    selected = 0
    with torch.inference_mode():
        for prompt, completion in zip(prompts, completions):
            for t in range(len(completion)):
                ids = torch.tensor([list(prompt) + completion[:t]])
                expert = sampler.expert(ids).logits[:, -1, : sampler.vocab_size]
                amateur = sampler.amateur(ids).logits[:, -1, : sampler.vocab_size]
                selected += len(contrast_positions(expert, amateur, alpha, beta).steps)
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows = [json.loads(line) for line, _ in zip(DATA.open(), range(400))]
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        expert_spec = TinyModelSpec(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=2,
                                    intermediate_size=4 * args.hidden, initializer_range=0.05, seed=1)
        amateur_spec = TinyModelSpec(hidden_size=args.hidden // 2, num_layers=max(1, args.layers // 2), num_heads=4,
                                     num_kv_heads=2, intermediate_size=2 * args.hidden, initializer_range=0.05, seed=2)
        expert_path, amateur_path = save_pair(tmp, texts, expert_spec, amateur_spec, vocab_size=1024)
        sampler = ContrastiveSampler(ModelConfig(str(expert_path)), ModelConfig(str(amateur_path)), alpha=0.2,
                                     beta=0.4, max_new_tokens=args.max_new_tokens)
        prompts = [prompt_ids(sampler.tokenizer, r["question"], "Please reason step by step.") for r in rows[: args.problems]]
        batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]

        def generate_all():
            return [c for b in batches for c in greedy_generate(sampler.expert, sampler.tokenizer, b, args.max_new_tokens)]

        def sample_all():
            return [r for b in batches for r in sampler.sample([str(i) for i in range(len(b))], b)]

        # Interleaved repeats, best of each: the machine is shared and the first call warms up.
        generation_s = one_pass_s = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            completions = generate_all()
            generation_s = min(generation_s, time.perf_counter() - started)
            started = time.perf_counter()
            rows_out = sample_all()
            one_pass_s = min(one_pass_s, time.perf_counter() - started)

        started = time.perf_counter()
        naive_selected = per_prefix(sampler, prompts, [r["completion_ids"] for r in rows_out], 0.2, 0.4)
        per_prefix_s = time.perf_counter() - started

    tokens = sum(len(r["completion_ids"]) for r in rows_out)
    selected = sum(len(r["steps"]) for r in rows_out)
    assert selected == naive_selected, "the two algorithms must select the same steps"
    assert [r["completion_ids"] for r in rows_out] == completions
    print(f"pair: expert {args.layers}x{args.hidden}, amateur {max(1, args.layers // 2)}x{args.hidden // 2}; "
          f"{len(prompts)} GSM8K problems, {tokens} completion tokens, {selected} selected steps, batch {args.batch_size}")
    print(f"{'method':<34}{'wall s':>10}{'tokens/s':>12}")
    for name, seconds in (("expert greedy generation alone", generation_s), ("one-pass sampler (this project)", one_pass_s),
                          ("per-prefix sampler (reference)", per_prefix_s)):
        print(f"{name:<34}{seconds:>10.2f}{tokens / seconds:>12.1f}")
    print(f"per-prefix / one-pass: {per_prefix_s / one_pass_s:.1f}x faster (target >= 5x)")
    print(f"one-pass / generation alone: {one_pass_s / generation_s:.2f}x the cost (target <= 1.3x)")


if __name__ == "__main__":
    sys.exit(main())
