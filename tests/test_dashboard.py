"""The Grafana dashboard (monitoring/lightreasoner-dashboard.json) against the metrics the code emits.

The emitted metrics are read off ``lightreasoner_ray.ui.prometheus`` itself: every public
``record_*`` function is called with its ``_record`` captured, which yields each metric's
kind, name and tag keys. Ray's Prometheus naming (checked against a live scrape by the slow
test at the end) turns them into the series names Prometheus stores. Every PromQL
expression of the dashboard (panels and template variables) is tokenized, and each metric
name and label it queries must be one the code emits, and each emitted metric must have a
panel.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightreasoner_ray.ui import prometheus

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "monitoring" / "lightreasoner-dashboard.json"

# Ray's metrics agent adds these labels to every application metric; WorkerId is dropped at
# some cardinality levels. Prometheus adds the scrape target's ``instance`` and ``job``.
RAY_LABELS = frozenset({"SessionName", "NodeAddress", "Component", "Version", "WorkerId"})
SCRAPE_LABELS = frozenset({"instance", "job"})
RAY_PREFIX = "ray_"


# --- the metrics the code emits ---------------------------------------------------------------

@dataclass(frozen=True)
class Emitted:
    kind: str  # the ray.util.metrics class: Counter, Gauge, Histogram
    name: str  # the name given to Ray
    tag_keys: frozenset[str]


DUMMY_VALUES = {int: 3, float: 0.5, str: "gsm8k"}


def record_functions() -> dict[str, object]:
    return {name: func for name, func in inspect.getmembers(prometheus, inspect.isfunction)
            if name.startswith("record_") and func.__module__ == prometheus.__name__}


def dummy_call(func) -> dict[str, object]:
    """Keyword arguments for a ``record_*`` function, built from its annotations (all values > 0)."""
    kwargs = {}
    for param in inspect.signature(func, eval_str=True).parameters.values():
        if param.annotation not in DUMMY_VALUES:
            pytest.fail(f"{func.__name__}: no dummy value for parameter {param.name}: {param.annotation!r}")
        kwargs[param.name] = DUMMY_VALUES[param.annotation]
    return kwargs


def capture_records(monkeypatch) -> tuple[list[tuple[str, dict]], list[tuple[str, str, float, dict]]]:
    """Call every ``record_*`` with ``_record`` captured: (the calls made, the records they made)."""
    records: list[tuple[str, str, float, dict]] = []

    def fake_record(kind, name, description, value, tags=None):
        records.append((kind, name, value, dict(tags or {})))

    monkeypatch.setattr(prometheus, "_record", fake_record)
    calls = []
    for name, func in record_functions().items():
        kwargs = dummy_call(func)
        func(**kwargs)
        calls.append((name, kwargs))
    return calls, records


def emitted_from(records) -> dict[str, Emitted]:
    emitted: dict[str, Emitted] = {}
    for kind, name, _value, tags in records:
        metric = Emitted(kind, name, frozenset(tags))
        if emitted.setdefault(name, metric) != metric:
            pytest.fail(f"metric {name} recorded as {emitted[name]} and as {metric}")
    return emitted


@pytest.fixture
def emitted(monkeypatch) -> dict[str, Emitted]:
    return emitted_from(capture_records(monkeypatch)[1])


def prometheus_series(metric: Emitted) -> frozenset[str]:
    """The series names Prometheus stores for a Ray application metric (Ray >= 2.10).

    Ray's metrics agent prefixes the namespace ``ray_``; a Counter is a Prometheus counter,
    whose exposition appends ``_total``; a Gauge keeps its name; a Histogram has the usual
    ``_bucket``/``_sum``/``_count`` series.
    """
    base = RAY_PREFIX + metric.name
    if metric.kind == "Counter":
        return frozenset({base + "_total"})
    if metric.kind == "Gauge":
        return frozenset({base})
    if metric.kind == "Histogram":
        return frozenset({base + "_bucket", base + "_sum", base + "_count"})
    raise AssertionError(f"unknown metric kind {metric.kind} for {metric.name}")


# --- a small PromQL tokenizer ----------------------------------------------------------------

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}
FUNCTIONS = AGGREGATIONS | {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time",
    "last_over_time", "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan",
    "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}

TOKEN_RE = re.compile(r"""
      (?P<space>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<braces>\{(?:[^}"']|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')*\})
    | (?P<range>\[[^\]]*\])
    | (?P<variable>\$\{[^}]*\}|\$\w+)
    | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<punct>[(),@]|=~|!~|==|!=|<=|>=|[-+*/%^<>=])
