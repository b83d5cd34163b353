"""The load generator: one process, one core, one uvloop event loop.

Run as ``python -m bench.loadgen`` by the orchestrator, with a JSON spec on stdin; prints one
JSON result line on stdout (logs go to stderr). It:

1. opens ``streams`` SSE subscriber connections at ``connect_rate`` per second and times how
   long until every one has its response head;
2. measures the server's RSS (``/proc/<pid>/status``) before and after, for RSS per stream;
3. publishes at a paced rate (a timer sends what is owed every few ms) or closed-loop (the
   next request leaves when the previous answer arrives), on a few keep-alive connections;
4. counts, on every stream, the events received, and on a sample of probe streams parses each
   event's publish timestamp (``"t": <time_ns>``) for latency;
5. after the publish window waits for the answers still in flight and for the streams to
   drain, then checks zero loss by counting: each stream's received count against what was
   published to it (acknowledged publishes only).

Every subscriber is a ``BufferedProtocol`` reading into one process-wide buffer: no per-read
``bytes`` object on the counting path, no coroutine per connection. Events are counted with
``bytearray.count`` of a marker (``\\nevent: `` for the hub, ``\\ndata:`` for nchan); a marker split
across two reads is caught by checking the seam (last bytes of the previous read + first bytes
of this one), so nothing is counted twice or missed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import re
import resource
import socket
import sys
import time
from array import array
from typing import Any

READ_SIZE = 256 * 1024
SHARED = bytearray(READ_SIZE)
SHARED_MV = memoryview(SHARED)
T_RE = re.compile(rb'"t":\s*(\d+)')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*args: Any) -> None:
    print("[loadgen]", *args, file=sys.stderr, flush=True)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    user, system = proc_times(pid)
    return user + system


def _family(pid: int) -> list[int]:
    """The process and its children (a hub with --workers is a parent and its workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(c) for c in f.read().split())]
    except OSError:
        return [pid]


def proc_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its children, in seconds."""
    user = system = 0.0
    for member in _family(pid):
        try:
            with open(f"/proc/{member}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def proc_rss_kb(pid: int) -> int:
    total = 0
    for member in _family(pid):
        try:
            with open(f"/proc/{member}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def cores_busy_s() -> dict[str, float]:
    """Busy seconds per core from /proc/stat (everything but idle and iowait: user, nice,
    system, irq, softirq, steal), including softirq time no process is charged for."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                parts = line.split()
                vals = [int(v) for v in parts[1:9]]
                out[parts[0]] = (sum(vals) - vals[3] - vals[4]) / CLK_TCK
    return out


