"""The Grafana dashboard in deploy/grafana/hub.json imports as is into a shared Grafana and
Prometheus: every panel and query reads the `datasource` variable, every metric selector of
every query is scoped to the `job` and `instance` variables (so `sum(process_open_fds)` adds
the selected hubs, not every exporter of the Prometheus), and every metric name it queries is
a series a running hub's /metrics has (parsed with prometheus-client's parser), so a renamed
metric cannot leave a panel silently empty.

The queries are read by a small PromQL tokenizer (`selectors`), enough to find each metric
selector and its label matchers: not a PromQL parser, but one that refuses what it does not
know (an unknown function, a stray character) rather than guess."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "hub.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCOPE = {("job", "=~", "$job"), ("instance", "=~", "$instance")}

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "double_exponential_smoothing", "end", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "info",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "start", "stddev_over_time", "stdvar_over_time", "sum_over_time",
    "tan", "tanh", "time", "timestamp", "vector", "year",
}  # fmt: skip
AGGREGATIONS = {
    "avg", "bottomk", "count", "count_values", "group", "limit_ratio", "limitk", "max", "min",
    "quantile", "stddev", "stdvar", "sum", "topk",
}  # fmt: skip
# Followed by a parenthesised list of label names, which are not metrics.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_WORDS = {"and", "or", "unless", "atan2", "bool", "offset"}
NUMBER_WORDS = {"inf", "nan"}

TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]+\}|\$\w+|\[\[\w+\]\])
  | (?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+)
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=@])
  | (?P<punct>[(){}\[\],:])
    """,
    re.VERBOSE,
)


class Token(NamedTuple):
    kind: str
    text: str


class Selector(NamedTuple):
    """One instant or range vector selector: its metric name and label matchers."""

    metric: str | None
    matchers: frozenset[tuple[str, str, str]]


def tokens(expr: str) -> list[Token]:
    out, at = [], 0
    while at < len(expr):
        match = TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:]!r} in {expr!r}")
        at = match.end()
        if match.lastgroup != "space":
            out.append(Token(match.lastgroup or "", match.group()))
    return out


def unquote(token: Token) -> str:
    if token.kind != "string":
        raise ValueError(f"expected a string, got {token.text!r}")
    text = token.text[1:-1]
    return text if token.text[0] == "`" else re.sub(r"\\(.)", r"\1", text)


def matchers(toks: list[Token], at: int) -> tuple[set[tuple[str, str, str]], str | None, int]:
    """The label matchers of the `{...}` opening at toks[at]: (matchers, a quoted metric name
    if the braces hold one, the index after the closing brace)."""
    found: set[tuple[str, str, str]] = set()
    metric = None
    at += 1
    while toks[at].text != "}":
        label = toks[at]
        if label.kind not in ("name", "string"):
            raise ValueError(f"expected a label name, got {label.text!r}")
        name = label.text if label.kind == "name" else unquote(label)
        if label.kind == "string" and toks[at + 1].text in (",", "}"):
            metric, at = name, at + 1  # {"metric.name", ...}
        else:
            op = toks[at + 1].text
            if op not in ("=", "!=", "=~", "!~"):
                raise ValueError(f"expected a matcher operator after {name!r}, got {op!r}")
            found.add((name, op, unquote(toks[at + 2])))
            at += 3
        if toks[at].text == ",":
            at += 1
        elif toks[at].text != "}":
            raise ValueError(f"expected , or }} in a selector, got {toks[at].text!r}")
    return found, metric, at + 1


