"""``python -m bench.sources``: events taken from their sources (issue 20) into 2,000 streams.

For each source, a fresh hub process (pinned to core 0) reads it with ``--source`` (memory
broker; ``--brokers memory,redis`` adds a row with the Redis broker on 127.0.0.1:6379 under a
prefix of the run's own), and a side process (pinned to core 1: bench.loadgen's counting
streams, uvloop) holds N streams (2,000) of ``GET /events``, each reading every event (type
broadcast). The sources:

- ``pg``: an outbox table of the run's own (``hub outbox init``, dropped at the end), the hub
  on ``postgres://...?table=<t>&batch=500&poll=1``;
- ``nats``: a JetStream stream of the run's own (nats-py, deleted at the end, with the hub's
  durable consumer), the hub on ``nats://127.0.0.1:4222/<STREAM>?durable=<d>``;
- ``http``: no source, the same events POSTed to /publish: the reference the sources are
  held against.

Each row, once every stream is open and a few warm-up events reached all of them:

1. throughput: E events (20,000) written as fast as this process's producer can: PostgreSQL,
   multi-row INSERTs of 100 rows, each its own transaction, on 2 connections; NATS,
   ``js.publish`` in bursts of 100 awaited together (each acknowledged); HTTP, POSTs of 100
   events, 2 in flight. `prod/s`: events committed (acknowledged) a second; `taken/s`: events
   the hub took a second (to the ``ts`` of the last one, read on one more stream of this
   process's); `ev/s`: events delivered to every stream a second, from the first write to the
   moment the last probe stream (every tenth, read at once) has the last event, every other
   stream (read SO_RCVLOWAT bytes at a time, --lowat) counted after; `deliv/s` = ev/s x
   streams; the CPU of the hub, of the source's server (every ``postgres`` or ``nats-server``
   process, whoever started them), of the streams' process and of everyone else over that time,
   and each core's busy time.
2. latency: a real headless Chromium (the system's, launched as tests/browser_support launches
   it, through Playwright) holds an EventSource to the hub while the N streams read too;
   events are written one at a time at R/s (50) for D seconds (10), each its own transaction
   (an autocommit INSERT) or its own acknowledged publish. Each event carries ``t``, the
   producer's wall clock taken just before the INSERT (whose COMMIT it is) or the publish is
   sent; the page records ``Date.now()`` (ms) on each message. `p50`/`p99`: the page's
   receipt minus ``t``; `ack50`/`ack99`: the receipt minus the moment the COMMIT (the
   publish's ack) returned to the producer, the issue's "from COMMIT"; `store50`: the hub's
   ``ts`` (ms, when it decoded the record, just before storing it) minus ``t``;
   `probe50`/`probe99`: on up to 200 of the load streams (raw sockets), their receipt minus
   ``t``. The same machine's clock throughout.

Then every stream's count is checked (warm-up + E + latency events, none lost, none twice),
the page's too, and the hub's /metrics (hub_source_records_total: published = written, no
replay, no dead letter). A row during which other work took more than 15 % of the cores is run
again (--retries, 2), after waiting for a quiet machine (--quiet-wait, 30 s).

``--quick``: 20 streams, 50 events, 20 latency events at 20/s, pg and nats, memory broker (a
test). ``--profile DIR``: py-spy records the hub and the streams' process while throughput is
measured. Processes, loopback only, each started here and ended by its own PID; the table and
the stream are the run's own and are removed at the end; every wait is bounded in time and
every loop in count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import importlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen, procs, servers
from bench.__main__ import LOADGEN_CORE, NOISE_PCT, SERVER_CORE, machine_load, mint_tokens
from bench.faults_check import STORED
from bench.faults_clients import post
from bench.procs import fmt, ms

REPO = Path(__file__).resolve().parent.parent
now = time.monotonic

PG_URL = "postgres://postgres@127.0.0.1:5432/test"
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
SOURCES = ("pg", "nats", "http")
BROKERS = ("memory", "redis")
RELAY_BATCH = 500  # the outbox relay's rows a round (?batch=)
TX_ROWS = 100  # rows an INSERT (one transaction) while throughput is measured
PRODUCERS = 2  # PostgreSQL connections (HTTP: requests in flight) writing at once
BURST = 100  # NATS publishes awaited together
WARM = 10  # warm-up events: the source is read and every stream gets them
CONNECT_RATE = 5000.0  # streams opened a second
PROBES = 200  # load streams that parse each event's stamp (and are read at once)
# The load streams that are not probes are read once this many bytes wait (SO_RCVLOWAT; at
# once after the last event): they take every event as before, and leave the cores to the hub
# (read at once, 2,000 streams took ~65% of a core at 50 events/s, ~90% at 3,000 events/s).
LOWAT = 32 * 1024
READY_WITHIN = 30.0  # seconds a source has to be read by the hub
WARM_WITHIN = 30.0  # seconds the warm-up events have to reach every stream
STALL = 15.0  # seconds without one more event on any stream: the row has stalled
SIDE_WITHIN = 60.0  # seconds the side process has to open its streams
BROWSER_WITHIN = 30.0  # seconds the page has to open its stream, and to get the last event
RUN_WITHIN = 1800.0  # the whole run
SOURCE_SERVER = {"pg": "postgres", "nats": "nats-server", "http": ""}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- the side process: the load streams (bench.loadgen's, pinned to the other core) -----------


async def side_main() -> None:
    """`--side`: the spec on the first line of stdin, then commands, one JSON line each;
    answers on stdout. It opens the streams, then waits for counts; it ends when stdin does."""
    reader = await procs.pipe_reader(sys.stdin, 1 << 20)
    spec = json.loads(await reader.readline())
    with open(spec["tokens_file"]) as f:
        spec["tokens"] = json.load(f)["subscribers"]
    g = loadgen.Gen(spec)
    n = g.n
    probe_every = max(1, n // max(1, spec["probes"]))
    g.subs = [
        loadgen.Sub(g, i, i % probe_every == 0 and i // probe_every < spec["probes"])
        for i in range(n)
    ]
    try:
        procs.emit(await side_connect(g, spec))
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "wait":
                procs.emit(await side_wait(g, cmd["each"], cmd["within"], cmd["by_probes"]))
            elif cmd["cmd"] == "lowat":  # SO_RCVLOWAT of the streams that are not probes
                for sub in g.subs:
                    if not sub.probe:
                        loadgen.set_rcvlowat(sub.transport, cmd["bytes"])
                procs.emit({"lowat": cmd["bytes"]})
            elif cmd["cmd"] == "latencies":  # the probes' since the last ask, microseconds
                lat = list(g.latencies)
                del g.latencies[:]
                procs.emit({"latencies": lat})
    finally:
        g.closing = True
        loadgen.close_all(g.subs)
        await asyncio.sleep(0.05)


async def side_connect(g: loadgen.Gen, spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[Any]] = set()

    async def connect_one(s: loadgen.Sub) -> None:
        try:
            await loop.create_connection(lambda: s, g.host, g.port)
        except OSError as exc:
            g.connect_errors += 1
            g.connect_error_sample = str(exc)

    start, started = now(), 0
    while started < g.n:  # paced: CONNECT_RATE a second
        owed = min(g.n, int((now() - start) * spec["connect_rate"]) + 1)
        while started < owed:
            task = loop.create_task(connect_one(g.subs[started]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            started += 1
        await asyncio.sleep(0.002)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(g.all_heads.wait(), spec["connect_within"])
    return {
        "connected": g.headers_ok,
        "connect_s": g.t_all_heads - start if g.all_heads.is_set() else None,
        "errors": g.connect_errors + len(g.head_errors),
        "error_sample": [g.connect_error_sample, *g.head_errors[:3]],
        "probes": sum(1 for s in g.subs if s.probe),
    }


async def until(subs: list[loadgen.Sub], target: int, deadline: float) -> float | None:
    """Until `subs` could have `target` events in all (their sum; the moment), none of them got
    one more for STALL seconds, or the deadline (None)."""
    last, changed = -1, now()
    while now() < deadline:
        got = sum(s.count for s in subs)
        t = now()
        if got >= target:
            return t
        if got != last:
            last, changed = got, t
        elif t - changed > STALL:
            return None
        await asyncio.sleep(0.002)  # polling inside a deadline
    return None


async def side_wait(g: loadgen.Gen, each: int, within: float, by_probes: bool) -> dict[str, Any]:
    """When every stream could have `each` events, then each stream's count. `by_probes`: the
    moment the probes (read at once) have them all; the other streams (read late:
    SO_RCVLOWAT) are then read at once and counted too."""
    deadline = now() + within
    probes = [s for s in g.subs if s.probe] if by_probes else []
    if probes:
        done = await until(probes, each * len(probes), deadline)
        for sub in g.subs:
            loadgen.set_rcvlowat(sub.transport, 1)  # (wakes their readers at once)
        if done is not None and await until(g.subs, each * g.n, deadline) is None:
            done = None
    else:
        done = await until(g.subs, each * g.n, deadline)
    counts = [s.count for s in g.subs]
    return {
        "done": done,
        "min": min(counts, default=0),
        "max": max(counts, default=0),
        "lost": sum(max(0, each - c) for c in counts),
        "extra": sum(max(0, c - each) for c in counts),
        "disconnects": g.disconnects,
    }


class Streams(procs.Side):
    """The side process seen from here: one answer per command, in order."""

    def __init__(self, tmp: Path, spec: dict[str, Any]) -> None:
        argv = ["taskset", "-c", str(LOADGEN_CORE), sys.executable, "-m", "bench.sources"]
        super().__init__([*argv, "--side"], tmp / "streams.log", dict(os.environ))
        self.answers: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.send(spec)

    def on_message(self, msg: dict[str, Any]) -> None:
        self.answers.put_nowait(msg)

    def on_end(self) -> None:
        self.answers.put_nowait(None)

    async def answer(self, within: float) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.answers.get(), within)
        if msg is None:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
            raise RuntimeError(f"the streams' process ended: {tail}")
        return msg

    def ask_wait(self, each: int, within: float, by_probes: bool = False) -> None:
        """Start a wait (side_wait); its answer comes with `answer`."""
        self.send({"cmd": "wait", "each": each, "within": within, "by_probes": by_probes})

    async def lowat(self, n: int) -> None:
        """The streams that are not probes read once `n` bytes wait (1: at once again)."""
        self.send({"cmd": "lowat", "bytes": n})
        await self.answer(30.0)

    async def latencies(self) -> list[int]:
        self.send({"cmd": "latencies"})
        return list((await self.answer(30.0))["latencies"])


# -- the producers ------------------------------------------------------------------------------


def event(kind: str, n: int, t: int | None = None) -> str:
    """A publish body: a broadcast to every stream; `t` (ns, wall clock) for latency."""
    if t is None:
        return f'{{"type":"broadcast","data":{{"k":"{kind}","n":{n}}}}}'
    return f'{{"type":"broadcast","data":{{"k":"{kind}","n":{n},"t":{t}}}}}'


class Feeder:
    """Where a row's events are written: open, put (many, one), close."""

    source = "?"

    def hub_args(self) -> list[str]:
        return []

    async def open(self, hub_port: int) -> None:
        """Once the hub runs (the HTTP feeder posts to it)."""

    async def prepare(self) -> None:
        """Before the hub starts: the table, the stream."""

    async def put_many(self, bodies: list[str]) -> None:
        """As fast as this producer can: returns once every one is committed (acknowledged)."""
        raise NotImplementedError

    async def put_one(self, body: str) -> int:
        """One event in its own transaction (publish): the wall clock (ns) once committed."""
        raise NotImplementedError

    async def close(self) -> None:
        """Drop what `prepare` made (each step bounded)."""


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class PostgresFeeder(Feeder):
    source = "pg"

    def __init__(self, dsn: str, tag: str) -> None:
        self.dsn = dsn
        self.table = f"bench_sources_{tag}"
        self.url = f"{dsn}?table={self.table}&batch={RELAY_BATCH}&poll=1"
        self.conns: list[Any] = []
        self.made = False

    def hub_args(self) -> list[str]:
        return ["--source", self.url]

    async def prepare(self) -> None:
        hub = str(REPO / ".venv" / "bin" / "hub")
        proc = await asyncio.create_subprocess_exec(
            hub, "outbox", "init", self.url, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("hub outbox init did not finish in 30 s") from None
        self.made = True  # (perhaps partly: close drops what there is)
        if proc.returncode != 0:
            raise RuntimeError(f"hub outbox init: {out.decode(errors='replace')[-500:]}")
        import asyncpg

        for _ in range(PRODUCERS):
            self.conns.append(await asyncpg.connect(self.dsn, timeout=10, command_timeout=60))

    async def put_many(self, bodies: list[str]) -> None:
        insert = f'INSERT INTO "{self.table}" (body) SELECT b::jsonb FROM unnest($1::text[]) b'
        todo = iter(chunks(bodies, TX_ROWS))

        async def producer(conn: Any) -> None:
            for chunk in todo:  # (the shared iterator: each chunk once)
                await conn.execute(insert, chunk)

        await asyncio.gather(*(producer(c) for c in self.conns))

    async def put_one(self, body: str) -> int:
        await self.conns[0].execute(f'INSERT INTO "{self.table}" (body) VALUES ($1::jsonb)', body)
        return time.time_ns()

    async def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
        self.conns = []
        if not self.made:
            return
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=10, command_timeout=30)
        try:
            await conn.execute("SET lock_timeout = '10s'")
            t = self.table
            await conn.execute(
                f'DROP TABLE IF EXISTS "{t}", "{t}_dead"; DROP FUNCTION IF EXISTS "{t}_notify"()'
            )
        finally:
            await conn.close()


