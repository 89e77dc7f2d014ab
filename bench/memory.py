"""Peak memory of one sampling actor's contrast step, before and after bounding it.

Random-weight Qwen2 models at the real vocabulary (151,936) and the real widths of
Qwen2.5-Math-1.5B (expert: hidden 1536, 12/2 heads, MLP 8960) and Qwen2.5-0.5B
(amateur: hidden 896, 14/2 heads, MLP 4864), with few layers so a run fits minutes on
a CPU. Each measurement runs in a fresh process: models are built, the peak-RSS mark
is reset (/proc/self/clear_refs), then a batch of prompts with a FIXED completion of
N tokens is teacher-forced and contrasted (generating 1,024 tokens greedily at these
widths would take far longer on a CPU and does not change the contrast's memory).

* before: the previous algorithm (kept below): every completion position of the batch
  projected through the head at once, the ``[:, :vocab]`` slice keeping the full-width
  storage, the expert's logits alive while the amateur's are computed, a KV cache
  built by the decoder;
* after: ``ContrastiveSampler.contrast``: hidden states only, a chunk of positions of
  both models projected (fp32) and contrasted at a time, no KV cache.

    python bench/memory.py                       # both algorithms at 128 and 1,024 tokens
    python bench/memory.py --measure after --tokens 1024 --preset tiny   # one process, JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

VOCAB = 151_936
PRESETS = {
    # (hidden, heads, kv heads, MLP, layers)
    "real": {"expert": (1536, 12, 2, 8960, 1), "amateur": (896, 14, 2, 4864, 1)},
    # Real vocabulary, tiny bodies: what tests/test_memory.py runs.
    "tiny": {"expert": (64, 4, 2, 128, 1), "amateur": (32, 2, 1, 64, 1)},
}
PROMPT_TOKENS = 64


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def build_model(hidden: int, heads: int, kv_heads: int, mlp: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=mlp, num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def old_completion_logits(model, sequences, prompt_lengths, pad_id, vocab_size):
    """The previous ``generation.completion_logits``: all positions of the batch at once."""
    from lightreasoner_ray.engines.generation import _pad_batch

    device = next(model.parameters()).device
    input_ids, attention_mask = _pad_batch(sequences, pad_id, left=False, device=device)
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows, cols, counts = [], [], []
        for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
            counts.append(len(sequence) - prompt_length)
            rows.extend([row] * counts[-1])
            cols.extend(range(prompt_length - 1, len(sequence) - 1))
        selected = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logits = model.get_output_embeddings()(selected)[:, :vocab_size]
    return list(torch.split(logits, counts))


def before(sampler, prompts, completions):
    """The previous ``ContrastiveSampler.sample`` contrast step."""
    from lightreasoner_ray.core.contrast import contrast_positions

    sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
    lengths = [len(p) for p in prompts]
    expert = old_completion_logits(sampler.expert, sequences, lengths, 0, sampler.vocab_size)
    amateur = old_completion_logits(sampler.amateur, sequences, lengths, 0, sampler.vocab_size)
    return {i: contrast_positions(e, a, sampler.alpha, sampler.beta, sampler.position_chunk)
            for i, (e, a) in enumerate(zip(expert, amateur))}


def after(sampler, prompts, completions):
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

    return ContrastiveSampler.contrast(sampler, prompts, completions)


def measure(algorithm: str, tokens: int, batch: int, preset: str) -> dict:
    """Build the pair, reset the peak mark, contrast one batch; peak RSS in MB."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    specs = PRESETS[preset]
    sampler = SimpleNamespace(
        expert=build_model(*specs["expert"], seed=1), amateur=build_model(*specs["amateur"], seed=2),
        tokenizer=SimpleNamespace(pad_token_id=0), vocab_size=VOCAB, alpha=0.2, beta=0.4, position_chunk=64,
        selection="paper",
    )
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (PROMPT_TOKENS,), generator=generator).tolist() for _ in range(batch)]
    completions = [torch.randint(1, VOCAB, (tokens,), generator=generator).tolist() for _ in range(batch)]
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    loaded = _rss_mb("VmRSS")
    started = time.perf_counter()
    results = {"before": before, "after": after}[algorithm](sampler, prompts, completions)
    seconds = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    positions = sum(len(r.kl) for r in results.values())
    assert positions == batch * tokens, positions
    return {"algorithm": algorithm, "tokens": tokens, "batch": batch, "preset": preset, "loaded_mb": loaded,
            "peak_mb": peak, "contrast_mb": peak - loaded, "seconds": seconds,
            "selected": sum(len(r.steps) for r in results.values())}


def run_isolated(algorithm: str, tokens: int, batch: int, preset: str) -> dict:
    """``measure`` in a fresh process (peak RSS is per process)."""
    command = [sys.executable, __file__, "--measure", algorithm, "--tokens", str(tokens), "--batch", str(batch),
               "--preset", preset]
    root = str(Path(__file__).resolve().parent.parent)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", choices=["before", "after"], help="one measurement in this process (JSON)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="real")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens[0], args.batch, args.preset)))
        return
    layers = PRESETS[args.preset]
    print(f"preset {args.preset}: expert (hidden, heads, kv, MLP, layers) {layers['expert']}, "
          f"amateur {layers['amateur']}, vocab {VOCAB}, batch {args.batch}, prompt {PROMPT_TOKENS} tokens, "
          "fixed (teacher-forced) completions, fp32 on CPU")
    print(f"{'new tokens':>10} | {'models MB':>9} | {'before: peak MB':>15} {'+contrast':>9} {'s':>6} | "
          f"{'after: peak MB':>14} {'+contrast':>9} {'s':>6} | {'contrast mem ratio':>18} | selected before/after")
    for tokens in args.tokens:
        old = run_isolated("before", tokens, args.batch, args.preset)
        new = run_isolated("after", tokens, args.batch, args.preset)
        selected = f"{old['selected']}/{new['selected']}"
        print(f"{tokens:>10} | {new['loaded_mb']:>9.0f} | {old['peak_mb']:>15.0f} {old['contrast_mb']:>9.0f} "
              f"{old['seconds']:>6.1f} | {new['peak_mb']:>14.0f} {new['contrast_mb']:>9.0f} {new['seconds']:>6.1f} | "
              f"{old['contrast_mb'] / max(new['contrast_mb'], 1):>17.1f}x | {selected}", flush=True)


if __name__ == "__main__":
    main()
