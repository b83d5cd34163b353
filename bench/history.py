"""``python -m bench.history``: what the history really holds, and what bounding it costs.

`--history-bytes` must bound the memory the history holds (issue 15: 25 legal 1 MB publishes
of log events whose `data` is 700 empty lists took a hub from 46 to 574 MB of RSS while it
counted 67 MB: the decoded `data` kept beside each frame). Three ways, measured side by side:

- ``before``: events keep their decoded `data`; the history counts 3x the frame + 400 bytes
  (the code before issue 15);
- ``keep``: events keep their decoded `data`, and the history counts it with an estimate made
  of C-speed scans of the body (`data_estimate`: containers, separators, escapes);
- ``drop`` (the hub's, hub/history.py): the history drops the decoded `data` of what it holds
  and counts 2x the frame + EVENT_OVERHEAD; a filter decodes `data` from the body when it
  asks (hub/message.py keeps it decoded for the next readers, within DECODED_BYTES).

For each event shape, 25 bodies of up to 1 MiB (a JSON array of at most 10,000 events, the
hub's limits; 12,500 events in all at most) are decoded as the hub decodes them and appended
to a history with the default bounds (10,000 events, 64 MiB): the events held, what the
history counts, what it really holds (tracemalloc), the RSS growth of a fresh process doing
the same and the time of a full collection then; and `drop`'s RSS after 100 and 200 such
publishes (flat: what is left is the allocator's, not a leak). Then CPU: `History.append` per
event in a full history, and a `?level=warning` filter read by 1 and by 100 streams for each
event of the history (what `drop` adds: one decode per event, shared by the streams that read
it). About a minute and a half; one process at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import ujson

from hub.decode import decode_json
from hub.dispatch import DEFAULT_TYPES
from hub.flusher import WINDOW
from hub.history import EVENT_OVERHEAD, History
from hub.message import Event
from hub.stream import Stream

REPO = Path(__file__).resolve().parent.parent
HISTORY = 10_000  # the defaults of --history and --history-bytes
HISTORY_BYTES = 64 * 1024 * 1024
BODIES = 25  # publishes of up to BODY_BYTES each
BODY_BYTES = 1024 * 1024
MAX_BATCH = 10_000
EVENTS_PER_BODY = 500  # times the publishes: the events in all, at most (12,500: enough to
# fill the history; the reviewer's 25 publishes of 700 lists each were 12,375 events)

SHAPES: dict[str, dict[str, object]] = {
    "payment": {"type": 2, "user": "u12345", "data": {"amount": 42, "currency": "EUR"}},
    "log": {
        "type": 4,
        "data": {"level": "warning", "service": "api", "msg": "upstream timed out after 30 s"},
    },
    "lists": {"type": 4, "data": [[] for _ in range(700)]},  # the reviewer's
    "text-8k": {"type": 4, "data": {"level": "info", "msg": "x" * 8000}},
}


def data_estimate(body: str) -> int:
    """`keep`'s count of the decoded `data`: at most 72 bytes for each value (a list or dict
    and its slot, a string's header and slot, a number), one per container and separator,
    plus the characters of the strings (four bytes each once an escape may be outside
    Latin-1). Five scans of the body at C speed."""
    width = 4 if "\\u" in body else 1
    tokens = body.count("[") + body.count("{") + body.count(",") + body.count(":")
    return width * len(body) + 72 * tokens


class BeforeHistory(History):
    """The history before issue 15: decoded data kept, 3x the frame + 400 counted."""

    def append(self, event: Event) -> None:
        event.seq = self.end_seq
        self.end_seq += 1
        events = self.events
        events.append(event)
        self.size += 3 * len(event.frame) + 400
        while len(events) > self.limit or self.size > self.limit_bytes:
            old = events.popleft()
            self.floor = old.key
            self.size -= 3 * len(old.frame) + 400


class KeepHistory(History):
    """Design `keep`: decoded data kept and counted (data_estimate); each event's count is
    kept beside it, so that eviction does not scan the body again."""

    def __init__(self, limit: int, limit_bytes: int, floor: tuple[int, int]) -> None:
        super().__init__(limit, limit_bytes, floor)
        self.costs: deque[int] = deque()

    def append(self, event: Event) -> None:
        event.seq = self.end_seq
        self.end_seq += 1
        events = self.events
        events.append(event)
        cost = 2 * len(event.frame) + EVENT_OVERHEAD + data_estimate(event.body)
        self.costs.append(cost)
        self.size += cost
        while len(events) > self.limit or self.size > self.limit_bytes:
            old = events.popleft()
            self.floor = old.key
            self.size -= self.costs.popleft()


DESIGNS: dict[str, type[History]] = {"before": BeforeHistory, "keep": KeepHistory, "drop": History}


def bodies(shape: str, publishes: int) -> Iterator[bytes]:
    """The publish bodies of the run, one at a time (as a hub receives them): `publishes`
    JSON arrays of up to BODY_BYTES each, and no more events in all than EVENTS_PER_BODY
    times `publishes` (small events come in fewer, larger batches)."""
    one = ujson.dumps(SHAPES[shape]).encode()
    per_body = min(MAX_BATCH, (BODY_BYTES - 2) // (len(one) + 1))
    left = min(publishes * per_body, publishes * EVENTS_PER_BODY)
    while left > 0:
        n = min(per_body, left)
        yield b"[" + b",".join([one] * n) + b"]"
        left -= n


def fill(history: History, shape: str, publishes: int = BODIES) -> None:
    """Publish the run's bodies into `history` as the hub does (decode_json, ids, append)."""
    ms = 1_764_000_000_000
    for body in bodies(shape, publishes):
        events = decode_json(body)
        for n, event in enumerate(events):
            event.assign_id(ms, n)
            history.append(event)
        ms += 1


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(design: str, shape: str, publishes: int) -> None:
    """One fresh process: the history filled, the RSS before and after, and the time of a
    full collection then (the cyclic GC visits every list and dict the history holds)."""
    history = DESIGNS[design](HISTORY, HISTORY_BYTES, (0, 0))
    gc.collect()
    before = rss_mb()
    fill(history, shape, publishes)
    gc.collect()
    after = rss_mb()
    started = time.perf_counter()
    gc.collect()  # what a full collection costs the loop with this history held
    took = time.perf_counter() - started
    result = {"before": before, "after": after, "gc": took, "events": len(history)}
    print(json.dumps({**result, "size": history.size}))


