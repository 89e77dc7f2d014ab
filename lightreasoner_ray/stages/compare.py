"""``lightreasoner compare``: two evaluated models side by side, question by question.

Reads the prediction files ``<output_dir>/eval/<tag>/<benchmark>.jsonl`` of a model
before and after training and writes ``<output_dir>/compare/<before>_vs_<after>.md``
and ``.json``: the per-benchmark accuracies on the questions both answered, and the
questions training fixed (wrong before, right after) and broke (right before, wrong
after), each with the question, both extracted answers and the gold answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightreasoner_ray.config import Config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.ui.console import echo
from lightreasoner_ray.ui.reports import markdown_table, paper_order, percent, title

logger = logging.getLogger(__name__)

# Questions listed per benchmark and direction in the Markdown (the JSON has them all).
MARKDOWN_QUESTIONS = 25
QUESTION_CHARS = 300


def model_predictions_dir(config: Config, tag_or_dir: str) -> str:
    """An eval tag under ``<output_dir>/eval``, or a directory of ``<benchmark>.jsonl`` files."""
    if not storage.is_uri(tag_or_dir) and ("/" in tag_or_dir or tag_or_dir.startswith(".")) and Path(tag_or_dir).is_dir():
        return tag_or_dir
    return RunLayout(config.output_dir).eval_model(tag_or_dir)


def read_predictions(directory: str, label: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{benchmark: {question id: prediction row}}`` from the finished ``<benchmark>.jsonl`` files."""
    if storage.is_uri(directory):
        raise LightReasonerError(f"compare reads local prediction files; {directory} is a URI")
    root = Path(directory)
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else []
    if not files:
        raise LightReasonerError(
            f"no predictions for {label!r}: {directory} holds no <benchmark>.jsonl files; evaluate that model first "
            "(eval.models=[tag=path]) or pass --before/--after with a tag under <output_dir>/eval"
        )
    predictions: dict[str, dict[str, dict[str, Any]]] = {}
    for path in files:
        rows: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LightReasonerError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise LightReasonerError(f"{path}, line {number}: a prediction row must be a JSON object")
            missing = [key for key in ("id", "correct") if key not in row]
            if missing:
                raise LightReasonerError(f"{path}, line {number}: prediction row lacks {', '.join(missing)}")
            rows[str(row["id"])] = row
        predictions[path.stem] = rows
    return predictions


def _case(benchmark: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "id": str(before["id"]),
        "question": after.get("question", before.get("question", "")),
        "gold": after.get("answer", before.get("answer", "")),
        "before_answer": before.get("extracted", ""),
        "after_answer": after.get("extracted", ""),
    }


def compare_predictions(before: dict[str, dict[str, dict[str, Any]]], after: dict[str, dict[str, dict[str, Any]]],
                        before_label: str, after_label: str) -> dict[str, Any]:
    shared = paper_order(set(before) & set(after))
    if not shared:
        raise LightReasonerError(
            f"{before_label!r} ({', '.join(sorted(before))}) and {after_label!r} ({', '.join(sorted(after))}) share no "
            "benchmark: evaluate both on the same benchmarks"
        )
    benchmarks: dict[str, Any] = {}
    fixed: list[dict[str, Any]] = []
    broken: list[dict[str, Any]] = []
    for name in shared:
        ids = [question for question in before[name] if question in after[name]]
        right_before = sum(bool(before[name][q]["correct"]) for q in ids)
        right_after = sum(bool(after[name][q]["correct"]) for q in ids)
        fixed_here = [_case(name, before[name][q], after[name][q]) for q in ids
                      if not before[name][q]["correct"] and after[name][q]["correct"]]
        broken_here = [_case(name, before[name][q], after[name][q]) for q in ids
                       if before[name][q]["correct"] and not after[name][q]["correct"]]
        benchmarks[name] = {
            "n": len(ids),
            "before_accuracy": right_before / len(ids) if ids else None,
            "after_accuracy": right_after / len(ids) if ids else None,
            "fixed": len(fixed_here),
            "broken": len(broken_here),
            "only_before": len(before[name]) - len(ids),
            "only_after": len(after[name]) - len(ids),
        }
        fixed.extend(fixed_here)
        broken.extend(broken_here)
    return {"before": before_label, "after": after_label, "benchmarks": benchmarks, "fixed": fixed, "broken": broken}


def _one_line(text: Any, limit: int = QUESTION_CHARS) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def comparison_markdown(comparison: dict[str, Any]) -> str:
    before, after = comparison["before"], comparison["after"]
    rows = []
    for name, stats in comparison["benchmarks"].items():
        delta = (None if stats["n"] == 0 else stats["after_accuracy"] - stats["before_accuracy"])
        rows.append([title(name), stats["n"], percent(stats["before_accuracy"]), percent(stats["after_accuracy"]),
                     "–" if delta is None else f"{100 * delta:+.1f}", stats["fixed"], stats["broken"]])
    parts = [
        f"# {after} vs {before}\n",
        f"Accuracy (%) on the questions both models answered; *fixed*: wrong for `{before}`, right for `{after}`; "
        "*broken*: the other way round.\n",
        markdown_table(rows, ["Benchmark", "n", before, after, "Δ", "fixed", "broken"]),
    ]
    for heading, cases in (("Fixed by training", comparison["fixed"]), ("Broken by training", comparison["broken"])):
        parts.append(f"\n## {heading} ({len(cases)})\n")
        if not cases:
            parts.append("None.\n")
            continue
        for name in comparison["benchmarks"]:
            here = [case for case in cases if case["benchmark"] == name]
            if not here:
                continue
            table = [[case["id"], _one_line(case["question"]), _one_line(case["before_answer"], 60),
                      _one_line(case["after_answer"], 60), _one_line(case["gold"], 60)]
                     for case in here[:MARKDOWN_QUESTIONS]]
            parts.append(f"\n### {title(name)}\n\n")
            parts.append(markdown_table(table, ["id", "question", before, after, "gold"]))
            if len(here) > MARKDOWN_QUESTIONS:
                parts.append(f"\n… and {len(here) - MARKDOWN_QUESTIONS} more in the JSON.\n")
    # Blank lines between blocks: a Markdown table must not touch a paragraph.
    return "\n".join(part.strip("\n") + "\n" for part in parts)


def _file_label(label: str) -> str:
    return Path(label.rstrip("/")).name or "model"


def run_compare(config: Config, before: str = "baseline", after: str = "lightreasoner") -> dict[str, Any]:
    comparison = compare_predictions(
        read_predictions(model_predictions_dir(config, before), before),
        read_predictions(model_predictions_dir(config, after), after),
        _file_label(before), _file_label(after),
    )
    paths = RunLayout(config.output_dir).comparison(_file_label(before), _file_label(after))
    markdown = comparison_markdown(comparison)
    storage.write_json_atomic(paths["json"], comparison)
    storage.write_bytes_atomic(paths["markdown"], markdown.encode("utf-8"))
    table_end = markdown.find("\n## ")
    echo(markdown[:table_end].rstrip())
    echo(f"questions fixed: {len(comparison['fixed'])}, broken: {len(comparison['broken'])}; {paths['markdown']}, "
         f"{paths['json']}")
    return {**comparison, "paths": paths}