class NatsFeeder(Feeder):
    source = "nats"

    def __init__(self, server: str, tag: str) -> None:
        self.server = server
        self.stream = f"BENCH_SOURCES_{tag.upper()}"
        self.subjects = f"bench.sources.{tag}.>"
        self.subject = f"bench.sources.{tag}.events"
        self.durable = f"hub_{tag}"
        self.url = f"{server}/{self.stream}?durable={self.durable}"
        self.nc: Any = None
        self.js: Any = None
        self.made = False

    def hub_args(self) -> list[str]:
        return ["--source", self.url]

    async def prepare(self) -> None:
        import nats

        self.nc = await nats.connect(self.server, connect_timeout=5, max_reconnect_attempts=3)
        self.js = self.nc.jetstream(timeout=10)
        await self.js.add_stream(name=self.stream, subjects=[self.subjects])
        self.made = True

    async def put_many(self, bodies: list[str]) -> None:
        publish = self.js.publish
        for burst in chunks(bodies, BURST):
            await asyncio.gather(*(publish(self.subject, b.encode()) for b in burst))

    async def put_one(self, body: str) -> int:
        await self.js.publish(self.subject, body.encode())
        return time.time_ns()

    async def close(self) -> None:
        if self.nc is None:
            return
        try:
            if self.made:
                await asyncio.wait_for(self.js.delete_stream(self.stream), 10)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
            self.nc = None