def held_per_event(design: str, shape: str, n: int = 1000) -> float:
    """What an event in the history holds (tracemalloc), over `n` events appended as the hub
    appends them (the decoded batch freed), the limits out of reach."""
    history = DESIGNS[design](n, 1 << 40, (0, 0))
    body = b"[" + b",".join([ujson.dumps(SHAPES[shape]).encode()] * n) + b"]"
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    events = decode_json(body)
    for i, event in enumerate(events):
        event.assign_id(1_764_000_000_000, i)
        history.append(event)
    del events, event
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    return held / len(history)


def in_child(design: str, shape: str, publishes: int = BODIES) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.history", "--child", design, shape, str(publishes)],
        cwd=REPO,
        capture_output=True,
        check=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def memory_row(design: str, shape: str) -> str:
    run = in_child(design, shape)
    held = held_per_event(design, shape) * run["events"]
    mb = 1024 * 1024
    return (
        f"  {shape:8} {design:6} {run['events']:>7,} events  counted {run['size'] / mb:5.1f} MB  "
        f"held {held / mb:6.1f} MB ({held / run['size']:4.2f}x the count)  "
        f"RSS {run['before']:3.0f} -> {run['after']:4.0f} MB  full gc {run['gc'] * 1000:4.0f} ms"
    )


