"""``python -m bench.resume_loops``: clients resuming from the oldest id in a loop (issue 18).

Issue 18: 16 clients that resume from the oldest id again and again (each reads the whole
replay, disconnects, comes back with the same Last-Event-ID) pulled 4.26 GB in 7.8 s and
tripled the p50 delay of everyone else. Such a client should be served its share, not more.
This bench measures what they pull and what they cost the ordinary streams.

Processes, loopback only, each started here and ended by its own PID: the hub (memory broker,
``--hub-cmd`` or .venv/bin/hub, pinned alone to the first core when there are two or more),
this process (the publisher and the ordinary streams) and a side process for the looping
clients (``--side``, driven over its stdin and stdout, so that their reads delay neither the
publisher nor the probes' receipts), both on the other cores.

1. The history is filled: broadcasts (type 5) of about 1 KB each (a frame of ~1,050 bytes),
   POSTed as JSON arrays of up to MAX_BATCH events and 1 MiB, until a resume from the first
   event's id (the oldest: the first id of the first 202) is owed ``--history-mb`` MB
   (10^6 bytes). The hub is started with ``--history`` and ``--history-bytes`` large enough to
   hold all of it and every live event of the run (the default 64 MiB holds ~20,000 such
   events, ~21 MB of replay), so that the oldest id stays in the history. One resume from it
   is then read alone, to the end of the last filled frame: its bytes (head and opening
   included) are the replay, the target of every loop below, and its time is reported.
2. ``--streams`` ordinary streams are opened (each its own user, a subscriber JWT with
   ``exp``), and small broadcasts carrying their publish time (``{"t": monotonic ns, "n"}``)
   are published at RATE events/s on one keep-alive connection, one request in flight. The
   first ``--probes`` streams parse every event they receive as it comes (the delay:
   CLOCK_MONOTONIC, shared by every process, at receipt less ``t``); the others are only
   drained (read once RCVLOWAT bytes wait: SO_RCVLOWAT). Once every probe has received an
   event, the baseline period (``--baseline-seconds``) is measured: the probes' delay p50/p99
   over the events published in it, and the hub's CPU (utime + stime in /proc) over it.
3. The loops period (``--seconds``): ``--loops`` clients in the side process, each its own
   user, each connecting ``GET /events`` with ``Last-Event-ID: <oldest id>``, reading as fast
   as it can (a BufferedProtocol into one shared buffer, bytes counted, nothing parsed) until
   it has the replay's bytes, then aborting the connection and starting again at once. The
   side counts the bytes read and the loops completed; the period is the side's own, from
   its first connections to the stop. The probes' delay and the hub's CPU are measured over
   it as in the baseline.
4. After the loops stop, the publisher stops (its publish in flight answered), and every probe
   must receive every event published (bounded by DRAIN_WITHIN); events never received show
   as received < published x probes.

Reported: baseline and during-loops delay p50/p99, the ratios, the replay MB/s pulled by the
loops in all and per loop, the loops completed, the hub's CPU in each period; and, so the
numbers can be judged, this process's loop lateness (a 10 ms ticker) and CPU, the side's CPU,
the machine and the hub's commit (``with uncommitted changes`` when ``git status`` shows any
in hub/ or handlers/; with ``--hub-cmd`` the hub is not this checkout's, and only the command
is said).

Every wait is bounded in time and every loop in count (the whole run by RUN_WITHIN).
``--quick``: 2 MB of history, 100 streams (20 probes), 4 loops, 2 s periods, for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import shlex
import socket
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from bench import procs, servers

REPO = Path(__file__).resolve().parent.parent
SECRET = "resume-loops-bench-secret-".ljust(48, "x")
mono = time.monotonic
mono_ns = time.monotonic_ns

RATE = 100.0  # live events/s published throughout the measured periods
TICK = 0.01  # the publisher sends what it owes every TICK seconds
MAX_LIVE_BATCH = 50  # live events in one publish at most (a publisher that fell behind)
MAX_BATCH = 10_000  # the hub's default --max-batch
MAX_BODY = 1024 * 1024  # the hub's default --max-body
PAD = 930  # characters of padding in a filled event's data: a frame of ~1,050 bytes
EVENT_OVERHEAD = 1024  # what the hub counts for an event beside 2x its frame (hub/history.py)
READ_SIZE = 1 << 20  # the side's shared read buffer (one recv takes up to this)
STREAM_READ = 256 * 1024
RCVLOWAT = 64 * 1024  # an ordinary (not probe) stream is read once this much waits
OPEN_CHUNK = 200  # streams connecting at once
HEAD_WITHIN = 30.0  # seconds for every ordinary stream to get its 200 head
POST_WITHIN = 15.0  # seconds one publish may take
REPLAY_WITHIN = 60.0  # seconds the lone resume may take
FIRST_WITHIN = 10.0  # seconds for every probe to receive its first live event
SIDE_WITHIN = 15.0  # seconds the side process has to answer a command
DRAIN_WITHIN = 15.0  # seconds for every probe to receive what was published in the periods
IDLE_TICKS = 100  # ticks of this process's loop, idle, before the periods (its own lateness)
RETRY_PAUSE = 0.2  # seconds a loop waits after a refusal or a failed connect

LIVE = re.compile(rb'"t":(\d+),"n":(\d+)')
HEAD_END = b"\r\n\r\n"


token = partial(procs.token, SECRET)


def request(port: int, tok: str, last_id: str | None = None) -> bytes:
    resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
    return (
        f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {tok}\r\n"
        f"Accept: text/event-stream\r\n{resume}\r\n"
    ).encode()


def percentile(sorted_vals: Sequence[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def set_rcvlowat(transport: asyncio.BaseTransport | None, n: int) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)


# -- the side process: the looping clients ---------------------------------------------------


class Looper:
    """The side's state: L clients, each reading the replay from the oldest id again and
    again; bytes and loops counted per client."""

    def __init__(self, port: int, spec: dict[str, Any]) -> None:
        self.port = port
        self.target = int(spec["bytes"])
        self.requests = [request(port, t, spec["oldest"]) for t in spec["tokens"]]
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        n = len(self.requests)
        self.bytes = [0] * n
        self.loops = [0] * n
        self.cut = [0] * n  # connections closed by the hub before the replay was read
        self.durations: list[float] = []
        self.refusals: dict[str, int] = {}
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    async def client(self, i: int, until: float) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping and mono() < until:  # bounded: the side's deadline
            done: asyncio.Future[bool] = loop.create_future()
            conn = LoopConn(self, i, done)
            t0 = mono()
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(conn.itself, "127.0.0.1", self.port),
                    HEAD_WITHIN,
                )
            except (OSError, TimeoutError) as exc:
                self.refused(f"connect {type(exc).__name__}")
                await asyncio.sleep(RETRY_PAUSE)  # a pause before retrying, not a synchronisation
                continue
            try:
                complete = await asyncio.wait_for(done, max(0.0, until - mono()))
            except TimeoutError:
                complete = False
            except asyncio.CancelledError:
                transport.abort()
                raise
            transport.abort()
            if complete:
                self.loops[i] += 1
                self.durations.append(mono() - t0)
            elif conn.status not in (0, 200):
                await asyncio.sleep(RETRY_PAUSE)  # after a refusal, as a client would

    def refused(self, kind: str) -> None:
        self.refusals[kind] = self.refusals.get(kind, 0) + 1


class LoopConn(asyncio.BufferedProtocol):
    """One looping connection: the first bytes checked for a 200, then only counted."""

    def __init__(self, looper: Looper, i: int, done: asyncio.Future[bool]) -> None:
        self.looper = looper
        self.i = i
        self.done = done
        self.got = 0
        self.status = 0
        self.head = b""

    def itself(self) -> LoopConn:
        """The protocol factory of its own connection."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.looper.requests[self.i])  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.looper.view

    def buffer_updated(self, nbytes: int) -> None:
        looper = self.looper
        looper.bytes[self.i] += nbytes
        self.got += nbytes
        if not self.status:
            self.head += bytes(looper.buf[: min(nbytes, 64)])
            if len(self.head) >= 12:
                try:
                    self.status = int(self.head[9:12])
                except ValueError:
                    self.status = -1
                if self.status != 200:
                    looper.refused(f"status {self.status}")
                    self.finish(False)
                    return
        if self.got >= looper.target:
            self.finish(True)

    def finish(self, complete: bool) -> None:
        if not self.done.done():
            self.done.set_result(complete)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.status == 200 and not self.looper.stopping:
                self.looper.cut[self.i] += 1
            self.finish(False)