class HttpFeeder(Feeder):
    source = "http"

    def __init__(self, publisher: str) -> None:
        self.headers = {"Authorization": f"Bearer {publisher}", "Content-Type": "application/json"}
        self.port = 0

    async def open(self, hub_port: int) -> None:
        self.port = hub_port

    async def _post(self, body: bytes) -> None:
        attempt = await post(0, self.port, self.headers, body, timeout=30.0)
        if attempt.outcome != STORED:
            raise RuntimeError(f"POST /publish: {attempt.status} {attempt.detail}")

    async def put_many(self, bodies: list[str]) -> None:
        todo = iter(chunks(bodies, TX_ROWS))

        async def producer() -> None:
            for chunk in todo:
                await self._post(("[" + ",".join(chunk) + "]").encode())

        await asyncio.gather(*(producer() for _ in range(PRODUCERS)))

    async def put_one(self, body: str) -> int:
        await self._post(body.encode())
        return time.time_ns()


# -- the browser ---------------------------------------------------------------------------------

PAGE_JS = """(url) => new Promise((resolve, reject) => {
  window.got = [];
  const es = new EventSource(url);
  es.addEventListener('broadcast', (e) => { window.got.push([Date.now(), e.data]); });
  es.onopen = () => resolve(true);
  setTimeout(() => reject(new Error('the EventSource did not open')), 15000);
})"""