def skip_to_closing(toks: list[Token], at: int, close: str) -> int:
    """The index after the bracket matching the one opening at toks[at]."""
    opening, depth = toks[at].text, 0
    for i in range(at, len(toks)):
        if toks[i].text == opening:
            depth += 1
        elif toks[i].text == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unclosed {opening}")


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of a PromQL expression (with Grafana's $variables), in order."""
    toks = [*tokens(expr), Token("end", "")]
    found, at = [], 0
    while toks[at].kind != "end":
        tok, following = toks[at], toks[at + 1].text
        if tok.kind == "name" and tok.text in GROUPING:
            at += 1
            if following == "(":
                at = skip_to_closing(toks, at, ")")  # label names, not metrics
        elif tok.kind == "name" and (OPERATOR_WORDS | NUMBER_WORDS) & {tok.text, tok.text.lower()}:
            at += 1
        elif tok.kind == "name" and (tok.text in FUNCTIONS or tok.text in AGGREGATIONS):
            if following not in ("(", "by", "without"):
                raise ValueError(f"{tok.text} used as a metric name in {expr!r}")
            at += 1
        elif tok.kind == "name" and following == "(":
            raise ValueError(f"unknown function {tok.text!r} in {expr!r}")
        elif tok.kind == "name" or tok.text == "{":
            metric = tok.text if tok.kind == "name" else None
            at += tok.kind == "name"
            labels: set[tuple[str, str, str]] = set()
            if toks[at].text == "{":
                labels, quoted, at = matchers(toks, at)
                metric = metric or quoted
            name = {m[2] for m in labels if m[:2] == ("__name__", "=")}
            found.append(Selector(metric or next(iter(name), None), frozenset(labels)))
        elif tok.text == "[":
            at = skip_to_closing(toks, at, "]")  # a range or subquery: [5m], [$__rate_interval]
        else:
            at += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {s.metric for s in selectors(expr) if s.metric is not None}


def series_names(exposition: str) -> set[str]:
    """The series names Prometheus stores from a /metrics text: the samples' names (a counter
    `x` is `x_total`, a histogram `x_bucket`, `x_sum`, `x_count`, an info `x_info`), never the
    bare family name of those, which no query can read."""
    return {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those folded into rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def query_of(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def label_values_selector(query: str) -> str:
    """The series selector of `label_values(selector, label)`."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert match, f"not label_values(metric, label): {query!r}"
    return match.group(1)


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


# -- the reader ---------------------------------------------------------------------------


def test_the_name_reader_sees_metrics_and_nothing_else():
    expr = 'sum by (status) (rate(hub_publish_rejected_total{status="400"}[5m])) / max(x_y)'
    assert metric_names(expr) == {"hub_publish_rejected_total", "x_y"}
    expr = (
        "histogram_quantile(0.99, sum without (instance, job) (rate(a_bucket"
        '{job=~"$job", le!="+Inf"}[$__rate_interval]))) > bool 0.5 * on (job) group_left (le) '
        "max(b offset 1h30m) or vector(1) and sum(c[5m:1m] @ end()) by (le)"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    expr = '{__name__="d", job=~"${job}"} + {"e.f", x="}"} - 1e3 + Inf'
    assert metric_names(expr) == {"d", "e.f"}


def test_the_selector_reader_keeps_each_selectors_matchers():
    found = selectors('sum(a{job=~"$job", instance=~"$instance"}) / b{job=~"$job",}')
    assert found == [
        Selector("a", frozenset(SCOPE)),
        Selector("b", frozenset({("job", "=~", "$job")})),
    ]
    assert not found[1].matchers.issuperset(SCOPE)
    assert selectors('rate(x{a="q\\"}"}[1m])')[0].matchers == {("a", "=", 'q"}')}


@pytest.mark.parametrize(
    "expr",
    ["sum(rte(x[5m]))", "sum(x) ; y", 'x{job~="a"}', "rate + x", "x{job=}"],
)
def test_the_reader_refuses_what_it_does_not_know(expr):
    with pytest.raises((ValueError, IndexError)):
        selectors(expr)


def test_series_names_carry_the_suffixes_prometheus_stores():
    text = (
        "# TYPE c counter\nc_total 1\n"
        "# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 1\nh_sum 0.5\nh_count 1\n'
        '# TYPE i info\ni_info{v="1"} 1\n'
        "# TYPE g gauge\ng 3\n"
    )
    assert series_names(text) == {"c_total", "h_bucket", "h_sum", "h_count", "i_info", "g"}


# -- the dashboard ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_every_metric_the_dashboard_queries_is_one_the_hub_exposes(hub_server):
    server = await hub_server()
    exposed = series_names((await server.fetch("/metrics")).body.decode())
    dashboard = load()
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", ()):
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']!r} queries no metric"
            used |= names
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            used |= metric_names(label_values_selector(query_of(variable)))
    assert used <= exposed, sorted(used - exposed)
    assert {"process_resident_memory_bytes", "hub_delivery_latency_seconds_bucket"} <= used
    titles = {p["title"] for p in panels(dashboard)}
    assert {
        "Open streams",
        "Publish rate by type",
        "Memory",
        "File descriptors",
        "Publish-to-socket latency",
    } <= titles


def test_every_selector_is_scoped_to_the_job_and_instance_variables():
    unscoped = [
        (panel["title"], target["refId"], selector.metric)
        for panel in panels(load())
        for target in panel.get("targets", ())
        for selector in selectors(target["expr"])
        if not selector.matchers.issuperset(SCOPE)
    ]
    assert not unscoped, unscoped


def test_the_job_and_instance_variables_list_only_hubs():
    """Multi-select with All; with no allValue, All is the hub targets found (a regex of
    their values), never `.*`, which would match every exporter again. The instances are of
    the chosen jobs."""
    found = variables(load())
    for name in ("job", "instance"):
        variable = found[name]
        assert variable["type"] == "query"
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable.get("allValue") in (None, "")
        assert variable["current"].get("value") == ["$__all"], f"{name} starts at All"
        query = query_of(variable)
        assert query.endswith(f", {name})"), query
        assert variable.get("definition", query) == query
        assert metric_names(label_values_selector(query)) == {"hub_streams_open"}
    instances = selectors(label_values_selector(query_of(found["instance"])))
    assert ("job", "=~", "$job") in instances[0].matchers
    names = [v["name"] for v in load()["templating"]["list"]]
    assert names.index("datasource") < names.index("job") < names.index("instance")


def test_every_panel_query_and_variable_reads_the_datasource_variable():
    dashboard = load()
    datasource = variables(dashboard)["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert datasource.get("current") in (None, {}), "a datasource picked on this machine"
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, (panel["title"], target["refId"])
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]

    def references(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                yield from references(value)
        elif isinstance(node, list):
            for item in node:
                yield from references(item)

    # No datasource pinned anywhere else: not the uid of one Grafana, nor an import input's
    # ${DS_PROMETHEUS}, which provisioning from a file leaves unresolved.
    assert all(ref == DATASOURCE for ref in references(dashboard["panels"]))
    assert "${DS_" not in DASHBOARD.read_text()
