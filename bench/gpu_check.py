"""The GPU acceptance check: one command, one GPU, no Ray, vLLM, DeepSpeed or network needed.

At the real Qwen2.5-Math-1.5B / Qwen2.5-0.5B shapes (random weights, written locally by
lightreasoner_ray.toy.real_shapes in bf16), on the accelerator in bf16, against the same
computation in fp32 on the CPU over the same token ids and the same (bf16-rounded) weights:

1. generation: the HF engine's greedy generation of both-model prompts (tokens/s);
2. contrast: the sampler's computation (one teacher-forced pass of each model, fp32 LM head
   through ``torch.mm(..., out_dtype=float32)`` on CUDA, KL, selection, soft labels):
   selected steps must agree on >= 99% of positions and KL within the stated tolerance;
3. one LoRA update of the trainer's loss (core.loss.step_kl, q_proj/v_proj, r 8): gradient
   cosine >= 0.99 against fp32 CPU, and the update applied;
4. if DeepSpeed is importable: one ZeRO-2 LoRA step in this single process (else "skipped").

Peak accelerator memory of each piece is reported. One table out (and --json), exit 1 on
any mismatch, 2 on bad input.

    python bench/gpu_check.py                          # CUDA, real shapes (< 8 minutes on one GPU)
    python bench/gpu_check.py --device cpu --shape tiny   # the same comparisons, bf16 CPU vs fp32 CPU (seconds)

Imports only torch, transformers, peft and the Ray-free layers (core, engines, toy.real_shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from lightreasoner_ray.config import ModelConfig
from lightreasoner_ray.core.contrast import contrast_positions
from lightreasoner_ray.core.loss import SelectedStepLogits, step_kl
from lightreasoner_ray.engines.generation import completion_logits, greedy_generate
from lightreasoner_ray.engines.models import (
    load_model,
    load_tokenizer,
    shared_vocab_size,
)
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.toy import real_shapes

ALPHA, BETA = 0.2, 0.4
SELECTION_AGREEMENT = 0.99
# KL in nats: bf16 activations against fp32 over the same weights. Mean |dKL| over positions,
# and the largest relative difference allowed where KL is not tiny.
KL_MEAN_ABS_TOLERANCE = 0.02
KL_MAX_ABS_TOLERANCE = 0.25
GRADIENT_COSINE = 0.99
TINY = {"expert": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
        "amateur": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)}
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
    "did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. How much "
    "more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def build_pair(directory: Path, shape: str, layers: int | None) -> tuple[Path, Path]:
    """The expert and amateur at real shapes (or tiny bodies at the real vocabulary), bf16 on disk."""
    tiny = shape == "tiny"
    expert = directory / ("expert-tiny" if tiny else "qwen2.5-math-1.5b")
    amateur = directory / ("amateur-tiny" if tiny else "qwen2.5-0.5b")
    for path, name, role in ((expert, "qwen2.5-math-1.5b", "expert"), (amateur, "qwen2.5-0.5b", "amateur")):
        if not (path / "REAL_SHAPE.json").is_file():
            real_shapes.write_model(name, path, num_layers=(layers or 2) if tiny else layers, dtype="bfloat16",
                                    overrides={**TINY[role], "initializer_range": 0.12} if tiny else None,
                                    seed=1 if role == "expert" else 2)
    return expert, amateur


class Peak:
    """Peak accelerator memory of a piece of work (bytes; 0 on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)


def load_pair(expert: Path, amateur: Path, device: torch.device, dtype: str):
    expert_model = load_model(ModelConfig(path=str(expert), dtype=dtype), "expert", device)
    amateur_model = load_model(ModelConfig(path=str(amateur), dtype=dtype), "amateur", device)
    return expert_model, amateur_model


def contrast(expert_model, amateur_model, prompts, completions, vocab, pad_id):
    """The sampler's contrast (ContrastiveSampler.contrast), composed from the same core and engine calls."""
    sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
    lengths = [len(p) for p in prompts]
    expert_rows = completion_logits(expert_model, sequences, lengths, pad_id, vocab)
    amateur_rows = completion_logits(amateur_model, sequences, lengths, pad_id, vocab)
    return [contrast_positions(e, a, ALPHA, BETA, 64) for e, a in zip(expert_rows, amateur_rows)]


def loss_batch(prompt, completion, result, device):
    """One trajectory's selected steps as the trainer collates them (one row, packed steps)."""
    steps = result.steps
    width = max(len(ids) for ids in result.target_ids)
    target_ids = torch.zeros((len(steps), width), dtype=torch.long)
    target_probs = torch.zeros((len(steps), width), dtype=torch.float32)
    for row, (ids, probs) in enumerate(zip(result.target_ids, result.target_probs)):
        target_ids[row, : len(ids)] = torch.tensor(ids)
        target_probs[row, : len(probs)] = torch.tensor(probs)
    sequence = list(prompt) + list(completion)
    return SimpleNamespace(
        input_ids=torch.tensor([sequence], device=device), attention_mask=torch.ones((1, len(sequence)), dtype=torch.long,
                                                                                    device=device),
        step_rows=torch.zeros(len(steps), dtype=torch.long, device=device),
        step_positions=torch.tensor([len(prompt) - 1 + t for t in steps], device=device),
        target_ids=target_ids.to(device), target_probs=target_probs.to(device))


