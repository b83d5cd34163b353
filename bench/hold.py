"""``python -m bench.hold``: the catch-up hold (``--catch-up-wait``) against a reconnect storm.

With the Redis broker, a stream whose Last-Event-ID is of this node's epoch but newer than all
the node has read waits up to ``--catch-up-wait`` seconds for the node's feed to read that far,
then resumes exactly; still behind, it is answered 503 with Retry-After. A node whose feed has
not heard from Redis for 1.5 s refuses every new stream. This bench measures what that costs
and buys when a whole fleet reconnects at once to a node that is behind.

The system, real processes on loopback only: one redis-server (bench.servers.RedisServer), hub
A on it directly, hub B on the same Redis and key prefix through a Blackhole proxy
(bench.faults_clients). The proxy and a publisher run in a side process of their own
(``--side``, driven over its stdin and stdout) so that the storm's event loop delays neither
B's link nor the publishing: the publisher sends broadcasts (type 5) to A at RATE events/s
throughout, one request in flight (so the acknowledged ids arrive in id order), and reports
every acknowledged id. With two cores or more, B is pinned alone to the first core and
everything else (Redis, A, the side process, this process) to the others.

Each cell starts a fresh B with its own ``--catch-up-wait``, then:

1. publishes one event to A and waits until B has read it (a probe stream resumed from it);
2. blocks B's link (not in the baseline) and publishes PRE_EVENTS more to A: B is behind them;
3. the storm: N streams opened on B as fast as this one event loop can, each with
   Last-Event-ID = the newest id acknowledged by A, each its own user; the side process heals
   B's link H ms after the storm began (timed there, not in this busy loop);
4. each client: on a 503 (or 429) waits its Retry-After plus up to 1 s of jitter (EventSource
   with the hub's retry) and tries again with the same Last-Event-ID, MAX_TRIES at most; on a
   200 it reads its stream;
5. MARK_AFTER s after the last stream opened, a marked event is published; every stream
   reads up to it. A stream passes when the ids of the events it received (its replay and
   what came live) are exactly the publisher's acknowledged ids after its Last-Event-ID up to
   the mark, in order: anything else is counted as lost (owed, never came), double (an id at
   or before Last-Event-ID, or twice) or out of order; a `reset` event is counted too.

The clients are cheap enough not to be the bottleneck: an open stream is read only once
RCVLOWAT bytes wait (SO_RCVLOWAT), and its bytes are compared at C speed with one canonical
copy that every stream resumed from the same id is owed (the hub encodes each frame once);
that copy is parsed once, and a stream that differs from it is parsed on its own (Client).

Reported per cell: the time from the storm's start until all N streams are open; how many
opened on their first try, the 503s and the retries; p50/p99 of the time each client waited
for its 200; lost, doubles, resets (all must be 0); B's RSS before the storm and its peak
during it (VmHWM after clear_refs, or the largest VmRSS sampled); B's CPU seconds from the
storm's start until all its streams were open. Then, per cell: the refusals by kind (and the
first body of each), this process's CPU and how late its loop ran, and the CPU the rest of
the machine used meanwhile (other processes, softirq): the numbers are only as clean as that.

Every process is started here and ended by its own PID; every wait is bounded in time, every
retry in count, and no cell starts past RUN_BUDGET. ``--quick``: 50 streams; ``--cells``:
some cells only; ``--keep``: keep the logs; ``--b-direct``: the baseline with B on Redis
directly (is the proxy what delays B?).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import procs, servers
from bench.faults_check import Attempt
from bench.faults_clients import Blackhole
from bench.rawconn import (
    HEAD_END,
    Conn,
    answer_head,
    close_all,
    events_request,
    retry_after,
)

SECRET = "hold-bench-secret-".ljust(48, "x")
now = time.monotonic

RATE = 200.0  # events/s published to A throughout
PRE_EVENTS = 5  # published to A while B is cut off, before the storm
MAX_TRIES = 10  # attempts per client
LAUNCH_CHUNK = 500  # first attempts started in one turn of the loop
HEAD_TIMEOUT = 15.0  # seconds an attempt waits to connect and get its answer's head
STORM_WITHIN = 40.0  # seconds a storm may take in all (10 tries of up to 4 s each)
MARK_AFTER = 0.5  # seconds after the last stream opened before the closing mark
DRAIN_WITHIN = 15.0  # seconds every open stream has to read up to the mark
SIDE_WITHIN = 10.0  # seconds the side process has to answer a command
PROBE_WITHIN = 10.0
RCVLOWAT = 64 * 1024  # an open stream is read once this much waits (fewer, larger reads)
RAW_CAP = 1 << 20  # bytes of ids kept of a stream that differs from the others
RUN_BUDGET = 180.0  # seconds after which no further cell starts (it is reported not run)
RUN_WITHIN = 420.0  # the whole run, whatever happens

# An event the publisher sent: its id, then its name (a `reset` or anything else is counted).
EVENT_ID = re.compile(rb"id: ([^\n]*)\nevent: broadcast\n")
OPENING_ID = re.compile(rb"(?m)^id: ([^\n]*)$")


@dataclass(frozen=True)
class Cell:
    name: str
    hold_ms: int | None  # None: the link is never blocked
    wait: float  # B's --catch-up-wait


CELLS = [
    Cell("1 baseline", None, 1.0),
    Cell("2 hold", 300, 1.0),
    Cell("3 refuse", 300, 0.0),
    Cell("4 unready", 3000, 1.0),
]


token = partial(procs.token, SECRET)


def key(event_id: bytes | str) -> tuple[int, int] | None:
    """(ms, seq) of `<ms>-<seq>-<epoch>`, or None."""
    text = event_id.decode() if isinstance(event_id, bytes) else event_id
    parts = text.split("-")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


# -- the side process: B's proxy and the publisher --------------------------------------------


async def side_main(upstream: int, a_port: int, rate: float) -> None:
    """The proxy between B and Redis, and the publisher to A; commands on stdin (one JSON
    object a line), reports on stdout. Ends when stdin does."""
    loop = asyncio.get_running_loop()
    proxy = await Blackhole(upstream).start()

    def failed(attempt: Attempt, tag: str | None) -> None:
        procs.emit({"fail": attempt.status, "detail": attempt.detail, "tag": tag})

    publisher = procs.Paced(a_port, os.environ["HOLD_TOKEN"], rate, failed)
    procs.emit({"proxy": proxy.port})

    def heal() -> None:
        proxy.heal()
        procs.emit({"healed": now()})

    publisher.start()
    reader = await procs.pipe_reader(sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            what = cmd["cmd"]
            if what == "block":
                proxy.block()
                procs.emit({"blocked": now()})
            elif what == "heal_after":
                loop.call_later(float(cmd["s"]), heal)
            elif what == "heal":
                heal()
            elif what == "mark":
                publisher.marks.append((int(cmd["n"]), str(cmd["tag"])))
    finally:
        await publisher.close()
        await proxy.close()


class Side(procs.PublishingSide):
    """The side process, seen from here: commands in, acknowledged ids out (in id order)."""

    def __init__(self, tmp: Path, redis_port: int, a_port: int, publisher_token: str) -> None:
        env = procs.clean_env()
        env["HOLD_TOKEN"] = publisher_token
        argv = [sys.executable, "-m", "bench.hold", "--side", str(redis_port), str(a_port)]
        argv += ["--rate", str(RATE)]
        super().__init__(argv, tmp / "side.log", env)
        self.failures: list[str] = []
        self.healed: asyncio.Future[float] | None = None
        self.blocked: asyncio.Future[float] | None = None
        self.proxy_port: asyncio.Future[int] | None = None

    async def start(self) -> int:
        self.proxy_port = asyncio.get_running_loop().create_future()
        await self.listen(1 << 20)
        return await asyncio.wait_for(self.proxy_port, SIDE_WITHIN)

    def on_message(self, msg: dict[str, Any]) -> None:
        if "ack" in msg:
            self.acked(msg)
        elif "fail" in msg:
            self.failures.append(f"{msg['fail']} {msg['detail']}"[:200])
            if msg["tag"]:
                self.mark_failed(msg["tag"], f"mark not published: {msg['detail']}")
        elif "healed" in msg and self.healed is not None and not self.healed.done():
            self.healed.set_result(float(msg["healed"]))
        elif "blocked" in msg and self.blocked is not None and not self.blocked.done():
            self.blocked.set_result(float(msg["blocked"]))
        elif "proxy" in msg and self.proxy_port is not None:
            self.proxy_port.set_result(int(msg["proxy"]))

    async def mark(self, count: int, tag: str) -> list[str]:
        """Publish `count` events tagged `tag` through the publisher's queue; their ids."""
        return await self.mark_once(count, tag, SIDE_WITHIN)

    async def block(self) -> float:
        self.blocked = asyncio.get_running_loop().create_future()
        self.send({"cmd": "block"})
        return await asyncio.wait_for(self.blocked, SIDE_WITHIN)

    def heal_after(self, seconds: float) -> None:
        self.healed = asyncio.get_running_loop().create_future()
        self.send({"cmd": "heal_after", "s": seconds})


