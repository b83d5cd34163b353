"""The topics bench (bench.topics) in its small run: one real hub process, 600 streams
reading broadcasts to everyone, then broadcasts their publisher sends to 10 topics of 60
streams and to 60 topics of 10, each row counted on every stream; once every stream has
closed, the hub holds no topic channel, topic or user."""

from __future__ import annotations

import re

from test_faults import run_bench

WITHIN = 120.0  # seconds; the run takes about 20
ROWS = {  # row -> (topics, streams per topic)
    "bcast-600": ("-", "600"),
    "topics-10x60": ("10", "60"),
    "topics-60x10": ("60", "10"),
}


def test_named_topics_lose_nothing_and_leave_no_table_entry_behind() -> None:
    code, out = run_bench("--quick", timeout=WITHIN, module="bench.topics")
    # the table's rows: row streams topics per-topic offered each publ deliv p50 p99 max lost
    # srvCPU us/deliv RSS after-tables RSS-after notes...
    rows = {
        cols[0]: cols
        for line in out.splitlines()
        if (cols := line.split()) and cols[0] in ROWS and len(cols) >= 18
    }
    assert list(rows) == list(ROWS), out
    for name, (topics, per) in ROWS.items():
        cols = rows[name]
        assert (cols[1], cols[2], cols[3], cols[4]) == ("600", topics, per, "200"), (name, out)
        assert int(cols[7].replace(",", "")) > 0, (name, out)  # deliveries: not vacuous
        assert cols[11] == "0" and cols[15] == "0/0/0", (name, out)  # lost; tables after
        assert cols[-1] == "OK", (name, out)
    assert re.search(
        r"^hub after every row, all streams closed: hub_streams_open 0, hub_topic_channels 0, "
        r"hub_stream_topics 0, hub_stream_users 0;",
        out,
        re.M,
    ), out
    assert re.search(r"^total: 3 rows: OK", out, re.M), out
    assert code == 0, out
