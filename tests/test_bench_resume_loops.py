"""The resume-loops bench (bench.resume_loops, issue 18) in its small run: real processes on
loopback (a hub, this bench's streams and publisher, a side process of clients resuming from
the oldest id in a loop). The report parses, the loops completed replays, and the probes
received every event published in both periods (the baseline and the loops'): a hub that
starves its ordinary streams while it serves replays, or a bench that measures nothing, fails
here."""

from __future__ import annotations

import math
import re

from test_faults import run_bench

WITHIN = 120.0  # seconds; the run takes about 8

NUM = r"([\d.]+|nan)"
PERIOD = re.compile(
    rf"^(baseline|loops): {NUM} s, (\d+) events published, probes received (\d+)/(\d+); "
    rf"delay p50 {NUM} ms p99 {NUM} ms max {NUM} ms; hub CPU (\d+)%",
    re.MULTILINE,
)
RATIO = re.compile(rf"^ratio \(loops / baseline\): p50 x{NUM}, p99 x{NUM}$", re.MULTILINE)
PULLED = re.compile(
    rf"^replay pulled: {NUM} MB in {NUM} s, {NUM} MB/s in all, {NUM} MB/s per loop .*"
    r"loops completed (\d+) ",
    re.MULTILINE,
)


def test_looping_resumes_complete_and_the_probes_are_served_in_both_periods() -> None:
    code, out = run_bench("--quick", timeout=WITHIN, module="bench.resume_loops")
    periods = {m[0]: m for m in PERIOD.findall(out)}
    assert set(periods) == {"baseline", "loops"}, out
    for _, seconds, published, received, expected, p50, p99, worst, _cpu in periods.values():
        assert float(seconds) > 0 and int(published) > 0, out
        assert int(expected) == 20 * int(published), out  # 20 probes in --quick
        assert int(received) == int(expected), out  # every probe got every event
        assert 0 < float(p50) <= float(p99) <= float(worst), out
    ratio = RATIO.search(out)
    assert ratio and all(math.isfinite(float(x)) and float(x) > 0 for x in ratio.groups()), out
    pulled = PULLED.search(out)
    assert pulled, out
    total_mb, _, all_mbs, per_mbs, completed = pulled.groups()
    assert int(completed) > 0 and float(total_mb) >= 2.0, out  # at least one 2 MB replay
    assert float(all_mbs) > 0 and float(per_mbs) > 0, out
    assert re.search(r"^OK in \d+ s$", out, re.MULTILINE), out
    assert code == 0, out
