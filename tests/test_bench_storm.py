"""The reconnect-storm bench (bench.storm) in its small run: real processes (hubs on the memory
broker and, with two workers, on a private redis-server), 200 streams reading broadcasts
published throughout, all cut at once by this side or by a hub's restart, and back with
Last-Event-ID. In every cell every stream comes back, and none loses or doubles an event; none
is reset where the history still reaches back, and every one is reset where it cannot (the
memory broker's restart forgets it)."""

from __future__ import annotations

import re

from redis_support import require_redis_server
from test_faults import run_bench

WITHIN = 150.0  # seconds; the run takes about 25
CELLS = {  # cell -> whether its streams are reset (the history is gone)
    "cut-jitter": False,
    "cut-nojitter": False,
    "restart-memory": True,
    "restart-memory-s0": True,
    "restart-redis-2w": False,
    "restart-redis-2w-s0": False,
}
ROW = re.compile(
    r"^\[.*\] cell (\S+): back (\d+)/(\d+) lost (\d+) doubles (\d+) resets (\d+) "
    r"\((expected|none expected)\) unexpected-ends (\d+) openings-off (\d+) gave-up (\d+) "
    r"late (\d+) \(window (\d+) events\) (OK|FAILED)$",
    re.MULTILINE,
)


def test_a_reconnect_storm_loses_and_doubles_nothing_and_resets_only_without_history() -> None:
    require_redis_server()
    code, out = run_bench("--quick", timeout=WITHIN, module="bench.storm")
    rows = {m[0]: m[1:] for m in ROW.findall(out)}
    assert list(rows) == list(CELLS), out
    for name, reset in CELLS.items():
        back, n, lost, doubles, resets, said, ends, off, gave_up, late, window, verdict = rows[name]
        assert back == n == "200", (name, out)
        assert (lost, doubles) == ("0", "0"), (name, out)
        assert (ends, off, gave_up, late) == ("0", "0", "0", "0"), (name, out)
        assert int(window) > 0, (name, out)  # each stream was owed events: not vacuous
        if reset:
            assert said == "expected" and resets == n, (name, out)
        else:
            assert said == "none expected" and resets == "0", (name, out)
        assert verdict == "OK", (name, out)
        # its table row is there too
        assert re.search(rf"^{re.escape(name)}\s+(memory|redis)\s+\d\s+\S+\s+200/200\s", out, re.M)
    assert re.search(r"^total: 6 cells, lost 0 doubles 0 late 0 unexpected resets 0: OK", out, re.M)
    assert code == 0, out