# -- the hubs --------------------------------------------------------------------------------


class Hub(procs.Hub):
    """One hub process on a free loopback port, pinned to `core` when given; logs in a file;
    ended by its PID (bench.servers.STARTED)."""

    def __init__(self, tmp: Path, name: str, core: int | None, flags: list[str]) -> None:
        port = servers.free_port()
        env = procs.clean_env()
        env["HUB_JWT_SECRET"] = SECRET
        argv = [sys.executable, "-m", "handlers.app", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--shutdown-spread", "0", "--shutdown-timeout", "5"]
        argv += flags
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        super().__init__(argv, port, tmp / f"hub-{name}-{port}.log", env)


# -- the storm's clients ---------------------------------------------------------------------

HEAD, STREAM, DONE, GAVE_UP = range(4)


class Client:
    """One client: attempts until a 200 (bounded), then reads its stream up to the mark.

    Every stream resumed from the same Last-Event-ID on B is owed the same bytes: the same
    opening, then the same frames (the hub encodes each event's frame once). So a stream's
    bytes are compared, at C speed, with the storm's canonical copy (`storm.canon`); a stream
    that reads past its end extends it with its complete frames. The canonical copy itself is
    parsed once, at the end, against the publisher's acknowledged ids. A stream that differs
    from it is parsed on its own from there on (`slow`: its event ids, one a line)."""

    def __init__(self, storm: Storm, index: int, request: bytes) -> None:
        self.storm = storm
        self.index = index
        self.request = request
        self.state = HEAD
        self.conn: Conn | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.tries = 0
        self.statuses: list[int] = []
        self.first = 0.0  # when its first attempt began
        self.sent = 0.0  # when its first request was sent
        self.opened = 0.0  # when its 200 head came
        self.off = 0  # bytes of its stream that match storm.canon
        # From its first difference with storm.canon on: the ids of its events, one a line.
        self.slow: bytearray | None = None
        self.slow_from = 0  # (where in canon its own parsing began: a frame's start)
        self.opening: bytes | None = None  # its opening's id, when it was parsed apart
        self.resets = 0  # (counted where it was parsed apart)
        self.others = 0
        self.cut = False  # its stream ended before the mark

    # attempts

    def attempt(self) -> None:
        if self.storm.closing or self.storm.expired:
            return
        self.tries += 1
        if self.tries == 1:
            self.first = now()
        self.state = HEAD
        self.buf = b""
        conn = self.conn = Conn(self, self.storm.loop)
        self.timer = self.storm.loop.call_later(HEAD_TIMEOUT, self._head_timeout, conn)
        try:
            conn.open(self.storm.port, self.request)
        except OSError as exc:
            self.failed(exc)

    def request_sent(self) -> None:
        if not self.sent:
            self.sent = now()

    def failed(self, exc: OSError) -> None:
        self.storm.errors.append(f"connect: {exc!r}"[:120])
        self._answer(0, 1.0, "connect")

    def _head_timeout(self, conn: Conn) -> None:
        if self.conn is conn and self.state == HEAD:
            self.storm.errors.append("no answer head in time")
            self._answer(0, 1.0, "timeout")

    def _answer(self, status: int, retry_after: float, kind: str = "") -> None:
        """This attempt's outcome when it is not a 200: retry it later, or give up."""
        conn, self.conn = self.conn, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if conn is not None:
            conn.close()
        self.statuses.append(status)
        self.storm.refused(status, kind)
        if status not in (0, 429, 503) or self.tries >= MAX_TRIES or self.storm.closing:
            self.state = GAVE_UP
            self.storm.settled(self)
            return
        delay = retry_after + self.storm.rng.uniform(0.0, 1.0)
        self.storm.loop.call_later(delay, self.attempt)

    # what its connection reads

    def received(self, data: bytes) -> None:
        if self.state == STREAM:
            self._take(data)
        elif self.state == HEAD:
            self.buf += data
            head = answer_head(self.buf)
            if head is None:
                if len(self.buf) > 65536:
                    self._answer(0, 1.0, "head too long")
                return
            status, headers, rest = head
            self.buf = b""
            if status != 200:
                kind = (
                    "behind"
                    if b"not read up to" in rest
                    else "unready"
                    if b"cannot serve streams" in rest
                    else ""
                )
                self.storm.said.setdefault(f"{status} {kind}", rest[:200].decode(errors="replace"))
                self._answer(status, retry_after(headers), kind)
                return
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.statuses.append(200)
            self.state = STREAM
            self.opened = now()
            if self.conn is not None:
                self.conn.lowat(RCVLOWAT)
            self.storm.settled(self)
            if rest:
                self._take(rest)

    def _take(self, data: bytes) -> None:
        if self.slow is not None:
            self._parse(data)
            return
        storm = self.storm
        if self.buf:
            data = self.buf + data
            self.buf = b""
        canon = storm.canon
        n = min(len(canon) - self.off, len(data))
        if n > 0 and not canon.startswith(data if n == len(data) else data[:n], self.off):
            self._go_slow(data)
            return
        self.off += n
        if n < len(data):  # past the canonical copy: its complete frames extend it
            rest = data[n:]
            cut = rest.rfind(b"\n\n")
            if cut >= 0:
                storm.extend(rest[: cut + 2])
                self.off += cut + 2
                rest = rest[cut + 2 :]
            self.buf = rest
        if storm.mark_end and self.off >= storm.mark_end:
            self.state = DONE
            storm.done(self)

    def _go_slow(self, data: bytes) -> None:
        """It differs from the canonical copy: parse it apart from the frame that differs."""
        canon = self.storm.canon
        self.slow_from = canon.rfind(b"\n\n", 0, self.off) + 2 if self.off else 0
        if self.slow_from == 1:  # (no whole block before it)
            self.slow_from = 0
        self.slow = bytearray()
        self.buf = b""
        self._parse(bytes(canon[self.slow_from : self.off]) + data)

    def _parse(self, data: bytes) -> None:
        """Complete blocks only (what follows the last blank line waits for the next read):
        the opening's id, then each event's id, up to and with the mark's."""
        assert self.slow is not None
        if self.buf:
            data = self.buf + data
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.buf = data
            return
        self.buf = data[cut + 2 :]
        blocks = data[: cut + 2]
        if self.slow_from == 0 and self.opening is None:
            self.opening, blocks = opening_id(blocks)
        at = blocks.find(self.storm.needle)
        if at >= 0:
            blocks = blocks[: blocks.find(b"\n\n", at) + 2]
        content = Content.of(blocks)
        if len(self.slow) < RAW_CAP:
            self.slow += b"".join(i + b"\n" for i in content.ids)
        self.resets += content.resets
        self.others += content.others
        if at >= 0:
            self.state = DONE
            self.buf = b""
            self.storm.done(self)

    def lost(self) -> None:
        if self.state == HEAD:
            self._answer(0, 1.0, "closed")
        elif self.state == STREAM and not self.storm.closing:
            self.cut = True
            self.state = DONE
            self.storm.done(self)

    def content(self) -> Content:
        """What it received, when that is not simply the canonical copy up to the mark."""
        canon = bytes(self.storm.canon)
        if self.slow is None:  # a prefix of the canonical copy (it was cut, or is late)
            end = canon.rfind(b"\n\n", 0, self.off) + 2 if self.off else 0
            return Content.of(canon[: max(end, 0)], with_opening=True)
        head = Content.of(canon[: self.slow_from], with_opening=True)
        ids = head.ids + bytes(self.slow).split(b"\n")[:-1]
        opening = head.opening if self.slow_from else self.opening
        return Content(opening, ids, head.resets + self.resets, head.others + self.others)


def opening_id(blocks: bytes) -> tuple[bytes, bytes]:
    """The id of the stream's opening (its first block), and the blocks after it."""
    end = blocks.find(b"\n\n")
    found = OPENING_ID.search(blocks[: end + 2])
    return (found.group(1) if found else b"?"), blocks[end + 2 :]


@dataclass
class Content:
    """The events a stream received: its opening's id, the ids of the publisher's events,
    the resets, and any other events."""

    opening: bytes | None
    ids: list[bytes]
    resets: int
    others: int

    @staticmethod
    def of(blocks: bytes, with_opening: bool = False) -> Content:
        opening = None
        if with_opening and blocks:
            opening, blocks = opening_id(blocks)
        ids = EVENT_ID.findall(blocks)
        events = blocks.count(b"\nevent: ")
        resets = blocks.count(b"\nevent: reset\n") if events != len(ids) else 0
        return Content(opening, ids, resets, events - len(ids) - resets)


class Storm:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        tokens: list[str],
        last_id: str,
        needle: bytes,
        seed: int,
    ) -> None:
        self.loop = loop
        self.port = port
        self.needle = needle
        self.canon = bytearray()  # what every stream is owed, as far as any has read
        self.mark_end = 0  # where the mark's frame ends in it, once it is there
        self.rng = random.Random(seed)
        self.closing = False
        self.expired = False  # past STORM_WITHIN: no more attempts
        self.marked = False  # the mark is out: the streams open now are all there will be
        self.errors: list[str] = []
        self.refusals: dict[str, int] = {}
        self.said: dict[str, str] = {}  # the first answer's body of each kind of refusal
        self.unsettled = len(tokens)
        self.draining = 0  # open streams not yet at the mark (nor cut)
        self.all_settled = asyncio.Event()
        self.all_done = asyncio.Event()
        self.t_settled = 0.0
        resume = f"Last-Event-ID: {last_id}\r\n\r\n".encode()
        self.clients = [
            Client(self, i, events_request(port, tok) + resume) for i, tok in enumerate(tokens)
        ]

    def start(self, at: int = 0) -> None:
        """Every client's first attempt, LAUNCH_CHUNK in each turn of the loop: the first
        requests go out while the later connections are still being made."""
        for client in self.clients[at : at + LAUNCH_CHUNK]:
            client.attempt()
        if at + LAUNCH_CHUNK < len(self.clients):
            self.loop.call_soon(self.start, at + LAUNCH_CHUNK)

    def extend(self, frames: bytes) -> None:
        start = len(self.canon)
        self.canon += frames
        if not self.mark_end:
            at = self.canon.find(self.needle, start)
            if at >= 0:
                self.mark_end = self.canon.find(b"\n\n", at) + 2

    def refused(self, status: int, kind: str) -> None:
        name = f"{status} {kind}".strip()
        self.refusals[name] = self.refusals.get(name, 0) + 1

    def settled(self, client: Client) -> None:
        if client.state == STREAM:
            self.draining += 1
        self.unsettled -= 1
        if self.unsettled == 0:
            self.t_settled = now()
            self.all_settled.set()

    def done(self, client: Client) -> None:
        self.draining -= 1
        if self.draining == 0 and (self.unsettled == 0 or self.marked):
            self.all_done.set()

    def flush(self) -> None:
        """Every open stream read at once from now on (the mark may sit below RCVLOWAT)."""
        self.marked = True
        for client in self.clients:
            if client.state == STREAM and client.conn is not None:
                client.conn.lowat(1)
        if self.draining == 0:
            self.all_done.set()

    def close(self) -> None:
        self.closing = True
        close_all(self.clients)


