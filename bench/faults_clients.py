"""The fault checker's clients and its network fault: publishers, subscribers, a blackhole.

All of them run in the checker's one asyncio loop, over loopback sockets, and write what they
saw into the history of ``bench.faults_check``:

- ``Publisher``: one request in flight; each request a batch of 1-3 broadcasts (type 5, which
  reaches every stream) whose data carry a unique tag. With an Idempotency-Key it retries on
  a 503 or a connection error under the same key (bounded in attempts and time); without one
  it never retries. Each attempt is recorded with what it was told.
- ``Subscriber``: one client across many connections: raw SSE over a socket, cut at random
  moments (or held away across a fault), and resumed with the last `id:` it received (ids
  are opaque: echoed, never parsed) on a node picked at random.
- ``Blackhole``: a TCP proxy between one hub node and Redis that can stop forwarding in both
  directions without closing anything, then heal. What was sent meanwhile is delivered on
  heal (TCP delivers what was sent before a close), the way a healed partition does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from bench.faults_check import (
    NOT_PUBLISHED,
    STORED,
    UNKNOWN,
    UNSENT,
    Attempt,
    Publish,
    Received,
    SubscriberLog,
)

__all__ = ["Blackhole", "Publisher", "Subscriber", "classify", "http_get"]

now = time.monotonic

CONNECT_TIMEOUT = 2.0
# Longer than the hub's own Redis timeouts (5 s): the hub's answer, not ours, is recorded.
PUBLISH_TIMEOUT = 12.0
RETRY_FOR = 40.0  # seconds a keyed publisher keeps retrying one publish (past a 20 s stall)
MAX_ATTEMPTS = 200
MAX_PUBLISHES = 1_000_000
MAX_CONNECTS = 100_000


def classify(status: int, body: Any) -> str:
    """What a publish's answer says: 202 stored; a 503 that says the outcome (the `outcome`
    field, or, without one, an error that begins "not published") is not published; any
    other answer may or may not have stored it."""
    if status == 202:
        return STORED
    if status == 503 and isinstance(body, dict):
        outcome = body.get("outcome")
        if outcome == "not_published":
            return NOT_PUBLISHED
        if outcome is None and str(body.get("error", "")).startswith("not published"):
            return NOT_PUBLISHED
    return UNKNOWN


def _request(method: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _answer(
    reader: asyncio.StreamReader, timeout: float
) -> tuple[int, dict[str, str], bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status, headers = _head(head[:-4])
    length = int(headers.get("content-length", "-1"))
    left = max(0.01, deadline - loop.time())
    if length >= 0:
        body = await asyncio.wait_for(reader.readexactly(length), left)
    else:
        body = await asyncio.wait_for(reader.read(), left)
    return status, headers, body


async def http_get(port: int, path: str, timeout: float = 2.0) -> int:
    """The status of a GET; 0 when no answer came."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return 0
    try:
        writer.write(_request("GET", port, path, {}, b""))
        status, _, _ = await _answer(reader, timeout)
        return status
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return 0
    finally:
        writer.transport.abort()


async def post(
    node: int, port: int, headers: dict[str, str], body: bytes, timeout: float = PUBLISH_TIMEOUT
) -> Attempt:
    """One POST /publish on its own connection, and what it was told."""
    start = now()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        return Attempt(start, now(), UNSENT, node, 0, f"connect: {exc!r}"[:200])
    try:
        writer.write(_request("POST", port, "/publish", headers, body))
        status, answer_headers, raw = await _answer(reader, timeout)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        return Attempt(start, now(), UNKNOWN, node, 0, f"{type(exc).__name__}: {exc}"[:200])
    finally:
        writer.transport.abort()
    end = now()
    try:
        answer: Any = json.loads(raw)
    except ValueError:
        answer = None
    outcome = classify(status, answer)
    if outcome == STORED:
        ids = answer.get("ids") if isinstance(answer, dict) else None
        replayed = answer_headers.get("idempotent-replayed", "").lower() == "true"
        return Attempt(start, end, STORED, node, status, json.dumps(ids), replayed)
    error = answer.get("error") if isinstance(answer, dict) else raw[:200].decode(errors="replace")
    return Attempt(start, end, outcome, node, status, str(error)[:300])


class Publisher:
    """One request in flight, `rate` requests a second at most, until `stop` is set."""

    def __init__(
        self,
        name: str,
        keyed: bool,
        token: str,
        nodes: Callable[[], list[tuple[int, int]]],
        rng: random.Random,
        rate: float,
        run_id: str,
        log: list[Publish],
    ) -> None:
        self.name = name
        self.keyed = keyed
        self.token = token
        self.nodes = nodes  # (node index, port) of every node, up or down
        self.rng = rng
        self.rate = rate
        self.run_id = run_id
        self.log = log
        self.seq = 0
        self.anomalies: list[str] = []  # answers that are neither 202 nor 503

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.seq < MAX_PUBLISHES:
            began = now()
            await self.publish_one(self.rng.choice((1, 1, 1, 2, 3)))
            pause = 1.0 / self.rate - (now() - began)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)  # pacing, not a synchronisation

    async def publish_one(self, size: int) -> Publish:
        pub = Publish(self.name, self.seq, size, self.keyed)
        self.seq += 1
        self.log.append(pub)
        body = json.dumps([{"type": 5, "data": {"tag": t}} for t in pub.tags()]).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if self.keyed:
            headers["Idempotency-Key"] = f"{self.run_id}-{self.name}-{pub.seq}"
        deadline = now() + RETRY_FOR
        for _ in range(MAX_ATTEMPTS):
            node, port = self.rng.choice(self.nodes())
            attempt = await post(node, port, headers, body)
            pub.attempts.append(attempt)
            if attempt.status not in (0, 202, 503):
                self.anomalies.append(f"{pub.tags()[0]}: {attempt.status} {attempt.detail}")
            if attempt.outcome == STORED or not self.keyed or now() > deadline:
                break
            if attempt.status not in (0, 503):
                break  # a refusal a retry cannot change (4xx): recorded, not retried
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))  # backoff between retries
        return pub


