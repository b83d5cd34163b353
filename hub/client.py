"""A Python client for the hub: publish (blocking or asyncio) and subscribe (asyncio).

Standard library only, so that a Django or Flask app can publish without new dependencies,
and importable without Tornado:

    from hub.client import Publisher
    with Publisher("http://127.0.0.1:8080", token) as hub:
        hub.publish("payment", user="alice", data={"amount": 42})

    async for event in subscribe("http://127.0.0.1:8080", token, topics=["payments"]):
        print(event.id, event.name, event.data)

A publish that fails on the way (a dropped connection, a 503 from a hub that is shutting down
or cut off from Redis, a 503 whose `outcome` is `unknown` because Redis took the request and
never answered) is retried with capped, jittered backoff under the same `Idempotency-Key`: a
hub that stored the first attempt answers the retry with the first answer's ids instead of
publishing again, so a retried publish is delivered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

__all__ = ["AsyncPublisher", "HubError", "Publisher", "SSEParser", "StreamEvent", "subscribe"]

RETRY_STATUSES = frozenset({502, 503, 504})
MAX_LINE = 64 * 1024  # an SSE line or response head line longer than this is refused


class HubError(Exception):
    """The hub refused a request: `status` is the HTTP status, `body` the hub's JSON error
    (`body["error"]` says why)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        why = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"hub answered {status}: {why}")