def lora_gradients(model, batch, vocab, seed: int):
    """Wrap ``model`` in LoRA (q_proj, v_proj; B drawn small so every factor has a gradient), one loss backward."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(peft_model.named_parameters()):
        if "lora_" in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    wrapped = SelectedStepLogits(peft_model, vocab)
    loss = step_kl(wrapped, batch).mean()
    loss.backward()
    grads = {name: p.grad.detach().float().cpu() for name, p in sorted(peft_model.named_parameters())
             if p.requires_grad and p.grad is not None}
    return peft_model, float(loss.detach()), grads


def cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[k].flatten() for k in sorted(a)]).double()
    y = torch.cat([b[k].flatten() for k in sorted(b)]).double()
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-300))


def deepspeed_step(model, batch, vocab, device) -> dict:
    """One ZeRO-2 step of the trainer's loss in this single process, if DeepSpeed is importable."""
    try:
        import deepspeed
    except Exception as error:  # not installed, or a broken install
        return {"status": "skipped", "why": f"deepspeed not importable ({type(error).__name__})"}
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    on_gpu = device.type == "cuda"
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": on_gpu},
              "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "torch_adam": not on_gpu}},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    wrapped = SelectedStepLogits(model, vocab)
    engine, *_ = deepspeed.initialize(model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad],
                                      config=config)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    loss = step_kl(engine, batch).mean()
    engine.backward(loss)
    engine.step()
    moved = sum(int(not torch.equal(before[n], p.detach())) for n, p in engine.module.named_parameters() if n in before)
    return {"status": "ok" if moved and math.isfinite(float(loss)) else "failed", "loss": float(loss),
            "parameters_changed": moved}