class Subscriber:
    """One client across its connections. `cut()` aborts the current connection; `hold(t)`
    keeps it away until `t`. It reconnects to a random node with the last id it received."""

    def __init__(
        self,
        name: str,
        token: str,
        nodes: Callable[[], list[tuple[int, int]]],
        rng: random.Random,
    ) -> None:
        self.name = name
        self.token = token
        self.nodes = nodes
        self.rng = rng
        self.log = SubscriberLog(name, None, float("inf"))
        self.last_id: str | None = None
        self.hold_until = 0.0
        self.connected = False
        self._writer: asyncio.StreamWriter | None = None
        self._wake = asyncio.Event()
        self.untagged = 0

    def cut(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()

    def hold(self, until: float) -> None:
        self.hold_until = until
        self.cut()

    def release(self, at: float) -> None:
        self.hold_until = at
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            for _ in range(MAX_CONNECTS):
                if stop.is_set():
                    return
                while now() < self.hold_until and not stop.is_set():
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.hold_until - now())
                node, port = self.rng.choice(self.nodes())
                status = await self._connect(node, port, stop)
                if stop.is_set():
                    return
                # a refused or failed connect backs off a little; a cut reconnects soon
                await asyncio.sleep(self.rng.uniform(0.05, 0.3 if status == 200 else 0.5))
        finally:
            self.log.stopped = now()
            self.cut()

    async def _connect(self, node: int, port: int, stop: asyncio.Event) -> int:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        sent = self.last_id or ""
        if sent:
            headers["Last-Event-ID"] = sent
        at = now()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, limit=1 << 20), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            self.log.connects.append((at, node, 0, sent))
            return 0
        self._writer = writer
        try:
            writer.write(_request("GET", port, "/events", headers, b""))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status, _ = _head(head[:-4])
            self.log.connects.append((at, node, status, sent))
            if status != 200:
                return status
            self.connected = True
            await self._read(reader, node, stop)
            return 200
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            if not self.log.connects or self.log.connects[-1][0] != at:
                self.log.connects.append((at, node, 0, sent))
            return 0
        finally:
            self.connected = False
            self._writer = None
            writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, node: int, stop: asyncio.Event) -> None:
        """The WHATWG event-stream rules, for what the hub sends: a block's id is committed
        at its blank line (an id-only block, the opening, counts); a block with data is an
        event."""
        buf = b""
        event_id: str | None = self.last_id
        name = b""
        data: list[bytes] = []
        while not stop.is_set():
            chunk = await reader.read(65536)
            if not chunk:
                return
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                line = buf[:end].rstrip(b"\r")
                buf = buf[end + 1 :]
                if line:
                    if line.startswith(b":"):
                        continue
                    fieldname, _, value = line.partition(b":")
                    if value.startswith(b" "):
                        value = value[1:]
                    if fieldname == b"id" and b"\0" not in value:
                        event_id = value.decode()
                    elif fieldname == b"event":
                        name = value
                    elif fieldname == b"data":
                        data.append(value)
                    continue
                # a blank line: dispatch
                t = now()
                self.last_id = event_id
                if self.log.first_open is None:
                    self.log.first_open = t
                if data:
                    self._event(name, b"\n".join(data), event_id or "", node, t)
                name = b""
                data = []

    def _event(self, name: bytes, data: bytes, event_id: str, node: int, t: float) -> None:
        if name == b"reset":
            self.log.resets.append(Received("", t, event_id, node))
            return
        if name == b"end":
            return  # the hub ends the stream; it will close, and the client reconnects
        try:
            tagged = json.loads(data)["data"]["tag"]
        except (ValueError, KeyError, TypeError):
            self.untagged += 1
            return
        self.log.received.append(Received(str(tagged), t, event_id, node))


class Blackhole:
    """A loopback TCP proxy to `upstream_port`. `block()` stops forwarding both ways (nothing
    is closed: what arrives waits in buffers, the kernel's and ours); `heal()` forwards it
    all and goes on. New connections made while blocked are accepted and wait the same."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Blackhole:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def blocked(self) -> bool:
        return not self._flowing.is_set()

    def block(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def switch(self, upstream_port: int) -> None:
        """Send new connections to `upstream_port` and cut the open ones: what a client of a
        failed-over address sees (its connections break, the next ones reach the new
        server)."""
        self.upstream_port = upstream_port
        for writer in list(self._writers):
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            await self._flowing.wait()  # a refusal, too, waits out the partition
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                await self._flowing.wait()  # blocked: what was read waits here, the rest
                if not data:  # in the kernel's buffers
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()
            dst.close()
            self._writers.discard(dst)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._flowing.set()