async def side_main(port: int) -> None:
    """Reads its spec (one JSON line), starts the loops, says when; on `stop` (or EOF, or its
    own deadline) stops them and says what they pulled."""
    loop = asyncio.get_running_loop()
    reader = await procs.pipe_reader(sys.stdin, 16 << 20)
    spec = json.loads(await asyncio.wait_for(reader.readline(), SIDE_WITHIN))
    looper = Looper(port, spec)
    until = mono() + float(spec["max_seconds"])
    cpu0, start = procs.self_cpu_s(), mono_ns()
    looper.tasks = [loop.create_task(looper.client(i, until)) for i in range(len(spec["tokens"]))]
    procs.emit({"start": start})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.readline(), max(0.0, until - mono()))  # "stop" or EOF
    stop = mono_ns()
    said = {
        "stop": stop,
        "bytes": list(looper.bytes),
        "loops": list(looper.loops),
        "cut": list(looper.cut),
        "durations": list(looper.durations),
        "refusals": dict(looper.refusals),
        "cpu": procs.self_cpu_s() - cpu0,
    }
    looper.stopping = True
    for task in looper.tasks:
        task.cancel()
    await asyncio.gather(*looper.tasks, return_exceptions=True)
    procs.emit(said)


class Side(procs.Side):
    """The side process, seen from here."""

    def __init__(self, tmp: Path, port: int) -> None:
        argv = [sys.executable, "-m", "bench.resume_loops", "--side", str(port)]
        super().__init__(argv, tmp / "side.log", procs.clean_env(), preexec_fn=servers.raise_nofile)
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def start(self, spec: dict[str, Any]) -> int:
        """Sends the spec; the side's start (monotonic ns) once its loops are launched."""
        await self.listen(64 << 20)
        self.send(spec)
        return int((await self.next())["start"])

    def on_message(self, msg: dict[str, Any]) -> None:
        self.lines.put_nowait(msg)

    async def next(self, within: float = SIDE_WITHIN) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.lines.get(), within)
        except TimeoutError:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"the side process did not answer in {within:g} s:\n{tail}"
            ) from None

    async def stop(self) -> dict[str, Any]:
        self.send({"cmd": "stop"})
        return await self.next()


