"""``python -m bench.topics``: topics that publishers name (issue 19), against one hub process.

One hub (memory broker, pinned to core 0) serves every row in turn; each row is a run of the
load generator (bench/loadgen.py, pinned to core 1, as ``python -m bench`` runs it): N streams
(10,000) open at 5,000/s, events are published for D seconds (8) at a fixed offered rate, one
request in flight, what is owed when it returns going as one batch (bench.scenarios'
broadcast publisher), then every stream is checked by count and closed. The rows:

- ``bcast-10k``: ``{"type": 5}`` broadcasts to N streams that name no topic (``GET /events``);
- ``topics-10x1k``: ``{"type": "broadcast", "topic": "t<i>"}`` spread over 10 topics of
  1,000 streams each (``GET /events?topic=t<i>``);
- ``topics-1kx10``: the same over 1,000 topics of 10 streams each;

all three at 200 events/s (bcast-10k-200's rate). A write carries what a stream is owed, so
the cost of a delivery depends on how many events each stream is sent a second (`each/s`):
then the rows that compare at equal `each/s`: broadcast at 20/s (each stream 20/s, as in
topics-10x1k), the 10 topics at 2,000/s (200/s each, as in bcast-10k) and the 1,000 topics at
20,000/s (20/s each). `us/deliv` is the hub's CPU time per delivery.

After each row, once /healthz counts no stream: the hub's RSS and its topic tables
(/metrics: ``hub_topic_channels``, the flusher's channels; ``hub_stream_topics`` and
``hub_stream_users``, the registry's indexes), which must be 0. The report ends with the
RSS at the start, its peak (VmHWM) and at the end.

``--quick``: 600 streams, the three 200/s rows, 2 s each (a test). Processes, loopback only,
each started here and ended by its own PID; every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs, servers
from bench.__main__ import (
    LOADGEN_CORE,
    NOISE_PCT,
    SERVER_CORE,
    mint_tokens,
    run_loadgen,
    sustained,
    unaccounted,
    wait_quiet,
)
from bench.procs import fmt, ms

now = time.monotonic
GONE_WITHIN = 30.0  # seconds the hub has to count no stream after a row's streams closed
TABLES = ("hub_streams_open", "hub_topic_channels", "hub_stream_topics", "hub_stream_users")


@dataclass
class Row:
    name: str
    routing: str  # loadgen routing: "plain" (no topic) or "named"
    topics: int  # topics named (0: broadcast to everyone)
    rate: float  # offered events/s

    def per_topic(self, streams: int) -> int:
        return streams // self.topics if self.topics else streams

    @property
    def each(self) -> float:
        """Events a second each stream is sent."""
        return self.rate / self.topics if self.topics else self.rate


def rows_for(streams: int, quick: bool) -> list[Row]:
    """The rows (see the module) for `streams` streams: 10 and streams/10 topics."""
    few, many = 10, streams // 10

    def k(n: int) -> str:
        return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)

    rows = [
        Row(f"bcast-{k(streams)}", "plain", 0, 200),
        Row(f"topics-{few}x{k(streams // few)}", "named", few, 200),
        Row(f"topics-{k(many)}x{streams // many}", "named", many, 200),
    ]
    if not quick:
        rows += [
            Row(f"bcast-{k(streams)}-20", "plain", 0, 20),
            Row(f"topics-{few}x{k(streams // few)}-{k(200 * few)}", "named", few, 200 * few),
            Row(f"topics-{k(many)}x{streams // many}-{k(20 * many)}", "named", many, 20 * many),
        ]
    return rows


def metrics(port: int) -> dict[str, float]:
    """The hub's gauges of TABLES, from /metrics."""
    _, body = servers.http_get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in TABLES:
            out[name] = float(value)
    return out