def browser_support() -> Any:
    """tests/browser_support: Chromium is launched exactly as the browser tests launch it."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("browser_support")


class Browser:
    """A headless Chromium (Playwright) and one page on the hub's origin."""

    def __init__(self) -> None:
        self.pw: Any = None
        self.browser: Any = None
        self.page: Any = None

    async def start(self) -> None:
        support = browser_support()
        if not Path(support.CHROMIUM).exists():
            raise RuntimeError(f"{support.CHROMIUM} is missing (apt-get install chromium)")
        from playwright.async_api import async_playwright

        self.pw = await async_playwright().start()
        self.browser = await self.pw.chromium.launch(
            executable_path=support.CHROMIUM, args=support.LAUNCH_ARGS
        )

    async def open(self, port: int, tok: str) -> None:
        """A page on the hub's origin (/healthz), its EventSource open."""
        self.page = await self.browser.new_page()
        await self.page.goto(f"http://127.0.0.1:{port}/healthz", timeout=BROWSER_WITHIN * 1000)
        await self.page.evaluate(PAGE_JS, f"/events?token={tok}")

    async def wait_for(self, count: int, within: float) -> bool:
        try:
            await self.page.wait_for_function(
                "(n) => window.got.length >= n", arg=count, timeout=within * 1000
            )
            return True
        except Exception:  # Playwright's TimeoutError: what arrived is still reported
            return False

    async def received(self) -> list[tuple[int, str]]:
        return [(int(ms), str(data)) for ms, data in await self.page.evaluate("window.got")]

    async def close_page(self) -> None:
        if self.page is not None:
            with contextlib.suppress(Exception):
                await self.page.close()
            self.page = None

    async def stop(self) -> None:
        await self.close_page()
        with contextlib.suppress(Exception):
            if self.browser is not None:
                await asyncio.wait_for(self.browser.close(), 10)
        with contextlib.suppress(Exception):
            if self.pw is not None:
                await asyncio.wait_for(self.pw.stop(), 10)


# -- measuring ---------------------------------------------------------------------------------


Snapshot = dict[int, tuple[str, int, float]]  # pid -> (command name, parent, CPU seconds)
SERVERS = ("postgres", "nats-server", "redis-server")  # by command name, whoever started them