""", re.VERBOSE)
MATCHER_RE = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*,?""")


@dataclass
class Selector:
    name: str | None  # None for a bare {__name__=~"..."} selector
    matchers: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (operator, value)


@dataclass
class ParsedQuery:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels in by/without/on/ignoring/group_* lists
    aggregates: bool = False
    problems: list[str] = field(default_factory=list)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        match = TOKEN_RE.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def parse_matchers(braces: str) -> dict[str, tuple[str, str]]:
    body, matchers, pos = braces[1:-1], {}, 0
    while body[pos:].strip():
        match = MATCHER_RE.match(body, pos)
        if match is None:
            raise ValueError(f"cannot read label matchers {braces!r}")
        label, operator, quoted = match.groups()
        matchers[label] = (operator, quoted[1:-1])
        pos = match.end()
    return matchers


def parse_promql(expr: str) -> ParsedQuery:
    """The metric selectors and grouping labels of a PromQL expression (strings, ranges and
    Grafana variables skipped; function and keyword names are not metrics)."""
    tokens, parsed, i = tokenize(expr), ParsedQuery(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "ident" and text in GROUPING and following[1] == "(":
            close = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
            parsed.grouping |= {t for k, t in tokens[i + 2:close] if k == "ident"}
            i = close + 1
            continue
        if kind == "ident" and (following[1] == "(" or text in AGGREGATIONS and following[1] in ("by", "without")):
            if text not in FUNCTIONS:
                parsed.problems.append(f"unknown PromQL function {text}() in {expr!r}")
            parsed.aggregates |= text in AGGREGATIONS
        elif kind == "ident" and text not in KEYWORDS:
            matchers = parse_matchers(following[1]) if following[0] == "braces" else {}
            parsed.selectors.append(Selector(text, matchers))
            i += 2 if following[0] == "braces" else 1
            continue
        elif kind == "braces":
            parsed.selectors.append(Selector(None, parse_matchers(text)))
        i += 1
    return parsed


# --- the dashboard's queries -------------------------------------------------------------------

LABEL_VALUES_RE = re.compile(r"^\s*label_values\((?:(?P<selector>.*),)?\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # the panels of a collapsed row


def dashboard_queries(dashboard: dict):
    """(where, PromQL expression, legend labels, label a variable reads) for every query."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            legend = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", target.get("legendFormat", "")))
            yield f"panel {panel.get('title')!r} query {target.get('refId')}", target["expr"], legend, None
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        match = LABEL_VALUES_RE.match(text or "")
        if match is None or not match.group("selector"):
            raise AssertionError(f"variable {variable['name']}: expected label_values(<selector>, <label>), got {text!r}")
        yield f"variable {variable['name']!r}", match.group("selector"), set(), match.group("label")


def dashboard_problems(dashboard: dict, emitted: dict[str, Emitted]) -> list[str]:
    """Everything wrong between the dashboard's queries and the emitted metrics; [] when they agree."""
    metric_of = {series: metric for metric in emitted.values() for series in prometheus_series(metric)}
    queried: set[str] = set()
    problems: list[str] = []

    def labels_of(series: str) -> frozenset[str]:
        return metric_of[series].tag_keys | RAY_LABELS | SCRAPE_LABELS

    for where, expr, legend, variable_label in dashboard_queries(dashboard):
        parsed = parse_promql(expr)
        problems += [f"{where}: {problem}" for problem in parsed.problems]
        if not parsed.selectors:
            problems.append(f"{where}: queries no metric: {expr!r}")
        selected: set[str] = set()
        for selector in parsed.selectors:
            matchers = dict(selector.matchers)
            name_matcher = matchers.pop("__name__", None)
            if selector.name is not None:
                names = {selector.name}
            elif name_matcher is not None and name_matcher[0] in ("=", "=~"):
                pattern = re.escape(name_matcher[1]) if name_matcher[0] == "=" else name_matcher[1]
                names = {series for series in metric_of if re.fullmatch(pattern, series)}
                if not names:
                    problems.append(f"{where}: __name__ {name_matcher[1]!r} matches no metric the code emits")
                continue  # a name pattern only lists series; it does not make a metric shown
            else:
                problems.append(f"{where}: a selector without a metric name: {expr!r}")
                continue
            for name in names:
                if name not in metric_of:
                    problems.append(f"{where}: queries {name}, which the code does not emit "
                                    f"(it emits {', '.join(sorted(metric_of))})")
                    continue
                selected.add(name)
                for label in sorted(set(matchers) - labels_of(name)):
                    problems.append(f"{where}: label {label} is not a label of {name} "
                                    f"(tags {sorted(metric_of[name].tag_keys)})")
        queried |= selected
        wanted = parsed.grouping | legend | ({variable_label} if variable_label else set())
        for label in sorted(wanted):
            for name in sorted(selected):
                if label not in labels_of(name) and label != "le":
                    problems.append(f"{where}: label {label} is not a label of {name} "
                                    f"(tags {sorted(metric_of[name].tag_keys)})")
        if parsed.aggregates and "without" not in expr:
            for label in sorted(legend - parsed.grouping):
                problems.append(f"{where}: the legend shows {label}, which the aggregation drops")
    for metric in sorted(emitted.values(), key=lambda m: m.name):
        if not prometheus_series(metric) & queried:
            problems.append(f"{metric.name} ({metric.kind}, {'/'.join(sorted(prometheus_series(metric)))}) "
                            "has no panel")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


# --- tests: the emitted metrics ----------------------------------------------------------------

def test_capture_sees_every_metric_of_the_module(emitted):
    # An independent reading of the same module: every literal metric name in its source.
    source_names = set(re.findall(r'"(lightreasoner_[a-z_]+)"', inspect.getsource(prometheus)))
    assert source_names and set(emitted) == source_names
    assert emitted["lightreasoner_eval_rows"].tag_keys == {"model", "benchmark"}
    assert emitted["lightreasoner_train_loss"].kind == "Gauge"
    assert emitted["lightreasoner_problems_sampled"].kind == "Counter"


def test_prometheus_series_names():
    assert prometheus_series(Emitted("Counter", "a_b", frozenset())) == {"ray_a_b_total"}
    assert prometheus_series(Emitted("Gauge", "a_b", frozenset())) == {"ray_a_b"}
    assert prometheus_series(Emitted("Histogram", "h", frozenset())) == {"ray_h_bucket", "ray_h_sum", "ray_h_count"}


# --- tests: the tokenizer ----------------------------------------------------------------------

def test_tokenizer_finds_metrics_not_functions_keywords_or_strings():
    parsed = parse_promql('sum by (benchmark) (rate(foo_total{a="x", b=~"y.*,}"}[$window])) '
                          '/ on(benchmark) group_left(model) bar:rec:rate5m offset 5m')
    assert [(s.name, s.matchers) for s in parsed.selectors] == [
        ("foo_total", {"a": ("=", "x"), "b": ("=~", "y.*,}")}), ("bar:rec:rate5m", {})]
    assert parsed.grouping == {"benchmark", "model"} and parsed.aggregates and not parsed.problems

    parsed = parse_promql('histogram_quantile(0.9, sum(rate(x_bucket[5m])) by (le)) > bool 1e3')
    assert [s.name for s in parsed.selectors] == ["x_bucket"] and parsed.grouping == {"le"}

    parsed = parse_promql('label_replace(up, "dst", "$1", "src", "(sum|rate)") and {__name__=~"ray_.+"}')
    assert [s.name for s in parsed.selectors] == ["up", None]
    assert parsed.selectors[1].matchers == {"__name__": ("=~", "ray_.+")}

    assert parse_promql("rat(foo[1m])").problems == ["unknown PromQL function rat() in 'rat(foo[1m])'"]
    assert not parse_promql("max(foo)").grouping and parse_promql("max(foo)").aggregates
    assert not parse_promql("foo - 1").aggregates


def test_tokenizer_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="label matchers"):
        parse_promql('foo{a~"x"}')
    with pytest.raises(ValueError, match="cannot tokenize"):
        parse_promql("foo # bar")


# --- tests: the dashboard ----------------------------------------------------------------------

def test_dashboard_queries_exactly_the_emitted_metrics(dashboard, emitted):
    assert dashboard_problems(dashboard, emitted) == []
    shown = {s.name for _, expr, _, _ in dashboard_queries(dashboard) for s in parse_promql(expr).selectors}
    assert {"ray_lightreasoner_problems_sampled_total", "ray_lightreasoner_train_loss",
            "ray_lightreasoner_eval_correct_total"} <= shown


def test_dashboard_shape(dashboard):
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "SessionName" in variables
    ids, cells = set(), set()
    for panel in panels(dashboard):
        assert panel["id"] not in ids, f"panel id {panel['id']} repeated"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # Every query filters on the chosen Ray session.
    for where, expr, _, _ in dashboard_queries(dashboard):
        for selector in parse_promql(expr).selectors:
            if selector.name is not None:
                assert selector.matchers.get("SessionName") == ("=~", "$SessionName"), (where, expr)


def rename_in_exprs(dashboard: dict, old: str, new: str, *, first_only: bool = False) -> dict:
    changed = copy.deepcopy(dashboard)
    for panel in panels(changed):
        for target in panel.get("targets", []):
            if old in target["expr"]:
                target["expr"] = target["expr"].replace(old, new)
                if first_only:
                    return changed
    return changed


def test_a_renamed_metric_in_one_panel_fails(dashboard, emitted):
    changed = rename_in_exprs(dashboard, "ray_lightreasoner_eval_rows_total", "ray_lightreasoner_eval_row_total",
                              first_only=True)
    problems = dashboard_problems(changed, emitted)
    assert len(problems) == 1 and "queries ray_lightreasoner_eval_row_total, which the code does not emit" in problems[0]


def test_a_metric_renamed_everywhere_leaves_it_without_a_panel(dashboard, emitted):
    changed = rename_in_exprs(dashboard, "ray_lightreasoner_train_lr", "ray_lightreasoner_train_learning_rate")
    problems = dashboard_problems(changed, emitted)
    assert any("ray_lightreasoner_train_learning_rate, which the code does not emit" in p for p in problems)
    assert problems[-1].startswith("lightreasoner_train_lr (Gauge, ray_lightreasoner_train_lr) has no panel")


@pytest.mark.parametrize("old,new", [
    ("ray_lightreasoner_problems_sampled_total", "ray_lightreasoner_problems_sampled"),  # a counter without _total
    ("ray_lightreasoner_train_step", "ray_lightreasoner_train_step_total"),  # a gauge with _total
    ("ray_lightreasoner_selected_steps_total", "lightreasoner_selected_steps_total"),  # no ray_ prefix
])
def test_the_wrong_ray_naming_fails(dashboard, emitted, old, new):
    problems = dashboard_problems(rename_in_exprs(dashboard, old, new), emitted)
    assert any(f"queries {new}, which the code does not emit" in p for p in problems)
    assert any(p.endswith("has no panel") and old in p for p in problems)


def test_a_metric_renamed_in_the_code_fails(dashboard, emitted):
    renamed = dict(emitted)
    loss = renamed.pop("lightreasoner_train_loss")
    renamed["lightreasoner_train_kl"] = Emitted(loss.kind, "lightreasoner_train_kl", loss.tag_keys)
    problems = dashboard_problems(dashboard, renamed)
    assert any("queries ray_lightreasoner_train_loss, which the code does not emit" in p for p in problems)
    assert "lightreasoner_train_kl (Gauge, ray_lightreasoner_train_kl) has no panel" in problems
    # A tag dropped from the code: every panel grouping or filtering on it fails.
    untagged = dict(emitted)
    rows = untagged["lightreasoner_eval_rows"]
    untagged[rows.name] = Emitted(rows.kind, rows.name, rows.tag_keys - {"benchmark"})
    assert any("label benchmark is not a label of ray_lightreasoner_eval_rows_total" in p
               for p in dashboard_problems(dashboard, untagged))


def test_a_label_the_code_does_not_set_fails(dashboard, emitted):
    changed = rename_in_exprs(dashboard, "by (model, benchmark)", "by (model, dataset)")
    assert any("label dataset is not a label of ray_lightreasoner_eval_correct_total" in p
               for p in dashboard_problems(changed, emitted))
    changed = rename_in_exprs(dashboard, 'model=~"$model"', 'split=~"$model"')
    assert any("label split is not a label of ray_lightreasoner_eval_rows_total" in p
               for p in dashboard_problems(changed, emitted))
    changed = copy.deepcopy(dashboard)
    target = next(t for p in panels(changed) if p["title"] == "Evaluation rows / s" for t in p["targets"])
    target["legendFormat"] = "{{model}} {{benchmark}}"  # the panel sums benchmark away
    assert dashboard_problems(changed, emitted) == [
        "panel 'Evaluation rows / s' query A: the legend shows benchmark, which the aggregation drops"]


def test_a_variable_query_is_checked_too(dashboard, emitted):
    changed = copy.deepcopy(dashboard)
    variable = next(v for v in changed["templating"]["list"] if v["name"] == "model")
    variable["query"]["query"] = variable["query"]["query"].replace(", model)", ", tag)")
    assert any(p.startswith("variable 'model': label tag is not a label of") for p in dashboard_problems(changed, emitted))
    variable["query"]["query"] = 'label_values({__name__=~"ray_lightreasoner_nothing_.+"}, SessionName)'
    assert any("matches no metric the code emits" in p for p in dashboard_problems(changed, emitted))


# --- slow: the naming rule against a live Ray metrics agent ---------------------------------

SCRAPE_SCRIPT = r"""
import json, socket, sys, time, urllib.request
import ray

calls = json.loads(sys.argv[1])
expected = set(json.loads(sys.argv[2]))
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)


@ray.remote(num_cpus=0)
class Recorder:  # records from a Ray worker process, as the sampler actors and train workers do
    def record(self, calls):
        from lightreasoner_ray.ui import prometheus
        for name, kwargs in calls:
            getattr(prometheus, name)(**kwargs)


recorder = Recorder.remote()
ray.get(recorder.record.remote(calls))
deadline, text = time.time() + 120, ""
while time.time() < deadline:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        text = ""
    present = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    if expected <= present:
        break
    time.sleep(1)
print("\n".join(line for line in text.splitlines() if "lightreasoner" in line))
ray.shutdown()
"""
SAMPLE_RE = re.compile(r'^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\{(?P<labels>.*)\}\s+(?P<value>\S+)$')


@pytest.mark.slow
def test_ray_exports_the_names_the_dashboard_assumes(monkeypatch, tmp_path):
    calls, records = capture_records(monkeypatch)
    monkeypatch.undo()
    emitted = emitted_from(records)
    expected = {series: metric for metric in emitted.values() for series in prometheus_series(metric)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-c", SCRAPE_SCRIPT, json.dumps(calls), json.dumps(sorted(expected))],
                            check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    types, samples = {}, {}
    for line in result.stdout.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif (match := SAMPLE_RE.match(line)) is not None:
            labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', match["labels"]))
            samples.setdefault(match["name"], []).append((labels, float(match["value"])))
    assert set(types) == set(expected), result.stdout[-3000:]
    for series, metric in expected.items():
        assert types[series] == metric.kind.lower(), series
        (labels, value), = samples[series]
        assert {"SessionName", "NodeAddress", "Component", "Version"} <= set(labels), labels
        extra = {k for k in labels if not k.startswith("otel_scope_")} - metric.tag_keys - RAY_LABELS
        assert not extra, f"{series}: labels {extra} the dashboard check does not know"
        recorded = [(v, tags) for kind, name, v, tags in records if name == metric.name]
        assert all(labels[k] == v for _, tags in recorded for k, v in tags.items()), (series, labels)
        # a counter exports the sum of its increments, a gauge its last value
        assert value == pytest.approx(sum(v for v, _ in recorded) if metric.kind == "Counter" else recorded[-1][0])


def test_kuberay_podmonitor_scrapes_every_ray_pod_on_the_metrics_port():
    import yaml

    monitor = yaml.safe_load((DASHBOARD_PATH.parent / "kuberay-podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    endpoint, = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    # The project's own KubeRay manifests expose the metrics export port under that name.
    manifests = [path for path in (DASHBOARD_PATH.parents[1] / "k8s").glob("*.yaml")
                 if "metrics-export-port" in path.read_text()]
    for path in manifests:
        ports = [node.get("name") for document in yaml.safe_load_all(path.read_text())
                 for node in mappings(document) if node.get("containerPort") == 8080]
        assert ports and set(ports) == {endpoint["port"]}, f"{path.name}: metrics ports named {ports}"


def mappings(node):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from mappings(value)
