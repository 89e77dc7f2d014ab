"""The full `lightreasoner demo`, timed end to end; prints the table to paste into the README.

    python bench/demo.py [key=value ...]        # e.g. demo.seeds=[0,1,2]

Runs exactly what `lightreasoner demo` runs (toy pair built or reused from the cache,
Ray Data sampling, three Ray Train + DeepSpeed trainings per seed, Ray pool
evaluation) and reports the wall time of each part.
"""

from __future__ import annotations

import logging
import sys
import time

from lightreasoner_ray.demo import demo_config, run_demo


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    report = run_demo(demo_config(overrides))
    total = time.time() - started
    timings = report["timings_s"]
    print(f"\nwall time: {total:.0f} s in all (toy pair {timings['build_pair']:.0f} s, sampling {timings['sample']:.0f} s, "
          f"evaluation {timings['evaluate']:.0f} s; the rest is training)")
    expert = next(row for row in report["rows"] if row["model"] == "expert")["accuracy_mean"]
    for row in report["rows"]:
        if row["model"] in ("lightreasoner", "sft", "random_steps"):
            print(f"{row['model']:>14}: {100 * (row['accuracy_mean'] - expert):+.1f} points over the expert, "
                  f"{row['tuned_tokens']} tuned tokens")


if __name__ == "__main__":
    main(sys.argv[1:])