def snapshot() -> Snapshot:
    """Every process's command name, parent and CPU seconds (/proc; nothing is signalled)."""
    out: Snapshot = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        fields = data[data.rindex(b")") + 2 :].split()
        out[int(entry)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def cpu_by_role(
    before: Snapshot, after: Snapshot, roles: dict[int, str], wall: float
) -> dict[str, float]:
    """% of one core each role took between two snapshots: the processes of `roles` (the
    hub, the streams), `producer` (this process), `browser` (this process's other
    descendants: Chromium, Playwright's driver), each of SERVERS, `kernel` (kernel threads:
    softirq work of loopback TCP, mostly) and `others` (the rest: other work on the machine).
    A process that started meanwhile counts whole; one that ended is not seen."""
    me = os.getpid()
    out: dict[str, float] = {}
    for pid, (comm, ppid, cpu) in after.items():
        used = cpu - before[pid][2] if pid in before else cpu
        if pid in roles:
            role = roles[pid]
        elif pid == me:
            role = "producer"
        elif pid == 2 or ppid == 2:
            role = "kernel"
        elif comm in SERVERS:
            role = comm
        else:
            role = "others"
            ancestor, hops = ppid, 0
            while ancestor > 1 and hops < 64:  # (bounded: a chain of parents)
                if ancestor == me:
                    role = "browser"
                    break
                ancestor = after[ancestor][1] if ancestor in after else 0
                hops += 1
        out[role] = out.get(role, 0.0) + 100 * max(0.0, used) / wall
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


SAMPLE = re.compile(r'^hub_source_records_total\{[^}]*outcome="(\w+)"[^}]*\} ([0-9.e+-]+)$', re.M)


async def source_records(port: int) -> dict[str, int]:
    """hub_source_records_total by outcome (summed over the sources: there is one)."""
    url = f"http://127.0.0.1:{port}/metrics"
    _, body = await asyncio.to_thread(servers.http_get, url, 5.0)
    out: dict[str, int] = {}
    for outcome, value in SAMPLE.findall(body.decode()):
        out[outcome] = out.get(outcome, 0) + int(float(value))
    return out


TP_TS = re.compile(rb'^data: \{[^\n]*"ts":\s*(\d+),\s*"data":\s*\{"k":\s*"tp"', re.M)


class Monitor:
    """One more stream (this process's): the `ts` of each throughput event, the time the hub
    took it (decoded and stored it; ms, wall clock), for `taken/s`."""

    def __init__(self) -> None:
        self.count = 0
        self.last_ts = 0
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int, tok: str) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        self.writer = writer
        writer.write(
            f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {tok}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the monitor's stream: {head[:200]!r}")
        self.task = asyncio.ensure_future(self.read(reader))

    async def read(self, reader: asyncio.StreamReader) -> None:
        rest = b""
        while chunk := await reader.read(1 << 18):
            data = rest + chunk
            end = data.rfind(b"\n\n") + 2  # (complete frames only)
            for ts in TP_TS.findall(data, 0, end):
                self.count += 1
                self.last_ts = max(self.last_ts, int(ts))
            rest = data[end:]

    async def taken_at(self, total: int, within: float) -> float | None:
        """The wall clock (s) at which the hub took the last of `total` throughput events."""
        deadline = now() + within
        while self.count < total and now() < deadline:
            await asyncio.sleep(0.01)  # polling inside a deadline
        return self.last_ts / 1000 if self.count >= total else None

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.transport.abort()


async def source_states(port: int) -> dict[str, str]:
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        _, body = await asyncio.to_thread(servers.http_get, url, 2.0)
    except OSError:
        return {}
    states = json.loads(body).get("sources") or {}
    return {str(k): str(v) for k, v in states.items()}


async def wait_source_up(port: int, within: float) -> str:
    """Until /readyz shows every source `up` (its state then; the last one seen at the end)."""
    deadline = now() + within
    states: dict[str, str] = {}
    while now() < deadline:
        states = await source_states(port)
        if states and all(s.startswith("up") for s in states.values()):
            return "up"
        await asyncio.sleep(0.05)  # polling inside a deadline
    return "; ".join(states.values()) or "no source state"


@dataclass
class Row:
    source: str
    broker: str
    streams: int
    events: int
    res: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    attempt: int = 1

    @property
    def ok(self) -> bool:
        r = self.res
        return (
            not self.error
            and not self.notes
            and r.get("connected") == self.streams
            and r.get("lost") == 0
            and r.get("extra") == 0
        )


async def run_row(
    row: Row, feeder: Feeder, args: argparse.Namespace, tmp: Path, secret: str, say: Any
) -> None:
    res = row.res
    hub: servers.HubServer | None = None
    side: Streams | None = None
    browser: Browser | None = None
    monitor: Monitor | None = None
    prefix = f"bench-sources-{secrets.token_hex(4)}"
    try:
        await asyncio.wait_for(feeder.prepare(), 60)
        extra = feeder.hub_args()
        if row.broker == "redis":
            extra += ["--broker", args.redis, "--redis-prefix", prefix]
        # (blocking until it answers /healthz: nothing else runs on this loop yet)
        hub = servers.HubServer(tmp, secret, SERVER_CORE, None, extra, "")
        await feeder.open(hub.port)
        if feeder.source != "http":
            state = await wait_source_up(hub.port, READY_WITHIN)
            if state != "up":
                raise RuntimeError(f"the hub does not read the source: {state[:300]}")
        spec = {
            "host": "127.0.0.1",
            "port": hub.port,
            "streams": row.streams,
            "routing": "plain",
            "kind": "hub",
            "tokens_file": str(tmp / "tokens.json"),
            "probes": min(PROBES, row.streams),
            "connect_rate": CONNECT_RATE,
            "connect_within": SIDE_WITHIN,
            "rcvlowat": 0,
        }
        side = Streams(tmp, spec)
        await side.listen(1 << 24)
        opened = await side.answer(SIDE_WITHIN + row.streams / CONNECT_RATE + 10)
        res["connected"] = opened["connected"]
        if opened["connected"] != row.streams:
            raise RuntimeError(f"{opened['connected']}/{row.streams} streams open: {opened}")
        monitor = Monitor()
        await monitor.open(hub.port, procs.token(secret, "monitor"))

        # warm-up: the source is read and every stream gets what it sends, both ways of
        # writing made once (a statement prepared, a connection opened)
        expected = 2 * WARM
        side.ask_wait(expected, WARM_WITHIN)
        await feeder.put_many([event("warm", i) for i in range(WARM)])
        for i in range(WARM):
            await asyncio.wait_for(feeder.put_one(event("warm", WARM + i)), 30)
        warm = await side.answer(WARM_WITHIN + 10)
        if warm["done"] is None:
            raise RuntimeError(f"warm-up: not every stream got {expected} events: {warm}")
        await side.latencies()  # (none: the warm-up events carry no stamp)

        # throughput
        say(f"  {row.source}/{row.broker}: {row.events:,} events as fast as they go ...")
        bodies = [event("tp", i) for i in range(row.events)]
        expected += row.events
        within = max(60.0, row.events / 200)
        roles = {hub.pid: "hub", side.proc.pid: "streams"}
        if args.lowat > 1:
            await side.lowat(args.lowat)
        spies = profile(args, row, {"hub": hub.pid, "streams": side.proc.pid}, "throughput")
        roles.update((spy.pid, "py-spy") for spy in spies)
        cpu0, busy0, cores0 = snapshot(), procs.busy_s(), loadgen.cores_busy_s()
        side.ask_wait(expected, within, by_probes=args.lowat > 1)
        t0, wall0 = now(), time.time()
        await asyncio.wait_for(feeder.put_many(bodies), within)
        t_put = now()
        done = await side.answer(within + 10)
        t_end = done["done"] if done["done"] is not None else now()
        wall = max(1e-6, t_end - t0)
        res["prod_rate"] = row.events / max(1e-6, t_put - t0)
        taken = await monitor.taken_at(row.events, 30)
        res["taken_rate"] = row.events / max(1e-3, taken - wall0) if taken else None
        res["rate"] = row.events / wall if done["done"] is not None else None
        res["deliv_rate"] = res["rate"] * row.streams if res["rate"] else None
        res["busy"] = 100 * (procs.busy_s() - busy0) / wall
        res["cores"] = {k: 100 * (v - cores0[k]) / wall for k, v in loadgen.cores_busy_s().items()}
        res["cpu"] = cpu = cpu_by_role(cpu0, snapshot(), roles, wall)
        for spy in spies:  # each ends on its own after --profile-s (else here, by its PID)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(spy.wait, args.profile_s + 10)
            servers.stop(spy)
        res["hub_cpu"], res["lg_cpu"] = cpu.get("hub", 0.0), cpu.get("streams", 0.0)
        res["src_cpu"] = cpu.get(SOURCE_SERVER[feeder.source], 0.0)
        res["others"] = cpu.get("others", 0.0)
        res["tp_s"] = wall
        if done["done"] is None:
            row.notes.append(f"throughput: not every stream got every event ({done})")
            res["lost"] = done["lost"]
            return
        say(
            f"    {res['prod_rate']:,.0f} written/s, {res['rate']:,.0f} delivered/s "
            f"({res['deliv_rate']:,.0f} deliveries/s), hub CPU {res['hub_cpu']:.0f}%"
        )

        # latency: a page in a real browser beside the load streams
        lat_n = int(args.rate * args.duration)
        res["lat_events"] = lat_n
        if args.browser:
            browser = Browser()
            await asyncio.wait_for(browser.start(), BROWSER_WITHIN)
            await asyncio.wait_for(
                browser.open(hub.port, procs.token(secret, "browser")), BROWSER_WITHIN
            )
        say(f"  {row.source}/{row.broker}: {lat_n} events at {args.rate:g}/s, one at a time ...")
        expected += lat_n
        if args.lowat > 1:
            await side.lowat(args.lowat)
        acked: dict[int, int] = {}
        commit_ms: list[float] = []
        cpu0, busy0, cores0 = snapshot(), procs.busy_s(), loadgen.cores_busy_s()
        start = now()
        for n in range(lat_n):  # paced: event n leaves at start + n / rate
            delay = start + n / args.rate - now()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.time_ns()
            acked[n] = await asyncio.wait_for(feeder.put_one(event("lat", n, t)), 30)
            commit_ms.append((acked[n] - t) / 1e6)
        lat_wall = max(1e-6, now() - start)
        res["lat_rate"] = lat_n / lat_wall
        if res["lat_rate"] < 0.95 * args.rate:
            row.notes.append(f"latency events written at {res['lat_rate']:.0f}/s only")
        res["lat_busy"] = 100 * (procs.busy_s() - busy0) / lat_wall
        res["lat_cores"] = {
            k: 100 * (v - cores0[k]) / lat_wall for k, v in loadgen.cores_busy_s().items()
        }
        res["lat_cpu"] = cpu = cpu_by_role(cpu0, snapshot(), roles, lat_wall)
        res["lat_hub_cpu"], res["lat_others"] = cpu.get("hub", 0.0), cpu.get("others", 0.0)
        res["commit_p50"] = percentile(commit_ms, 0.5)
        side.ask_wait(expected, 60, by_probes=args.lowat > 1)
        last = await side.answer(70)
        res["lost"], res["extra"] = last["lost"], last["extra"]
        res["disconnects"] = last["disconnects"]
        if last["disconnects"]:
            row.notes.append(f"{last['disconnects']} streams dropped")
        probes = [v / 1000 for v in await side.latencies()]
        res["probe_p50"], res["probe_p99"] = percentile(probes, 0.5), percentile(probes, 0.99)
        res["probe_samples"] = len(probes)
        if browser is not None:
            complete = await browser.wait_for(lat_n, BROWSER_WITHIN)
            got = await browser.received()
            await browser.close_page()
            seen: dict[int, int] = {}
            before, after, store = [], [], []
            for ms, data in got:
                msg = json.loads(data)
                d = msg.get("data") or {}
                if d.get("k") != "lat":
                    continue
                n = int(d["n"])
                seen[n] = seen.get(n, 0) + 1
                before.append(ms - d["t"] / 1e6)
                after.append(ms - acked[n] / 1e6)
                store.append(msg["ts"] - d["t"] / 1e6)
            res["page_events"] = len(before)
            res["p50"], res["p99"] = percentile(before, 0.5), percentile(before, 0.99)
            res["ack_p50"], res["ack_p99"] = percentile(after, 0.5), percentile(after, 0.99)
            res["store_p50"] = percentile(store, 0.5)
            missing = lat_n - len(seen)
            twice = sum(c - 1 for c in seen.values())
            if not complete or missing or twice:
                row.notes.append(f"page: {missing} events missing, {twice} twice")

        if feeder.source != "http":
            records = await source_records(hub.port)
            res["records"] = records
            written = 2 * WARM + row.events + lat_n
            counted = (records.get("published"), records.get("replayed", 0), records.get("dead", 0))
            if counted != (written, 0, 0):
                row.notes.append(f"hub_source_records_total {records}, {written} written")
        if hub.proc is not None and hub.proc.poll() is not None:
            row.notes.append(f"the hub exited: {hub.log_tail()}")
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        if hub is not None:
            row.error += f" [hub log: {hub.log_tail(600)}]"
    finally:
        if monitor is not None:
            monitor.close()
        if browser is not None:
            await browser.stop()
        if side is not None:
            side.close()
        if hub is not None:
            hub.stop()
        try:
            await asyncio.wait_for(feeder.close(), 40)
        except Exception as exc:
            row.notes.append(f"cleanup: {type(exc).__name__}: {exc}"[:200])
        if row.broker == "redis":
            await asyncio.to_thread(drop_prefix, args.redis, prefix)


def profile(
    args: argparse.Namespace, row: Row, pids: dict[str, int], phase: str
) -> list[subprocess.Popen[bytes]]:
    """--profile: py-spy records each of `pids` for --profile-s seconds from now (collapsed
    stacks, <source>-<broker>-<phase>-<name>.txt); the py-spy processes, ended by their PIDs."""
    if args.profile is None:
        return []
    started = []
    for name, pid in pids.items():
        out = args.profile / f"{row.source}-{row.broker}-{phase}-{name}.txt"
        argv = [str(args.py_spy), "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
        argv += ["--duration", str(args.profile_s), "--format", "raw", "-o", str(out)]
        started.append(servers.spawn(argv))
    return started


def drop_prefix(url: str, prefix: str) -> None:
    """Every key of the row's Redis prefix (a bounded SCAN walk)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    except (redis.RedisError, OSError) as exc:
        print(f"bench.sources: Redis keys under {prefix}: not deleted ({exc})", file=sys.stderr)
    finally:
        client.close()


# -- the table ------------------------------------------------------------------------------------


def noisy(row: Row) -> bool:
    """Other work took more than NOISE_PCT of the cores while the row measured."""
    r = row.res
    return measured(row) and max(r.get("others") or 0, r.get("lat_others") or 0) >= NOISE_PCT


def measured(row: Row) -> bool:
    """Whether the throughput run lasted long enough (1 s) for its CPU shares to say much."""
    return bool(row.res.get("tp_s", 0) >= 1.0)


def wait_quiet(max_wait: float, say: Any) -> None:
    """Until both cores are under 10 % busy (sampled over 0.5 s), at most `max_wait` s."""
    start = now()
    load = machine_load(0.5)
    if load < 10:
        return
    say(f"  waiting for a quiet machine ({load:.0f}% busy) ...")
    while load >= 10 and now() - start < max_wait:
        load = machine_load(0.5)
    state = "quiet" if load < 10 else f"still {load:.0f}% busy: going on"
    say(f"  {state} after {now() - start:.0f} s")


SHOWN = ("producer", "browser", "streams", "redis-server", "kernel", "others")


def busy(cores: dict[str, float]) -> str:
    """The hub's core and the other, % busy: 97%/88%."""
    return "/".join(f"{cores.get(f'cpu{c}', 0):.0f}%" for c in (SERVER_CORE, LOADGEN_CORE))


def shares(cpu: dict[str, float]) -> str:
    """The roles the notes show (the hub and the source server have columns)."""
    shown = [role for role in SHOWN if role in cpu]
    return " ".join(f"{role.removesuffix('-server')} {cpu[role]:.0f}%" for role in shown)


COLS = (
    ("source", 6, "<"),
    ("broker", 6, "<"),
    ("streams", 7, ">"),
    ("events", 7, ">"),
    ("prod/s", 7, ">"),
    ("taken/s", 7, ">"),
    ("ev/s", 7, ">"),
    ("deliv/s", 10, ">"),
    ("hubCPU%", 7, ">"),
    ("srcCPU%", 7, ">"),
    ("lgCPU%", 6, ">"),
    ("lat", 4, ">"),
    ("hubCPU%", 7, ">"),
    ("p50ms", 6, ">"),
    ("p99ms", 6, ">"),
    ("ack50", 6, ">"),
    ("ack99", 6, ">"),
    ("store50", 7, ">"),
    ("commit50", 8, ">"),
    ("probe50", 7, ">"),
    ("probe99", 7, ">"),
    ("lost", 4, ">"),
    ("notes", 0, "<"),
)


def cells(row: Row) -> list[str]:
    r = row.res
    notes = []
    if row.error:
        notes.append("ERROR: " + " ".join(row.error.split())[:300])
    notes += row.notes
    if r.get("cpu"):
        notes.append(f"cores {busy(r['cores'])} busy: {shares(r['cpu'])}")
    if r.get("lat_cpu"):
        notes.append(f"latency: cores {busy(r['lat_cores'])} busy: {shares(r['lat_cpu'])}")
    if measured(row) and (r.get("cores") or {}).get(f"cpu{LOADGEN_CORE}", 0) >= 95:
        notes.append("STREAMS-BOUND")
    if noisy(row):
        notes.append("NOISY")
    if row.attempt > 1:
        notes.append(f"attempt {row.attempt}")
    notes.append("OK" if row.ok else "FAILED")
    return [
        row.source,
        row.broker,
        fmt(row.streams),
        fmt(row.events),
        fmt(r.get("prod_rate")),
        fmt(r.get("taken_rate")),
        fmt(r.get("rate")),
        fmt(r.get("deliv_rate")),
        fmt(r.get("hub_cpu")),
        fmt(r.get("src_cpu")) if row.source != "http" else "-",
        fmt(r.get("lg_cpu")),
        fmt(r.get("page_events", r.get("lat_events"))),
        fmt(r.get("lat_hub_cpu")),
        ms(r.get("p50")),
        ms(r.get("p99")),
        ms(r.get("ack_p50")),
        ms(r.get("ack_p99")),
        ms(r.get("store_p50")),
        ms(r.get("commit_p50")),
        ms(r.get("probe_p50")),
        ms(r.get("probe_p99")),
        fmt(r.get("lost")),
        ", ".join(notes),
    ]


def table(rows: list[Row]) -> list[str]:
    def line(values: list[str]) -> str:
        return " ".join(
            f"{v:{al}{w}}" if w else v for v, (_, w, al) in zip(values, COLS, strict=True)
        ).rstrip()

    head = line([c[0] for c in COLS])
    return [head, "-" * len(head), *(line(cells(r)) for r in rows)]


LEGEND = """\
throughput: prod/s = events committed (acknowledged) a second by the producer; taken/s =
  events the hub took a second (first write to the `ts` of the last: when the hub decoded it
  and stored it, ms; read on one more stream); ev/s = events delivered to every stream a second
  (first write to the last probe stream's last event; the other streams are counted after);
  deliv/s = ev/s x streams; hubCPU%/srcCPU%/lgCPU% = the hub's, the source server's (every
  postgres / nats-server process) and the load streams' process's CPU over that time, % of a
  core.
latency (ms), events one at a time at the latency rate: p50/p99 = the browser page's
  Date.now() at the message minus the stamp the producer took just before the INSERT
  (autocommit: its COMMIT) or the publish; ack50/ack99 = minus the moment the COMMIT (the
  publish's ack, the POST's 202) returned instead; store50 = the hub's `ts` (set as it
  takes the event, just before storing it) minus the stamp; commit50 = how long the
  INSERT+COMMIT (publish+ack, POST) took the producer; probe50/99 = as p50/p99, on the load
  streams' probes (raw sockets, up to 200); lat = events the page received; hubCPU% = the
  hub's CPU over the latency events' time.
lost: events a load stream missed (none may be missing or doubled, nor on the page).
notes: "cores N%/M% busy: ..." core 0's (the hub's) and core 1's busy time during the
  throughput run (then the latency events), softirq included, and who took it, % of a core:
  producer (this process), browser (Chromium), streams, redis, kernel (kernel threads:
  loopback softirq), others (other work: the machine is shared); NOISY: others over 15% (the
  row is run again, up to --retries); STREAMS-BOUND: the streams' core was full (>= 95%
  busy): the load streams, not the hub, set ev/s."""


async def main_async(args: argparse.Namespace, say: Any) -> list[Row]:
    tmp = Path(tempfile.mkdtemp(prefix="hub-sources-"))
    rows: list[Row] = []
    try:
        secret = secrets.token_hex(24)
        await asyncio.to_thread(mint_tokens, secret, args.streams, tmp / "tokens.json")
        publisher = procs.token(secret, "bench", publish=True)
        for source in args.sources:
            for broker in args.brokers:
                for attempt in range(1 + args.retries):  # again when other work ran
                    if args.quiet_wait:
                        await asyncio.to_thread(wait_quiet, args.quiet_wait, say)
                    tag = secrets.token_hex(4)
                    feeder: Feeder
                    if source == "pg":
                        feeder = PostgresFeeder(args.pg, tag)
                    elif source == "nats":
                        feeder = NatsFeeder(args.nats, tag)
                    else:
                        feeder = HttpFeeder(publisher)
                    row = Row(source, broker, args.streams, args.events)
                    row.attempt = attempt + 1
                    say(f"{source}/{broker}: {args.streams:,} streams ...")
                    await run_row(row, feeder, args, tmp, secret, say)
                    say("  " + " | ".join(cells(row)))
                    if row.error or not noisy(row):
                        break
                    say("  other work ran on the cores: again")
                rows.append(row)
    finally:
        servers.stop_all()
        procs.drop_logs(tmp, args.keep, say)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sources",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=2000, help="streams a row (2,000)")
    parser.add_argument(
        "--events", type=int, default=20_000, help="events of the throughput run (20,000)"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="latency events/s (50)")
    parser.add_argument("--duration", type=float, default=10.0, help="latency seconds (10)")
    parser.add_argument(
        "--source",
        help="pg, nats, http, both (pg,nats) or all (default; --quick: both), or a "
        "comma-separated list",
    )
    parser.add_argument(
        "--brokers", default="memory", help="memory (default), redis, or memory,redis"
    )
    parser.add_argument("--no-browser", dest="browser", action="store_false", help="no page")
    parser.add_argument(
        "--lowat",
        type=int,
        default=LOWAT,
        help=f"SO_RCVLOWAT of the streams that are not probes ({LOWAT}; 0: read at once)",
    )
    parser.add_argument("--pg", default=PG_URL, help=f"the PostgreSQL server ({PG_URL})")
    parser.add_argument("--nats", default=NATS_URL, help=f"the NATS server ({NATS_URL})")
    parser.add_argument("--redis", default=REDIS_URL, help=f"the Redis broker's ({REDIS_URL})")
    parser.add_argument("--quick", action="store_true", help="20 streams, 50 events (a test)")
    parser.add_argument(
        "--quiet-wait", type=float, help="wait up to S s for a quiet machine before a row"
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="run a row again (up to N times, 2; --quick: 0) when other work ran on the cores",
    )
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the hub and the streams' process with py-spy while the throughput is "
        "measured, into this folder (collapsed stacks, <source>-<broker>-throughput-<who>.txt)",
    )
    parser.add_argument("--profile-s", type=int, default=5, help="seconds recorded (5)")
    parser.add_argument("--py-spy", type=Path, default=Path("py-spy"), help="py-spy to use")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        gc.disable()
        procs.run_main("bench.sources --side", side_main(), RUN_WITHIN)
        return
    if args.quick:
        args.streams, args.events, args.rate, args.duration = 20, 50, 20.0, 1.0
        args.source = args.source or "both"
    args.source = args.source or "all"
    named = {"both": "pg,nats", "all": "pg,nats,http"}.get(args.source, args.source)
    args.sources = [s.strip() for s in named.split(",") if s.strip()]
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    if not args.sources or any(s not in SOURCES for s in args.sources):
        parser.error(f"--source: {args.source!r} (pg, nats, http, both, all)")
    if not args.brokers or any(b not in BROKERS for b in args.brokers):
        parser.error(f"--brokers: {args.brokers!r} (memory, redis)")
    if args.streams < 1 or args.events < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--streams, --events, --rate and --duration must be positive")
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 30.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    procs.enough_descriptors("sources", args.streams)
    t_run, say = procs.sayer()
    header = [
        f"# python -m bench.sources {' '.join(sys.argv[1:])}".rstrip(),
        f"# {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit "
        f"{procs.commit('--untracked-files=no')}",
        f"# {procs.machine()}",
        f"# a hub process a row, pinned to core {SERVER_CORE}; the load streams (bench.loadgen, "
        f"uvloop) pinned to core {LOADGEN_CORE}; the producer, Chromium and the source servers "
        "unpinned",
        f"# throughput: {args.events:,} events; latency: {args.rate:g} events/s for "
        f"{args.duration:g} s{'' if args.browser else ' (no browser: the probes only)'}",
    ]
    for line in header:
        say(line)
    rows = procs.run_main("bench.sources", main_async(args, say), RUN_WITHIN)
    print()
    print("\n".join(header))
    print()
    print("\n".join(table(rows)))
    print(LEGEND)
    wanted = len(args.sources) * len(args.brokers)
    passed = len(rows) == wanted and all(r.ok for r in rows)
    print(f"total: {len(rows)} rows: {'OK' if passed else 'FAILED'} in {now() - t_run:.0f} s")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
