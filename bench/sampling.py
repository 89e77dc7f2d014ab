"""Sampling cost, side by side in one process on the same pair and problems.

    python bench/sampling.py [--problems 8] [--max-new-tokens 128] [--batch-size 8] [--naive-problems N]

Compares (1) this project's sampler: batched greedy generation, then ONE
teacher-forced pass per model and the contrast maths; (2) the reference's actual
algorithm (HKUDS/LightReasoner ``LightR_sampling.py``, re-implemented here for timing):
one problem at a time, the expert's distributions taken from ``generate``'s scores,
then every completion prefix decoded, appended to the chat-template text and
re-tokenized, and the amateur run on those prefixes 64 a right-padded batch (its
last real position read), then a Python loop over steps for the KL, mask and soft
label; (3) a naive oracle: a forward pass of each model per prefix on the exact ids
(what the one-pass sampler is checked against; slower than the reference); (4) the
expert's greedy generation alone. Prints wall times and the ratios, each naming its
baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.core.contrast import contrast_positions
from lightreasoner_ray.engines.generation import eos_token_ids, greedy_generate
from lightreasoner_ray.data.prompts import prompt_ids
from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler
from lightreasoner_ray.toy.tiny_models import TinyModelSpec, save_pair

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks" / "gsm8k" / "train.jsonl"


def per_prefix(sampler: ContrastiveSampler, prompts, completions, alpha, beta) -> int:
    """The naive oracle: for every prefix, a fresh forward pass of each model on the exact ids."""
    selected = 0
    with torch.inference_mode():
        for prompt, completion in zip(prompts, completions):
            for t in range(len(completion)):
                ids = torch.tensor([list(prompt) + completion[:t]])
                expert = sampler.expert(ids).logits[:, -1, : sampler.vocab_size]
                amateur = sampler.amateur(ids).logits[:, -1, : sampler.vocab_size]
                selected += len(contrast_positions(expert, amateur, alpha, beta).steps)
    return selected


def reference_algorithm(expert, amateur, tokenizer, questions, system_prompt, max_new_tokens, alpha, beta,
                        amateur_batch: int = 64) -> dict[str, float]:
    """LightR_sampling.py's work per problem, timed by phase (its arithmetic, our code).

    Greedy decoding with the same EOS ids as our sampler, so both see the same completions.
    """
    eos_ids = sorted(eos_token_ids(expert, tokenizer))
    pad_id = tokenizer.pad_token_id
    phases = {"generate": 0.0, "amateur": 0.0, "contrast": 0.0}
    selected = tokens = 0
    for question in questions:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer([text], return_tensors="pt")

        started = time.perf_counter()
        outputs = expert.generate(**inputs, max_new_tokens=max_new_tokens, output_scores=True,
                                  return_dict_in_generate=True, do_sample=False, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=pad_id, eos_token_id=eos_ids)
        targets = outputs.sequences[0][inputs.input_ids.shape[1]:].tolist()
        expert_probs = [F.softmax(score[0], dim=-1) for score in outputs.scores]
        phases["generate"] += time.perf_counter() - started
        tokens += len(targets)

        started = time.perf_counter()
        prefixes = [tokenizer(text + tokenizer.decode(targets[:step]), return_tensors="pt").input_ids[0]
                    for step in range(1, len(targets))]
        amateur_probs = []
        with torch.no_grad():
            for start in range(0, len(prefixes), amateur_batch):
                chunk = prefixes[start:start + amateur_batch]
                padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=pad_id)
                logits = amateur(padded, attention_mask=(padded != pad_id).long()).logits
                for row, prefix in enumerate(chunk):
                    amateur_probs.append(F.softmax(logits[row, prefix.size(0) - 1, :], dim=-1))
        phases["amateur"] += time.perf_counter() - started

        started = time.perf_counter()
        for step in range(1, len(targets)):
            expert_dist, amateur_dist = expert_probs[step], amateur_probs[step - 1]
            vocab = min(expert_dist.size(0), amateur_dist.size(0))
            expert_dist, amateur_dist = expert_dist[:vocab], amateur_dist[:vocab]
            mask = expert_dist >= alpha * torch.max(expert_dist)
            if not mask.any():
                continue
            kl = F.kl_div((amateur_dist + 1e-12).log(), expert_dist + 1e-12, reduction="sum").item()
            if kl < beta:
                continue
            scores = torch.log(expert_dist + 1e-12) - torch.log(amateur_dist + 1e-12)
            weights = torch.softmax(scores[mask], dim=-1).tolist()
            token_ids = torch.arange(vocab)[mask].tolist()
            _record = (tokenizer.decode(targets[:step]), [tokenizer.decode([i]) for i in token_ids], weights, kl)
            selected += 1
        phases["contrast"] += time.perf_counter() - started
    return {**phases, "total": sum(phases.values()), "selected": selected, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-problems", type=int, default=0, help="problems for the naive oracle (0: all)")
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

        questions = [r["question"] for r in rows[: args.problems]]

        def reference_all():
            return reference_algorithm(sampler.expert, sampler.amateur, sampler.tokenizer, questions,
                                       "Please reason step by step.", args.max_new_tokens, 0.2, 0.4)

        # Interleaved repeats, best of each: the machine is shared and the first call warms up.
        generation_s = one_pass_s = float("inf")
        reference = {"total": float("inf")}
        for _ in range(args.repeats):
            started = time.perf_counter()
            completions = generate_all()
            generation_s = min(generation_s, time.perf_counter() - started)
            started = time.perf_counter()
            rows_out = sample_all()
            one_pass_s = min(one_pass_s, time.perf_counter() - started)
            reference = min(reference, reference_all(), key=lambda timing: timing["total"])

        # The naive oracle is slow (a pass of each model per prefix): by default on every problem,
        # --naive-problems N times it on the first N and compares tokens/s.
        naive_count = min(args.naive_problems or len(prompts), len(prompts))
        started = time.perf_counter()
        naive_selected = per_prefix(sampler, prompts[:naive_count], [r["completion_ids"] for r in rows_out[:naive_count]],
                                    0.2, 0.4)
        per_prefix_s = time.perf_counter() - started

    tokens = sum(len(r["completion_ids"]) for r in rows_out)
    selected = sum(len(r["steps"]) for r in rows_out)
    naive_tokens = sum(len(r["completion_ids"]) for r in rows_out[:naive_count])
    assert sum(len(r["steps"]) for r in rows_out[:naive_count]) == naive_selected, \
        "the one-pass sampler and the naive oracle must select the same steps"
    assert [r["completion_ids"] for r in rows_out] == completions
    print(f"pair: expert {args.layers}x{args.hidden}, amateur {max(1, args.layers // 2)}x{args.hidden // 2}; "
          f"{len(prompts)} GSM8K problems, {tokens} completion tokens, {selected} selected steps, batch {args.batch_size}")
    print(f"reference algorithm: {reference['tokens']} completion tokens, {reference['selected']} selected steps "
          f"(it skips step 0, keeps KL >= beta and re-tokenizes prefixes, so counts may differ slightly)")
    contrast_s = one_pass_s - generation_s
    reference_contrast_s = reference["amateur"] + reference["contrast"]
    print(f"{'method':<58}{'wall s':>10}{'tokens/s':>12}")
    for name, seconds in (
        ("expert greedy generation alone (batched)", generation_s),
        ("one-pass sampler (this project): total", one_pass_s),
        ("  of which one pass per model + contrast", contrast_s),
        ("reference algorithm (LightR_sampling.py): total", reference["total"]),
        ("  generate with scores, one problem at a time", reference["generate"]),
        ("  amateur on re-tokenized prefixes, 64 a batch", reference["amateur"]),
        ("  per-step KL / mask / soft-label loop", reference["contrast"]),
    ):
        print(f"{name:<58}{seconds:>10.2f}{tokens / seconds:>12.1f}")
    naive_name = f"naive oracle: a pass of each model per prefix ({naive_count} problems)"
    print(f"{naive_name:<58}{per_prefix_s:>10.2f}{naive_tokens / per_prefix_s:>12.1f}")
    print(f"vs the reference algorithm: {reference['total'] / one_pass_s:.1f}x faster end to end; "
          f"after generation, {reference_contrast_s / contrast_s:.1f}x faster (one pass per model vs amateur "
          f"prefix batches + step loop)")
    print(f"vs the naive per-prefix oracle: {(tokens / one_pass_s) / (naive_tokens / per_prefix_s):.1f}x the tokens/s "
          f"(target >= 5x)")
    print(f"one-pass / generation alone: {one_pass_s / generation_s:.2f}x the cost (target <= 1.3x)")


if __name__ == "__main__":
    sys.exit(main())