def _event(type: int | str, user: str | None, data: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": type}
    if user is not None:
        event["user"] = user
    if data is not None:
        event["data"] = data
    return event


@dataclass
class _Retry:
    """Capped exponential backoff with jitter; a 503's Retry-After is honoured up to the cap."""

    attempts: int = 5
    first: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after is not None and retry_after.isdigit():
            return min(self.cap, float(retry_after))
        return float(min(self.cap, self.first * 2**attempt) * random.uniform(0.5, 1.0))

    def wait(self, attempt: int, status: int | None, retry_after: str | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (status None: the connection failed),
        or -1: answer as it is (success, a refusal, or no attempt left)."""
        if attempt + 1 >= self.attempts or (status is not None and status not in RETRY_STATUSES):
            return -1
        return self.delay(attempt, retry_after)


def _publish_request(
    events: Iterable[Mapping[str, Any]], token: str | None
) -> tuple[bytes, dict[str, str]]:
    """A publish's body and headers; its Idempotency-Key stays the same for every retry."""
    body = json.dumps(list(events), separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Idempotency-Key": uuid.uuid4().hex,
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return body, headers


def _ids(status: int, answer: Any) -> list[str]:
    if status != 202:
        raise HubError(status, answer)
    return list(answer["ids"])


def _target(base_url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _decode_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]


class Publisher:
    """Blocking publisher over one kept-alive connection (not thread-safe: one per thread)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self.scheme, self.host, self.port, self.path = _target(base_url)
        self.token = token
        self.timeout = timeout
        self.retry = _Retry(attempts, backoff, max_backoff)
        self._conn: http.client.HTTPConnection | None = None

    def publish(self, type: int | str, user: str | None = None, data: Any = None) -> str:
        """Publish one event (its type by number or name); its id."""
        return self.publish_many([_event(type, user, data)])[0]

    def publish_many(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Publish a batch, all or nothing; the ids, in order."""
        body, headers = _publish_request(events, self.token)
        attempt = 0
        while True:
            try:
                status, answer, retry_after = self._post(body, headers)
            except (OSError, http.client.HTTPException):
                self.close()
                wait = self.retry.wait(attempt, None)
                if wait < 0:
                    raise
            else:
                wait = self.retry.wait(attempt, status, retry_after)
                if wait < 0:
                    return _ids(status, answer)
            time.sleep(wait)
            attempt += 1

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any, str | None]:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self._conn.request("POST", self.path + "/publish", body=body, headers=headers)
        response = self._conn.getresponse()
        raw = response.read()
        if response.will_close:
            self.close()
        return response.status, _decode_body(raw), response.getheader("Retry-After")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Connection:
    """A minimal HTTP/1.1 client connection on asyncio streams: what the hub's answers need
    (Content-Length or chunked bodies, keep-alive), nothing more."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float) -> None:
        self.scheme, self.host, self.port, self.timeout = scheme, host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        ctx = ssl.create_default_context() if self.scheme == "https" else None
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=ctx, limit=MAX_LINE), self.timeout
        )

    async def send_head(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        status_line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        if not status_line:
            raise ConnectionResetError("the hub closed the connection")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def read_body(self, headers: Mapping[str, str]) -> bytes:
        assert self.reader is not None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    return b"".join(chunks)
                chunks.append(await self.reader.readexactly(size + 2))
                chunks[-1] = chunks[-1][:-2]
        length = int(headers.get("content-length", "0"))
        return await asyncio.wait_for(self.reader.readexactly(length), self.timeout)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class AsyncPublisher:
    """The asyncio publisher: the same calls as Publisher, awaited (one request at a time per
    instance; use several for concurrency)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        scheme, host, port, self.path = _target(base_url)
        self.token = token
        self.retry = _Retry(attempts, backoff, max_backoff)
        self._conn = _Connection(scheme, host, port, timeout)
        self._lock = asyncio.Lock()

    async def publish(self, type: int | str, user: str | None = None, data: Any = None) -> str:
        return (await self.publish_many([_event(type, user, data)]))[0]

    async def publish_many(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        body, headers = _publish_request(events, self.token)
        async with self._lock:
            attempt = 0
            while True:
                try:
                    status, answer, answer_headers = await self._post(body, headers)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    await self._conn.close()
                    wait = self.retry.wait(attempt, None)
                    if wait < 0:
                        raise
                else:
                    wait = self.retry.wait(attempt, status, answer_headers.get("retry-after"))
                    if wait < 0:
                        return _ids(status, answer)
                await asyncio.sleep(wait)
                attempt += 1

    async def _post(
        self, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, Any, dict[str, str]]:
        conn = self._conn
        await conn.send_head("POST", self.path + "/publish", headers)
        assert conn.writer is not None
        conn.writer.write(body)
        status, answer_headers = await conn.read_head()
        raw = await conn.read_body(answer_headers)
        if answer_headers.get("connection", "").lower() == "close":
            await conn.close()
        return status, _decode_body(raw), answer_headers

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True)
class StreamEvent:
    """One event of a stream. `name` is the SSE event name (the type's name, or `reset` when
    the hub cannot replay what was missed: refetch your state); the rest is the event's JSON."""

    id: str
    name: str
    type: int | None
    user: str | None
    ts: int | None
    data: Any


class SSEParser:
    """The WHATWG event-stream parser, fed bytes as they come: `feed()` returns the complete
    events (id, name, data). Comments and blocks without data (the hub's opening, a `retry:`)
    dispatch nothing, but an `id:` in them still moves the last event id, and `retry:` sets
    the reconnection delay."""

    def __init__(self) -> None:
        self.buffer = b""
        self.last_id = ""
        self.retry_ms: int | None = None
        self._name = ""
        self._data: list[str] = []
        self._first = True
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[tuple[str, str, str]]:
        buffer = self.buffer + chunk
        out = []
        start = 0
        if self._after_cr and buffer[:1] == b"\n":
            start = 1  # the LF of a CRLF whose CR ended the previous chunk
        self._after_cr = False
        while True:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
            if cr >= 0:
                cut = cr
                if cr + 1 == len(buffer):
                    skip, self._after_cr = 1, True
                else:
                    skip = 2 if buffer[cr + 1] == 10 else 1
            elif lf >= 0:
                cut, skip = lf, 1
            else:
                break
            event = self._line(buffer[start:cut].decode("utf-8", errors="replace"))
            if event is not None:
                out.append(event)
            start = cut + skip
        self.buffer = buffer[start:]
        if len(self.buffer) > MAX_LINE:
            raise ValueError(f"an event-stream line longer than {MAX_LINE} bytes")
        return out

    def _line(self, line: str) -> tuple[str, str, str] | None:
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if not line:
            if not self._data:
                self._name = ""
                return None
            event = (self.last_id, self._name or "message", "\n".join(self._data))
            self._name = ""
            self._data = []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value
        elif field == "id" and "\x00" not in value:
            self.last_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None


def _stream_event(event_id: str, name: str, data: str) -> StreamEvent:
    try:
        body = json.loads(data)
    except ValueError:
        body = data
    if isinstance(body, dict) and "type" in body:
        return StreamEvent(
            event_id, name, body.get("type"), body.get("user"), body.get("ts"), body.get("data")
        )
    return StreamEvent(event_id, name, None, None, None, body)


async def subscribe(
    base_url: str,
    token: str | Callable[[], str],
    topics: Iterable[str] = (),
    last_event_id: str | None = None,
    *,
    timeout: float = 10.0,
    max_backoff: float = 30.0,
    params: Mapping[str, str] | None = None,
) -> AsyncIterator[StreamEvent]:
    """The stream's events, for ever: on a cut, an expired token (the hub's `end` event) or a
    hub that is restarting, it reconnects by itself with `Last-Event-ID` and loses nothing the
    hub's history holds; when the history cannot reach back, a `reset` event comes (name
    "reset"): refetch your state. `token` may be a function, called for each connection (a
    fresh token after expiry). A 4xx other than 429 (bad token, forbidden topic) is raised as
    HubError: retrying would not help."""
    scheme, host, port, path = _target(base_url)
    query: dict[str, str] = dict(params or {})
    names = list(topics)
    if names:
        query["topics"] = ",".join(names)
    target = path + "/events" + ("?" + urlencode(query) if query else "")
    last = last_event_id
    attempt = 0
    retry_ms: int | None = None
    while True:
        conn = _Connection(scheme, host, port, timeout)
        try:
            headers = {
                "Accept": "text/event-stream",
                "Authorization": f"Bearer {token() if callable(token) else token}",
            }
            if last:
                headers["Last-Event-ID"] = last
            await conn.send_head("GET", target, headers)
            status, answer_headers = await conn.read_head()
            if status != 200:
                body = _decode_body(await conn.read_body(answer_headers))
                if 400 <= status < 500 and status != 429:
                    raise HubError(status, body)
                raise ConnectionError(f"hub answered {status}")
            attempt = 0
            parser = SSEParser()
            assert conn.reader is not None
            while True:
                chunk = await conn.reader.read(65536)
                if not chunk:
                    break
                for event_id, name, data in parser.feed(chunk):
                    if name == "end":
                        continue  # the hub ends the stream (token expiry): reconnect
                    if event_id:
                        last = event_id
                    yield _stream_event(event_id, name, data)
                if parser.last_id:
                    last = parser.last_id  # the opening's id too: a cut before any event
                retry_ms = parser.retry_ms if parser.retry_ms is not None else retry_ms
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        finally:
            await conn.close()
        delay = (retry_ms or 1000) / 1000 if attempt == 0 else min(max_backoff, 2**attempt)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0) if attempt else delay)
        attempt += 1
