"""``python -m bench.storm``: a reconnect storm (issue 18): every stream cut at once, back with
Last-Event-ID.

N streams (each its own user, a subscriber JWT signed with the hub's HS256 secret) read
broadcasts (type 5) that a publisher POSTs at RATE events/s throughout, one request in
flight, recording every id a 202 acknowledged. Then every stream is cut at once and comes
back with Last-Event-ID = the last id it received. The cells:

- ``cut-jitter``, ``cut-nojitter`` (memory broker): this side closes all N sockets at once;
  each client comes back after a uniform random delay within the ``retry:`` of its stream's
  opening (jitter), or all at once (no jitter: the worst case).
- ``restart-memory``: the hub gets SIGTERM (every stream gets what it is owed, a ``retry:``
  drawn from [retry, retry + --shutdown-spread] and an ``event: end``); once it has exited a
  new hub is started on the same port, and each client comes back after the ``retry:`` it
  was told, as EventSource and hub.client do (the spread is the jitter). The memory broker's
  history is gone with the process: every resume is answered ``reset``, which is expected.
- ``restart-redis-2w``: the same on the Redis broker (a private redis-server started here)
  with ``--workers 2``: the history is in Redis, every resume is exact, no reset.
- ``...-s0``: the restart cells with ``--shutdown-spread 0``: every client told the same
  ``retry:``, against the default spread.

Checked per stream, over every stream: it received every acknowledged id after its
Last-Event-ID up to a closing mark, once each, in order (a ``reset`` moves that start to the
reset's id: it must then get every acknowledged id after that one). Reported per cell: the
time from the cut (or the SIGTERM) until every stream is back (its 200 and its opening
read); p50/p99 of the delay from the publisher's send to receipt of the events published
from then until all were back, on PROBES probe streams; lost, doubles, resets; the serving
hub's RSS peak (VmHWM, summed over its processes); listen-queue overflows over the storm
(TcpExt ListenOverflows, system-wide); the hub's CPU seconds over it.

The clients are cheap (those of bench.hold): raw non-blocking sockets on one event loop, an
open stream read once RCVLOWAT bytes wait (probes at once), its bytes compared at C speed
with one canonical copy of the broadcast log (every stream is owed a slice of it: the hub
encodes each frame once); only what differs from it is parsed.

Processes, loopback only, each started here and ended by its own PID: the hub (pinned to the
first core; with ``--workers 2``, both cores), redis-server and a side process that
publishes (so this busy loop delays no publish), both with this one on the other core.
Every wait is bounded in time and every retry in count. ``--quick``: 200 streams, the hubs at
``--retry 1`` and a default spread of 2 s (10 s otherwise), for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import procs, servers
from bench.faults_check import UNKNOWN, Attempt
from bench.hold import Lag, key, percentile
from bench.rawconn import Conn, answer_head, close_all, events_request, retry_after

REPO = Path(__file__).resolve().parent.parent
SECRET = "storm-bench-secret-".ljust(48, "x")
now = time.monotonic

RATE = 200.0  # events/s published throughout
PROBES = 200  # streams read at once, whose events' delays are measured
LAUNCH_CHUNK = 500  # attempts started in one turn of the loop
HEAD_TIMEOUT = 15.0  # seconds an attempt waits for its answer's head
RCVLOWAT = 64 * 1024  # a stream that is not a probe is read once this much waits
MAX_TRIES = 20  # attempts per client per phase (the first connect, the storm)
CONNECT_WITHIN = 90.0  # seconds for every stream's first connect
WARM = 5.0  # seconds of events flowing before the cut
FLUSH_BEFORE = 0.3  # seconds before the cut every stream is read at once (its last id fresh)
STORM_EXTRA = 40.0  # seconds a storm may take past the longest retry told
EXIT_WITHIN = 30.0  # seconds the old hub has to exit after its SIGTERM
MARK_AFTER = 0.5  # seconds after all are back before the closing mark
DRAIN_WITHIN = 30.0  # seconds every stream has to read up to the mark
LATE_AFTER = 5.0  # a stream that reads the mark later than this after its 202 stalled
SIDE_WITHIN = 15.0
SAMPLE = 0.05  # seconds between RSS samples during a storm
RUN_WITHIN = 1200.0  # the whole run, whatever happens
QUICK = {"streams": 200, "probes": 50, "retry": 1.0, "spread": 2.0, "warm": 1.0}

T_SENT = re.compile(rb'"t":([0-9.]+)')
# the id of a broadcast frame: the first of some bytes; each after a blank line
FIRST_ID = re.compile(rb"id: ([^\n]*)\nevent: broadcast\n")
FRAME_ID = re.compile(rb"\n\nid: ([^\n]*)\nevent: broadcast\n")
IDLE, HEAD, OPENING, STREAM, GAVE_UP = range(5)


@dataclass(frozen=True)
class Cell:
    name: str
    kind: str  # "cut" (this side closes every socket) or "restart" (SIGTERM, a new hub)
    broker: str  # "memory" or "redis"
    workers: int = 1
    jitter: bool = True  # cut: a uniform delay within the opening's retry (else at once)
    spread: float | None = None  # restart: --shutdown-spread (None: the hub's default)

    @property
    def resets_expected(self) -> bool:
        """A restart of the memory broker loses the history: every resume is a reset."""
        return self.kind == "restart" and self.broker == "memory"


CELLS = [
    Cell("cut-jitter", "cut", "memory", jitter=True),
    Cell("cut-nojitter", "cut", "memory", jitter=False),
    Cell("restart-memory", "restart", "memory"),
    Cell("restart-memory-s0", "restart", "memory", spread=0.0),
    Cell("restart-redis-2w", "restart", "redis", workers=2),
    Cell("restart-redis-2w-s0", "restart", "redis", workers=2, spread=0.0),
]


@dataclass(frozen=True)
class Settings:
    streams: int
    probes: int
    rate: float
    warm: float
    retry: float | None  # --retry of the hubs (None: the hub's default)
    spread: float  # the spread of the cells that take the default
    default_spread: float  # the hub's own default


token = partial(procs.token, SECRET)


def hub_defaults() -> tuple[float, float]:
    """The hub's default retry and shutdown spread (seconds)."""
    from hub.config import Config

    config = Config()
    return config.retry, config.shutdown_spread


# -- the publisher: a side process ------------------------------------------------------------


