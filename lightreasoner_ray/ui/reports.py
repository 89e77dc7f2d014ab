"""Results tables and charts in the paper's layout: rows = models, columns = benchmarks + AVG.

A *results* dict (what ``run_evaluation`` returns and writes as ``results.json``)::

    {"benchmarks": ["gsm8k", ...],
     "models": {"<tag>": {"path": "...", "average": 0.41,
                          "benchmarks": {"gsm8k": {"accuracy": 0.5, "n": 4, "correct": 2}, ...}}}}

Accuracies are fractions in the dict and percentages in tables and charts.
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Sequence

from lightreasoner_ray.config import PAPER_BENCHMARKS
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import results_files

# The paper's column order; math500 takes MATH's place when the full set is not used.
PAPER_ORDER = tuple(column for name in PAPER_BENCHMARKS for column in ((name, "math500") if name == "math" else (name,)))
TITLES = {
    "gsm8k": "GSM8K",
    "math": "MATH",
    "math500": "MATH-500",
    "svamp": "SVAMP",
    "asdiv": "ASDiv",
    "minerva_math": "Minerva Math",
    "olympiadbench": "OlympiadBench",
    "mmlu_stem": "MMLU-STEM",
}
AVERAGE_TITLE = "AVG"


def paper_order(benchmarks: Iterable[str]) -> list[str]:
    """Benchmarks in the paper's column order; unknown names keep their order at the end."""
    names = list(dict.fromkeys(benchmarks))
    known = [b for b in PAPER_ORDER if b in names]
    return known + [b for b in names if b not in PAPER_ORDER]


def title(benchmark: str) -> str:
    return TITLES.get(benchmark, benchmark)


def percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}"


def markdown_table(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table; the first column left-aligned, the rest right-aligned."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in columns) + " |"
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join([header, rule, *body]) + "\n"


def accuracy_rows(results: dict[str, Any], metric: str = "accuracy") -> tuple[list[list[str]], list[str]]:
    """The paper's table as (rows, columns): one row per model, ``metric`` in %.

    ``metric`` is ``accuracy`` (pass@1; AVG is the model's ``average``) or, for sampled
    runs, ``pass@k`` / ``maj@k`` (AVG is their mean over the benchmarks shown).
    """
    benchmarks = paper_order(results["benchmarks"])
    columns = ["Model", *(title(b) for b in benchmarks), AVERAGE_TITLE]
    rows = []
    for tag, model in results["models"].items():
        scores = model["benchmarks"]
        values = [scores[b].get(metric) if b in scores else None for b in benchmarks]
        if metric == "accuracy":
            average = model.get("average")
        else:
            present = [v for v in values if v is not None]
            average = sum(present) / len(present) if present else None
        rows.append([tag, *(percent(v) for v in values), percent(average)])
    return rows, columns


def results_markdown(results: dict[str, Any], heading: str = "Evaluation results") -> str:
    """``results.md``: the accuracy table plus the sample sizes behind it."""
    rows, columns = accuracy_rows(results)
    benchmarks = paper_order(results["benchmarks"])
    counts = [
        [tag, *(_count(model["benchmarks"].get(b)) for b in benchmarks)]
        for tag, model in results["models"].items()
    ]
    k = sample_count(results)
    if k == 1:
        protocol = "Zero-shot pass@1 (greedy), accuracy in %. AVG is the mean over the benchmarks shown.\n"
        counted = "\nCorrect / evaluated problems:\n"
    else:
        settings = results.get("settings", {})
        protocol = (
            f"Zero-shot pass@1 in %, estimated from {k} samples a problem (temperature "
            f"{settings.get('temperature', '?')}, top_p {settings.get('top_p', '?')}). AVG is the mean over the "
            "benchmarks shown.\n"
        )
        counted = f"\nCorrect samples / (evaluated problems x {k}):\n"
    parts = [
        f"# {heading}\n",
        protocol,
        markdown_table(rows, columns),
    ]
    for metric in (("pass@k", "maj@k") if k > 1 else ()):
        metric_rows, metric_columns = accuracy_rows(results, metric)
        name = metric.replace("@k", f"@{k}")
        explained = "any of the samples right" if metric == "pass@k" else "the most frequent answer right"
        parts += [f"\n{name} in % ({explained}):\n", markdown_table(metric_rows, metric_columns)]
    parts += [counted, markdown_table(counts, ["Model", *(title(b) for b in benchmarks)])]
    return "\n".join(parts)


def sample_count(results: dict[str, Any]) -> int:
    """Completions drawn per problem (``k`` in the scores; 1 for greedy decoding)."""
    return max(
        (score.get("k", 1) for model in results["models"].values() for score in model["benchmarks"].values()),
        default=1,
    )


def _count(score: dict[str, Any] | None) -> str:
    if score is None:
        return "–"
    return f"{score['correct']}/{score['n'] * score.get('k', 1)}"


def bar_chart_png(results: dict[str, Any], chart_title: str = "Zero-shot pass@1 (%)") -> bytes:
    """A grouped bar chart (benchmarks + AVG on the x axis, one bar per model) as PNG bytes."""
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benchmarks = paper_order(results["benchmarks"])
    # With a single benchmark its AVG would repeat it.
    with_average = len(benchmarks) > 1
    labels = [title(b) for b in benchmarks] + ([AVERAGE_TITLE] if with_average else [])
    models = list(results["models"].items())
    figure = Figure(figsize=(max(6.0, 1.5 + len(labels) * (0.5 + 0.35 * len(models))), 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(models))
    for position, (tag, model) in enumerate(models):
        values = [100 * model["benchmarks"][b]["accuracy"] if b in model["benchmarks"] else 0.0 for b in benchmarks]
        if with_average:
            values.append(100 * (model.get("average") or 0.0))
        offsets = [i + (position - (len(models) - 1) / 2) * width for i in range(len(labels))]
        bars = axes.bar(offsets, values, width=width, label=tag)
        axes.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=1)
    axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title(chart_title)
    if models:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def bar_chart(results: dict[str, Any], path: str, chart_title: str = "Zero-shot pass@1 (%)") -> str:
    """Write the bar chart to ``path`` (local or URI) atomically; returns the path."""
    storage.write_bytes_atomic(path, bar_chart_png(results, chart_title))
    return path


def write_reports(results: dict[str, Any], directory: str) -> dict[str, str]:
    """``results.json``, ``results.md`` and ``results.png`` under ``directory``."""
    paths = results_files(directory)
    storage.write_json_atomic(paths["json"], results)
    storage.write_bytes_atomic(paths["markdown"], results_markdown(results).encode("utf-8"))
    bar_chart(results, paths["chart"])
    return paths
