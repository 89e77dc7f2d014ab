"""The demo's learning rate, chosen on the toy VALIDATION split (never on the test split).

    python bench/demo_validation.py [lr ...] [-- key=value ...]     # default lrs: 1e-4 2e-4 4e-4

For each learning rate, runs the demo (seed 0, one round) evaluated on the validation
split, into outputs/demo-validation/lr-<lr>, and prints each variant's validation
accuracy side by side. The chosen lr is the one with the best mean over the four
trained variants (LightReasoner, SFT on rejection-sampled solutions, SFT on gold, the
random-step control), so the choice favours no variant. beta stays the paper's 0.4.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

from lightreasoner_ray.demo import VARIANTS, demo_config, run_demo


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    lrs, overrides = argv, []
    if "--" in argv:
        split = argv.index("--")
        lrs, overrides = argv[:split], argv[split + 1 :]
    lrs = [float(lr) for lr in lrs] or [1e-4, 2e-4, 4e-4]
    table: dict[float, dict[str, float]] = {}
    for lr in lrs:
        started = time.time()
        report = run_demo(demo_config([
            "demo.eval_split=validation", "demo.seeds=[0]", "demo.rounds=1", f"train.lr={lr}",
            f"output_dir=outputs/demo-validation/lr-{lr:g}", *overrides,
        ]))
        table[lr] = {row["model"]: row["accuracy_mean"] for row in report["rows"]}
        print(f"lr {lr:g}: {time.time() - started:.0f} s", flush=True)
    print("\nvalidation accuracy (%), seed 0, one round")
    print(f"{'lr':>8} " + " ".join(f"{name:>14}" for name in ("expert", *VARIANTS)) + f" {'mean(trained)':>14}")
    for lr, accuracies in table.items():
        mean = statistics.fmean(accuracies[name] for name in VARIANTS)
        print(f"{lr:>8g} " + " ".join(f"{100 * accuracies[name]:>14.1f}" for name in ("expert", *VARIANTS))
              + f" {100 * mean:>14.1f}")
    best = max(table, key=lambda lr: statistics.fmean(table[lr][name] for name in VARIANTS))
    print(f"\nchosen: train.lr={best:g}")


if __name__ == "__main__":
    main(sys.argv[1:])