async def side_main(port: int, rate: float) -> None:
    """Publish broadcasts to the hub on `port` at `rate` events/s, one request in flight, each
    event's data carrying its send time (`t`, this machine's monotonic clock); marks on
    command (stdin, a JSON object a line); each answer reported on stdout. Ends when stdin
    does. A publish that fails is not retried: the pace goes on (a restart refuses a few)."""

    def failed(attempt: Attempt, tag: str | None) -> None:
        procs.emit({"fail": attempt.outcome, "detail": f"{attempt.status} {attempt.detail}"[:200]})
        if tag is not None:
            procs.emit({"markfail": tag})

    publisher = procs.Paced(port, os.environ["STORM_TOKEN"], rate, failed, stamp=True)
    publisher.start()
    reader = await procs.pipe_reader(sys.stdin)
    procs.emit({"ready": True})
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd.get("cmd") == "mark":
                publisher.marks.append((int(cmd["n"]), str(cmd["tag"])))
    finally:
        await publisher.close()


class Side(procs.PublishingSide):
    """The publisher's process, seen from here: marks in, acknowledged ids out (in order)."""

    ended = "the publisher's process ended"

    def __init__(self, tmp: Path, port: int, rate: float) -> None:
        env = procs.clean_env()
        env["STORM_TOKEN"] = token("storm-publisher", publish=True)
        argv = [sys.executable, "-m", "bench.storm", "--side", str(port), "--rate", str(rate)]
        super().__init__(argv, tmp / f"side-{port}.log", env)
        self.failures: dict[str, int] = {}
        self.first_failure: dict[str, str] = {}
        self.ready: asyncio.Future[bool] | None = None

    async def start(self) -> None:
        self.ready = asyncio.get_running_loop().create_future()
        await self.listen(1 << 20)
        await asyncio.wait_for(self.ready, SIDE_WITHIN)

    def on_message(self, msg: dict[str, Any]) -> None:
        if "ack" in msg:
            self.acked(msg)
        elif "fail" in msg:
            self.failures[msg["fail"]] = self.failures.get(msg["fail"], 0) + 1
            self.first_failure.setdefault(msg["fail"], msg["detail"])
        elif "markfail" in msg:
            self.mark_failed(msg["markfail"], "the mark was not published")
        elif "ready" in msg and self.ready is not None and not self.ready.done():
            self.ready.set_result(True)

    async def mark(self, count: int, tag: str) -> list[str]:
        """Publish `count` events tagged `tag` (tried up to 3 times); their ids."""
        for attempt in range(3):
            try:
                return await self.mark_once(count, tag, SIDE_WITHIN)
            except RuntimeError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5)  # the hub refused it: once more, bounded
        raise AssertionError("unreachable")


# -- the hub ------------------------------------------------------------------------------------