def streams_open(port: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        _, body = servers.http_get(f"http://127.0.0.1:{port}/healthz", timeout=2.0)
        return int(json.loads(body)["streams"])
    return None


def wait_no_streams(port: int) -> bool:
    """Until /healthz counts no stream (polling within GONE_WITHIN seconds)."""
    deadline = now() + GONE_WITHIN
    while now() < deadline:
        if streams_open(port) == 0:
            return True
        time.sleep(0.05)  # polling inside a deadline
    return False


def rss_mb(pid: int, field: bytes = b"VmRSS:") -> float:
    return procs.proc_status_kb(pid, field) / 1024


def run_row(
    row: Row, hub: servers.HubServer, streams: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": hub.port,
        "server_pid": hub.pid,
        "streams": streams,
        "routing": row.routing,
        "topics": row.topics,
        "probes": min(200, streams),
        "connect_rate": 5000.0,
        "duration": args.duration,
        # bench.scenarios' broadcast publisher: one request in flight, batches of what is owed
        "publish": {"mode": "rate", "rate": row.rate, "conns": 1, "inflight": 1, "batch_max": 1000},
        "kind": "hub",
        "tokens_file": str(tmp / "tokens.json"),
        "core": None,  # taskset pins it
        "loadgen_loop": "uvloop",
        "rcvlowat": 0,
    }
    timeout = streams / 5000 + 35 + args.duration + 60
    spec["timeout"] = timeout - 5
    res: dict[str, Any] = {"name": row.name, "topics": row.topics, "offered": row.rate}
    res["each"] = row.each
    res["per_topic"] = row.per_topic(streams)
    spy = None
    if args.profile:
        # py-spy on the hub over the middle of the publish window (once the streams are open)
        out = args.profile / f"{row.name}.txt"
        argv = [str(args.py_spy), "record", "--pid", str(hub.pid), "--rate", "250"]
        argv += ["--duration", str(max(1, int(args.duration) - 2)), "--format", "raw"]
        argv += ["--nonblocking", "-o", str(out)]
        spy = threading.Timer(streams / 5000 + 2.0, lambda: servers.spawn(argv))
        spy.start()
    try:
        res.update(run_loadgen(spec, timeout, tmp / f"loadgen-{row.name}.log"))
    finally:
        if spy is not None:
            spy.cancel()
    if hub.proc is None or hub.proc.poll() is not None:
        res["error"] = f"{res.get('error') or ''} the hub exited: {hub.log_tail()}".strip()
        return res
    res["closed"] = wait_no_streams(hub.port)
    res["after"] = metrics(hub.port)
    res["rss_after_mb"] = rss_mb(hub.pid)
    return res


def cpu_per_delivery_us(r: dict[str, Any]) -> float | None:
    if not r.get("delivery_rate") or r.get("srv_cpu_pct") is None:
        return None
    return float(r["srv_cpu_pct"]) / 100 / float(r["delivery_rate"]) * 1e6


def ok(r: dict[str, Any]) -> bool:
    """Every stream connected, got every event, and left no table entry (sustained or not:
    that is the notes' to say)."""
    after = r.get("after") or {}
    return (
        not r.get("error")
        and r.get("connected") == r.get("streams")
        and r.get("lost") == 0
        and not r.get("disconnects")
        and bool(r.get("closed"))
        and bool(after)
        and all(after.get(name) == 0 for name in TABLES)
    )


COLS = (
    ("row", 17, "<"),
    ("streams", 7, ">"),
    ("topics", 6, ">"),
    ("per-topic", 9, ">"),
    ("offered/s", 9, ">"),
    ("each/s", 6, ">"),
    ("publ/s", 8, ">"),
    ("deliv/s", 10, ">"),
    ("p50ms", 6, ">"),
    ("p99ms", 6, ">"),
    ("maxms", 6, ">"),
    ("lost", 5, ">"),
    ("srvCPU%", 7, ">"),
    ("us/deliv", 8, ">"),
    ("RSS-MB", 6, ">"),
    ("after: chan/topics/users", 24, ">"),
    ("RSS-after", 9, ">"),
    ("notes", 0, "<"),
)


def cells(r: dict[str, Any]) -> list[str]:
    after = r.get("after") or {}
    notes = []
    if r.get("error"):
        notes.append("ERROR: " + " ".join(str(r["error"]).split())[:200])
    else:
        if r.get("connected") != r.get("streams"):
            notes.append(f"only {r.get('connected')} connected")
        notes.append("sustained" if sustained(r) else "NOT sustained")
        if r.get("disconnects"):
            notes.append(f"{r['disconnects']} dropped")
        if r.get("pub_errors"):
            notes.append(f"{r['pub_errors']} publish errors: {r.get('pub_error_sample')}")
        if (unaccounted(r) or 0) >= NOISE_PCT:
            notes.append("NOISY")
        if not r.get("closed"):
            notes.append(f"streams still open after {GONE_WITHIN:g} s")
    notes.append("OK" if ok(r) else "FAILED")
    tables = "/".join(fmt(after.get(n)) for n in TABLES[1:])
    return [
        r["name"],
        fmt(r.get("streams")),
        fmt(r["topics"] or None) if r["topics"] else "-",
        fmt(r.get("per_topic")),
        fmt(r.get("offered")),
        fmt(r.get("each"), ",.4g"),
        fmt(r.get("published_rate")),
        fmt(r.get("delivery_rate")),
        ms(r.get("p50_ms")),
        ms(r.get("p99_ms")),
        ms(r.get("max_ms")),
        fmt(r.get("lost")),
        fmt(r.get("srv_cpu_pct")),
        fmt(cpu_per_delivery_us(r), ".2f"),
        fmt((r.get("rss_end_kb") or 0) / 1024 or None, ".1f"),
        tables,
        fmt(r.get("rss_after_mb"), ".1f"),
        ", ".join(notes),
    ]


def table(rows: list[dict[str, Any]]) -> list[str]:
    def line(values: list[str]) -> str:
        return " ".join(
            f"{v:{al}{w}}" if w else v for v, (_, w, al) in zip(values, COLS, strict=True)
        ).rstrip()

    head = line([c[0] for c in COLS])
    return [head, "-" * len(head), *(line(cells(r)) for r in rows)]


LEGEND = (
    "each/s: events a second each stream is sent; "
    "deliv/s: events received by all streams per second of the publish window; p50/p99/max: "
    "publish to receipt, on 200 probe streams; us/deliv: the hub's CPU time per delivery;\n"
    "RSS-MB: the hub's RSS with the row's streams open, after its publishing; after, once "
    "/healthz counts no stream: /metrics hub_topic_channels/hub_stream_topics/"
    "hub_stream_users, and the RSS (MB)"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.topics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=10_000, help="streams a row (10,000)")
    parser.add_argument("--duration", type=float, default=8.0, help="publish seconds a row")
    parser.add_argument("--quick", action="store_true", help="600 streams, 3 rows, 2 s (a test)")
    parser.add_argument(
        "--quiet-wait", type=float, help="wait up to S s for a quiet machine before a row"
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="run a row again (up to N times, 2; --quick: 0) when other work ran on the cores",
    )
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument("--only", help="rows by name, comma-separated (default: all)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the hub with py-spy during each row's publishing, into this folder "
        "(collapsed stacks, <row>.txt)",
    )
    parser.add_argument("--py-spy", type=Path, default=Path("py-spy"), help="py-spy to use")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.duration = 600, 2.0
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 30.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.streams < 10:
        parser.error("--streams: at least 10")
    rows_wanted = rows_for(args.streams, args.quick)
    if args.only:
        names = {name.strip() for name in args.only.split(",")}
        rows_wanted = [row for row in rows_wanted if row.name in names]
        if not rows_wanted:
            have = ", ".join(r.name for r in rows_for(args.streams, args.quick))
            parser.error(f"--only: no such row (have: {have})")
    if args.profile:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    procs.enough_descriptors("topics", args.streams)
    t_run, say = procs.sayer()
    header = [
        f"# python -m bench.topics {' '.join(sys.argv[1:])}".rstrip(),
        f"# {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit "
        f"{procs.commit('--untracked-files=no')}",
        f"# {procs.machine()}",
        f"# one hub process for every row, pinned to core {SERVER_CORE}; the load generator "
        f"(uvloop) pinned to core {LOADGEN_CORE}; {args.duration:g} s of publishing a row",
    ]
    for line in header:
        say(line)
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="hub-topics-"))
    hub: servers.HubServer | None = None
    memory: dict[str, Any] = {}
    try:
        secret = secrets.token_hex(20)
        mint_tokens(secret, args.streams, tmp / "tokens.json")
        hub = servers.HubServer(tmp, secret, SERVER_CORE, None, [], "")
        memory["start"] = rss_mb(hub.pid)
        memory["start_tables"] = metrics(hub.port)
        for row in rows_wanted:
            for attempt in range(1 + args.retries):  # again when other work ran meanwhile
                if args.quiet_wait:
                    wait_quiet(args.quiet_wait)
                say(f"{row.name}: {args.streams} streams, {row.rate:g} events/s ...")
                r = run_row(row, hub, args.streams, args, tmp)
                r["attempt"] = attempt + 1
                say("  " + " | ".join(cells(r)))
                if (unaccounted(r) or 0) < NOISE_PCT or r.get("error"):
                    break
                say("  other work ran on the cores: again")
            rows.append(r)
            if r.get("error") and (hub.proc is None or hub.proc.poll() is not None):
                break
        memory["end"] = rss_mb(hub.pid)
        memory["peak"] = rss_mb(hub.pid, b"VmHWM:")
        memory["end_tables"] = metrics(hub.port)
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        if hub is not None:
            hub.stop()
        servers.stop_all()
        procs.drop_logs(tmp, args.keep, say)
    print()
    print("\n".join(header))
    print()
    print("\n".join(table(rows)))
    print(LEGEND)
    tables_ok = bool(memory.get("end_tables")) and all(
        memory["end_tables"].get(n) == 0 for n in TABLES
    )
    if "end" in memory:
        end = memory["end_tables"]
        print(
            "hub after every row, all streams closed: "
            + ", ".join(f"{n} {fmt(end.get(n))}" for n in TABLES)
            + f"; RSS {memory['start']:.1f} MB at the start (no stream), peak "
            f"{memory['peak']:.1f} MB, {memory['end']:.1f} MB at the end"
            + ("" if tables_ok else "  [tables not empty]")
        )
    passed = bool(rows) and len(rows) == len(rows_wanted)
    passed = passed and all(ok(r) for r in rows) and tables_ok
    print(f"total: {len(rows)} rows: {'OK' if passed else 'FAILED'} in {now() - t_run:.0f} s")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