def run_check(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LightReasonerError("--device cuda: torch sees no CUDA device (use --device cpu --shape tiny to rehearse)")
    torch.manual_seed(0)
    rows: list[dict] = []
    work = Path(args.models or tempfile.mkdtemp(prefix="gpu_check_"))
    started = time.perf_counter()
    expert_dir, amateur_dir = build_pair(work, args.shape, args.layers)
    rows.append({"piece": "build models", "seconds": time.perf_counter() - started, "ok": True})
    tokenizer = load_tokenizer(ModelConfig(path=str(expert_dir)), "expert")
    prompts = []
    for question in QUESTIONS[: args.problems]:
        encoded = tokenizer.apply_chat_template([{"role": "system", "content": "Please reason step by step."},
                                                 {"role": "user", "content": question}], add_generation_prompt=True)
        prompts.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))

    # 1. Generation on the device, bf16.
    expert, amateur = load_pair(expert_dir, amateur_dir, device, "bfloat16")
    vocab = shared_vocab_size(tokenizer, expert, amateur)
    with Peak(device) as peak:
        started = time.perf_counter()
        completions = greedy_generate(expert, tokenizer, prompts, args.new_tokens)
        seconds = time.perf_counter() - started
    generated = sum(len(c) for c in completions)
    # Random weights rarely stop early; pad short completions with fixed ids so the contrast is long enough.
    completions = [c if len(c) >= 8 else c + [100 + i for i in range(8 - len(c))] for c in completions]
    rows.append({"piece": "generation (HF, greedy, bf16)", "seconds": seconds, "tokens": generated,
                 "tokens_per_s": generated / seconds, "peak_bytes": peak.bytes, "ok": generated > 0})

    # 2. Contrast: device bf16 vs CPU fp32, same ids and weights.
    with Peak(device) as peak:
        started = time.perf_counter()
        device_results = contrast(expert, amateur, prompts, completions, vocab, tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
    device_contrast_peak = peak.bytes
    expert_ref, amateur_ref = load_pair(expert_dir, amateur_dir, torch.device("cpu"), "float32")
    reference = contrast(expert_ref, amateur_ref, prompts, completions, vocab, tokenizer.pad_token_id)
    kl_device = torch.cat([r.kl for r in device_results]).double()
    kl_reference = torch.cat([r.kl for r in reference]).double()
    if args.perturb:
        kl_device = kl_device + args.perturb
    selected_device = kl_device > BETA
    selected_reference = kl_reference > BETA
    agreement = float((selected_device == selected_reference).double().mean())
    mean_abs = float((kl_device - kl_reference).abs().mean())
    max_abs = float((kl_device - kl_reference).abs().max())
    rows.append({"piece": "contrast (KL, selection)", "seconds": seconds, "positions": int(kl_reference.numel()),
                 "selected": int(selected_reference.sum()), "selection_agreement": agreement,
                 "kl_mean_abs_diff": mean_abs, "kl_max_abs_diff": max_abs, "peak_bytes": device_contrast_peak,
                 "ok": agreement >= SELECTION_AGREEMENT and mean_abs <= KL_MEAN_ABS_TOLERANCE
                 and max_abs <= KL_MAX_ABS_TOLERANCE})

    # 3. One LoRA update of the trainer's loss: device bf16 vs CPU fp32, labels from the fp32 contrast.
    index = max(range(len(reference)), key=lambda i: len(reference[i].steps))
    if not reference[index].steps:
        raise LightReasonerError("no step was selected at beta 0.4 on these random models: nothing to train")
    batch_cpu = loss_batch(prompts[index], completions[index], reference[index], torch.device("cpu"))
    batch_device = loss_batch(prompts[index], completions[index], reference[index], device)
    _, loss_reference, grads_reference = lora_gradients(expert_ref, batch_cpu, vocab, seed=0)
    with Peak(device) as peak:
        started = time.perf_counter()
        peft_device, loss_device, grads_device = lora_gradients(expert, batch_device, vocab, seed=0)
        if args.perturb:
            grads_device = {k: v + args.perturb * v.abs().mean() * torch.randn_like(v) * 100 for k, v in grads_device.items()}
        optimizer = torch.optim.AdamW([p for p in peft_device.parameters() if p.requires_grad], lr=5e-5)
        before = {n: p.detach().clone() for n, p in peft_device.named_parameters() if p.requires_grad}
        optimizer.step()
        changed = sum(int(not torch.equal(before[n], p.detach())) for n, p in peft_device.named_parameters()
                      if n in before)
        seconds = time.perf_counter() - started
    similarity = cosine(grads_device, grads_reference)
    rows.append({"piece": "LoRA update (loss, grads, AdamW)", "seconds": seconds, "steps": len(reference[index].steps),
                 "loss": loss_device, "loss_reference": loss_reference, "gradient_cosine": similarity,
                 "parameters_changed": changed, "peak_bytes": peak.bytes,
                 "ok": similarity >= GRADIENT_COSINE and changed > 0 and math.isfinite(loss_device)})
    del peft_device, expert_ref, amateur_ref

    # 4. DeepSpeed ZeRO-2, one step, if importable.
    if args.deepspeed == "off":
        rows.append({"piece": "DeepSpeed ZeRO-2 step", "status": "skipped", "why": "--deepspeed off", "ok": True})
    else:
        from peft import LoraConfig, get_peft_model

        fresh, _ = load_pair(expert_dir, amateur_dir, device, "bfloat16")
        fresh = get_peft_model(fresh, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        with Peak(device) as peak:
            started = time.perf_counter()
            outcome = deepspeed_step(fresh, batch_device, vocab, device)
            seconds = time.perf_counter() - started
        rows.append({"piece": "DeepSpeed ZeRO-2 step", "seconds": seconds, "peak_bytes": peak.bytes, **outcome,
                     "ok": outcome["status"] in ("ok", "skipped")})
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": args.shape, "torch": torch.__version__, "rows": rows, "ok": all(row["ok"] for row in rows),
            "tolerances": {"selection_agreement": SELECTION_AGREEMENT, "kl_mean_abs": KL_MEAN_ABS_TOLERANCE,
                           "kl_max_abs": KL_MAX_ABS_TOLERANCE, "gradient_cosine": GRADIENT_COSINE}}


def print_table(report: dict) -> None:
    print(f"device {report['device_name']} ({report['device']}), shape {report['shape']}, torch {report['torch']}")
    print(f"{'piece':<34} {'ok':<4} {'s':>7} {'peak GB':>8}  measurements")
    skip = {"piece", "ok", "seconds", "peak_bytes"}
    for row in report["rows"]:
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in skip)
        seconds = f"{row['seconds']:>7.1f}" if "seconds" in row else " " * 7
        peak = f"{row['peak_bytes'] / 1e9:>8.2f}" if row.get("peak_bytes") else " " * 8
        print(f"{row['piece']:<34} {'yes' if row['ok'] else 'NO':<4} {seconds} {peak}  {details}")
    print("PASS" if report["ok"] else "FAIL: a device result differs from the fp32 CPU reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--shape", choices=["real", "tiny"], default="real",
                        help="real: Qwen2.5-Math-1.5B / Qwen2.5-0.5B at full depth; tiny: tiny bodies, real vocabulary")
    parser.add_argument("--layers", type=int, default=None, help="override the depth of both models")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (real), 16 (tiny)")
    parser.add_argument("--problems", type=int, default=None, choices=range(1, len(QUESTIONS) + 1),
                        help="default 4 (real), 2 (tiny)")
    parser.add_argument("--models", help="directory to build (or reuse) the random-weight models in")
    parser.add_argument("--deepspeed", choices=["auto", "off"], default="auto")
    parser.add_argument("--json", type=Path, help="write the report here too")
    parser.add_argument("--perturb", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: inject a mismatch
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    args.new_tokens = args.new_tokens or (16 if tiny else 64)
    args.problems = args.problems or (2 if tiny else 4)
    try:
        report = run_check(args)
    except LightReasonerError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
