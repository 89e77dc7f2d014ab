"""Grading throughput on real benchmark rows: fast path vs symbolic path.

    python bench/grading.py [--data-dir ../shared/data/benchmarks] [--repeat 3]

Three workloads, measured side by side in one run:
- fast: every gold answer of the seven local benchmarks, boxed in a model-style
  completion, extracted and graded (string and plain-number comparisons);
- numeric: non-integer references answered as 8-digit decimals (tolerance path);
- symbolic: parseable MATH-500 / Minerva / OlympiadBench references answered as
  ``2*(ref)/2``, which only the sympy worker process can decide.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightreasoner_ray.core import grading  # noqa: E402
from lightreasoner_ray.data.benchmarks import default_data_dir, load_benchmark  # noqa: E402
from lightreasoner_ray.core.grading import extract_answer, is_equivalent, normalize_answer, parse_expression  # noqa: E402

LOCAL_BENCHMARKS = ("gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem")
SYMBOLIC_BENCHMARKS = ("math500", "minerva_math", "olympiadbench")


def _parsed_scalar(answer: str) -> list | None:
    text = normalize_answer(answer)
    if "=" in text or "," in text or re.fullmatch(r"[A-Za-z' .]+", text):
        return None
    try:
        return parse_expression(text)
    except ValueError:
        return None


def build_workloads(data_dir: Path) -> dict[str, list[tuple[str, str, str]]]:
    """name -> [(benchmark, completion or prediction, reference)]."""
    rows = {name: load_benchmark(name, data_dir=data_dir) for name in LOCAL_BENCHMARKS}
    fast = [
        (name, f"... so the total is \\boxed{{{row['answer']}}}.", row["answer"])
        for name in LOCAL_BENCHMARKS
        for row in rows[name]
    ]
    numeric, symbolic = [], []
    for name in SYMBOLIC_BENCHMARKS + ("asdiv",):
        for row in rows[name]:
            tree = _parsed_scalar(row["answer"])
            if tree is None:
                continue
            value = grading._rational_value(tree)
            if value is not None and value != int(value):
                numeric.append((name, f"{float(value):.8g}", row["answer"]))
            elif value is None and name in SYMBOLIC_BENCHMARKS:
                symbolic.append((name, f"2\\cdot({normalize_answer(row['answer'])})/2", row["answer"]))
    return {"fast": fast, "numeric": numeric, "symbolic": symbolic}


def run(workload: str, items: list[tuple[str, str, str]], repeat: int) -> tuple[float, int]:
    """Best-of-``repeat`` answers per second, and how many graded correct."""
    best, correct = 0.0, 0
    for _ in range(repeat):
        # A fresh worker each time, so sympy's cache does not remember the last run.
        grading._symbolic_worker().close()
        is_equivalent(r"2\sqrt{3}", r"\sqrt{12}")
        started = time.perf_counter()
        if workload == "fast":
            correct = sum(is_equivalent(extract_answer(text, name), ref) for name, text, ref in items)
        else:
            correct = sum(is_equivalent(prediction, ref) for _, prediction, ref in items)
        best = max(best, len(items) / (time.perf_counter() - started))
    return best, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    workloads = build_workloads(args.data_dir)
    started = time.perf_counter()
    is_equivalent(r"2\sqrt{3}", r"\sqrt{12}")
    print(f"symbolic worker start-up: {time.perf_counter() - started:.2f} s (once per process)")

    rates = {}
    for name, items in workloads.items():
        rate, correct = run(name, items, args.repeat)
        rates[name] = rate
        print(f"{name:9s} {len(items):6d} answers  {rate:10.0f} answers/s  graded correct {correct}/{len(items)}")
    print(f"fast path is {rates['fast'] / rates['symbolic']:.0f}x the symbolic path per answer")


if __name__ == "__main__":
    main()
