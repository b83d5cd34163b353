"""The sources bench (bench.sources) in its small run: a real hub reads a PostgreSQL outbox
table and then a NATS JetStream stream of the run's own; 20 streams (and a page in the real
browser) read every event written, counted on each, and the hub's /metrics count every record
published once, none replayed or dead-lettered. PostgreSQL (127.0.0.1:5432) and NATS with
JetStream (127.0.0.1:4222) must answer: in CI (`CI=true`) their absence fails, elsewhere the
test skips and says so (pg_support, nats_support). Without Chromium (outside CI) the run goes
without the page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_support import CHROMIUM
from nats_support import require_nats
from pg_support import require_postgres
from test_faults import run_bench

WITHIN = 120.0  # seconds; the run takes about 10
STREAMS, EVENTS, LATENCY_EVENTS = "20", "50", "20"  # bench.sources --quick


def test_every_event_written_to_a_source_reaches_every_stream_once() -> None:
    require_postgres()  # (both fail in CI, skip elsewhere, saying so)
    require_nats()
    args = ["--quick"]
    browser = Path(CHROMIUM).exists() or os.environ.get("CI") == "true"
    if not browser:
        args.append("--no-browser")  # (in CI a missing browser fails the run instead)
    code, out = run_bench(*args, timeout=WITHIN, module="bench.sources")
    # source broker streams events prod/s stored/s ev/s deliv/s hubCPU% srcCPU% lgCPU% lat
    # hubCPU% p50 p99 ack50 ack99 store50 commit50 probe50 probe99 lost notes...
    rows = {
        cols[0]: cols
        for line in out.splitlines()
        if (cols := line.split()) and cols[0] in ("pg", "nats") and len(cols) >= 23
    }
    assert sorted(rows) == ["nats", "pg"], out
    for source, cols in rows.items():
        assert cols[1:4] == ["memory", STREAMS, EVENTS], (source, out)
        number = [float(c.replace(",", "")) for c in cols[4:8]]
        assert all(v > 0 for v in number), (source, out)  # written, stored, delivered
        assert number[3] == pytest.approx(number[2] * int(STREAMS), rel=0.01), (source, out)
        assert cols[11] == LATENCY_EVENTS, (source, out)  # the page got each latency event
        assert cols[19] != "-" and cols[20] != "-", (source, out)  # the probes measured
        if browser:
            assert cols[13] != "-" and cols[14] != "-", (source, out)  # p50, p99 on the page
        assert cols[21] == "0", (source, out)  # lost
        assert cols[-1] == "OK", (source, out)
    assert "total: 2 rows: OK" in out, out
    assert code == 0, out
