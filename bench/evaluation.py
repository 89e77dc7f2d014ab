"""Evaluation throughput, measured side by side in one run (CPU, tiny random Qwen2 model).

    python bench/evaluation.py [--rows 32] [--max-new-tokens 48] [--grading-rows 600]

1. Generation + grading through the Ray evaluator pool with 2 actors, then 1 actor,
   on the same shards (problems/s, model loading excluded).
2. Grading alone: answers/s in one process (``grade_rows``) and fanned out over Ray
   tasks, on gold answers and on wrong ones; best of two runs each way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LIGHTREASONER_DATA_DIR", REPO.parent / "shared" / "data" / "benchmarks"))
BENCHMARKS = ["gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem"]


def build_tiny_model(directory: Path) -> Path:
    from lightreasoner_ray.toy.tiny_models import TinyModelSpec, save_pair

    texts = []
    with (DATA_DIR / "gsm8k" / "train.jsonl").open() as handle:
        for line, _ in zip(handle, range(400)):
            row = json.loads(line)
            texts.extend([row["question"], row["answer"]])
    expert = TinyModelSpec(hidden_size=64, num_layers=2, initializer_range=0.08, vocab_padding=2, seed=1)
    amateur = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=2)
    expert_path, _ = save_pair(directory, texts, expert, amateur, vocab_size=600)
    return expert_path


def pool_throughput(model: Path, output_dir: Path, actors: int, args: argparse.Namespace) -> dict:
    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.stages.evaluation.stage import run_evaluation

    config = load_config(None, [
        f"eval.model=tiny={model}",
        f"output_dir={output_dir}",
        f"eval.data_dir={DATA_DIR}",
        f"eval.benchmarks=[{','.join(BENCHMARKS)}]",
        f"eval.limit={args.rows}",
        f"eval.max_new_tokens={args.max_new_tokens}",
        f"eval.shard_size={args.shard_size}",
        f"eval.batch_size={args.shard_size}",
        f"eval.num_actors={actors}",
    ])
    return run_evaluation(config)["models"]["tiny"]["run"]


def grading_corpus(rows_per_benchmark: int) -> list[tuple[str, list[dict], list[str]]]:
    """(benchmark, rows, outputs): gold answers in a box, and the same rows with wrong answers."""
    from lightreasoner_ray.data.benchmarks import load_benchmark

    corpus = []
    for benchmark in BENCHMARKS:
        rows = load_benchmark(benchmark, DATA_DIR, rows_per_benchmark)
        right = [f"Step by step ... so the answer is \\boxed{{{row['answer']}}}." for row in rows]
        if benchmark == "mmlu_stem":
            wrong = [f"The answer is \\boxed{{{'BCDA'['ABCD'.index(row['answer'])]}}}." for row in rows]
        else:
            wrong = [f"Hence \\boxed{{3 \\cdot ({row['answer']}) + 1}}." for row in rows]
        # Two tasks a benchmark, so the Ray side has more tasks than CPUs to balance.
        middle = len(rows) // 2
        corpus.append((benchmark, rows[:middle] + rows[:middle], right[:middle] + wrong[:middle]))
        corpus.append((benchmark, rows[middle:] + rows[middle:], right[middle:] + wrong[middle:]))
    return corpus


def warm_up_grading_workers(ray) -> None:
    """Start Ray's task workers and their symbolic grading processes outside any timing."""
    from lightreasoner_ray.core.scoring import grade_rows

    grade_task = ray.remote(grade_rows).options(num_cpus=1)
    row = {"id": "0", "question": "q", "answer": "\\sqrt{2}/2"}
    slots = int(ray.cluster_resources().get("CPU", 1))
    ray.get([grade_task.remote("math500", [row] * 3, ["\\boxed{\\sin(\\pi/4)}"] * 3) for _ in range(2 * slots)])


def grading_throughput(corpus, ray, repeats: int = 2) -> dict:
    """Best of ``repeats`` timings each way (the first run of a process starts its symbolic worker)."""
    from lightreasoner_ray.core.scoring import grade_rows

    grade_task = ray.remote(grade_rows).options(num_cpus=1)
    warm_up_grading_workers(ray)
    answers = sum(len(outputs) for _, _, outputs in corpus)
    local_s, ray_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        local = [grade_rows(benchmark, rows, outputs) for benchmark, rows, outputs in corpus]
        local_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        remote = ray.get([grade_task.remote(benchmark, rows, outputs) for benchmark, rows, outputs in corpus])
        ray_s.append(time.perf_counter() - started)
    correct = sum(row["correct"] for graded in local for row in graded)
    assert correct == sum(row["correct"] for graded in remote for row in graded)
    return {"answers": answers, "correct": correct, "local_s": min(local_s), "ray_s": min(ray_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="problems per benchmark for the pool runs")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--grading-rows", type=int, default=600, help="problems per benchmark for grading")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray instance")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("LIGHTREASONER_NO_DASHBOARD", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model = build_tiny_model(scratch_dir / "tiny")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            warm_up_grading_workers(ray)
            # 2 actors first: any start-up cost left over counts against the larger pool.
            runs = {actors: pool_throughput(model, scratch_dir / f"out-{actors}", actors, args) for actors in (2, 1)}
            grading = grading_throughput(grading_corpus(args.grading_rows), ray)
        finally:
            ray.shutdown()

    problems = runs[1]["rows_generated"]
    print(f"\nEvaluator pool: {problems} problems ({len(BENCHMARKS)} benchmarks x {args.rows}), "
          f"max_new_tokens={args.max_new_tokens}, shard_size={args.shard_size}, CPU, {os.cpu_count()} cores")
    print(f"{'actors':>8} {'load s':>8} {'gen+grade s':>12} {'problems/s':>11}")
    for actors, run in sorted(runs.items()):
        print(f"{actors:>8} {run['load_s']:>8.1f} {run['generate_and_grade_s']:>12.1f} {run['rows_per_s']:>11.2f}")
    print(f"speed-up 2 actors / 1 actor: {runs[2]['rows_per_s'] / runs[1]['rows_per_s']:.2f}x")
    print(f"\nGrading: {grading['answers']} answers ({grading['correct']} correct), 7 benchmarks, "
          "half gold, half wrong")
    local_rate, ray_rate = grading["answers"] / grading["local_s"], grading["answers"] / grading["ray_s"]
    print(f"  one process : {grading['local_s']:6.2f} s  {local_rate:8.1f} answers/s")
    print(f"  Ray tasks   : {grading['ray_s']:6.2f} s  {ray_rate:8.1f} answers/s  ({2 * len(BENCHMARKS)} tasks)")
    print(f"  speed-up Ray tasks / one process: {ray_rate / local_rate:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