class Hub(procs.Hub):
    """`.venv/bin/hub` on a given loopback port, pinned with taskset; ended by its PID."""

    grace = 20.0

    def __init__(self, tmp: Path, name: str, port: int, cores: str, flags: list[str]) -> None:
        env = procs.clean_env("WEB_CONCURRENCY")
        env["HUB_JWT_SECRET"] = SECRET
        argv = ["taskset", "-c", cores, str(REPO / ".venv" / "bin" / "hub")]
        argv += ["--host", "127.0.0.1", "--port", str(port), *flags]
        self.workers = int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 1
        self.started = now()
        super().__init__(argv, port, tmp / f"hub-{name}-{port}.log", env)
        self._pids = [self.pid]

    def pids(self) -> list[int]:
        """Its processes: the hub, or a supervisor and its workers."""
        if self.workers > 1 and len(self._pids) < self.workers + 1:
            self._pids = [self.pid, *procs.children(self.pid)]
        return self._pids

    def complete(self) -> bool:
        return len(self.pids()) >= self.workers + (self.workers > 1)

    def term(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


# -- the canonical log ----------------------------------------------------------------------------


class Canon:
    """The broadcast frames every stream is owed a slice of, in id order, as far as any
    stream has read: its bytes, where each frame ends, and each frame's id."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ends: list[int] = []
        self.ids: list[bytes] = []
        self.index: dict[bytes, int] = {}
        self.last_key: tuple[int, int] = (-1, -1)
        self.needle = b""  # the closing mark's tag, once it is being published
        self.mark_end = 0  # where its frame ends, once it is here

    def append(self, ident: bytes, frame: bytes) -> None:
        self.data += frame
        self.ends.append(len(self.data))
        self.index[ident] = len(self.ids)
        self.ids.append(ident)
        self.last_key = key(ident) or self.last_key
        if self.needle and not self.mark_end and self.needle in frame:
            self.mark_end = len(self.data)

    def start_of(self, j: int) -> int:
        return self.ends[j - 1] if j else 0

    def frames_to(self, off: int) -> int:
        """How many frames end at or before `off`."""
        return bisect.bisect_right(self.ends, off)


# -- the clients ----------------------------------------------------------------------------------


class Client:
    """One subscriber across its connections. Where it is in the canonical log (`off`), from
    which id on it has been reading without a break (`anchor`, from `seg_start`: a segment;
    a reset starts a new one), what it was told (`retry_ms`), and what did not fit."""

    __slots__ = (
        "anchor",
        "apart_segments",
        "auth",
        "back_at",
        "buf",
        "conn",
        "ended",
        "index",
        "last_id",
        "off",
        "opening_off",
        "pbuf",
        "private",
        "probe",
        "resets",
        "retry_ms",
        "seg_start",
        "segments",
        "state",
        "statuses",
        "storm",
        "timer",
        "tries",
    )

    def __init__(self, storm: Storm, index: int, auth: bytes, probe: bool) -> None:
        self.storm = storm
        self.index = index
        self.auth = auth  # the request up to its Last-Event-ID
        self.probe = probe
        self.state = IDLE
        self.conn: Conn | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.buf = b""
        self.pbuf = b""  # a probe's bytes after its last complete block
        self.last_id = b""  # sent as Last-Event-ID
        self.off = 0
        self.anchor = b""
        self.seg_start = 0
        self.segments: list[tuple[bytes, int, int]] = []
        self.apart_segments: list[tuple[bytes, list[bytes]]] = []
        # Read apart from the log (its ids), after a reset to an id the log does not hold, or
        # where the log has a hole; None while it reads the log.
        self.private: list[bytes] | None = None
        self.retry_ms = 3000
        self.tries = 0  # attempts in this phase
        self.statuses: list[int] = []  # of this phase's attempts (0: no answer)
        self.back_at = 0.0  # when its opening was read, in this phase
        self.ended = 0  # `end` frames received
        self.resets = 0
        self.opening_off = False  # its opening's id is not its Last-Event-ID (a reset must come)

    # attempts

    def begin(self, last_id: bytes) -> None:
        """Its first stream: reading from `last_id` on, a position every stream shares."""
        self.last_id = self.anchor = last_id
        self.off = self.seg_start = 0
        self.attempt()

    def attempt(self) -> None:
        self.timer = None
        storm = self.storm
        if storm.closing or storm.expired:
            return
        if self.tries >= MAX_TRIES:
            self.state = GAVE_UP
            storm.gave_up += 1
            return
        self.tries += 1
        self.state = HEAD
        self.buf = self.pbuf = b""
        conn = self.conn = Conn(self, storm.loop)
        self.timer = storm.loop.call_later(HEAD_TIMEOUT, self._head_timeout, conn)
        try:
            conn.open(storm.port, self.auth + b"Last-Event-ID: " + self.last_id + b"\r\n\r\n")
        except OSError as exc:
            self.failed(exc)

    def request_sent(self) -> None:
        pass

    def failed(self, exc: OSError) -> None:
        what = f"connect: {exc.strerror or exc!r}"[:100]
        self.storm.errors[what] = self.storm.errors.get(what, 0) + 1
        self._retry(0, None)

    def _head_timeout(self, conn: Conn) -> None:
        if self.conn is conn and self.state in (HEAD, OPENING):
            self.storm.errors["no answer head in time"] = (
                self.storm.errors.get("no answer head in time", 0) + 1
            )
            self._retry(0, None)

    def _retry(self, status: int, retry_after: float | None) -> None:
        """This attempt failed: again after Retry-After (plus up to 1 s), or, with no answer,
        after half to all of its retry (bounded in count by attempt())."""
        conn, self.conn = self.conn, None
        if self.timer is not None:
            self.timer.cancel()
        if conn is not None:
            conn.close()
        self.statuses.append(status)
        self.state = IDLE
        rng = self.storm.rng
        if retry_after is not None:
            delay = retry_after + rng.uniform(0.0, 1.0)
        else:
            delay = self.retry_ms / 1000 * rng.uniform(0.5, 1.0)
        self.timer = self.storm.loop.call_later(delay, self.attempt)

    def reconnect_after(self, delay: float) -> None:
        self.tries = 0
        self.statuses = []
        self.back_at = 0.0
        if delay <= 0:
            self.storm.launch_soon(self)
        else:
            self.timer = self.storm.loop.call_later(delay, self.attempt)

    # what a connection reads

    def received(self, data: bytes) -> None:
        if self.state == STREAM:
            if self.probe:
                self._times(data)
            self._take(data)
            return
        self.buf += data
        if self.state == HEAD:
            head = answer_head(self.buf)
            if head is None:
                if len(self.buf) > 65536:
                    self._retry(0, None)
                return
            status, headers, rest = head
            self.buf = b""
            if status != 200:
                storm = self.storm
                storm.refusals[status] = storm.refusals.get(status, 0) + 1
                storm.said.setdefault(status, rest[:160].decode(errors="replace"))
                self._retry(status, retry_after(headers))
                return
            self.statuses.append(200)
            self.state = OPENING
            self.buf = rest
        end = self.buf.find(b"\n\n")
        if end < 0:
            return
        opening, rest = self.buf[:end], self.buf[end + 2 :]
        self.buf = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        opening_id = None
        for entry in opening.split(b"\n"):
            fname, _, fvalue = entry.partition(b":")
            fvalue = fvalue[1:] if fvalue[:1] == b" " else fvalue
            if fname == b"retry" and fvalue.isdigit():
                self.retry_ms = int(fvalue)
            elif fname == b"id":
                opening_id = fvalue
        self.opening_off = opening_id != self.last_id
        self.state = STREAM
        storm = self.storm
        if not storm.t0:
            storm.opened += 1
            if storm.opened >= len(storm.clients):
                storm.all_opened.set()
        elif not self.back_at:
            self.back_at = now()
            storm.came_back()
        if self.conn is not None and not self.probe and not storm.flushing:
            self.conn.lowat(RCVLOWAT)
        if rest:
            self.received(rest)

    def _times(self, data: bytes) -> None:
        """A probe's receipt times of the events published from the storm's start on."""
        text = self.pbuf + data
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self.pbuf = text
            return
        self.pbuf = text[cut + 2 :]
        storm = self.storm
        if not storm.lat_from:
            return
        t = now()
        for m in T_SENT.findall(text, 0, cut):
            sent = float(m)
            if sent >= storm.lat_from:
                storm.lat_sent.append(sent)
                storm.lat_delay.append(t - sent)

    def _take(self, data: bytes) -> None:
        """Its stream's bytes: compared with the canonical log where it is (C speed); a block
        that differs, or goes past the log's end, is parsed by hand (_block), and the
        comparison goes on after it. Read apart from the log, its ids are taken in bulk
        (_apart) until it meets the log again."""
        if self.buf:
            data = self.buf + data
            self.buf = b""
        canon = self.storm.canon
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            if self.private is not None:
                pos = self._apart(data, pos)
                continue
            log = canon.data
            n = min(len(log) - self.off, size - pos)
            if n > 0:
                if log.startswith(view[pos : pos + n], self.off):
                    self.off += n
                    pos += n
                    continue
                # it differs: from the start of the frame it is in, one block by hand
                i = canon.frames_to(self.off)
                begin = max(canon.ends[i - 1] if i else 0, self.seg_start)
                data = bytes(log[begin : self.off]) + data[pos:]
                view = memoryview(data)
                pos, size = 0, len(data)
                self.off = begin
            end = data.find(b"\n\n", pos)
            if end < 0:
                break
            if end > pos:
                self._block(data[pos:end])
            pos = end + 2
        if pos < size:
            self.buf = data[pos:]
        if canon.mark_end and self.off >= canon.mark_end and self.private is None:
            self.storm.reached(self)

    def _apart(self, data: bytes, pos: int) -> int:
        """Read apart from the log: the ids of its whole frames from `pos` on, in bulk, up to
        the first the log holds (or that goes past its end), which is taken by hand (it
        brings the stream back to the log). A block that is not a broadcast frame (a
        heartbeat, a reset, an end) is taken by hand too. Where it stopped."""
        private = self.private
        assert private is not None
        end = data.find(b"\n\n", pos)
        if end < 0:
            return len(data)  # (what is left is kept by the caller)
        canon = self.storm.canon
        index, last_key = canon.index, canon.last_key

        def meets(ident: bytes) -> bool:
            return ident in index or (key(ident) or (-1, -1)) > last_key

        first = FIRST_ID.match(data, pos, end + 2)
        if first is None or meets(first.group(1)):  # (most often: back on the log at once)
            if end > pos:
                self._block(data[pos:end])
            return end + 2
        cut = data.rfind(b"\n\n", pos) + 2
        ids = FRAME_ID.findall(b"\n\n" + data[pos:cut])
        if len(ids) != data.count(b"\n\n", pos, cut):  # other blocks among them: by hand
            self._block(data[pos:end])
            return end + 2
        if not meets(ids[-1]):
            private.extend(ids)
            return cut
        n = next(i for i, x in enumerate(ids) if meets(x))
        private.extend(ids[:n])
        for _ in range(n):
            pos = data.index(b"\n\n", pos) + 2
        end = data.index(b"\n\n", pos)
        self._block(data[pos:end])
        return end + 2

    def _block(self, block: bytes) -> None:
        ident = event = None
        has_data = False
        for line in block.split(b"\n"):
            if not line or line[:1] == b":":
                continue
            name, _, value = line.partition(b":")
            value = value[1:] if value[:1] == b" " else value
            if name == b"id":
                ident = value
            elif name == b"event":
                event = value
            elif name == b"data":
                has_data = True
            elif name == b"retry" and value.isdigit():
                self.retry_ms = int(value)
        storm = self.storm
        if not has_data:
            return  # a comment (heartbeat), a retry:
        if event == b"end":
            self.ended += 1
            storm.ends += 1
        elif event == b"reset" and ident is not None:
            self._reset(ident)
        elif event == b"broadcast" and ident is not None:
            self._frame(ident, block + b"\n\n")
        else:
            storm.others += 1

    def _reset(self, ident: bytes) -> None:
        """A reset: reading goes on from its id, a new segment (what is owed starts there)."""
        self.resets += 1
        self.storm.resets += 1
        self.opening_off = False
        self._close_segment()
        self.anchor = ident
        canon = self.storm.canon
        j = canon.index.get(ident)
        if j is None:
            self.private = []  # on its own until a frame says where it is in the log
            self.storm.apart += 1
        else:
            self.private = None
            self.off = self.seg_start = canon.ends[j]

    def _frame(self, ident: bytes, frame: bytes) -> None:
        """One event frame, parsed (it differs from the log where this stream is, or goes past
        its end). Most are in the log: where this stream is (it goes on), before (a double),
        or further (a gap: a new segment from its last id, which counts what it skipped as
        lost). One past the log's end extends it. One the log does not hold where this stream
        is (the log has a hole there: its frames came only to streams not read yet) is read
        on its own (`private`: its ids listed), until it meets the log again."""
        canon = self.storm.canon
        j = canon.index.get(ident)
        k = key(ident) or (-1, -1)
        private = self.private
        if private is not None:
            if j is not None:
                self._to_log(canon.start_of(j))
            elif k > canon.last_key:
                self._to_log(len(canon.data))
            else:
                private.append(ident)  # (its order is checked with the rest: analyse)
                return
        if j is not None:
            start = canon.start_of(j)
            if start == self.off:
                self.off = canon.ends[j]
            elif start < self.off:
                self.storm.doubles += 1
            else:
                self._to_log(start)
                self.off = canon.ends[j]
        elif self.off == len(canon.data) and k > canon.last_key:
            canon.append(ident, frame)
            self.off = len(canon.data)
        else:
            last = self._last_id()
            self._close_segment()
            self.anchor = last
            self.private = [ident]
            self.storm.apart += 1

    def _to_log(self, start: int) -> None:
        """A new segment in the log, at `start`, after its last id."""
        last = self._last_id()
        self._close_segment()
        self.anchor = last
        self.private = None
        self.off = self.seg_start = start

    def _close_segment(self) -> None:
        if self.private is not None:
            if self.private:
                self.apart_segments.append((self.anchor, self.private))
        elif self.off > self.seg_start:
            self.segments.append((self.anchor, self.seg_start, self.off))

    def _last_id(self) -> bytes:
        """The id of the last complete frame it received (its Last-Event-ID)."""
        if self.private is not None:
            return self.private[-1] if self.private else self.anchor
        canon = self.storm.canon
        i = canon.frames_to(self.off)
        if i == 0 or canon.ends[i - 1] <= self.seg_start:
            return self.anchor
        return canon.ids[i - 1]

    def cut_here(self) -> None:
        """Its stream is gone: what it had of a frame is dropped (EventSource dispatches whole
        events only); it will resume after the last whole one."""
        self.last_id = self._last_id()
        if self.private is None:
            i = self.storm.canon.frames_to(self.off)
            boundary = self.storm.canon.ends[i - 1] if i else 0
            self.off = max(boundary, self.seg_start)
        if self.opening_off:
            self.storm.openings_off += 1
            self.opening_off = False
        self.buf = self.pbuf = b""
        self.state = IDLE

    def lost(self) -> None:
        """Its connection closed (the hub closed it)."""
        if self.state in (HEAD, OPENING):
            self._retry(0, None)
            return
        if self.state != STREAM or self.storm.closing:
            return
        self.conn = None
        had_end = self.ended
        self.cut_here()
        storm = self.storm
        storm.closed_at.append(now())
        if not storm.restarting or not had_end:
            storm.unexpected += 1  # ended by the hub outside a restart, or without an end frame
        self.reconnect_after(self.retry_ms / 1000)  # EventSource: the retry it was told

    def final_segments(
        self,
    ) -> tuple[list[tuple[bytes, int, int]], list[tuple[bytes, list[bytes]]]]:
        """Its segments in the log (anchor, from, to) and apart from it (anchor, ids)."""
        segs, apart = list(self.segments), list(self.apart_segments)
        if self.private is None:
            if self.off > self.seg_start:
                segs.append((self.anchor, self.seg_start, self.off))
        elif self.private:
            apart.append((self.anchor, self.private))
        return segs, apart


class Storm:
    """Every client of a cell, on this one loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        tokens: list[str],
        probes: int,
        seed: int,
    ) -> None:
        self.loop = loop
        self.port = port
        self.canon = Canon()
        self.rng = random.Random(seed)
        self.closing = False
        self.expired = False
        self.restarting = False  # a hub restart is under way: ends are expected
        self.flushing = False  # every stream read at once
        self.t0 = 0.0  # the cut or the SIGTERM
        self.lat_from = 0.0  # probes record the delays of events sent from then on
        self.expected = 0  # streams to come back
        self.back = 0
        self.all_back = asyncio.Event()
        self.t_all_back = 0.0
        self.opened = 0  # first connects (openings read)
        self.all_opened = asyncio.Event()
        self.all_done = asyncio.Event()
        self.at_mark: dict[int, float] = {}  # client -> when it had read the mark
        self.lat_sent = array("d")
        self.lat_delay = array("d")
        self.refusals: dict[int, int] = {}
        self.said: dict[int, str] = {}
        self.errors: dict[str, int] = {}
        self.gave_up = 0
        self.resets = self.doubles = self.others = 0
        self.apart = 0  # times a stream read apart from the log (a reset, a hole in it)
        self.closed_at: list[float] = []  # when the hub closed a stream (a restart: the old)
        self.ends = self.unexpected = self.openings_off = 0
        self.pending: list[Client] = []  # attempts to start, LAUNCH_CHUNK a turn
        self.launching = False
        self.clients = [
            Client(self, i, events_request(port, tok), i < probes) for i, tok in enumerate(tokens)
        ]

    def launch_soon(self, client: Client) -> None:
        self.pending.append(client)
        if not self.launching:
            self.launching = True
            self.loop.call_soon(self._launch)

    def _launch(self) -> None:
        chunk, self.pending = self.pending[:LAUNCH_CHUNK], self.pending[LAUNCH_CHUNK:]
        for client in chunk:
            client.attempt()
        if self.pending:
            self.loop.call_soon(self._launch)
        else:
            self.launching = False

    def came_back(self) -> None:
        self.back += 1
        if self.back >= self.expected and not self.all_back.is_set():
            self.t_all_back = now()
            self.all_back.set()

    def reached(self, client: Client) -> None:
        if client.index not in self.at_mark:
            self.at_mark[client.index] = now()
            if len(self.at_mark) == len(self.clients):
                self.all_done.set()

    def flush(self, on: bool) -> None:
        """Every open stream read at once (on), or in large reads again (off)."""
        self.flushing = on
        for client in self.clients:
            if client.state == STREAM and client.conn is not None and not client.probe:
                client.conn.lowat(1 if on else RCVLOWAT)

    def cut(self, jitter: bool) -> None:
        """This side closes every stream at once; each comes back after a uniform delay within
        its retry (jitter), or at once."""
        clients = self.clients
        for client in clients:
            if client.conn is not None:
                client.conn.close()
                client.conn = None
            if client.timer is not None:
                client.timer.cancel()
                client.timer = None
            client.cut_here()
        for client in clients:
            delay = self.rng.uniform(0.0, client.retry_ms / 1000) if jitter else 0.0
            client.reconnect_after(delay)

    def close(self) -> None:
        self.closing = True
        close_all(self.clients)