# -- one cell --------------------------------------------------------------------------------


@dataclass
class Row:
    cell: Cell
    n: int
    opened: int = 0
    all_open_s: float | None = None
    first_try: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    wait_p50: float = 0.0
    wait_p99: float = 0.0
    lost: int = 0
    doubles: int = 0
    disordered: int = 0
    stray: int = 0
    resets: int = 0
    others: int = 0
    cut: int = 0
    gave_up: int = 0
    openings_off: int = 0  # streams whose opening id was not their Last-Event-ID
    apart: int = 0  # streams that differed from the canonical copy (or did not reach the mark)
    window: int = 0  # events each stream was owed
    rss_before_kb: int = 0
    rss_peak_kb: int = 0
    peak_how: str = ""
    cpu_s: float = 0.0
    heal_late_ms: float | None = None
    ramp: tuple[float, float] = (0.0, 0.0)  # first requests sent from, to (s after the start)
    before_heal: int = 0  # first requests sent before the link healed
    held: int = 0  # of them, answered 200 on that first try (held, or reached B late)
    bench_cpu_s: float = 0.0  # this process's CPU seconds over the storm
    others_cpu_s: float = 0.0  # busy CPU seconds of the machine not charged to this run's processes
    storm_s: float = 0.0  # the storm's length (until every client settled)
    lag_ms: float = 0.0  # the most this process's event loop ran late over the storm
    overflows: int = 0
    errors: list[str] = field(default_factory=list)
    said: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.opened == self.n
            and self.lost == self.doubles == self.resets == self.disordered == 0
            and self.stray == self.others == self.cut == self.openings_off == 0
        )