def others_cpu_s(exclude: set[int]) -> dict[int, float]:
    """CPU seconds of every other process (to see whether anything else ran meanwhile)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[int(name)] = proc_cpu_s(int(name))
    return out


def others_pct(before: dict[int, float], after: dict[int, float], wall: float) -> float:
    return 100 * sum(v - before.get(k, v) for k, v in after.items()) / wall


def tcp_ext(names: tuple[str, ...] = ("ListenOverflows", "SyncookiesSent")) -> dict[str, int]:
    """System-wide TcpExt counters (/proc/net/netstat): listen-queue overflows during the ramp
    mean the server's accept backlog was too short (the client then waits for a SYN
    retransmit, >= 1 s)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        d = dict(zip(lines[0][1:], lines[1][1:], strict=False))
        return {k: int(d.get(k, 0)) for k in names}
    except (OSError, IndexError, ValueError):
        return {}


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def set_rcvlowat(transport: asyncio.BaseTransport | None, n: int) -> None:
    """SO_RCVLOWAT: epoll reports the socket readable only once n bytes are queued, so a
    counting stream is read in fewer, larger reads (the server's writes are unchanged).
    Setting it back to 1 wakes the reader at once (Linux >= 4.19)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)


class Gen:
    """Shared state of one run."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind: str = spec["kind"]
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.n: int = spec["streams"]
        self.private: bool = spec["routing"] == "private"
        self.rcvlowat: int = spec.get("rcvlowat", 0)
        # "\nevent: ", not "\nid: ": a hub stream's opening block carries an id too
        self.marker: bytes = b"\nevent: " if self.kind == "hub" else b"\ndata:"
        self.topic: bool = spec["routing"] == "topic"
        # "named": `topics` topics named by the publisher (bench.topics), streams reading them
        # in blocks (topic_of: the probes, every n/probes-th stream, spread over them);
        # "plain": broadcast to streams that name no topic
        self.named: int = spec.get("topics", 0) if spec["routing"] == "named" else 0
        self.readers = [0] * self.named  # streams per topic
        for i in range(self.n if self.named else 0):
            self.readers[self.topic_of(i)] += 1
        self.subs: list[Sub] = []
        self.headers_ok = 0
        self.head_errors: list[str] = []
        self.connect_errors = 0
        self.connect_error_sample = ""
        self.t_all_heads = 0.0
        self.all_heads = asyncio.Event()
        self.closing = False
        self.disconnects = 0
        self.latencies = array("q")  # microseconds
        self.chunked_streams = 0
        tokens = spec.get("tokens") or []
        hostport = f"{self.host}:{self.port}"
        self.requests: list[bytes] = []
        for i in range(self.n):
            if self.kind == "hub":
                path = (
                    "/events"
                    if self.private or spec["routing"] == "plain"
                    else "/events?topic=logs"
                    if self.topic
                    else f"/events?topic=t{self.topic_of(i)}"
                    if self.named
                    else "/events?topic=payments"
                )
                auth = f"Authorization: Bearer {tokens[i]}\r\n"
            else:
                chan = f"u{i}" if self.private else "all"
                path = f"/sub?chan={chan}"
                auth = ""
            self.requests.append(
                (
                    f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}"
                    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
                ).encode()
            )

    def topic_of(self, i: int) -> int:
        """The topic stream i reads (routing "named")."""
        return i * self.named // self.n

    def head_received(self) -> None:
        self.headers_ok += 1
        if self.headers_ok == self.n:
            self.t_all_heads = time.monotonic()
            self.all_heads.set()

    def received(self) -> int:
        return sum(s.count for s in self.subs)