# -- one cell -----------------------------------------------------------------------------------


@dataclass
class Row:
    cell: Cell
    n: int
    spread: float | None = None  # the --shutdown-spread the hub ran with (restart cells)
    back: int = 0
    all_back_s: float | None = None
    back_p50: float = 0.0
    back_p99: float = 0.0
    first_try: int = 0
    retries: int = 0
    delay_p50: float | None = None
    delay_p99: float | None = None
    delays: int = 0
    calm_p50: float | None = None
    calm_p99: float | None = None
    lost: int = 0
    short: int = 0  # streams that did not reach the mark
    undelivered: int = 0  # acknowledged events they had not received then (all streams)
    late: int = 0  # streams that reached it more than LATE_AFTER s after its 202 (stalled)
    doubles: int = 0
    resets: int = 0
    reset_streams: int = 0
    apart: int = 0  # times a stream read apart from the log (a hole in it)
    others: int = 0
    unexpected: int = 0
    openings_off: int = 0
    gave_up: int = 0
    ends: int = 0
    window: int = 0  # events acknowledged from the first stream's start to the mark
    canon_frames: int = 0
    unacked: int = 0  # frames in the log (and read apart from it) no 202 acknowledged
    canon_disordered: int = 0
    rss_peak_kb: int = 0
    peak_how: str = ""
    overflows: int = 0
    hub_cpu_s: float = 0.0
    old_exit_s: float | None = None
    closed: tuple[float, float, float] | None = None  # the old hub's closes: first, p50, last
    drain_s: float = 0.0  # from the mark's 202 until every stream had read it
    analyse_s: float = 0.0
    lag_ms: float = 0.0
    bench_cpu_s: float = 0.0
    published: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    refusals: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        resets_ok = self.reset_streams == self.n if self.cell.resets_expected else self.resets == 0
        return (
            self.back == self.n
            and self.lost == self.doubles == self.short == self.late == 0
            and self.unexpected == self.openings_off == self.gave_up == 0
            and self.canon_disordered == 0
            and resets_ok
        )