class Lag:
    """How late this loop runs timers (the clients' clock is only as good as that)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.worst = 0.0
        self.handle = loop.call_later(0.01, self._tick, now() + 0.01)

    def _tick(self, due: float) -> None:
        self.worst = max(self.worst, now() - due)
        self.handle = self.loop.call_later(0.01, self._tick, now() + 0.01)

    def stop(self) -> float:
        self.handle.cancel()
        return self.worst


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def classify(received: list[bytes], expected: list[bytes], after: tuple[int, int]) -> list[int]:
    """[lost, doubles, disordered, stray] of one stream's ids against what it was owed."""
    position = {e: i for i, e in enumerate(expected)}
    seen: set[bytes] = set()
    doubles = disordered = stray = 0
    last = -1
    for r in received:
        k = key(r)
        if (k is not None and k <= after) or r in seen:
            doubles += 1
            continue
        seen.add(r)
        i = position.get(r)
        if i is None:
            stray += 1
            continue
        if i < last:
            disordered += 1
        last = max(last, i)
    lost = sum(1 for e in expected if e not in seen)
    return [lost, doubles, disordered, stray]


async def probe(port: int, tok: str, last_id: str) -> None:
    """Until a stream resumed from `last_id` opens on the hub (it has read that far)."""
    deadline = now() + PROBE_WITHIN
    request = (
        f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {tok}\r\n"
        f"Last-Event-ID: {last_id}\r\n\r\n"
    ).encode()
    while now() < deadline:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(HEAD_END), 5)
                if head.startswith(b"HTTP/1.1 200"):
                    return
            finally:
                writer.transport.abort()
        await asyncio.sleep(0.05)  # polling inside a deadline
    raise RuntimeError(f"hub on port {port} never read up to {last_id}")