class Sub(asyncio.BufferedProtocol):
    """One SSE stream. Counts events; a probe also records latencies."""

    __slots__ = (
        "body",
        "cbuf",
        "chunked",
        "cleft",
        "count",
        "fast",
        "g",
        "head",
        "idx",
        "marker",
        "mlen1",
        "pbuf",
        "pend",
        "prefixes",
        "probe",
        "rests",
        "transport",
    )

    def __init__(self, g: Gen, idx: int, probe: bool) -> None:
        self.g = g
        self.idx = idx
        self.probe = probe
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.body = False
        self.fast = False  # body, not chunked, not a probe: count in place
        self.count = 0
        marker = g.marker
        self.marker = marker
        self.mlen1 = len(marker) - 1
        self.prefixes = [marker[:k] for k in range(len(marker))]
        self.rests = [marker[k:] for k in range(len(marker))]
        # pend: how many leading bytes of the marker the stream so far ends with (the marker
        # starts with its only "\n", so at most one partial marker can be pending). The body
        # starts as if after a "\n", so a marker at its very start is counted.
        self.pend = 1
        self.chunked = False
        self.cbuf = b""
        self.cleft = 0
        self.pbuf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.g.requests[self.idx])  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return SHARED_MV

    def buffer_updated(self, n: int) -> None:
        if self.fast and n >= self.mlen1:
            # Fast path: count in the shared buffer, in place, no allocation.
            self.count += self.count_in(SHARED, n)
            return
        self.data(bytes(SHARED[:n]))

    def count_in(self, buf: bytes | bytearray, n: int) -> int:
        """Markers in buf[:n] plus one completed across the seam; updates pend.
        Needs n >= len(marker) - 1 (shorter reads go through count_short)."""
        marker = self.marker
        c = buf.count(marker, 0, n)
        p = self.pend
        if p and buf.startswith(self.rests[p], 0, n):
            c += 1
        m1 = self.mlen1
        pos = buf.rfind(b"\n", n - m1, n)
        if pos >= 0 and buf.startswith(self.prefixes[n - pos], pos, n):
            self.pend = n - pos
        else:
            self.pend = 0
        return c

    def count_short(self, data: bytes) -> int:
        if len(data) >= self.mlen1:
            return self.count_in(data, len(data))
        t = self.prefixes[self.pend] + data
        self.pend = 0
        return self.count_in(t, len(t)) if len(t) >= self.mlen1 else self._tiny(t)

    def _tiny(self, t: bytes) -> int:
        # fewer bytes than a marker: keep the longest suffix that starts the marker
        pos = t.rfind(b"\n")
        self.pend = len(t) - pos if pos >= 0 and self.marker.startswith(t[pos:]) else 0
        return 0

    def data(self, data: bytes) -> None:
        if not self.body:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > 65536:
                    self.fail("response head too large")
                self.head = head
                return
            self.head = b""
            status_line, _, rest = head[:end].partition(b"\r\n")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or parts[1] != b"200":
                self.fail(status_line.decode("latin-1") + " " + head[end + 4 : end + 200].decode())
                return
            lower = rest.lower()
            if b"transfer-encoding:" in lower and b"chunked" in lower:
                self.chunked = True
                self.g.chunked_streams += 1
            self.body = True
            self.fast = not self.chunked and not self.probe
            if self.g.rcvlowat > 1 and not self.probe:
                set_rcvlowat(self.transport, self.g.rcvlowat)
            self.g.head_received()
            data = head[end + 4 :]
            if not data:
                return
        if self.chunked:
            data = self.dechunk(data)
            if not data:
                return
        self.count += self.count_short(data)
        if self.probe:
            now = time.time_ns()
            buf = self.pbuf + data
            end = buf.rfind(b"\n\n")
            if end >= 0:
                lat = self.g.latencies
                for m in T_RE.findall(buf, 0, end):
                    lat.append((now - int(m)) // 1000)
                buf = buf[end + 2 :]
            self.pbuf = buf

    def dechunk(self, data: bytes) -> bytes:
        """Strip HTTP/1.1 chunk framing. cleft: >0 bytes left in the chunk, 0 size line next,
        -2 the CRLF after a chunk's data next."""
        buf = self.cbuf + data if self.cbuf else data
        out = []
        pos = 0
        n = len(buf)
        while pos < n:
            left = self.cleft
            if left > 0:
                take = min(left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.cleft = left - take if left > take else -2
            elif left == -2:
                if n - pos < 2:
                    break
                pos += 2
                self.cleft = 0
            else:
                e = buf.find(b"\r\n", pos)
                if e < 0:
                    break
                size = int(buf[pos:e].split(b";")[0], 16)
                pos = e + 2
                if size == 0:
                    pos = n
                    break
                self.cleft = size
        self.cbuf = buf[pos:]
        return b"".join(out)

    def fail(self, why: str) -> None:
        if len(self.g.head_errors) < 5:
            self.g.head_errors.append(why[:300])
        else:
            self.g.head_errors.append("")
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.g.closing:
            self.g.disconnects += 1


class PubConn(asyncio.Protocol):
    """A keep-alive publisher connection; parses (pipelined) responses."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.pending: collections.deque[tuple[int, int]] = collections.deque()
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        while True:
            he = buf.find(b"\r\n\r\n", pos)
            if he < 0:
                break
            head = buf[pos:he].lower()
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 17)
                clen = int(head[i + 17 : j if j >= 0 else len(head)])
                end = he + 4 + clen
                if end > n:
                    break
            elif b"chunked" in head:
                z = buf.find(b"\r\n0\r\n\r\n", he)
                if z < 0:
                    z = buf.find(b"0\r\n\r\n", he + 4, he + 9)
                    if z < 0:
                        break
                    end = z + 5
                else:
                    end = z + 7
            else:
                end = he + 4
            status = int(head[9:12])
            body = buf[he + 4 : end]
            pos = end
            if not self.pending:
                self.pub.note_error(f"unexpected response {status}")
                continue
            nev, first = self.pending.popleft()
            self.pub.answered(self, status, nev, first, body)
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.pub.stopped or self.pending:
            self.pub.note_error(f"publisher connection lost ({exc}); {len(self.pending)} in flight")
            self.pending.clear()


class Publisher:
    def __init__(self, g: Gen, spec: dict[str, Any]) -> None:
        self.g = g
        self.mode: str = spec["mode"]  # "rate" | "closed"
        self.rate: float = spec.get("rate", 0)
        self.conns_n: int = spec.get("conns", 1)
        self.inflight: int = spec.get("inflight", 1)
        self.batch_max: int = spec.get("batch_max", 1)
        self.batch_exact: bool = spec.get("batch_exact", False)
        self.single: bool = spec.get("single", True)  # one event per request, not an array
        self.tick: float = spec.get("tick", 0.002)
        self.conns: list[PubConn] = []
        self.stopped = False
        self.t0 = 0.0
        self.duration = 0.0
        self.owed_sent = 0  # events put on the wire
        self.requests_sent = 0
        self.acked_events = 0
        self.acked_requests = 0
        self.errors = 0
        self.error_sample: list[str] = []
        self.next_user = 0
        # acknowledged events per user (private) or per topic (named)
        self.expected = (
            array("q", bytes(8 * g.n))
            if g.private
            else array("q", bytes(8 * g.named))
            if g.named
            else None
        )
        hostport = f"{g.host}:{g.port}"
        if g.kind == "hub":
            self.head = (
                f"POST /publish HTTP/1.1\r\nHost: {hostport}\r\n"
                f"Authorization: Bearer {spec['token']}\r\n"
                "Content-Type: application/json\r\nContent-Length: "
            ).encode()
        else:
            self.head = b""
            self.hostport = hostport.encode()

    def note_error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_sample) < 5:
            self.error_sample.append(why[:300])

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.conns_n):
            _, proto = await loop.create_connection(lambda: PubConn(self), self.g.host, self.g.port)
            self.conns.append(proto)  # type: ignore[arg-type]

    def build(self, nev: int, t: int) -> tuple[bytes, int]:
        """One request carrying nev events (hub) or one event (nchan); returns (bytes, first
        user index)."""
        g = self.g
        first = -1
        if g.kind == "hub":
            if g.private:
                first = self.next_user
                n = g.n
                evs = [
                    b'{"type":2,"user":"u%d","data":{"t":%d}}' % ((first + k) % n, t)
                    for k in range(nev)
                ]
                self.next_user = (first + nev) % n
            elif g.named:
                first = self.next_user  # here: the first event's topic
                n = g.named
                evs = [
                    b'{"type":"broadcast","topic":"t%d","data":{"t":%d}}' % ((first + k) % n, t)
                    for k in range(nev)
                ]
                self.next_user = (first + nev) % n
            elif g.topic:
                evs = [b'{"type":4,"data":{"t":%d}}' % t] * nev
            else:
                evs = [b'{"type":5,"data":{"t":%d}}' % t] * nev
            body = evs[0] if self.single and nev == 1 else b"[" + b",".join(evs) + b"]"
            return self.head + b"%d\r\n\r\n" % len(body) + body, first
        if g.private:
            first = self.next_user
            self.next_user = (first + 1) % g.n
            chan = b"u%d" % first
        else:
            chan = b"all"
        body = b'{"t":%d}' % t
        return (
            b"POST /pub?chan=%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (chan, self.hostport, len(body), body)
        ), first

    def send_on(self, conn: PubConn, owed: int) -> int:
        """Fill conn's window with what is owed; returns events sent."""
        if conn.closed or conn.transport is None:
            return 0
        sent = 0
        out = []
        t = time.time_ns()
        per = 1 if self.g.kind == "nchan" else self.batch_max
        while owed - sent > 0 and len(conn.pending) < self.inflight:
            nev = min(per, owed - sent)
            if self.batch_exact and nev < per:
                break
            req, first = self.build(nev, t)
            out.append(req)
            conn.pending.append((nev, first))
            sent += nev
        if out:
            conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
            self.requests_sent += len(out)
            self.owed_sent += sent
        return sent

    def answered(self, conn: PubConn, status: int, nev: int, first: int, body: bytes) -> None:
        if 200 <= status < 300:
            self.acked_events += nev
            self.acked_requests += 1
            exp = self.expected
            if exp is not None:
                n = len(exp)
                if first + nev <= n:
                    for u in range(first, first + nev):
                        exp[u] += 1
                else:
                    for k in range(nev):
                        exp[(first + k) % n] += 1
        else:
            self.note_error(f"{status} {body[:200]!r}")
        if self.stopped:
            return
        if self.mode == "closed":
            self.send_on(conn, self.batch_max if not self.single else 1)
        else:
            # paced: what is owed by now leaves at once on the connection that just freed up
            elapsed = min(time.monotonic() - self.t0, self.duration)
            owed = int(self.rate * elapsed) - self.owed_sent
            if owed > 0:
                self.send_on(conn, owed)

    async def run(self, duration: float) -> tuple[float, float]:
        """Publish for duration seconds; returns (t0, t_end) in loop time."""
        now = time.monotonic
        t0 = self.t0 = now()
        self.duration = duration
        end = t0 + duration
        if self.mode == "closed":
            per = 1 if self.single else self.batch_max
            for c in self.conns:
                for _ in range(self.inflight):
                    self.send_on(c, per)
            await asyncio.sleep(duration)
            self.stopped = True
            return t0, now()
        rr = 0
        nconn = len(self.conns)
        while True:
            t = now()
            last = t >= end
            elapsed = duration if last else t - t0
            owed = int(self.rate * elapsed) - self.owed_sent
            for k in range(nconn):
                if owed <= 0:
                    break
                owed -= self.send_on(self.conns[(rr + k) % nconn], owed)
            rr += 1
            if last:
                break
            await asyncio.sleep(min(self.tick, max(0.0, end - now())))
        self.stopped = True
        return t0, now()

    def all_answered(self) -> bool:
        return all(not c.pending or c.closed for c in self.conns)


async def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        r, w = await asyncio.open_connection(host, port)
        w.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = await r.read()
        w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head[9:12]), body

    return await asyncio.wait_for(go(), timeout)


STREAMS_RE = re.compile(rb'"streams"\s*:\s*(\d+)|subscribers:\s*(\d+)')


async def server_streams(g: Gen) -> int | None:
    path = "/healthz" if g.kind == "hub" else "/nchan_status"
    try:
        status, body = await http_get(g.host, g.port, path)
    except (OSError, TimeoutError, ValueError):
        return None
    m = STREAMS_RE.search(body)
    if status != 200 or not m:
        return None
    return int(m.group(1) or m.group(2))


def percentile(sorted_vals: list[int], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[k] / 1000.0


async def run(g: Gen, spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pid: int = spec["server_pid"]
    res: dict[str, Any] = {"streams": g.n}
    n = g.n
    nprobes = min(spec.get("probes", 100), n)
    probe_every = max(1, n // nprobes) if nprobes else 0
    g.subs = [
        Sub(g, i, bool(nprobes) and i % probe_every == 0 and i // probe_every < nprobes)
        for i in range(n)
    ]
    res["probes"] = sum(1 for s in g.subs if s.probe)
    rss0 = proc_rss_kb(pid)
    res["rss0_kb"] = rss0

    # 1. connect at the controlled rate
    if n:
        rate = spec.get("connect_rate", 5000)
        tasks: set[asyncio.Task[Any]] = set()

        async def connect_one(s: Sub) -> None:
            try:
                await loop.create_connection(lambda: s, g.host, g.port)
            except OSError as e:
                g.connect_errors += 1
                g.connect_error_sample = str(e)

        ext0 = tcp_ext()
        cpu0 = proc_cpu_s(pid)
        t_start = time.monotonic()
        started = 0
        while started < n:
            owed = min(n, int((time.monotonic() - t_start) * rate) + 1)
            while started < owed:
                task = loop.create_task(connect_one(g.subs[started]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                started += 1
            await asyncio.sleep(0.002)
        res["ramp_s"] = time.monotonic() - t_start
        deadline = spec.get("connect_timeout", 30.0)
        try:
            await asyncio.wait_for(g.all_heads.wait(), deadline)
            res["connect_s"] = g.t_all_heads - t_start
            # the server's CPU time per stream opened (accept, request, checks, opening)
            res["connect_cpu_us"] = (proc_cpu_s(pid) - cpu0) / n * 1e6
        except TimeoutError:
            res["connect_s"] = None
        res["connected"] = g.headers_ok
        ext1 = tcp_ext()
        res["tcp_ext"] = {k: ext1[k] - ext0.get(k, 0) for k in ext1}
        res["connect_errors"] = g.connect_errors + len(g.head_errors)
        if g.connect_error_sample or g.head_errors:
            res["connect_error_sample"] = [g.connect_error_sample, *g.head_errors[:5]]
        res["chunked_streams"] = g.chunked_streams
        # let the server see every stream (its own count where it has one)
        t_wait = time.monotonic() + spec.get("settle_timeout", 5.0)
        seen = None
        while time.monotonic() < t_wait:
            seen = await server_streams(g)
            if seen is None or seen >= g.headers_ok:
                break
            await asyncio.sleep(0.05)
        res["server_streams"] = seen
        await asyncio.sleep(spec.get("settle", 0.5))
    rss1 = proc_rss_kb(pid)
    res["rss1_kb"] = rss1
    res["rss_per_stream_kb"] = (rss1 - rss0) / n if n else None

    pub_spec = spec.get("publish")
    if not pub_spec:
        # idle: hold the streams, measure the server's idle CPU (heartbeats)
        mine = {pid, os.getpid()}
        o0, b0 = others_cpu_s(mine), cores_busy_s()
        c0, s0, t0 = proc_cpu_s(pid), self_cpu_s(), time.monotonic()
        await asyncio.sleep(spec.get("idle_hold", 2.0))
        wall = time.monotonic() - t0
        b1, o1 = cores_busy_s(), others_cpu_s(mine)
        res["others_cpu_pct"] = others_pct(o0, o1, wall)
        res["cores_busy_pct"] = {k: 100 * (b1[k] - b0[k]) / wall for k in b1}
        res["srv_cpu_pct"] = 100 * (proc_cpu_s(pid) - c0) / wall
        res["lg_cpu_pct"] = 100 * (self_cpu_s() - s0) / wall
        res["rss_end_kb"] = proc_rss_kb(pid)
        res["disconnects"] = g.disconnects
        return finish(g, res)

    pub = Publisher(g, pub_spec)
    await pub.connect()
    duration = spec["duration"]
    recv0 = g.received()
    # a broker process of the benchmark's own (redis-server): its CPU is accounted, not noise
    broker = spec.get("broker_pid")
    mine = {pid, os.getpid(), *([broker] if broker else [])}
    o0, b0 = others_cpu_s(mine), cores_busy_s()
    k0 = proc_times(pid)[1]
    r0 = proc_cpu_s(broker) if broker else 0.0
    c0, s0, w0 = proc_cpu_s(pid), self_cpu_s(), time.monotonic()
    await pub.run(duration)
    c1, s1, w1 = proc_cpu_s(pid), self_cpu_s(), time.monotonic()
    r1 = proc_cpu_s(broker) if broker else 0.0
    k1 = proc_times(pid)[1]
    b1, o1 = cores_busy_s(), others_cpu_s(mine)
    recv1 = g.received()
    if g.rcvlowat > 1:
        # from here on every byte counts at once (the drain)
        for s in g.subs:
            set_rcvlowat(s.transport, 1)
    wall = w1 - w0
    res["duration_s"] = wall
    res["srv_cpu_pct"] = 100 * (c1 - c0) / wall
    res["srv_sys_pct"] = 100 * (k1 - k0) / wall  # the kernel's share (send(), recv(), epoll)
    res["lg_cpu_pct"] = 100 * (s1 - s0) / wall
    res["broker_cpu_pct"] = 100 * (r1 - r0) / wall
    res["cores_busy_pct"] = {k: 100 * (b1[k] - b0[k]) / wall for k in b1}
    res["others_cpu_pct"] = others_pct(o0, o1, wall)
    res["delivery_rate"] = (recv1 - recv0) / wall
    res["rss_end_kb"] = proc_rss_kb(pid)
    # drain: wait for the answers still in flight and until every stream has what was
    # published to it (acknowledged publishes only), or progress stops
    t_drain = time.monotonic()
    hard = t_drain + spec.get("drain_timeout", 20.0)
    stall = spec.get("stall_timeout", 3.0)
    last, last_change = recv1, w1
    while True:
        got = g.received()
        now = time.monotonic()
        if got != last:
            last, last_change = got, now
        answered = pub.all_answered()
        expected_total = (
            sum(a * r for a, r in zip(pub.expected, g.readers, strict=True))
            if g.named and pub.expected is not None
            else pub.acked_events * (1 if g.private else n)
        )
        if answered and got >= expected_total:
            break
        if (answered and now - last_change > stall) or now > hard:
            break
        await asyncio.sleep(0.01)
    res["drain_s"] = time.monotonic() - t_drain
    res["answers_complete"] = answered
    res["offered_rate"] = pub.rate if pub.mode == "rate" else None
    res["acked_events"] = pub.acked_events
    res["acked_requests"] = pub.acked_requests
    res["published_rate"] = pub.acked_events / duration
    res["request_rate"] = pub.acked_requests / duration
    res["pub_errors"] = pub.errors
    if pub.error_sample:
        res["pub_error_sample"] = pub.error_sample
    if g.rcvlowat > 1:
        # counting streams were read late (SO_RCVLOWAT): the in-window count misses what sat
        # in their socket buffers at the end; count to the time the last event arrived instead
        res["delivery_rate"] = (g.received() - recv0) / max(wall, last_change - w0)
    lost = extra = 0
    if g.private or g.named:
        exp = pub.expected
        assert exp is not None
        for s in g.subs:  # stream i reads user i, or its topic
            d = exp[g.topic_of(s.idx) if g.named else s.idx] - s.count
            if d > 0:
                lost += d
            else:
                extra -= d
    else:
        e = pub.acked_events
        for s in g.subs:
            d = e - s.count
            if d > 0:
                lost += d
            else:
                extra -= d
    res["expected"] = expected_total
    res["received"] = g.received()
    res["lost"] = lost
    res["extra"] = extra
    res["disconnects"] = g.disconnects
    return finish(g, res)


def finish(g: Gen, res: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(g.latencies)
    res["samples"] = len(lat)
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        res[name + "_ms"] = percentile(lat, q)
    return res


def close_all(g_subs: list[Sub]) -> None:
    """Reset (RST) every stream so no TIME_WAIT is left on the client side."""
    import struct

    linger = struct.pack("ii", 1, 0)
    for s in g_subs:
        tr = s.transport
        if tr is None:
            continue
        sock = tr.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        tr.close()


async def amain(spec: dict[str, Any]) -> dict[str, Any]:
    g = Gen(spec)
    try:
        return await asyncio.wait_for(run(g, spec), spec.get("timeout", 300))
    except TimeoutError:
        return {"error": "loadgen timeout"}
    finally:
        g.closing = True
        close_all(g.subs)
        await asyncio.sleep(0.05)


def main() -> None:
    spec = json.loads(sys.stdin.read())
    if spec.get("tokens_file"):
        with open(spec["tokens_file"]) as f:
            tok = json.load(f)
        spec["tokens"] = tok["subscribers"]
        if spec.get("publish"):
            spec["publish"]["token"] = tok["publisher"]
    core = spec.get("core")
    if core is not None:
        os.sched_setaffinity(0, {core})
    raise_nofile()
    gc.disable()
    factory = None
    loop_name = "asyncio"
    if spec.get("loadgen_loop", "uvloop") == "uvloop":
        try:
            import uvloop

            factory = uvloop.new_event_loop
            loop_name = "uvloop"
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(amain(spec))
    res["loadgen_loop"] = loop_name
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
