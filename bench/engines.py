"""HF generate vs vLLM on the same prompts, side by side in one run, for both stages.

Sampling: a ContrastiveSampler actor's work (the expert's greedy completions, then the
HF teacher-forced contrast of both models) on the same GSM8K train problems, with
``sampling.engine=hf`` and ``=vllm``: wall time, generation's share of it, tokens/s.
Evaluation: the same GSM8K test prompts through each engine (greedy): tokens/s, wall
time, ratio, and whether the completions are identical token for token.

Models are random-weight Qwen2 models built here (no hub) at a chosen width/depth,
with a BPE tokenizer trained on GSM8K text; the vocabulary is small, so the LM head
costs less than in a real checkpoint. Run::

    python bench/engines.py                       # ~ a few minutes on 2 idle CPUs
    python bench/engines.py --hidden 896 --layers 24 --heads 14 --kv-heads 2   # Qwen2.5-0.5B's body

vLLM's engine runs in a spawned process: everything happens under ``main()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "benchmarks" / "gsm8k"


def read_rows(path: Path, n: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for line, _ in zip(handle, range(n))]


def build_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    from lightreasoner_ray.toy.tiny_models import TinyModelSpec, save_pair

    root = Path(args.cache) / f"h{args.hidden}-l{args.layers}-a{args.heads}-kv{args.kv_heads}"
    if (root / "expert" / "config.json").is_file():
        return root / "expert", root / "amateur"
    texts = [text for row in read_rows(DATA / "train.jsonl", 2000) for text in (row["question"], row["answer"])]
    expert = TinyModelSpec(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, intermediate_size=4 * args.hidden,
                           max_position_embeddings=2048, initializer_range=0.02, seed=1)
    amateur = dataclasses.replace(expert, num_layers=max(1, args.layers // 4), seed=2)
    return save_pair(root, texts, expert, amateur, vocab_size=args.vocab)


def timed(function, *arguments):
    started = time.perf_counter()
    result = function(*arguments)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--problems", type=int, default=16, help="sampling problems and evaluation questions each")
    parser.add_argument("--sampling-tokens", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="HF batch size (sampling and evaluation)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="vLLM's KV cache on CPU; 0 on a GPU")
    parser.add_argument("--cache", default="/tmp/lightreasoner-bench-engines")
    args = parser.parse_args()

    import torch

    from lightreasoner_ray.config import ModelConfig, VLLMConfig
    from lightreasoner_ray.data.prompts import prompt_ids
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler
    from lightreasoner_ray.config import EVAL_SYSTEM_PROMPT, SAMPLING_SYSTEM_PROMPT

    expert_path, amateur_path = build_pair(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vllm = VLLMConfig(
        max_model_len=1024, max_num_seqs=64, enforce_eager=device == "cpu",
        kv_cache_memory_bytes=(args.kv_cache_mib << 20) if args.kv_cache_mib else None,
        gpu_memory_utilization=0.5,
    )
    expert, amateur = ModelConfig(path=str(expert_path)), ModelConfig(path=str(amateur_path))
    parameters = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(expert_path).parameters())
    print(f"expert {expert_path} ({parameters / 1e6:.1f}M parameters), device {device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    # One engine at a time: a live vLLM engine process polls for work and would slow the HF run.
    train = read_rows(DATA / "train.jsonl", args.problems)
    test = read_rows(DATA / "test.jsonl", args.problems)
    loads, sampling, evaluation = {}, {}, {}
    for engine in ("hf", "vllm"):
        sampler, loads[engine] = timed(
            lambda e=engine: ContrastiveSampler(expert, amateur, alpha=0.2, beta=0.4, max_new_tokens=args.sampling_tokens,
                                                engine=e, vllm=vllm)
        )
        tokenizer = sampler.tokenizer
        # ---- sampling: one actor's work, batch after batch ----
        prompts = [prompt_ids(tokenizer, row["question"], SAMPLING_SYSTEM_PROMPT) for row in train]
        ids = [str(i) for i in range(len(prompts))]
        sampler.sample(ids[:2], prompts[:2])  # warm-up
        sampler.generation_seconds = 0.0
        started = time.perf_counter()
        rows = []
        for start in range(0, len(prompts), args.batch_size):
            rows += sampler.sample(ids[start : start + args.batch_size], prompts[start : start + args.batch_size])
        wall = time.perf_counter() - started
        tokens = sum(len(row["completion_ids"]) for row in rows)
        sampling[engine] = {"wall": wall, "generation": sampler.generation_seconds, "tokens": tokens, "rows": rows}
        print(f"sampling with {engine}: {wall:.1f}s", flush=True)
        # ---- evaluation: the same questions, greedy, through the same engine ----
        questions = [prompt_ids(tokenizer, row["question"], EVAL_SYSTEM_PROMPT) for row in test]
        sampler.engine.spec = dataclasses.replace(sampler.engine.spec, max_new_tokens=args.eval_tokens,
                                                  batch_size=args.batch_size)
        completions, wall = timed(sampler.engine.generate, questions)
        evaluation[engine] = {"wall": wall, "completions": completions,
                              "tokens": sum(len(s[0].token_ids) for s in completions)}
        print(f"evaluation with {engine}: {wall:.1f}s", flush=True)
        if hasattr(sampler.engine, "close"):
            sampler.engine.close()
        del sampler

    same = sum(a["completion_ids"] == b["completion_ids"] and a["steps"] == b["steps"]
               for a, b in zip(sampling["hf"]["rows"], sampling["vllm"]["rows"]))

    print(f"\nSampling: {len(prompts)} GSM8K train problems, {args.sampling_tokens} new tokens max, "
          f"batches of {args.batch_size} (one actor)")
    print("| engine | load (s) | wall (s) | generation (s) | contrast (s) | generation share | completion tok/s |")
    print("|:---|---:|---:|---:|---:|---:|---:|")
    for engine, m in sampling.items():
        print(f"| {engine} | {loads[engine]:.1f} | {m['wall']:.1f} | {m['generation']:.1f} | "
              f"{m['wall'] - m['generation']:.1f} | {100 * m['generation'] / m['wall']:.0f}% | {m['tokens'] / m['wall']:.1f} |")
    print(f"vLLM / HF sampling throughput: {sampling['hf']['wall'] / sampling['vllm']['wall']:.2f}x; "
          f"identical completions and steps: {same}/{len(prompts)}")

    identical = sum(a[0].token_ids == b[0].token_ids
                    for a, b in zip(evaluation["hf"]["completions"], evaluation["vllm"]["completions"]))
    print(f"\nEvaluation: {len(questions)} GSM8K test questions, greedy, {args.eval_tokens} new tokens max "
          f"(HF batches of {args.batch_size}; vLLM gets them all at once)")
    print("| engine | wall (s) | generated tokens | tok/s |")
    print("|:---|---:|---:|---:|")
    for engine, m in evaluation.items():
        print(f"| {engine} | {m['wall']:.1f} | {m['tokens']} | {m['tokens'] / m['wall']:.1f} |")
    print(f"vLLM / HF evaluation throughput: {evaluation['hf']['wall'] / evaluation['vllm']['wall']:.2f}x; "
          f"identical completions: {identical}/{len(questions)}")


if __name__ == "__main__":
    sys.exit(main())
