"""The catch-up hold bench (bench.hold) in its small run: real processes (a private
redis-server, hub A on it, hub B behind a proxy that cuts its link to Redis), 50 clients
resuming on B at once in each of the four cells. Every stream opens, and none loses,
doubles or resets an event, whichever way B answers while it is behind (held, refused at
once, or unready)."""

from __future__ import annotations

import re

from redis_support import require_redis_server
from test_faults import run_bench

WITHIN = 120.0  # seconds; the run takes about 20


def test_a_storm_of_resumes_on_a_node_behind_opens_every_stream_and_loses_nothing() -> None:
    require_redis_server()
    code, out = run_bench("--quick", timeout=WITHIN, module="bench.hold")
    cells = re.findall(
        r"^\[.*\] cell (\d) \w+: opened (\d+)/(\d+) lost (\d+) doubles (\d+) resets (\d+) "
        r"disordered (\d+) stray (\d+) cut (\d+) \(window (\d+) events\)$",
        out,
        re.MULTILINE,
    )
    assert [c[0] for c in cells] == ["1", "2", "3", "4"], out
    for _, opened, n, lost, doubles, resets, disordered, stray, cut, window in cells:
        assert opened == n == "50", out
        assert (lost, doubles, resets, disordered, stray, cut) == ("0",) * 6, out
        assert int(window) > 0, out  # each stream was owed events: not vacuous
    assert re.search(
        r"^total: opened 200/200 lost 0 doubles 0 resets 0 disordered 0: OK", out, re.M
    )
    assert code == 0, out
