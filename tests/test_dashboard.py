"""The Grafana dashboard in deploy/grafana/hub.json reads only metrics the hub exposes: every
metric name in its queries is one a running hub's /metrics has (parsed with prometheus-client's
parser), so a renamed metric cannot leave a panel silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "hub.json"
PROMQL_WORDS = {"sum", "rate", "by", "max", "min", "avg", "histogram_quantile", "le", "irate"}


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are neither functions, keywords, label names
    inside braces or by(...), nor durations."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in PROMQL_WORDS}


def test_the_name_reader_sees_metrics_and_nothing_else():
    expr = 'sum by (status) (rate(hub_publish_rejected_total{status="400"}[5m])) / max(x_y)'
    assert metric_names(expr) == {"hub_publish_rejected_total", "x_y"}


@pytest.mark.gen_test(timeout=10)
async def test_every_metric_the_dashboard_queries_is_one_the_hub_exposes(hub_server):
    server = await hub_server()
    text = (await server.fetch("/metrics")).body.decode()
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= metric_names(target["expr"])
    assert used, "the dashboard queries nothing"
    assert used <= exposed, sorted(used - exposed)
    titles = {p["title"] for p in dashboard["panels"]}
    assert {
        "Open streams",
        "Publish rate by type",
        "Memory",
        "File descriptors",
        "Publish-to-socket latency",
    } <= titles