# -- the hub ---------------------------------------------------------------------------------


class Hub(procs.Hub):
    """The hub process on a free loopback port, pinned to `core` when given; its log in a
    file; ended by its PID (bench.servers.STARTED)."""

    def __init__(self, tmp: Path, cmd: list[str], core: int | None, flags: list[str]) -> None:
        port = servers.free_port()
        env = procs.clean_env()
        env["HUB_JWT_SECRET"] = SECRET
        argv = [*cmd, "--host", "127.0.0.1", "--port", str(port), *flags]
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        super().__init__(argv, port, tmp / f"hub-{port}.log", env)  # (taskset, env: same PID)


class Poster:
    """POST /publish on one keep-alive connection, one request in flight."""

    def __init__(self, port: int, publisher_token: str) -> None:
        self.port = port
        self.auth = publisher_token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, Any]:
        for attempt in range(2):  # once more on a fresh connection if the kept one was closed
            try:
                return await asyncio.wait_for(self._post(body), POST_WITHIN)
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.close()
                if attempt:
                    raise RuntimeError(f"publish failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def _post(self, body: bytes) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            (
                f"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {self.auth}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        head = await self.reader.readuntil(HEAD_END)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        answer = await self.reader.readexactly(length) if length else b""
        return status, json.loads(answer) if answer else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# -- the ordinary streams and the probes -----------------------------------------------------


class Streams:
    """The ordinary streams of one run: their count, their heads, the probes' delays."""

    def __init__(self, port: int, n: int, probes: int) -> None:
        self.port = port
        self.n = n
        self.probes = probes
        self.buf = bytearray(STREAM_READ)
        self.view = memoryview(self.buf)
        self.conns: list[Stream] = []
        self.opened = 0
        self.all_open = asyncio.Event()
        self.errors: list[str] = []
        self.cut = 0
        self.closing = False
        self.lat_t = array("q")  # each receipt by a probe: the event's publish time (ns)
        self.lat_v = array("q")  # and its delay (ns)
        self.target_n = -1  # the probes are waited for until each has event n >= this
        self.reached = 0
        self.all_reached = asyncio.Event()

    def head_ok(self) -> None:
        self.opened += 1
        if self.opened == self.n:
            self.all_open.set()

    def wait_for(self, n: int) -> None:
        """all_reached is set once every probe has received live event n (or later)."""
        self.all_reached.clear()
        self.target_n = n
        self.reached = sum(1 for c in self.conns[: self.probes] if c.last_n >= n)
        if self.reached >= self.probes:
            self.all_reached.set()

    def crossed(self) -> None:
        self.reached += 1
        if self.reached >= self.probes:
            self.all_reached.set()

    def close(self) -> None:
        self.closing = True
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()


class Stream(asyncio.BufferedProtocol):
    """One ordinary stream: a probe parses what it receives as it comes; any other is read
    once RCVLOWAT bytes wait, and only counted."""

    def __init__(self, streams: Streams, index: int, tok: str) -> None:
        self.streams = streams
        self.index = index
        self.probe = index < streams.probes
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.head = b""
        self.pbuf = b""
        self.last_n = -1
        self.request = request(streams.port, tok)

    def itself(self) -> Stream:
        """The protocol factory of its own connection."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.streams.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.open and not self.probe:
            return  # drained, not parsed
        now = mono_ns()
        data = bytes(self.streams.buf[:nbytes])
        if not self.open:
            head = self.head + data
            end = head.find(HEAD_END)
            if end < 0:
                self.head = head
                return
            self.head = b""
            status = head[:end].split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                streams = self.streams
                if len(streams.errors) < 5:
                    streams.errors.append((status + b" " + head[end + 4 : end + 200]).decode())
                if self.transport is not None:
                    self.transport.abort()
                return
            self.open = True
            if not self.probe:
                set_rcvlowat(self.transport, RCVLOWAT)
            self.streams.head_ok()
            data = head[end + 4 :]
            if not self.probe:
                return
        buf = self.pbuf + data if self.pbuf else data
        end = buf.rfind(b"\n\n")
        if end >= 0:
            streams = self.streams
            last = self.last_n
            for m in LIVE.finditer(buf, 0, end):
                t = int(m[1])
                streams.lat_t.append(t)
                streams.lat_v.append(now - t)
                last = int(m[2])
            if last >= streams.target_n > self.last_n:
                self.last_n = last
                streams.crossed()
            self.last_n = last
            buf = buf[end + 2 :]
        self.pbuf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open and not self.streams.closing:
            self.streams.cut += 1


async def open_streams(streams: Streams, tokens: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for start in range(0, len(tokens), OPEN_CHUNK):
        end = min(len(tokens), start + OPEN_CHUNK)
        batch = [Stream(streams, i, tokens[i]) for i in range(start, end)]
        streams.conns += batch
        results = await asyncio.gather(
            *(loop.create_connection(c.itself, "127.0.0.1", streams.port) for c in batch),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                streams.errors.append(f"connect: {r!r}"[:200])
    try:
        await asyncio.wait_for(streams.all_open.wait(), HEAD_WITHIN)
    except TimeoutError:
        raise RuntimeError(
            f"{streams.opened}/{streams.n} streams open after {HEAD_WITHIN:g} s: "
            f"{streams.errors[:3]}"
        ) from None


class Publisher:
    """Live broadcasts at RATE events/s, each carrying its publish time and number."""

    def __init__(self, poster: Poster) -> None:
        self.poster = poster
        self.t = array("q")  # publish time (monotonic ns) of event n
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def run(self, deadline: float) -> None:
        start, sent = mono(), 0
        while not self.stop.is_set() and mono() < deadline:  # bounded: the run's deadline
            owed = min(MAX_LIVE_BATCH, int(RATE * (mono() - start)) - sent)
            if owed < 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), TICK)  # pacing
                continue
            t = mono_ns()
            events = [{"type": 5, "data": {"t": t, "n": sent + i}} for i in range(owed)]
            status, answer = await self.poster.post(json.dumps(events).encode())
            if status != 202:
                self.failures.append(f"{status} {answer}"[:200])
                continue
            self.t.extend([t] * owed)
            sent += owed


class Lag:
    """How late this process's event loop runs: a TICK ticker's lateness, with its time."""

    def __init__(self) -> None:
        self.at = array("q")
        self.late = array("q")
        self.stop = False

    async def run(self, deadline: float, ticks: int | None = None) -> None:
        while not self.stop and mono() < deadline:  # bounded: the run's deadline
            if ticks is not None and len(self.late) >= ticks:
                return
            t0 = mono_ns()
            await asyncio.sleep(TICK)  # the ticker whose lateness is measured
            t1 = mono_ns()
            self.at.append(t1)
            self.late.append(t1 - t0 - int(TICK * 1e9))

    async def idle(self, ticks: int) -> float:
        """Its p99 lateness (ms) over `ticks` ticks of an idle loop: the machine's own."""
        await self.run(mono() + ticks * TICK * 5, ticks)
        p99 = percentile(sorted(self.late), 0.99) / 1e6
        self.at, self.late = array("q"), array("q")
        return p99

    def p99_ms(self, a: int, b: int) -> float:
        vals = sorted(v for t, v in zip(self.at, self.late, strict=True) if a <= t <= b)
        return percentile(vals, 0.99) / 1e6


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Period:
    name: str
    seconds: float = 0.0
    published: int = 0
    expected: int = 0  # published x probes
    received: int = 0  # of those, received by the probes
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    hub_cpu: float = 0.0  # percent of one core
    bench_cpu: float = 0.0
    lag_p99_ms: float = 0.0


@dataclass
class Result:
    hub_argv: list[str]
    hub_core: int | None
    fill_events: int = 0
    fill_s: float = 0.0
    oldest: str = ""
    replay_bytes: int = 0
    alone_s: float = 0.0
    streams: int = 0
    probes: int = 0
    loops: int = 0
    periods: list[Period] = field(default_factory=list)
    pulled: list[int] = field(default_factory=list)  # bytes per looping client
    completed: list[int] = field(default_factory=list)  # loops per looping client
    loop_cut: int = 0
    durations: list[float] = field(default_factory=list)
    loop_refusals: dict[str, int] = field(default_factory=dict)
    side_cpu: float = 0.0
    idle_lag_ms: float = 0.0
    stream_errors: list[str] = field(default_factory=list)
    streams_cut: int = 0
    publish_failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def fill(
    poster: Poster, history_mb: float, say: Callable[[str], None]
) -> tuple[str, str, int]:
    """Publish ~1 KB broadcasts until a resume from the first is owed history_mb MB: the
    first id, the last id and the events published."""
    one = len(json.dumps({"type": 5, "data": {"i": 0, "pad": "x" * PAD}})) + 16
    per_post = min(MAX_BATCH, (MAX_BODY - 2) // (one + 1))
    frame = PAD + 120  # a frame's bytes, about (its id, name, envelope and data)
    total = max(2, int(history_mb * 1e6 / frame) + 1)
    first = last = ""
    sent = 0
    for _ in range(total // per_post + 2):  # bounded: the posts needed
        if sent >= total:
            break
        n = min(per_post, total - sent)
        events = [{"type": 5, "data": {"i": sent + i, "pad": "x" * PAD}} for i in range(n)]
        status, answer = await poster.post(json.dumps(events).encode())
        if status != 202:
            raise RuntimeError(f"fill: publish answered {status}: {str(answer)[:300]}")
        first = first or answer["ids"][0]
        last = answer["ids"][-1]
        sent += n
    say(f"filled: {sent} events of ~{frame} bytes, oldest id {first}, newest {last}")
    return first, last, sent


async def replay_alone(port: int, oldest: str, last: str) -> tuple[int, float]:
    """One resume from the oldest id, read to the end of the last filled frame: its bytes
    (head and opening included) and how long it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 << 20)
    try:
        t0 = mono()
        writer.write(request(port, token("rl-measure"), oldest))
        needle = f"id: {last}\n".encode()
        got = 0
        tail = b""
        deadline = t0 + REPLAY_WITHIN
        while mono() < deadline:  # bounded in time
            chunk = await asyncio.wait_for(reader.read(STREAM_READ), max(0.0, deadline - mono()))
            if not chunk:
                raise RuntimeError(f"the lone resume closed after {got} bytes")
            window = tail + chunk
            at = window.find(needle)
            if at >= 0:
                end = window.find(b"\n\n", at)
                if end >= 0:
                    return got - len(tail) + end + 2, mono() - t0
                tail = window[at:]  # the frame's end comes next
            else:
                tail = window[-len(needle) :]
            got += len(chunk)
        raise RuntimeError(f"the lone resume read {got} bytes in {REPLAY_WITHIN:g} s, not all")
    finally:
        writer.close()


def measure(
    period: Period, streams: Streams, pub: Publisher, a: int, b: int, hub_cpu: float
) -> None:
    """The probes' receipts of the events published in [a, b] (monotonic ns)."""
    period.seconds = (b - a) / 1e9
    period.published = sum(1 for t in pub.t if a <= t <= b)
    period.expected = period.published * streams.probes
    vals = sorted(v / 1e6 for t, v in zip(streams.lat_t, streams.lat_v, strict=True) if a <= t <= b)
    period.received = len(vals)
    period.p50_ms = percentile(vals, 0.5)
    period.p99_ms = percentile(vals, 0.99)
    period.max_ms = vals[-1] if vals else float("nan")
    period.hub_cpu = 100 * hub_cpu / period.seconds if period.seconds else 0.0


async def run(args: argparse.Namespace, say: Callable[[str], None]) -> Result:
    hub_core, rest = procs.cores()
    if hub_core is not None:
        os.sched_setaffinity(0, rest)  # this process and the side; the hub alone on its core
    tmp = Path(tempfile.mkdtemp(prefix="hub-resume-loops-"))
    frame_cost = 2 * (PAD + 140) + EVENT_OVERHEAD
    fill_events = int(args.history_mb * 1e6 / (PAD + 120)) + 2
    live = int(RATE * (args.baseline_seconds + args.seconds + 60))
    keep = fill_events + live + 1000
    flags = ["--history", str(keep), "--history-bytes", str(max(64 << 20, keep * frame_cost))]
    flags += ["--max-streams", str(args.streams + 2 * args.loops + 64)]
    flags += ["--shutdown-spread", "0", "--shutdown-timeout", "5"]
    cmd = shlex.split(args.hub_cmd) if args.hub_cmd else [str(REPO / ".venv" / "bin" / "hub")]
    hub = Hub(tmp, cmd, hub_core, flags)
    result = Result(hub.argv, hub_core, streams=args.streams, loops=args.loops)
    result.probes = min(args.probes, args.streams)
    deadline = mono() + run_within(args)
    poster = Poster(hub.port, token("rl-publisher", publish=True))
    streams = Streams(hub.port, args.streams, result.probes)
    side: Side | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await hub.wait_ready()
        say(f"hub ready on port {hub.port}, core {hub_core}; this process on {rest}")
        t = mono()
        result.oldest, last, result.fill_events = await fill(poster, args.history_mb, say)
        result.fill_s = mono() - t
        result.replay_bytes, result.alone_s = await replay_alone(hub.port, result.oldest, last)
        say(
            f"one resume alone: {result.replay_bytes / 1e6:.1f} MB in {result.alone_s:.2f} s "
            f"({result.replay_bytes / 1e6 / result.alone_s:.0f} MB/s)"
        )
        tokens = [token(f"rl-stream-{i}") for i in range(args.streams)]
        loop_tokens = [token(f"rl-loop-{i}") for i in range(args.loops)]
        t = mono()
        await open_streams(streams, tokens)
        say(f"{args.streams} streams open in {mono() - t:.2f} s ({result.probes} probes)")
        gc.collect()
        gc.freeze()  # what is set up stays out of the collections (shorter pauses)

        pub = Publisher(poster)
        lag = Lag()
        result.idle_lag_ms = await lag.idle(IDLE_TICKS)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(pub.run(deadline)), loop.create_task(lag.run(deadline))]
        streams.wait_for(0)
        try:
            await asyncio.wait_for(streams.all_reached.wait(), FIRST_WITHIN)
        except TimeoutError:
            raise RuntimeError(
                f"{streams.reached}/{result.probes} probes received a live event in "
                f"{FIRST_WITHIN:g} s; publish failures: {pub.failures[:3]}"
            ) from None

        base = Period("baseline")
        a, cpu_a, me_a = mono_ns(), procs.cpu_s(hub.pid), procs.self_cpu_s()
        await asyncio.sleep(args.baseline_seconds)  # the measured period
        b, cpu_b, me_b = mono_ns(), procs.cpu_s(hub.pid), procs.self_cpu_s()
        base.bench_cpu = 100 * (me_b - me_a) / ((b - a) / 1e9)
        say(f"baseline period done ({(b - a) / 1e9:.1f} s)")

        side = Side(tmp, hub.port)
        spec = {
            "oldest": result.oldest,
            "bytes": result.replay_bytes,
            "tokens": loop_tokens,
            "max_seconds": args.seconds + SIDE_WITHIN,
        }
        during = Period("loops")
        c = await side.start(spec)
        cpu_c, me_c = procs.cpu_s(hub.pid), procs.self_cpu_s()
        await asyncio.sleep(max(0.0, args.seconds - (mono_ns() - c) / 1e9))  # the period
        cpu_d, me_d = procs.cpu_s(hub.pid), procs.self_cpu_s()
        report = await side.stop()
        d = int(report["stop"])
        during.bench_cpu = 100 * (me_d - me_c) / ((d - c) / 1e9)
        result.pulled = [int(x) for x in report["bytes"]]
        result.completed = [int(x) for x in report["loops"]]
        result.loop_cut = sum(int(x) for x in report["cut"])
        result.durations = sorted(float(x) for x in report["durations"])
        result.loop_refusals = dict(report["refusals"])
        result.side_cpu = float(report["cpu"])
        say(f"loops period done ({(d - c) / 1e9:.1f} s): {sum(result.completed)} loops")

        pub.stop.set()  # (its publish in flight is answered first: every event is counted)
        lag.stop = True
        await asyncio.gather(*tasks)
        streams.wait_for(len(pub.t) - 1)
        try:
            await asyncio.wait_for(streams.all_reached.wait(), DRAIN_WITHIN)
        except TimeoutError:
            result.notes.append(
                f"only {streams.reached}/{result.probes} probes received every event published "
                f"within {DRAIN_WITHIN:g} s of the end"
            )
        measure(base, streams, pub, a, b, cpu_b - cpu_a)
        measure(during, streams, pub, c, d, cpu_d - cpu_c)
        base.lag_p99_ms = lag.p99_ms(a, b)
        during.lag_p99_ms = lag.p99_ms(c, d)
        result.periods = [base, during]
        result.stream_errors = streams.errors
        result.streams_cut = streams.cut
        result.publish_failures = pub.failures
        if hub.proc.poll() is not None:
            result.notes.append(f"the hub exited ({hub.proc.poll()}):\n{hub.tail()}")
        return result
    finally:
        for task in tasks:
            task.cancel()
        streams.close()
        poster.close()
        if side is not None:
            side.close()
        await asyncio.sleep(0)  # the aborts go out before the hub is stopped
        await asyncio.to_thread(hub.stop)
        procs.drop_logs(tmp, args.keep, say)


def run_within(args: argparse.Namespace) -> float:
    """The whole run's bound: setup, the two periods, the drain."""
    return 120.0 + 2 * float(args.baseline_seconds + args.seconds) + float(args.history_mb)


# -- the report ------------------------------------------------------------------------------


def checkout() -> str:
    """This checkout's commit, `with uncommitted changes` when hub/ or handlers/ has any."""
    return procs.commit("--", "hub", "handlers", unknown="unknown")


def report(r: Result, hub_cmd: str | None) -> tuple[list[str], bool]:
    lines: list[str] = []
    if hub_cmd:
        lines.append(f"hub: --hub-cmd {hub_cmd!r}, not this checkout (at {checkout()})")
    else:
        lines.append(f"hub: this checkout at {checkout()}")
    lines.append(f"hub argv: {' '.join(a for a in r.hub_argv)}")
    lines.append(
        f"history: {r.fill_events} events filled in {r.fill_s:.1f} s; a resume from the oldest "
        f"id ({r.oldest}) is owed {r.replay_bytes / 1e6:.1f} MB, read alone in "
        f"{r.alone_s:.2f} s ({r.replay_bytes / 1e6 / r.alone_s:.0f} MB/s)"
    )
    lines.append(
        f"streams: {r.streams} ordinary ({r.probes} probes), {RATE:g} live events/s; "
        f"{r.loops} looping clients in the loops period"
    )
    lines.append(
        f"this process's loop, idle (all streams open, nothing published): late p99 "
        f"{r.idle_lag_ms:.2f} ms (a {TICK * 1000:g} ms ticker: the machine's own jitter)"
    )
    lines.append("")
    for p in r.periods:
        lines.append(
            f"{p.name}: {p.seconds:.1f} s, {p.published} events published, probes received "
            f"{p.received}/{p.expected}; delay p50 {p.p50_ms:.2f} ms p99 {p.p99_ms:.2f} ms "
            f"max {p.max_ms:.1f} ms; hub CPU {p.hub_cpu:.0f}%; this process CPU "
            f"{p.bench_cpu:.0f}%, its loop late p99 {p.lag_p99_ms:.2f} ms"
        )
    ok = len(r.periods) == 2
    if ok:
        base, during = r.periods
        lines.append(
            f"ratio (loops / baseline): p50 x{during.p50_ms / base.p50_ms:.2f}, "
            f"p99 x{during.p99_ms / base.p99_ms:.2f}"
        )
        total = sum(r.pulled)
        mbs = total / 1e6 / during.seconds
        per = [b / 1e6 / during.seconds for b in r.pulled] or [0.0]
        durations = r.durations
        lines.append(
            f"replay pulled: {total / 1e6:.1f} MB in {during.seconds:.1f} s, {mbs:.1f} MB/s in "
            f"all, {mbs / max(1, r.loops):.1f} MB/s per loop (min {min(per):.1f}, max "
            f"{max(per):.1f}); loops completed {sum(r.completed)} (per client min "
            f"{min(r.completed or [0])}, max {max(r.completed or [0])}); a loop took p50 "
            f"{percentile(durations, 0.5):.2f} s, max {durations[-1] if durations else 0:.2f} s"
        )
        lines.append(
            f"the side process (the loops): CPU {100 * r.side_cpu / during.seconds:.0f}%; "
            f"loops cut by the hub {r.loop_cut}; refusals "
            f"{', '.join(f'{v} x {k}' for k, v in sorted(r.loop_refusals.items())) or 'none'}"
        )
        ok = all(p.received > 0 for p in r.periods) and sum(r.completed) > 0
    if r.stream_errors:
        lines.append(f"stream errors: {r.stream_errors[:5]}")
    if r.streams_cut:
        lines.append(f"ordinary streams cut by the hub: {r.streams_cut}")
    if r.publish_failures:
        lines.append(f"publishes refused: {len(r.publish_failures)} ({r.publish_failures[0]})")
    lines += [f"note: {n}" for n in r.notes]
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.resume_loops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--loops", type=int, default=16, help="looping clients (16)")
    parser.add_argument(
        "--history-mb",
        type=float,
        default=32.0,
        help="MB (10^6 bytes) a resume from the oldest id is owed (32)",
    )
    parser.add_argument("--streams", type=int, default=1000, help="ordinary streams (1000)")
    parser.add_argument("--probes", type=int, default=100, help="of those, probes (100)")
    parser.add_argument("--seconds", type=float, default=8.0, help="the loops period (8)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="the baseline period (5)"
    )
    parser.add_argument(
        "--hub-cmd",
        help="the command that starts the hub instead of .venv/bin/hub (then --host, --port "
        "and the flags are added), e.g. 'env PYTHONPATH=/tmp/old /work/main/.venv/bin/hub'",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 MB of history, 100 streams (20 probes), 4 loops, 2 s periods (a smoke test)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument("--side", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with asyncio.Runner(loop_factory=procs.event_loop_factory()) as runner:
            runner.run(side_main(args.side))
        return
    if args.quick:
        args.history_mb, args.streams, args.probes, args.loops = 2.0, 100, 20, 4
        args.seconds = args.baseline_seconds = 2.0
    if args.loops < 1 or args.streams < 1 or args.probes < 1:
        parser.error("--loops, --streams and --probes must be at least 1")
    if args.seconds <= 0 or args.baseline_seconds <= 0 or args.history_mb <= 0:
        parser.error("--seconds, --baseline-seconds and --history-mb must be positive")
    servers.raise_nofile()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < args.streams + 200:
        print(f"resume_loops: {args.streams} streams need more descriptors than {soft}")
        sys.exit(2)

    t_run, say = procs.sayer()

    say(
        f"bench.resume_loops: {args.loops} loops, {args.history_mb:g} MB of replay, "
        f"{args.streams} streams, periods {args.baseline_seconds:g} s + {args.seconds:g} s; "
        f"{procs.machine(memory=False)}"
    )
    result = procs.run_main("resume_loops", run(args, say), run_within(args))
    lines, ok = report(result, args.hub_cmd)
    print()
    print("\n".join(lines))
    print(f"{'OK' if ok else 'FAILED'} in {mono() - t_run:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
