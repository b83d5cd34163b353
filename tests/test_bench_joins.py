"""The join/leave cost bench (bench.joins) in its small run: 300 streams connect to real hubs
with join/leave off and on, in each layout. Every stream opens, every user's join is published
once when it is on and none when it is off, each topic's watcher reads every join of its topic,
and the members who do not watch are written no membership event."""

from __future__ import annotations

import re

from test_faults import run_bench

WITHIN = 120.0  # seconds; the run takes about 10
ROW = re.compile(
    r"^(\S+)-(on|off)\s+1\s+300\s+[\d.]+\s+[\d,]+\s+\d+\s+\d+\s+[\d.]+\s+([\d,]+)\s+[\d.]+"
    r"\s+([\d,]+)\s+(OK|FAILED)$",
    re.MULTILINE,
)
# layout -> users published in join events: all but the probes (one a topic, open before)
JOINED = {"one-topic": 299, "ten-topics": 290, "one-topic-all-watch": 299}


def test_join_and_leave_events_reach_their_watchers_and_no_other_member() -> None:
    code, out = run_bench("--quick", timeout=WITHIN, module="bench.joins")
    rows = {(m[0], m[1]): m[2:] for m in ROW.findall(out)}
    assert sorted(rows) == sorted((layout, on) for layout in JOINED for on in ("on", "off")), out
    for (layout, on), (writes, joined, verdict) in rows.items():
        assert verdict == "OK", (layout, on, out)
        assert int(joined.replace(",", "")) == (JOINED[layout] if on == "on" else 0), out
        writes_n = int(writes.replace(",", ""))
        if on == "off":
            assert writes_n == 0, out
        elif layout == "one-topic-all-watch":
            assert writes_n >= 299, out  # every member is written the joins after its own
        else:
            assert writes_n < 50, out  # the watchers only
    assert re.search(r"^total: 6 cells: OK", out, re.M), out
    assert code == 0, out