async def sample_until(
    event: asyncio.Event, deadline: float, pids: Callable[[], list[int]], peak: list[int]
) -> None:
    """Wait for `event` (until `deadline`), sampling the summed VmRSS of `pids()` meanwhile."""
    while not event.is_set() and now() < deadline:
        rss = sum(procs.proc_status_kb(pid, b"VmRSS:") for pid in pids())
        peak[0] = max(peak[0], rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), SAMPLE)  # sampling RSS


def hub_flags(cell: Cell, s: Settings, redis_url: str | None, prefix: str) -> list[str]:
    flags: list[str] = []
    if s.retry is not None:
        flags += ["--retry", f"{s.retry:g}"]
    if cell.kind == "restart":
        flags += ["--shutdown-spread", f"{cell.spread if cell.spread is not None else s.spread:g}"]
    if cell.broker == "redis":
        assert redis_url is not None
        flags += ["--broker", redis_url, "--redis-prefix", prefix]
        flags += ["--workers", str(cell.workers)]
    return flags


async def run_cell(
    cell: Cell,
    s: Settings,
    tmp: Path,
    tokens: list[str],
    redis_url: str | None,
    say: Callable[[str], None],
) -> Row:
    loop = asyncio.get_running_loop()
    n = s.streams
    row = Row(cell, n)
    if cell.kind == "restart":
        row.spread = cell.spread if cell.spread is not None else s.spread
    port = servers.free_port()
    prefix = f"storm-{uuid.uuid4().hex[:8]}"
    flags = hub_flags(cell, s, redis_url, prefix)
    cores = "0" if cell.workers == 1 else "0,1"
    hubs = [await asyncio.to_thread(Hub, tmp, f"{cell.name}-1", port, cores, flags)]
    side: Side | None = None
    storm: Storm | None = None
    try:
        await hubs[0].wait_ready(streak=5 if cell.workers > 1 else 1)
        side = Side(tmp, port, s.rate)
        await side.start()
        first = (await side.mark(1, f"e0-{uuid.uuid4().hex[:8]}"))[-1]
        storm = Storm(loop, port, tokens, s.probes, random.randrange(1 << 30))
        # every stream opens, from the same event on (each is owed the same log)
        t = now()
        for client in storm.clients:
            client.last_id = client.anchor = first.encode()
            storm.launch_soon(client)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(storm.all_opened.wait(), CONNECT_WITHIN)
        if not storm.all_opened.is_set():
            row.notes.append(
                f"only {sum(1 for c in storm.clients if c.state == STREAM)}/{n} streams opened "
                f"within {CONNECT_WITHIN:g} s: not run"
            )
            row.refusals, row.errors = dict(storm.refusals), dict(storm.errors)
            say(f"cell {cell.name}: NOT RUN ({row.notes[-1]})")
            return row
        say(f"cell {cell.name}: {n} streams open in {now() - t:.2f} s; events flowing")
        for client in storm.clients:
            client.tries = 0
            client.statuses = []
        storm.lat_from = now() + 0.5
        await asyncio.sleep(max(0.0, s.warm - FLUSH_BEFORE))  # events flow: the calm before
        storm.flush(True)
        await asyncio.sleep(FLUSH_BEFORE)  # every stream's last id fresh, as a browser's is

        # the storm
        hub = hubs[0]
        peak = [0]
        hwm = False
        if cell.kind == "cut":
            hwm = all(procs.reset_peak(pid) for pid in hub.pids())
        overflows0 = procs.listen_overflows()
        cpu0 = sum(procs.cpu_s(pid) for pid in hub.pids())
        mine0 = procs.cpu_s(os.getpid())
        lag = Lag(loop)
        storm.expected = n
        storm.back = 0
        storm.all_back.clear()
        storm.t0 = t0 = now()
        longest = s.retry or 3.0
        if cell.kind == "cut":
            storm.cut(cell.jitter)
            storm.flush(False)
        else:
            storm.restarting = True
            longest += row.spread or 0.0
            hub.term()  # (every stream still read at once: it takes its end as a browser does)
        storm_deadline = t0 + longest + STORM_EXTRA
        current: list[Hub] = [hub]
        if cell.kind == "restart":
            # the old hub ends its streams and exits; then a new one on the same port
            try:
                await asyncio.to_thread(hub.proc.wait, EXIT_WITHIN)
                row.old_exit_s = now() - t0
            except subprocess.TimeoutExpired:
                row.notes.append(f"the old hub did not exit within {EXIT_WITHIN:g} s")
            storm.flush(False)
            new = await asyncio.to_thread(Hub, tmp, f"{cell.name}-2", port, cores, flags)
            hubs.append(new)
            current[0] = new
            hwm = True  # a fresh process: its VmHWM is its peak
            cpu0 = 0.0

        def pids() -> list[int]:
            return current[0].pids()

        await sample_until(storm.all_back, storm_deadline, pids, peak)
        storm.restarting = False
        row.overflows = procs.listen_overflows() - overflows0
        row.hub_cpu_s = sum(procs.cpu_s(pid) for pid in pids()) - cpu0
        row.bench_cpu_s = procs.cpu_s(os.getpid()) - mine0
        row.lag_ms = lag.stop() * 1000
        if hwm:
            row.rss_peak_kb = sum(procs.proc_status_kb(pid, b"VmHWM:") for pid in pids())
            row.peak_how = "VmHWM"
        else:
            row.rss_peak_kb, row.peak_how = peak[0], "sampled VmRSS"
        if storm.all_back.is_set():
            row.all_back_s = storm.t_all_back - t0
        else:
            storm.expired = True
        clients = storm.clients
        back = [c.back_at - t0 for c in clients if c.back_at]
        row.back = len(back)
        row.back_p50, row.back_p99 = percentile(back, 50), percentile(back, 99)
        row.first_try = sum(1 for c in clients if c.statuses[:1] == [200])
        row.retries = sum(max(0, len(c.statuses) - 1) for c in clients)
        row.gave_up = storm.gave_up
        if storm.closed_at:
            closed = [t - t0 for t in storm.closed_at]
            row.closed = (min(closed), percentile(closed, 50), max(closed))
        until = storm.t_all_back or now()
        delays = [d for t, d in zip(storm.lat_sent, storm.lat_delay, strict=True) if t <= until]
        row.delays = len(delays)
        if delays:
            row.delay_p50, row.delay_p99 = percentile(delays, 50), percentile(delays, 99)
        say(
            f"cell {cell.name}: {row.back}/{n} back in "
            f"{row.all_back_s if row.all_back_s is not None else float('nan'):.2f} s"
        )

        # the closing mark, and every stream up to it
        await asyncio.sleep(MARK_AFTER)
        tag = f"final-{uuid.uuid4().hex[:8]}"
        storm.canon.needle = tag.encode()
        storm.flush(True)
        mark = (await side.mark(1, tag))[-1]
        t_mark = now()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(storm.all_done.wait(), DRAIN_WITHIN)
        row.drain_s = now() - t_mark
        row.late = sum(1 for t in storm.at_mark.values() if t - t_mark > LATE_AFTER)
        analyse(row, storm, side, first, mark)
        row.analyse_s = now() - t_mark - row.drain_s
        if side.failures:
            row.failures = dict(side.failures)
        row.refusals, row.errors = dict(storm.refusals), dict(storm.errors)
        say(
            f"cell {cell.name}: back {row.back}/{n} lost {row.lost} doubles {row.doubles} "
            f"resets {row.resets} ({'expected' if cell.resets_expected else 'none expected'}) "
            f"unexpected-ends {row.unexpected} openings-off "
            f"{row.openings_off} gave-up {row.gave_up} late {row.late + row.short} "
            f"(window {row.window} events) "
            f"{'OK' if row.ok else 'FAILED'}"
        )
        return row
    finally:
        if storm is not None:
            storm.close()
        if side is not None:
            side.close()
        for h in hubs:
            await asyncio.to_thread(h.stop)


