"""The demo's learning rate, chosen on the toy VALIDATION split (never on the test split).

    python bench/demo_validation.py [lr ...] [-- key=value ...]     # default lrs: 1e-4 2e-4 5e-4

For each learning rate, runs the demo (seed 0, one round) evaluated on the validation
split, into outputs/demo-validation/lr-<lr>, and prints each variant's validation
accuracy side by side (after each lr too, so a sweep cut short still tells). The
sampling and rejection sampling do not depend on the lr: later lrs reuse the first
one's (linked, so the demo resumes them). The chosen lr is the one with the best mean over the four
trained variants (LightReasoner, SFT on rejection-sampled solutions, SFT on gold, the
random-step control), so the choice favours no variant. beta stays the paper's 0.4.

    python bench/demo_validation.py --test LR [key=value ...]

then reports the chosen lr on the TEST split: the demo (seed 0, demo.rounds as set,
default 2) in outputs/demo-test/lr-<LR>, with the validation run's sampling and seed-0
trainings reused (the same computation: same problems, pair, lr and seed), so only the
evaluation on the test split and the later rounds run; the reused stages' wall times
are the validation run's (marked resumed in the table).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

from lightreasoner_ray.io.layout import cache_root
from lightreasoner_ray.runs.demo import VARIANTS, claim_output_dir, demo_config, pair_fingerprint, run_demo
from lightreasoner_ray.io.layout import REJECTION_SFT as REJECTION_DIR
from lightreasoner_ray.toy.pair import build_toy_pair


def report_on_test(lr: float, overrides: list[str]) -> None:
    validation = Path("outputs/demo-validation") / f"lr-{lr:g}"
    output_dir = Path("outputs/demo-test") / f"lr-{lr:g}"
    config = demo_config(["demo.eval_split=test", "demo.seeds=[0]", f"train.lr={lr}", f"output_dir={output_dir}",
                          *overrides])
    if not output_dir.exists():
        output_dir.mkdir(parents=True)
        claim_output_dir(config, pair_fingerprint(build_toy_pair(cache_root() / "toy_pair")))
        for shared in ("all_steps", REJECTION_DIR, *(f"{name}-seed0" for name in VARIANTS)):
            (output_dir / shared).symlink_to((validation / shared).resolve(), target_is_directory=True)
    run_demo(config)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    if argv[:1] == ["--test"]:
        report_on_test(float(argv[1]), argv[2:])
        return
    lrs, overrides = argv, []
    if "--" in argv:
        split = argv.index("--")
        lrs, overrides = argv[:split], argv[split + 1 :]
    lrs = [float(lr) for lr in lrs] or [1e-4, 2e-4, 5e-4]
    table: dict[float, dict[str, float]] = {}
    root = Path("outputs/demo-validation")
    for lr in lrs:
        started = time.time()
        output_dir = root / f"lr-{lr:g}"
        first = root / f"lr-{lrs[0]:g}"
        config = demo_config(["demo.eval_split=validation", "demo.seeds=[0]", "demo.rounds=1", f"train.lr={lr}",
                              f"output_dir={output_dir}", *overrides])
        if lr != lrs[0] and not output_dir.exists():
            claim_output_dir(config, pair_fingerprint(build_toy_pair(cache_root() / "toy_pair")))
            for shared in ("all_steps", REJECTION_DIR):
                (output_dir / shared).symlink_to((first / shared).resolve(), target_is_directory=True)
        report = run_demo(config)
        table[lr] = {row["model"]: row["accuracy_mean"] for row in report["rows"]}
        print(f"lr {lr:g}: {time.time() - started:.0f} s; validation accuracy: "
              + ", ".join(f"{name} {100 * value:.1f}" for name, value in table[lr].items()), flush=True)
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
