"""Grading agreement and throughput: our grader against its previous version and plain math-verify.

    python bench/grading.py [--data-dir ../shared/data/benchmarks] [--limit 300] [--json bench_grading.json]

For up to ``--limit`` rows of each local benchmark, model-style completions are built
from the gold answer, each with the verdict a mathematician would give:

- boxed: the gold answer boxed (right);
- stated: "The final answer is $gold$." with no box (right);
- labelled: ``\\boxed{x = gold}`` for single-expression answers (right);
- reordered: a bare list of answers boxed in reverse order, or each member in its own box (right);
- relation: an inequality written the other way round (``x \\le 5`` as ``5 \\ge x``) (right);
  where the benchmarks have too few, ``x \\le gold`` is posed for integer golds of GSM8K
  and MATH-500, answered ``gold \\ge x`` (right) or ``gold \\le x`` ("relation wrong");
- solution: the benchmark's own worked solution, where it has one (right);
- wrong: the gold answer with its first number plus one, or the next choice letter (wrong).

Three graders decide each completion: ``new`` (this package's ``extract_answer`` +
``is_equivalent``), ``old`` (the grader before math-verify, loaded from git revision
``bf7f5be`` into a temporary module) and ``math-verify`` (its ``parse`` + ``verify`` with
its defaults, in-process). One table is printed: per workload, how often each grader
gives the expected verdict, how often ``new`` agrees with the other two, and answers/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.answer_perturbation import perturbed
from lightreasoner_ray.core import grading  # noqa: E402
from lightreasoner_ray.data.benchmarks import benchmark_path, default_data_dir, load_benchmark, read_jsonl  # noqa: E402

LOCAL_BENCHMARKS = ("gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem")
OLD_REVISION = "bf7f5be"
RELATION = re.compile(r"^\s*([A-Za-z])\s*(\\leq?|\\geq?|<|>)(?![A-Za-z])\s*([^<>=]+)$")
FLIPPED = {"<": ">", ">": "<", "\\le": "\\ge", "\\leq": "\\geq", "\\ge": "\\le", "\\geq": "\\leq"}


def load_old_grader(workdir: Path):
    """The grader as of ``OLD_REVISION``, importable by its own worker process."""
    source = subprocess.run(
        ["git", "show", f"{OLD_REVISION}:lightreasoner_ray/core/grading.py"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout
    # Its worker imports the module by name with the package's parent on PYTHONPATH:
    # place the copy in a package of its own there.
    package = workdir / "old_grading_pkg" / "old_grading_pkg" / "sub"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "grading.py").write_text(source)
    sys.path.insert(0, str(workdir / "old_grading_pkg"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    spec = importlib.util.spec_from_file_location("old_grading_pkg.sub.grading", package / "grading.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_workloads(data_dir: Path, limit: int) -> dict[str, list[tuple[str, str, str, list | None, bool]]]:
    """workload -> [(benchmark, completion, gold, choices, expected verdict)]."""
    workloads: dict[str, list] = {name: [] for name in ("boxed", "stated", "labelled", "reordered", "relation", "relation wrong", "solution", "wrong")}
    for name in LOCAL_BENCHMARKS:
        rows = load_benchmark(name, data_dir=data_dir)[:limit]
        raw = [row for _, row in read_jsonl(benchmark_path(name, data_dir))][:limit]
        for row, raw_row in zip(rows, raw):
            gold, choices = row["answer"], row.get("choices")

            def add(workload: str, completion: str, expected: bool = True, row=(name, gold, choices)) -> None:
                workloads[workload].append((row[0], completion, row[1], row[2], expected))

            add("boxed", f"Working it through step by step, the result is \\boxed{{{gold}}}.")
            add("wrong", f"Working it through step by step, the result is \\boxed{{{perturbed(gold, name)}}}.", False)
            if name == "mmlu_stem":
                continue
            add("stated", f"Putting it together.\nThe final answer is ${gold}$.")
            text = grading.normalize_answer(gold)
            if "," not in gold and "=" not in gold and "\\in" not in gold and not RELATION.match(text):
                add("labelled", f"Hence \\boxed{{x = {gold}}}.")
            try:
                bare_list = grading._structure(text).kind == "set" and not grading._enclosing_brackets(text)
            except ValueError:  # beyond the parser's bounds
                bare_list = False
            parts = grading._split_list(text) if bare_list else []
            if len(parts) > 1:
                add("reordered", f"So \\boxed{{{', '.join(reversed(parts))}}}.")
                add("reordered", "So " + " or ".join(f"$\\boxed{{{part.strip()}}}$" for part in parts) + ".")
            relation = RELATION.match(text)
            if relation:
                variable, operator, bound = relation.groups()
                add("relation", f"Therefore \\boxed{{{bound.strip()} {FLIPPED[operator]} {variable}}}.")
            elif name in ("gsm8k", "math500") and re.fullmatch(r"-?\d+", text):
                # The benchmarks hold few inequality answers: pose "x \le gold" and answer it
                # written the other way round (right) or with the direction reversed (wrong).
                workloads["relation"].append((name, f"Hence \\boxed{{{text} \\geq x}}.", f"x \\leq {text}", None, True))
                workloads["relation wrong"].append((name, f"Hence \\boxed{{{text} \\leq x}}.", f"x \\leq {text}", None, False))
            if isinstance(raw_row.get("solution"), str) and "\\boxed" in raw_row["solution"]:
                add("solution", raw_row["solution"])
    return {name: items for name, items in workloads.items() if items}


def grade_new(item) -> bool:
    name, completion, gold, choices, _ = item
    return grading.is_equivalent(grading.extract_answer(completion, name, choices), gold)


def make_grade_old(old):
    def grade(item) -> bool:
        name, completion, gold, choices, _ = item
        return old.is_equivalent(old.extract_answer(completion, name, choices), gold)

    return grade


def grade_math_verify(item) -> bool:
    from math_verify import parse, verify

    _, completion, gold, _, _ = item
    return verify(parse(f"${gold}$"), parse(completion))


def run(grade, items) -> tuple[list[bool], float]:
    started = time.perf_counter()
    verdicts = []
    for item in items:
        try:
            verdicts.append(bool(grade(item)))
        except Exception:  # a grader that raises has not accepted the answer
            verdicts.append(False)
    return verdicts, len(items) / max(time.perf_counter() - started, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--limit", type=int, default=300, help="rows per benchmark (default 300)")
    parser.add_argument("--json", type=Path, default=Path("bench_grading.json"))
    args = parser.parse_args()

    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("lightreasoner_ray").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as workdir:
        old = load_old_grader(Path(workdir))
        graders = {"new": grade_new, "old": make_grade_old(old), "math-verify": grade_math_verify}
        workloads = build_workloads(args.data_dir, args.limit)
        for warm in (grade_new, graders["old"], grade_math_verify):  # start workers, import libraries
            warm(("math500", r"\boxed{2\sqrt{3}}", r"\sqrt{12}", None, True))
        results = {}
        for workload, items in workloads.items():
            verdicts, rates = {}, {}
            for grader, grade in graders.items():
                verdicts[grader], rates[grader] = run(grade, items)
            expected = [item[4] for item in items]

            def share(left: list[bool], right: list[bool]) -> float:
                return sum(a == b for a, b in zip(left, right)) / len(left)

            results[workload] = {
                "answers": len(items),
                "expected_verdict": "right" if expected[0] else "wrong",
                "as_expected": {grader: share(verdicts[grader], expected) for grader in graders},
                "new_agrees_with_old": share(verdicts["new"], verdicts["old"]),
                "new_agrees_with_math_verify": share(verdicts["new"], verdicts["math-verify"]),
                "answers_per_second": rates,
                "disagreements_new_vs_expected": [
                    {"benchmark": item[0], "gold": item[2], "completion": item[1][-160:], "new": verdict}
                    for item, verdict in zip(items, verdicts["new"])
                    if verdict != item[4]
                ][:20],
            }
        old._symbolic_worker().close()

    header = (
        f"{'workload':14s} {'n':>5s} {'verdict':>7s} | {'new ok':>7s} {'old ok':>7s} {'mv ok':>7s} | "
        f"{'new=old':>7s} {'new=mv':>7s} | {'new/s':>7s} {'old/s':>7s} {'mv/s':>7s}"
    )
    print(header)
    print("-" * len(header))
    for workload, result in results.items():
        ok, speed = result["as_expected"], result["answers_per_second"]
        print(
            f"{workload:14s} {result['answers']:5d} {result['expected_verdict']:>7s} | "
            f"{ok['new']:7.1%} {ok['old']:7.1%} {ok['math-verify']:7.1%} | "
            f"{result['new_agrees_with_old']:7.1%} {result['new_agrees_with_math_verify']:7.1%} | "
            f"{speed['new']:7.0f} {speed['old']:7.0f} {speed['math-verify']:7.0f}"
        )
    args.json.write_text(json.dumps({"limit_per_benchmark": args.limit, "workloads": results}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