def analyse(row: Row, storm: Storm, side: Side, first: str, mark: str) -> None:
    """Every stream against the publisher's acknowledged ids, from the first event to the
    mark: a segment (reading without a break from an anchor id on) owes every acknowledged
    id after its anchor up to its last frame; the last segment owes them up to the mark."""
    canon = storm.canon
    acks = side.acks
    ack_keys = sorted(k for k in (key(a) for a in acks) if k is not None)
    acked = set(acks)
    first_key, mark_key = key(first), key(mark)
    assert first_key is not None and mark_key is not None

    def owed(after: tuple[int, int], upto: tuple[int, int]) -> int:
        return max(0, bisect.bisect_right(ack_keys, upto) - bisect.bisect_right(ack_keys, after))

    row.window = owed(first_key, mark_key)
    mark_end = canon.mark_end or len(canon.data)
    upto = canon.frames_to(mark_end)
    row.canon_frames = upto
    prefix = [0]
    for ident in canon.ids:
        prefix.append(prefix[-1] + (ident.decode() in acked))
    keys = [key(i) or (-1, -1) for i in canon.ids[:upto]]
    row.unacked = upto - prefix[upto]
    row.canon_disordered = sum(1 for a, b in itertools.pairwise(keys) if a >= b)
    if not canon.mark_end:
        row.notes.append("no stream read the closing mark")
    for client in storm.clients:
        last_key = key(client.anchor) or (-1, -1)
        segments, apart = client.final_segments()
        for anchor, start, end in segments:
            anchor_key = key(anchor) or (-1, -1)
            last_key = max(last_key, anchor_key)
            a, b = canon.frames_to(start), canon.frames_to(min(end, mark_end))
            if b > a:
                last = key(canon.ids[b - 1]) or (-1, -1)
                row.lost += max(0, owed(anchor_key, last) - (prefix[b] - prefix[a]))
                last_key = max(last_key, last)
        for anchor, ids in apart:
            anchor_key = key(anchor) or (-1, -1)
            last_key = max(last_key, anchor_key)
            prev, got = anchor_key, 0
            for ident in ids:
                k = key(ident) or (-1, -1)
                if k > mark_key:
                    break
                if k <= prev:  # at or before an id it had: a double (or out of order)
                    row.doubles += 1
                    continue
                prev = k
                if ident.decode() in acked:
                    got += 1
                else:
                    row.unacked += 1
            if prev > anchor_key:
                row.lost += max(0, owed(anchor_key, prev) - got)
                last_key = max(last_key, prev)
        if client.index not in storm.at_mark:
            row.short += 1
            row.undelivered += owed(last_key, mark_key)
        if client.resets:
            row.reset_streams += 1
        if client.opening_off:
            row.openings_off += 1
    row.doubles += storm.doubles
    row.resets = storm.resets
    row.apart = storm.apart
    row.others = storm.others
    row.unexpected = storm.unexpected
    row.openings_off += storm.openings_off
    row.ends = storm.ends
    row.published = len(acks)
    if row.unacked:
        unknown = side.failures.get(UNKNOWN, 0)
        row.notes.append(
            f"{row.unacked} deliveries of events that were not acknowledged "
            f"({unknown} publishes had no answer: they may have been stored)"
        )
    calm = [
        d
        for t, d in zip(storm.lat_sent, storm.lat_delay, strict=True)
        if t < storm.t0 - FLUSH_BEFORE
    ]
    if calm:
        row.calm_p50, row.calm_p99 = percentile(calm, 50), percentile(calm, 99)