def events_of(shape: str, n: int) -> list[Event]:
    events = decode_json(b"[" + b",".join([ujson.dumps(SHAPES[shape]).encode()] * n) + b"]")
    for i, event in enumerate(events):
        event.assign_id(1_764_000_000_000, i)
    return events


def full(design: str, shape: str, limit: int) -> History:
    """A history of `design` holding `limit` events of `shape` (a tenth of the defaults'
    bounds): each append from now on also evicts, as in a running hub."""
    history = DESIGNS[design](limit, HISTORY_BYTES * limit // HISTORY, (0, 0))
    for event in events_of(shape, limit):
        history.append(event)
    return history


def append_ns(design: str, shape: str, n: int = 3_000, runs: int = 5) -> float:
    """Nanoseconds per History.append in a full history, best of `runs`: fresh events each
    run, held by the history only once appended, so that the eviction of the oldest frees
    all it held, as in a running hub (a popleft per event, the same for every design)."""
    best = float("inf")
    for _ in range(runs):
        history = full(design, shape, 1000)
        events = deque(events_of(shape, n))
        append, take = history.append, events.popleft
        gc.collect()
        started = time.perf_counter()
        while events:
            append(take())
        best = min(best, time.perf_counter() - started)
        del history
    return best / n * 1e9


def windows(events: list[Event]) -> list[list[Event]]:
    """The events in runs of at most one write (hub.flusher.WINDOW bytes of frames): what the
    streams of one flush pass read, each in turn."""
    out: list[list[Event]] = [[]]
    size = 0
    for event in events:
        if size >= WINDOW:
            out.append([])
            size = 0
        out[-1].append(event)
        size += len(event.frame)
    return out


def filter_ns(design: str, shape: str, streams: int, runs: int = 3) -> float:
    """Nanoseconds per event for `streams` streams with ?level=warning to read every event of
    a full history once, as flush passes do (each stream checks a window of events in turn:
    hub.stream's Stream.accepts), best of `runs`."""
    filters = DEFAULT_TYPES.stream_filters({"level": ["warning"]})
    subs = [Stream(f"u{i}", topics=("logs",), filters=filters) for i in range(streams)]
    best = float("inf")
    n = 0
    for _ in range(runs):
        history = full(design, shape, 1000)
        passes = windows(list(history.read(history.first_seq)))
        n = len(history)
        gc.collect()
        started = time.perf_counter()
        for window in passes:
            for sub in subs:
                accepts = sub.accepts
                for event in window:
                    accepts(event)
        best = min(best, time.perf_counter() - started)
        del history, passes
    return best / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__)
    parser.add_argument("--child", nargs=3, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    print(
        f"memory: {BODIES} publishes of up to 1 MiB ({BODIES * EVENTS_PER_BODY:,} events at "
        f"most) into a history of {HISTORY:,} events / {HISTORY_BYTES >> 20} MiB (held: "
        "tracemalloc; RSS: a fresh process)"
    )
    for shape in SHAPES:
        for design in DESIGNS:
            print(memory_row(design, shape), flush=True)
    rss = [f"{n}: {in_child('drop', 'lists', n)['after']:.0f} MB" for n in (25, 100, 200)]
    print("  RSS of drop after more publishes of lists: " + ", ".join(rss), flush=True)
    print("CPU: History.append in a full history of 1,000 events, ns per event (best of 5)")
    for shape in SHAPES:
        row = "  ".join(f"{d} {append_ns(d, shape):6.0f}" for d in DESIGNS)
        print(f"  {shape:8} {row}", flush=True)
    print("CPU: a ?level=warning filter, ns per event for 1 / 100 streams to read it (best of 3)")
    for shape in ("log", "lists"):
        for design in DESIGNS:
            one, hundred = filter_ns(design, shape, 1), filter_ns(design, shape, 100)
            print(f"  {shape:8} {design:6} {one:8,.0f} / {hundred:9,.0f}", flush=True)


if __name__ == "__main__":
    main()
