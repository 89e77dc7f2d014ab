"""The full `lightreasoner demo`, timed end to end; prints the table to paste into the README.

    python bench/demo.py [key=value ...]        # e.g. demo.seeds=[0,1,2]

Runs exactly what `lightreasoner demo` runs (toy pair built or reused from the cache,
Ray Data sampling, rejection sampling, four Ray Train + DeepSpeed trainings per seed and
one more per LightReasoner round, Ray pool evaluation) and reports the wall time of
each part, and the efficiency ratios of the paper against SFT on rejection-sampled
solutions.
"""

from __future__ import annotations

import logging
import sys
import time

from lightreasoner_ray.runs.demo import demo_config, run_demo


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    report = run_demo(demo_config(overrides))
    total = time.time() - started
    timings = report["timings_s"]
    print(f"\nwall time: {total:.0f} s in all (toy pair {timings['build_pair']:.0f} s, sampling {timings['sample']:.0f} s, "
          f"rejection sampling {timings['rejection_sample']:.0f} s, evaluation {timings['evaluate']:.0f} s; "
          "the rest is training and later rounds)")
    rows = {row["model"]: row for row in report["rows"]}
    expert = rows["expert"]["accuracy_mean"]
    for name, row in rows.items():
        if name not in ("amateur", "expert"):
            print(f"{name:>22}: {100 * (row['accuracy_mean'] - expert):+.1f} points over the expert, "
                  f"{row['tuned_tokens']} tuned tokens, {row['wall_time_s']:.0f} s")
    lightreasoner, rejection = rows["lightreasoner"], rows["rejection_sft"]
    print("LightReasoner / SFT (rejection-sampled): "
          f"wall time {lightreasoner['wall_time_s'] / rejection['wall_time_s']:.2f}x, "
          f"sampled problems {lightreasoner['problems_used'] / rejection['problems_used']:.2f}x, "
          f"tuned tokens {lightreasoner['tuned_tokens'] / rejection['tuned_tokens']:.3f}x")

if __name__ == "__main__":
    main(sys.argv[1:])