# -- the report ----------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def table(rows: list[Row]) -> list[str]:
    head = (
        f"{'cell':<20} {'broker':<6} {'wk':>2} {'spread':>6} {'back':>11} {'all back':>9} "
        f"{'back p50/p99 s':>15} {'delay p50/p99 ms':>17} {'lost':>5} {'dbl':>4} {'late':>5} "
        f"{'resets':>13} {'RSS MB':>7} {'ovfl':>5} {'hub CPU s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.cell
        spread = "-" if r.spread is None else f"{r.spread:g}s"
        all_back = f"{r.all_back_s:.2f} s" if r.all_back_s is not None else "never"
        resets = f"{r.resets}" + (" (expected)" if c.resets_expected else "")
        lines.append(
            f"{c.name:<20} {c.broker:<6} {c.workers:>2} {spread:>6} {f'{r.back}/{r.n}':>11} "
            f"{all_back:>9} {f'{r.back_p50:.2f}/{r.back_p99:.2f}':>15} "
            f"{f'{ms(r.delay_p50)}/{ms(r.delay_p99)}':>17} {r.lost:>5} {r.doubles:>4} "
            f"{r.late + r.short:>5} "
            f"{resets:>13} {r.rss_peak_kb / 1024:>7.0f} {r.overflows:>5} {r.hub_cpu_s:>9.2f}"
        )
    return lines


LEGEND = [
    "cut-*: this side closes every socket at once (jitter: each back after a uniform delay "
    "within its opening's retry:; nojitter: all at once); restart-*: SIGTERM to the hub, a "
    "new hub on the same port once it exited, each client back after the retry: it was told "
    "(drawn by the hub from [retry, retry + spread]); wk: hub worker processes",
    "all back: from the cut/SIGTERM until every stream's 200 and opening were read; back "
    "p50/p99: the same per stream; delay: publisher's send to receipt, on the probe streams, "
    "of the events published from the cut/SIGTERM until all were back (a probe away receives "
    "them when it is back: its wait counts; on restart-memory those the new hub took before "
    "it came back are covered by its reset, not delivered)",
    "lost/dbl: over every stream, every acknowledged id after its Last-Event-ID (or after "
    "its reset's id) up to a closing mark; resets: `event: reset` frames (expected on the "
    "memory broker's restart: its history is gone, every resume is reset); late: streams "
    f"that read the mark more than {LATE_AFTER:g} s after its 202 or not within "
    f"{DRAIN_WITHIN:g} s (stalled: a cell fails on any; lost counts only gaps, ids missing "
    "before one a stream received)",
    "RSS MB: peak of the hub serving the reconnects (VmHWM summed over its processes; "
    "restart: the new hub's); ovfl: TcpExt ListenOverflows during the storm (system-wide); "
    "hub CPU s: the serving hub's, from the cut (restart: from its start) until all were back",
]


def details(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        lines.append(f"  {r.cell.name}:")
        first = f"first attempt 200: {r.first_try}/{r.n}, retries {r.retries}, gave up {r.gave_up}"
        if r.refusals:
            first += "; refusals " + ", ".join(f"{v} x {k}" for k, v in sorted(r.refusals.items()))
        if r.errors:
            first += "; " + ", ".join(f"{v} x {k}" for k, v in sorted(r.errors.items())[:4])
        lines.append(f"    {first}")
        owed = (
            f"window {r.window} events acknowledged (first to mark); canon {r.canon_frames} "
            f"frames, {r.canon_disordered} out of order, {r.unacked} deliveries unacknowledged; "
            f"streams reset {r.reset_streams}, end frames {r.ends}, read apart {r.apart}, other "
            f"events {r.others}, ended without cause {r.unexpected}, openings off "
            f"{r.openings_off}, short of the mark {r.short} (owed {r.undelivered} events "
            "they had not received)"
        )
        lines.append(f"    {owed}")
        load = (
            f"delays sampled {r.delays}; before the storm p50/p99 {ms(r.calm_p50)}/"
            f"{ms(r.calm_p99)} ms; this process {r.bench_cpu_s:.1f} CPU s over the storm (its "
            f"loop {r.lag_ms:.0f} ms late at worst); RSS by {r.peak_how}"
        )
        if r.closed is not None:
            load += (
                f"; the old hub closed the streams {r.closed[0]:.2f} to {r.closed[2]:.2f} s "
                f"after SIGTERM (p50 {r.closed[1]:.2f} s)"
            )
        if r.old_exit_s is not None:
            load += f" and exited after {r.old_exit_s:.2f} s"
        load += f"; every stream at the mark {r.drain_s:.2f} s after its 202"
        if r.late or r.short:
            load += (
                f" ({r.late} more than {LATE_AFTER:g} s after it, {r.short} not within "
                f"{DRAIN_WITHIN:g} s: stalled)"
            )
        load += f" (checked in {r.analyse_s:.2f} s)"
        lines.append(f"    {load}")
        published = f"publisher: {r.published} events acknowledged"
        if r.failures:
            published += ", refused or failed: " + ", ".join(
                f"{v} x {k}" for k, v in sorted(r.failures.items())
            )
        lines.append(f"    {published}")
        lines += [f"    note: {x}" for x in r.notes]
    return lines


async def main_async(
    s: Settings, cells: list[Cell], say: Callable[[str], None], keep: bool
) -> list[Row]:
    hub_core, rest = procs.cores()
    if hub_core is not None:
        os.sched_setaffinity(0, rest)  # this process, redis and the publisher off core 0
    tmp = Path(tempfile.mkdtemp(prefix="hub-storm-"))
    redis: servers.RedisServer | None = None
    rows: list[Row] = []
    try:
        if any(c.broker == "redis" for c in cells):
            redis = await asyncio.to_thread(servers.RedisServer, tmp, rest[-1])
        t = now()
        tokens = [token(f"storm-{i}") for i in range(s.streams)]
        say(f"{s.streams} tokens in {now() - t:.2f} s")
        for cell in cells:
            try:
                rows.append(await run_cell(cell, s, tmp, tokens, redis.url if redis else None, say))
            except (RuntimeError, OSError, TimeoutError) as exc:
                say(f"cell {cell.name}: FAILED to run: {type(exc).__name__}: {exc}")
                rows.append(Row(cell, s.streams, notes=[f"not run: {exc}"[:300]]))
    finally:
        if redis is not None:
            redis.stop()
        procs.drop_logs(tmp, keep, say)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=10_000, help="streams (default 10,000)")
    parser.add_argument("--probes", type=int, default=PROBES, help="probe streams (latency)")
    parser.add_argument("--rate", type=float, default=RATE, help="events/s published")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="200 streams, 50 probes, hubs at --retry 1 and a default spread of 2 s (a test)",
    )
    parser.add_argument(
        "--cells",
        default=",".join(c.name for c in CELLS),
        help="which cells, by name (default: all)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument("--side", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        asyncio.run(side_main(args.side, args.rate))
        return
    retry, default_spread = hub_defaults()
    if args.quick:
        s = Settings(
            int(QUICK["streams"]),
            int(QUICK["probes"]),
            args.rate,
            QUICK["warm"],
            QUICK["retry"],
            QUICK["spread"],
            default_spread,
        )
    else:
        s = Settings(
            args.streams, args.probes, args.rate, WARM, None, default_spread, default_spread
        )
    if s.streams < 1:
        parser.error("--streams must be at least 1")
    wanted = [w.strip() for w in args.cells.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in {c.name for c in CELLS}]
    if unknown:
        parser.error(f"--cells: no cell {unknown[0]!r} (have: {', '.join(c.name for c in CELLS)})")
    cells = [c for c in CELLS if c.name in wanted]
    if any(c.broker == "redis" for c in cells) and shutil.which("redis-server") is None:
        print("storm: redis-server is missing (apt-get install redis-server)", file=sys.stderr)
        sys.exit(2)
    procs.enough_descriptors("storm", s.streams)
    t_run, say = procs.sayer()

    say(f"bench.storm: {' '.join(sys.argv[1:]) or '(defaults)'}")
    say(f"machine: {procs.machine()}")
    say(f"hub: commit {procs.commit('--untracked-files=no')}")
    say(
        f"{s.streams} streams ({s.probes} probes), {s.rate:g} broadcasts/s throughout; hubs at "
        f"--retry {s.retry if s.retry is not None else retry:g} s, default cells' "
        f"--shutdown-spread {s.spread:g} s (the hub's default: {default_spread:g} s); "
        "hub on core 0 (--workers 2: both), this process, the publisher and redis on core 1"
    )
    rows = procs.run_main("storm", main_async(s, cells, say, args.keep), RUN_WITHIN)
    print()
    print("\n".join(table(rows)))
    print("\n".join(LEGEND))
    print("\n".join(details(rows)))
    ok = bool(rows) and all(r.ok for r in rows)
    print(
        f"total: {len(rows)} cells, lost {sum(r.lost for r in rows)} doubles "
        f"{sum(r.doubles for r in rows)} late {sum(r.late + r.short for r in rows)} "
        "unexpected resets "
        f"{sum(r.resets for r in rows if not r.cell.resets_expected)}: "
        f"{'OK' if ok else 'FAILED'} in {now() - t_run:.0f} s"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