async def run_cell(
    cell: Cell,
    n: int,
    tmp: Path,
    side: Side,
    redis_url: str,
    prefix: str,
    b_core: int | None,
    tokens: list[str],
    pids: list[int],
    say: Callable[[str], None],
    direct: bool = False,
) -> Row:
    loop = asyncio.get_running_loop()
    row = Row(cell, n)
    assert side.proxy_port is not None
    flags = ["--broker", f"redis://127.0.0.1:{side.proxy_port.result()}/0"]
    if direct:  # (--b-direct: the baseline without the proxy)
        flags = ["--broker", redis_url]
    flags += ["--redis-prefix", prefix, "--catch-up-wait", f"{cell.wait:g}"]
    b = await asyncio.to_thread(Hub, tmp, f"b{cell.name[0]}", b_core, flags)
    storm: Storm | None = None
    try:
        await b.wait_ready()
        tag = uuid.uuid4().hex[:8]
        first = (await side.mark(1, f"e-{tag}"))[-1]
        await probe(b.port, tokens[0], first)
        if cell.hold_ms is not None:
            await side.block()
        await side.mark(PRE_EVENTS, f"pre-{tag}")
        last_id = side.acks[-1]  # the newest id A acknowledged
        after = key(last_id)
        assert after is not None
        needle = f"final-{tag}".encode()
        storm = Storm(loop, b.port, tokens[:n], last_id, needle, random.randrange(1 << 30))
        await asyncio.sleep(0.05)  # B's own settling after the block (it is not reading)
        row.rss_before_kb = procs.proc_status_kb(b.pid, b"VmRSS:")
        hwm = procs.reset_peak(b.pid)
        sampled = row.rss_before_kb
        overflows = procs.listen_overflows()
        cpu0 = procs.cpu_s(b.pid)
        mine0 = procs.cpu_s(os.getpid())
        ours = [b.pid, *pids]
        ours0 = sum(procs.cpu_s(pid) for pid in ours) + mine0
        busy0 = procs.busy_s()
        lag = Lag(loop)
        t0 = now()
        if cell.hold_ms is not None:
            side.heal_after(cell.hold_ms / 1000)
        storm.start()
        deadline = t0 + STORM_WITHIN
        while not storm.all_settled.is_set() and now() < deadline:
            sampled = max(sampled, procs.proc_status_kb(b.pid, b"VmRSS:"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(storm.all_settled.wait(), 0.02)  # sampling RSS
        storm.expired = not storm.all_settled.is_set()
        cpu1 = procs.cpu_s(b.pid)
        mine1 = procs.cpu_s(os.getpid())
        row.bench_cpu_s = mine1 - mine0
        row.others_cpu_s = (
            procs.busy_s() - busy0 - (sum(procs.cpu_s(pid) for pid in ours) + mine1 - ours0)
        )
        row.storm_s = now() - t0
        row.lag_ms = lag.stop() * 1000
        sampled = max(sampled, procs.proc_status_kb(b.pid, b"VmRSS:"))
        peak = procs.proc_status_kb(b.pid, b"VmHWM:") if hwm else 0
        row.rss_peak_kb, row.peak_how = (peak, "VmHWM") if hwm else (sampled, "sampled")
        row.cpu_s = cpu1 - cpu0
        row.overflows = procs.listen_overflows() - overflows
        if side.healed is not None:
            healed = await asyncio.wait_for(side.healed, SIDE_WITHIN)
            assert cell.hold_ms is not None
            row.heal_late_ms = (healed - t0) * 1000 - cell.hold_ms
            row.before_heal = sum(1 for c in storm.clients if c.sent and c.sent < healed)
            row.held = sum(
                1
                for c in storm.clients
                if c.statuses[:1] == [200] and c.sent and c.sent < healed <= c.opened
            )
        clients = storm.clients
        sent = [c.sent - t0 for c in clients if c.sent]
        row.ramp = (min(sent), max(sent)) if sent else (0.0, 0.0)
        opened = [c for c in clients if c.opened]
        row.opened = len(opened)
        if storm.all_settled.is_set() and row.opened == n:
            row.all_open_s = max(c.opened for c in opened) - t0
        row.first_try = sum(1 for c in clients if c.statuses[:1] == [200])
        row.refusals = dict(storm.refusals)
        row.retries = sum(c.tries for c in clients) - n
        waits = [c.opened - c.first for c in opened]
        row.wait_p50, row.wait_p99 = percentile(waits, 50), percentile(waits, 99)
        row.gave_up = sum(1 for c in clients if c.state == GAVE_UP)
        row.errors = sorted(set(storm.errors))[:3]
        row.said = dict(storm.said)

        # the mark, and every open stream up to it
        await asyncio.sleep(MARK_AFTER)
        mark = (await side.mark(1, needle.decode()))[-1]
        storm.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(storm.all_done.wait(), DRAIN_WITHIN)
        acks = side.acks
        keys = [key(a) or (-1, -1) for a in acks]
        if any(x >= y for x, y in itertools.pairwise(keys)):
            row.notes.append("the publisher's acknowledged ids are not in increasing order")
        begin, end = acks.index(last_id) + 1, acks.index(mark) + 1
        owed = [a.encode() for a in acks[begin:end]]
        row.window = len(owed)
        reference = Content.of(bytes(storm.canon[: storm.mark_end]), with_opening=True)
        reference_counts = classify(reference.ids, owed, after)
        for c in opened:
            row.cut += c.cut
            if c.slow is None and storm.mark_end and c.off >= storm.mark_end and not c.cut:
                content, counts = reference, reference_counts  # the canonical copy, in full
            else:
                row.apart += 1
                content = c.content()
                counts = classify(content.ids, owed, after)
            row.resets += content.resets
            row.others += content.others
            if content.opening != last_id.encode():
                row.openings_off += 1
            row.lost += counts[0]
            row.doubles += counts[1]
            row.disordered += counts[2]
            row.stray += counts[3]
        if side.failures:
            row.notes.append(f"publishes refused by A: {len(side.failures)} ({side.failures[0]})")
        say(
            f"cell {cell.name}: opened {row.opened}/{n} lost {row.lost} doubles {row.doubles} "
            f"resets {row.resets} disordered {row.disordered} stray {row.stray} cut {row.cut} "
            f"(window {row.window} events)"
        )
        return row
    finally:
        if storm is not None:
            storm.close()
        await asyncio.sleep(0.2)  # the aborts reach B before it is stopped
        await asyncio.to_thread(b.stop)
        if side.healed is not None and not side.healed.done():
            side.send({"cmd": "heal"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(side.healed, SIDE_WITHIN)
        side.healed = None


# -- the report ------------------------------------------------------------------------------


LEGEND = [
    "H: ms from the storm's start until B's link to Redis heals (-: never cut); wait: B's "
    "--catch-up-wait",
    "all open: from the storm's start until the last client's 200; 1st-try 200: clients whose "
    "first request was answered 200;",
    "503s: refusals answered (each client then waits Retry-After + up to 1 s and tries again); "
    "retries: attempts past each client's first",
    "wait p50/p99: from a client's first attempt to its 200; lost/dbl/reset: over every "
    "stream, from its Last-Event-ID to the mark",
    "B RSS: before the storm / peak until all were open; B CPU s: from the storm's start until "
    "all were open",
]


def table(rows: list[Row]) -> list[str]:
    head = (
        f"{'cell':<11} {'H ms':>5} {'wait':>5} {'all open':>9} {'1st-try 200':>12} "
        f"{'503s':>6} {'retries':>8} {'wait p50':>9} {'p99':>7} {'lost':>5} {'dbl':>4} "
        f"{'reset':>5} {'B RSS MB before/peak':>21} {'B CPU s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.cell
        all_open = f"{r.all_open_s:.2f} s" if r.all_open_s is not None else "never"
        refused = sum(v for k, v in r.refusals.items() if k.startswith("503"))
        rss = f"{r.rss_before_kb / 1024:.0f} / {r.rss_peak_kb / 1024:.0f}"
        lines.append(
            f"{c.name:<11} {c.hold_ms if c.hold_ms is not None else '-':>5} "
            f"{c.wait:>4g}s {all_open:>9} {f'{r.first_try}/{r.n}':>12} {refused:>6} "
            f"{r.retries:>8} {r.wait_p50:>7.2f} s {r.wait_p99:>5.2f} s {r.lost:>5} "
            f"{r.doubles:>4} {r.resets:>5} {rss:>21} {r.cpu_s:>8.2f}"
        )
    return lines


def details(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        ramp = f"first requests sent +{r.ramp[0] * 1000:.0f} to +{r.ramp[1] * 1000:.0f} ms"
        if r.heal_late_ms is not None:
            ramp += (
                f"; {r.before_heal} before the heal ({r.heal_late_ms:+.1f} ms off H), "
                f"{r.held} of those answered 200 on that first try (after the heal)"
            )
        refused = ", ".join(f"{v} x {k}" for k, v in sorted(r.refusals.items())) or "none"
        refused = f"refusals: {refused}"
        if r.gave_up:
            refused += f"; {r.gave_up} clients gave up after {MAX_TRIES} tries"
        if r.overflows:
            refused += f"; {r.overflows} listen-queue overflows (their SYN retried after 1 s)"
        owed = f"each stream owed {r.window} events (replay + live, up to the mark)"
        for name in ("disordered", "stray", "others", "cut", "openings_off", "apart"):
            if getattr(r, name):
                owed += f"; {name} {getattr(r, name)}"
        load = (
            f"storm {r.storm_s:.1f} s: this process {r.bench_cpu_s:.1f} CPU s (its loop "
            f"{r.lag_ms:.0f} ms late at worst), the rest of the machine {r.others_cpu_s:.1f} "
            f"CPU s; B's peak RSS by {r.peak_how}"
        )
        lines.append(f"  {r.cell.name}:")
        lines += [f"    {x}" for x in (ramp, refused, owed, load)]
        lines += [f"    note: {x}" for x in r.notes]
        lines += [f"    error: {x}" for x in r.errors]
        lines += [f"    {k}: {v}" for k, v in sorted(r.said.items())]
    return lines


async def main_async(
    n: int, cells: list[Cell], say: Callable[[str], None], keep: bool, direct: bool
) -> list[Row]:
    b_core, rest = procs.cores()
    if b_core is not None:
        os.sched_setaffinity(0, rest)  # this process and every child but B
    tmp = Path(tempfile.mkdtemp(prefix="hub-hold-"))
    redis = await asyncio.to_thread(servers.RedisServer, tmp, rest[0])
    prefix = f"hold-{uuid.uuid4().hex[:8]}"
    a = Hub(tmp, "a", None, ["--broker", redis.url, "--redis-prefix", prefix])
    side: Side | None = None
    rows: list[Row] = []
    try:
        await a.wait_ready()
        side = Side(tmp, redis.port, a.port, token("hold-publisher", publish=True))
        await side.start()
        pids = [redis.pid, a.pid, side.proc.pid]  # (this run's other processes, for CPU)
        t = now()
        tokens = [token(f"hold-{i}") for i in range(n)]
        say(f"{n} tokens in {now() - t:.2f} s; B on core {b_core}, the rest on {rest}")
        for cell in cells:
            if now() - t > RUN_BUDGET:
                say(f"cell {cell.name}: NOT RUN (the run is past {RUN_BUDGET:g} s)")
                rows.append(Row(cell, n, notes=["not run: out of time"]))
                continue
            rows.append(
                await run_cell(
                    cell, n, tmp, side, redis.url, prefix, b_core, tokens, pids, say, direct
                )
            )
        published = len(side.acks)
        say(f"publisher: {published} events acknowledged by A, {len(side.failures)} refused")
    finally:
        if side is not None:
            side.close()
        await asyncio.to_thread(a.stop)
        redis.stop()
        procs.drop_logs(tmp, keep, say)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=5000, help="clients in each storm")
    parser.add_argument("--quick", action="store_true", help="50 streams (a smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument(
        "--b-direct",
        action="store_true",
        help="B on Redis directly, not through the proxy (the baseline only: is the proxy "
        "what delays B's feed?)",
    )
    parser.add_argument(
        "--cells", default="1,2,3,4", help="which cells, by number (default: 1,2,3,4)"
    )
    parser.add_argument(
        "--side", nargs=2, type=int, metavar=("REDIS_PORT", "A_PORT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--rate", type=float, default=RATE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        asyncio.run(side_main(args.side[0], args.side[1], args.rate))
        return
    n = 50 if args.quick else args.streams
    if n < 1:
        parser.error("--streams must be at least 1")
    chosen = [c for c in CELLS if c.name.split()[0] in args.cells.split(",")]
    if not chosen:
        parser.error(f"--cells: none of {args.cells!r} is a cell (1 to {len(CELLS)})")
    if args.b_direct and any(c.hold_ms is not None for c in chosen):
        parser.error("--b-direct runs only the baseline (--cells 1): no proxy, no block")
    if shutil.which("redis-server") is None:
        print("hold: redis-server is missing (apt-get install redis-server)", file=sys.stderr)
        sys.exit(2)
    procs.enough_descriptors("hold", n)
    t_run, say = procs.sayer()
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    say(
        f"bench.hold: {n} streams a storm, {RATE:g} events/s to A throughout; "
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"redis {next((w for w in redis_version if w.startswith('v=')), '?')[2:]}"
    )
    rows = procs.run_main("hold", main_async(n, chosen, say, args.keep, args.b_direct), RUN_WITHIN)
    print()
    print("\n".join(table(rows)))
    print("\n".join(LEGEND))
    print("\n".join(details(rows)))
    ok = all(r.ok for r in rows)
    total = (
        f"total: opened {sum(r.opened for r in rows)}/{sum(r.n for r in rows)} "
        f"lost {sum(r.lost for r in rows)} doubles {sum(r.doubles for r in rows)} "
        f"resets {sum(r.resets for r in rows)} disordered {sum(r.disordered for r in rows)}"
    )
    print(f"{total}: {'OK' if ok else 'FAILED'} in {now() - t_run:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
