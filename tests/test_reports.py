"""Report writers: the paper's table layout, Markdown tables, the bar chart."""

from __future__ import annotations

import json

from lightreasoner_ray.ui.reports import (
    accuracy_rows,
    bar_chart,
    markdown_table,
    paper_order,
    results_markdown,
    write_reports,
)


def results_for(scores: dict[str, dict[str, tuple[int, int]]]) -> dict:
    models = {}
    for tag, per_benchmark in scores.items():
        benchmarks = {b: {"accuracy": c / n, "n": n, "correct": c} for b, (c, n) in per_benchmark.items()}
        models[tag] = {"benchmarks": benchmarks, "average": sum(s["accuracy"] for s in benchmarks.values()) / len(benchmarks)}
    names = list(next(iter(scores.values())))
    return {"benchmarks": names, "models": models}


def test_paper_order_puts_math500_in_the_math_column_and_unknowns_last():
    assert paper_order(["mmlu_stem", "custom", "gsm8k", "math500", "svamp"]) == [
        "gsm8k", "math500", "svamp", "mmlu_stem", "custom"
    ]


def test_markdown_table_aligns_and_escapes():
    table = markdown_table([["a|b", 1.5], ["c", "2"]], ["Model", "Score"])
    assert table.splitlines() == ["| Model | Score |", "|:---|---:|", "| a\\|b | 1.5 |", "| c | 2 |"]


def test_results_table_rows_are_models_and_columns_follow_the_paper():
    results = results_for({
        "base": {"svamp": (1, 4), "gsm8k": (2, 4)},
        "trained": {"svamp": (3, 4), "gsm8k": (4, 4)},
    })
    rows, columns = accuracy_rows(results)
    assert columns == ["Model", "GSM8K", "SVAMP", "AVG"]
    assert rows == [["base", "50.0", "25.0", "37.5"], ["trained", "100.0", "75.0", "87.5"]]
    markdown = results_markdown(results)
    assert "| base | 50.0 | 25.0 | 37.5 |" in markdown
    assert "| trained | 4/4 | 3/4 |" in markdown


def test_missing_scores_show_a_dash():
    results = results_for({"base": {"gsm8k": (1, 2)}})
    results["benchmarks"] = ["gsm8k", "asdiv"]
    rows, _ = accuracy_rows(results)
    assert rows == [["base", "50.0", "–", "50.0"]]


def test_reports_are_written(tmp_path):
    results = results_for({"base": {"gsm8k": (1, 2), "math500": (0, 2)}, "trained": {"gsm8k": (2, 2), "math500": (1, 2)}})
    paths = write_reports(results, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| Model | GSM8K | MATH-500 | AVG |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["chart"] == f"{tmp_path}/results.png"
    single = bar_chart(results_for({"only": {"gsm8k": (0, 1)}}), str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").stat().st_size > 1000 and single.endswith("one.png")
