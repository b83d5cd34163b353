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
import http.client
import json
import logging
import math
import random
import re
import ssl
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

__all__ = [
    "AsyncPublisher",
    "Disconnected",
    "HubError",
    "HubUnreachable",
    "ProtocolError",
    "Publisher",
    "SSEParser",
    "StreamEvent",
    "Subscription",
    "compare_ids",
    "subscribe",
]

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
MAX_LINE = 64 * 1024  # a response head line or chunk size line longer than this is refused
MAX_HEADERS = 100  # header (or trailer) lines in one answer
MAX_INTERIM = 8  # 1xx answers skipped before the real one
MAX_BODY = 8 * 1024 * 1024  # an answer that is not a stream
MAX_SSE_LINE = 1024 * 1024  # an event-stream line (an event's data line: its whole JSON)
MAX_SSE_EVENT = 8 * 1024 * 1024  # the data of one event, all its lines
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# A hub event id, "<ms>-<seq>[-<epoch>]", as the hub reads one (hub.history.parse_position:
# ASCII digits, at most 20 each side; an epoch of 1-16 lower-case letters and digits). Not
# imported from there: hub.history needs hub.message and ujson, and this module stays
# standard library only.
_POSITION = re.compile(r"([0-9]{1,20})-([0-9]{1,20})(?:-([0-9a-z]{1,16}))?")

T = TypeVar("T")


class HubError(Exception):
    """The hub refused a request: `status` is the HTTP status, `body` the hub's JSON error
    (`body["error"]` says why)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        why = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"hub answered {status}: {why}")


def _event(
    type: int | str, user: str | None, data: Any, topics: Sequence[str] | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {"type": type}
    if user is not None:
        event["user"] = user
    if data is not None:
        event["data"] = data
    if topics is not None:
        event["topics"] = _topic_list(topics)
    return event


def _topic_list(topics: Sequence[str]) -> list[str]:
    if isinstance(topics, str):  # a name would go out as its characters
        raise TypeError(f"topics must be a sequence of topic names, not a str: [{topics!r}]")
    return list(topics)


def _with_topics(
    events: Iterable[Mapping[str, Any]], topics: Sequence[str] | None
) -> Iterable[Mapping[str, Any]]:
    """The batch, with `topics` on each event that names none of its own."""
    if topics is None:
        return events
    names = _topic_list(topics)
    return [e if "topics" in e or "topic" in e else {**e, "topics": names} for e in events]


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


def _presence_path(
    users: Sequence[str] | None, topic: str | None, limit: int | None, after: str | None
) -> str:
    """GET /presence's path and query: of users, or of one topic (a page of its members)."""
    if (users is None) == (topic is None):
        raise ValueError("ask presence of users (users=[...]) or of one topic (topic=...)")
    params: list[tuple[str, str]] = []
    if users is not None:
        if isinstance(users, str):  # a name would go out as its characters
            raise TypeError(f"users must be a sequence of user names, not a str: [{users!r}]")
        if limit is not None or after is not None:
            raise ValueError("limit and after page a topic's members: not with users")
        params = [("user", user) for user in users]
    else:
        params = [("topic", str(topic))]
        if limit is not None:
            params.append(("limit", str(limit)))
        if after is not None:
            params.append(("after", after))
    return "/presence?" + urlencode(params)


def _presence_answer(status: int, answer: Any) -> dict[str, Any]:
    if status != 200:
        raise HubError(status, answer)
    return dict(answer)


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

    def publish(
        self,
        type: int | str,
        user: str | None = None,
        data: Any = None,
        *,
        topics: Sequence[str] | None = None,
    ) -> str:
        """Publish one event (its type by number or name); its id. `topics` names topics
        (`["org:42"]`) for the types that take them: a payment goes to them too, a broadcast
        to them instead of everyone."""
        return self.publish_many([_event(type, user, data, topics)])[0]

    def publish_many(
        self, events: Iterable[Mapping[str, Any]], *, topics: Sequence[str] | None = None
    ) -> list[str]:
        """Publish a batch, all or nothing; the ids, in order. `topics`: for each event that
        names none of its own (`topics` or `topic`)."""
        body, headers = _publish_request(_with_topics(events, topics), self.token)
        return _ids(*self._retried("POST", "/publish", body, headers))

    def presence(
        self,
        users: Sequence[str] | None = None,
        *,
        topic: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> dict[str, Any]:
        """Who is online (GET /presence; the token must be a publisher's): of `users`,
        `{"users": {name: {"online", "streams", "sessions", "since"}}}`; of a `topic`,
        `{"topic", "streams", "users", "members", "next"}`, `members` a page of at most
        `limit` names after `after` (pass `next` as `after` for the next page; None: the
        last). Retried as a publish is (a dropped connection, a 503); HubError otherwise."""
        path = _presence_path(users, topic, limit, after)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return _presence_answer(*self._retried("GET", path, None, headers))

    def _retried(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """The request's status and decoded answer, retried as `retry` says (a dropped
        connection, a 503, a 429 after its Retry-After)."""
        attempt = 0
        while True:
            try:
                status, answer, retry_after = self._request(method, path, body, headers)
            except (OSError, http.client.HTTPException):
                self.close()
                wait = self.retry.wait(attempt, None)
                if wait < 0:
                    raise
            else:
                wait = self.retry.wait(attempt, status, retry_after)
                if wait < 0:
                    return status, answer
            time.sleep(wait)
            attempt += 1

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any, str | None]:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self._conn.request(method, self.path + path, body=body, headers=headers)
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


class ProtocolError(ConnectionError):
    """The server's bytes are not the HTTP/1.1 this client reads (a bad status line, chunk
    size or Content-Length, a line or head too long, too many interim answers)."""


async def _exactly(
    reader: asyncio.StreamReader, left: int, wait: float, what: str
) -> AsyncIterator[bytes]:
    """`left` bytes of `what` as they come, each read within `wait` seconds."""
    while left:
        piece = await _timed(reader.read(min(left, 65536)), wait, what)
        if not piece:
            raise ConnectionResetError(f"the server closed the connection in {what}")
        left -= len(piece)
        yield piece


async def _timed(awaitable: Awaitable[T], timeout: float, what: str) -> T:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise TimeoutError(f"nothing read for {timeout} s ({what})") from None


class _Connection:
    """A minimal HTTP/1.1 client connection on asyncio streams: what the hub's answers need
    (Content-Length, chunked or close-delimited bodies, keep-alive, interim 1xx answers
    skipped), nothing more. Every read and write has a deadline: a server that stalls
    anywhere (head, chunk size, mid-chunk, trailers) raises TimeoutError."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float) -> None:
        self.scheme, self.host, self.port, self.timeout = scheme, host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reusable = True  # false once an answer says close or is delimited by the close

    async def open(self) -> None:
        ctx = ssl.create_default_context() if self.scheme == "https" else None
        self.reader, self.writer = await _timed(
            asyncio.open_connection(self.host, self.port, ssl=ctx, limit=MAX_LINE),
            self.timeout,
            "connect",
        )
        self.reusable = True

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
    ) -> None:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await _timed(self.writer.drain(), self.timeout, "sending the request")

    async def _line(self, what: str, timeout: float | None = None) -> bytes:
        assert self.reader is not None
        try:
            line = await _timed(self.reader.readline(), timeout or self.timeout, what)
        except ValueError:  # the StreamReader's limit: a line longer than MAX_LINE
            raise ProtocolError(f"a line longer than {MAX_LINE} bytes ({what})") from None
        if not line.endswith(b"\n"):
            raise ConnectionResetError(f"the server closed the connection ({what})")
        return line

    async def read_head(self) -> tuple[int, dict[str, str]]:
        """The final answer's status and headers (names lower-cased, repeats joined); 1xx
        interim answers (100 Continue, 103 Early Hints) are read and dropped."""
        for _ in range(MAX_INTERIM + 1):
            status, headers = await self._head()
            if status == 101:
                raise ProtocolError("101 Switching Protocols, and no upgrade was asked for")
            if not 100 <= status < 200:
                if headers.get("connection", "").lower() == "close":
                    self.reusable = False
                return status, headers
        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")

    async def _head(self) -> tuple[int, dict[str, str]]:
        status_line = await self._line("the status line")
        parts = status_line.split(None, 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or not (len(parts[1]) == 3 and parts[1].isdigit())
        ):
            raise ProtocolError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        if parts[0] == b"HTTP/1.0":
            self.reusable = False
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await self._line("the headers")
            if line in (b"\r\n", b"\n"):
                return int(parts[1]), headers
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise ProtocolError(f"a header line without a colon: {line[:80]!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        raise ProtocolError(f"more than {MAX_HEADERS} header lines")

    async def body(
        self, headers: Mapping[str, str], timeout: float | None = None
    ) -> AsyncIterator[bytes]:
        """The answer's body as it arrives, by its framing; each read waits at most `timeout`
        (the connection's by default). A body cut short raises ConnectionResetError."""
        assert self.reader is not None
        reader, wait = self.reader, timeout or self.timeout
        coding = headers.get("transfer-encoding", "").strip().lower()
        if coding:
            if coding != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding: {coding}")
            while True:
                size_line = await self._line("a chunk size", wait)
                size = size_line.split(b";", 1)[0].strip()
                if not (0 < len(size) <= 16 and all(c in HEX_DIGITS for c in size)):
                    raise ProtocolError(f"not a chunk size: {size_line[:80]!r}")
                left = int(size, 16)
                if left == 0:
                    for _ in range(MAX_HEADERS + 1):  # trailers, up to the blank line
                        if await self._line("the trailers", wait) in (b"\r\n", b"\n"):
                            return
                    raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")
                async for piece in _exactly(reader, left, wait, "a chunk"):
                    yield piece
                if await self._line("a chunk's end", wait) not in (b"\r\n", b"\n"):
                    raise ProtocolError("a chunk longer than its size")
        elif "content-length" in headers:
            length = headers["content-length"].strip()
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError(f"not a Content-Length: {length[:80]!r}")
            async for piece in _exactly(reader, int(length), wait, "the body"):
                yield piece
        else:
            self.reusable = False  # delimited by the close
            while piece := await _timed(reader.read(65536), wait, "the body"):
                yield piece

    async def read_body(self, headers: Mapping[str, str]) -> bytes:
        """The whole body of an answer that is not a stream, up to MAX_BODY bytes."""
        pieces: list[bytes] = []
        size = 0
        async for piece in self.body(headers):
            size += len(piece)
            if size > MAX_BODY:
                raise ProtocolError(f"an answer longer than {MAX_BODY} bytes")
            pieces.append(piece)
        return b"".join(pieces)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.timeout)
            except (OSError, TimeoutError):
                writer.transport.abort()


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

    async def publish(
        self,
        type: int | str,
        user: str | None = None,
        data: Any = None,
        *,
        topics: Sequence[str] | None = None,
    ) -> str:
        return (await self.publish_many([_event(type, user, data, topics)]))[0]

    async def publish_many(
        self, events: Iterable[Mapping[str, Any]], *, topics: Sequence[str] | None = None
    ) -> list[str]:
        body, headers = _publish_request(_with_topics(events, topics), self.token)
        return _ids(*await self._retried("POST", "/publish", headers, body))

    async def presence(
        self,
        users: Sequence[str] | None = None,
        *,
        topic: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> dict[str, Any]:
        """Publisher.presence, awaited."""
        path = _presence_path(users, topic, limit, after)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return _presence_answer(*await self._retried("GET", path, headers))

    async def _retried(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Any]:
        """Publisher._retried, awaited: one request at a time on the connection."""
        async with self._lock:
            attempt = 0
            while True:
                try:
                    status, answer, answer_headers = await self._request(
                        method, path, headers, body
                    )
                except (OSError, TimeoutError):
                    await self._conn.close()
                    wait = self.retry.wait(attempt, None)
                    if wait < 0:
                        raise
                else:
                    wait = self.retry.wait(attempt, status, answer_headers.get("retry-after"))
                    if wait < 0:
                        return status, answer
                await asyncio.sleep(wait)
                attempt += 1

    async def _request(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Any, dict[str, str]]:
        conn = self._conn
        await conn.send(method, self.path + path, headers, body)
        status, answer_headers = await conn.read_head()
        raw = await conn.read_body(answer_headers)
        if not conn.reusable:
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
    the hub cannot replay what was missed: refetch your state); the rest is the event's JSON.
    `backwards` is true only on a `reset` whose id is of the same epoch as the last event id
    and older than it (a hub that should not send one: an older or buggy node, or a proxy):
    the client refetches its state as for any reset, but keeps its last event id (see
    subscribe)."""

    id: str
    name: str
    type: int | None
    user: str | None
    ts: int | None
    data: Any
    backwards: bool = False


def _position(event_id: str) -> tuple[int, int, str] | None:
    """(ms, seq, epoch) of a hub event id (epoch "" when it has none), or None."""
    match = _POSITION.fullmatch(event_id)
    return None if match is None else (int(match[1]), int(match[2]), match[3] or "")


def compare_ids(a: str, b: str) -> int | None:
    """How the hub's event id `a` stands to `b`: -1 older, 0 the same position, 1 newer; None
    when they do not compare: either is not a position "<ms>-<seq>[-<epoch>]", or they are of
    different epochs (after Redis lost or rolled back data, a new epoch may start at lower
    numbers). Positions of one epoch (or both without one: the memory broker's) order as the
    hub orders them, as (ms, seq) integers. Never raises."""
    pa, pb = _position(a), _position(b)
    if pa is None or pb is None or pa[2] != pb[2]:
        return None
    return (pa[:2] > pb[:2]) - (pa[:2] < pb[:2])


class SSEParser:
    """The event-stream parser of the WHATWG HTML standard (9.2.6, "Interpreting an event
    stream"), fed bytes as they arrive; the project's only one (the tests read the hub through
    it too). `feed()` returns the events the bytes complete, as (id, name, data).

    The rules: one leading BOM is dropped; a line ends at CRLF, CR or LF (a CRLF may be cut
    between two feeds); `:` starts a comment (handed to `on_comment`, the text after the
    colon); `field: value` loses one space after the colon, and a line without colon is a
    field with an empty value; `data` lines are joined with LF; `event` names the event
    ("message" if none); an `id` without NUL becomes the last event id when its block ends,
    even a block without data (so the hub's opening moves it); `retry` takes ASCII digits
    only; a blank line dispatches the block, which has no event unless it had a `data` line;
    other fields are ignored, and so is a block the stream ends in the middle of. A line
    longer than `max_line` bytes, or an event's data past `max_event`, raises ValueError.
    """

    def __init__(
        self,
        on_comment: Callable[[str], None] | None = None,
        *,
        max_line: int = MAX_SSE_LINE,
        max_event: int = MAX_SSE_EVENT,
    ) -> None:
        self.buffer = b""  # the start of a line whose end has not arrived
        self.last_id = ""  # what a reconnect sends as Last-Event-ID
        self.retry_ms: int | None = None
        self.on_comment = on_comment
        self.max_line, self.max_event = max_line, max_event
        self._id = ""  # the id buffer: becomes last_id when the block ends
        self._name = ""
        self._data: list[str] = []
        self._size = 0
        self._first = True
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[tuple[str, str, str]]:
        if not chunk:
            return []
        buffer = self.buffer + chunk if self.buffer else chunk
        out: list[tuple[str, str, str]] = []
        start = 0
        if self._after_cr and buffer[:1] == b"\n":
            start = 1  # the LF of a CRLF whose CR ended the previous feed
        self._after_cr = False
        end = len(buffer)
        while start < end:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else end)
            if cr >= 0:
                cut = cr
                if cr + 1 == end:
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
        if len(self.buffer) > self.max_line:
            raise ValueError(f"an event-stream line longer than {self.max_line} bytes")
        return out

    def _line(self, line: str) -> tuple[str, str, str] | None:
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if not line:
            self.last_id = self._id
            name, self._name = self._name, ""
            if not self._data:
                return None
            data, self._data, self._size = "\n".join(self._data), [], 0
            return self._id, name or "message", data
        if line[0] == ":":
            if self.on_comment is not None:
                self.on_comment(line[1:])
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._size += len(value) + 1
            if self._size > self.max_event:
                raise ValueError(f"an event's data longer than {self.max_event} characters")
            self._data.append(value)
        elif field == "event":
            self._name = value
        elif field == "id" and "\x00" not in value:
            self._id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None


class HubUnreachable(ConnectionError):
    """subscribe() gave up: `attempts` attempts in a row over `elapsed` seconds opened no
    stream (the hub down or out of reach, or answering 429 or 5xx), and its `max_attempts` or
    `give_up_after` said to stop. The last attempt's error is `last_error` (and __cause__)."""

    def __init__(self, url: str, attempts: int, elapsed: float, last_error: str) -> None:
        self.url, self.attempts, self.elapsed, self.last_error = url, attempts, elapsed, last_error
        super().__init__(
            f"gave up on the hub at {url}: {attempts} attempts in a row over {elapsed:.1f} s "
            f"opened no stream (the last: {last_error})"
        )


# A subscriber that cannot reach the hub says so: a WARNING for its first failed attempt, then
# at most one every WARN_EVERY seconds (the others at DEBUG), each counting the attempts.
WARN_EVERY = 10.0


class _Failures:
    """subscribe()'s attempts in a row that opened no stream: when to stop, what to log."""

    def __init__(self, url: str, max_attempts: int | None, give_up_after: float | None) -> None:
        self.url, self.max_attempts, self.give_up_after = url, max_attempts, give_up_after
        self.count = 0
        self.since = 0.0
        self.warned = -math.inf  # when the last WARNING was logged (monotonic)

    def failed(self, error: BaseException, delay: float) -> float:
        """One more failed attempt; the seconds to wait before the next (at most the time left
        before `give_up_after`), or HubUnreachable when there is to be no next."""
        now = time.monotonic()
        if not self.count:
            self.since = now
        self.count += 1
        elapsed = now - self.since
        why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        out_of_attempts = self.max_attempts is not None and self.count >= self.max_attempts
        out_of_time = self.give_up_after is not None and elapsed >= self.give_up_after
        if out_of_attempts or out_of_time:
            raise HubUnreachable(self.url, self.count, elapsed, why) from error
        if self.give_up_after is not None:
            delay = min(delay, self.give_up_after - elapsed)
        level = logging.WARNING if now - self.warned >= WARN_EVERY else logging.DEBUG
        if level == logging.WARNING:
            self.warned = now
        log.log(
            level,
            "cannot open the stream at %s (%s): %d failed attempts in a row over %.1f s; "
            "retrying in %.1f s",
            self.url,
            why,
            self.count,
            elapsed,
            delay,
        )
        return delay

    def opened(self) -> None:
        if self.count:
            log.info("stream open at %s after %d failed attempts", self.url, self.count)
        self.count = 0
        self.warned = -math.inf


class Disconnected(Exception):
    """The hub ended the stream for good: its last frame (`event: end`) said `reconnect:
    false` (code 4003, logout). `code`, `reason` and `detail` are the frame's."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        self.code, self.reason, self.detail = code, reason, detail
        super().__init__(f"the hub ended the stream for good: {code} {reason}: {detail}")


def _end(data: str) -> Disconnected | None:
    """The Disconnected an `end` frame's data asks for, or None: reconnect (what a frame that
    does not say `"reconnect": false` means, as a close without a frame does)."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("reconnect") is not False:
        return None
    code = body.get("code")
    return Disconnected(
        code if isinstance(code, int) else 0, str(body.get("reason")), str(body.get("detail"))
    )


def _stream_event(event_id: str, name: str, data: str, backwards: bool = False) -> StreamEvent:
    try:
        body = json.loads(data)
    except ValueError:
        body = data
    if isinstance(body, dict) and "type" in body:
        return StreamEvent(
            event_id,
            name,
            body.get("type"),
            body.get("user"),
            body.get("ts"),
            body.get("data"),
            backwards,
        )
    return StreamEvent(event_id, name, None, None, None, body, backwards)


@dataclass
class _Progress:
    """Where a subscription stands: shared by the Subscription and its generator (which must
    not hold the Subscription itself: a cycle would keep a left stream's connection open
    until the garbage collector runs)."""

    last_event_id: str | None
    duplicates_skipped: int = 0

    def advance(self, event_id: str) -> None:
        """Take `event_id` as the last event id, unless it is an older position of the same
        epoch (the client never moves back)."""
        if not event_id:
            return
        last = self.last_event_id
        order = compare_ids(event_id, last) if last else None
        if order is None or order >= 0:
            self.last_event_id = event_id


class Subscription(AsyncIterator[StreamEvent]):
    """What subscribe() returns: the stream's events (`async for`), and where it stands.

    `last_event_id` is the id a reconnect sends as Last-Event-ID: that of the newest event
    the client has (or the opening's, before any event). It never moves back: a `reset` whose
    id is of the same epoch and older is delivered with `backwards=True` and a WARNING (logger
    "hub.client"), and the last event id stays. `duplicates_skipped` counts the events dropped
    because their id is of the same epoch as the last event id and not newer: the client
    already has them (after such a reset, or from a hub that sends an event twice). The hub's
    ids only increase within an epoch, so no other event is ever dropped; ids that are not
    positions, and ids of another epoch, are never dropped. `aclose()` ends it."""

    def __init__(self, events: AsyncGenerator[StreamEvent, None], progress: _Progress) -> None:
        self._events = events
        self._progress = progress

    @property
    def last_event_id(self) -> str | None:
        return self._progress.last_event_id

    @property
    def duplicates_skipped(self) -> int:
        return self._progress.duplicates_skipped

    async def __anext__(self) -> StreamEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()


def subscribe(
    base_url: str,
    token: str | Callable[[], str],
    topics: Iterable[str] = (),
    last_event_id: str | None = None,
    *,
    timeout: float = 10.0,
    idle_timeout: float = 45.0,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    max_attempts: int | None = None,
    give_up_after: float | None = None,
    params: Mapping[str, str] | None = None,
) -> Subscription:
    """The stream's events until the hub ends it for good. It ends a stream with a last
    frame, `event: end`, whose data says whether to reconnect: on `"reconnect": false` (a
    logout) this raises Disconnected, which says why; on any other end (shutdown, a slow
    stream, an expired token, a cut, a close without an end frame, no byte for
    `idle_timeout` seconds, which the hub's heartbeats prevent) it reconnects by itself
    after the hub's `retry:` delay, with `Last-Event-ID`, and loses nothing the hub's history
    holds; when the history cannot reach back, a `reset` event comes (name "reset"): refetch
    your state. A reset never moves the last event id back, and events the client already
    has (same epoch, not newer than the last event id) are skipped: see Subscription.
    `token` may be a function, called for each connection (a fresh token after expiry). A
    4xx other than 429 (bad token, forbidden topic) is raised as HubError: retrying would
    not help. `timeout` bounds every other wait (connect, each read of an answer's head and
    body).

    `topics` are sent as the hub reads them (`?topic=a&topic=b`); `params`, other query
    parameters (a type's filter: `{"level": "warning"}`); a name the hub does not read is a
    400, raised as HubError.

    An attempt that opens no stream (no connection, a 429 or 5xx, an answer cut short) is
    retried after `backoff` seconds, doubling up to `max_backoff`, with jitter; the first in a
    row is logged at WARNING (logger "hub.client"), then at most one every 10 s. By default
    it keeps trying, as a long-lived subscriber should across a hub's restart or a network
    outage; `max_attempts` (attempts in a row) or `give_up_after` (seconds since the first
    failure in a row) bound it: HubUnreachable is raised then."""
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1 (or None: keep trying)")
    progress = _Progress(last_event_id)
    failures = _Failures(base_url, max_attempts, give_up_after)
    events = _subscription(
        base_url,
        token,
        topics,
        progress,
        timeout,
        idle_timeout,
        backoff,
        max_backoff,
        params,
        failures,
    )
    return Subscription(events, progress)


async def _subscription(
    base_url: str,
    token: str | Callable[[], str],
    topics: Iterable[str],
    progress: _Progress,
    timeout: float,
    idle_timeout: float,
    backoff: float,
    max_backoff: float,
    params: Mapping[str, str] | None,
    failures: _Failures,
) -> AsyncGenerator[StreamEvent, None]:
    """subscribe()'s events, its connections one after the other."""
    scheme, host, port, path = _target(base_url)
    # The hub reads `topic`, repeated (it once got `topics=a,b` from here, and ignored it).
    query = [("topic", name) for name in topics]
    query += list((params or {}).items())
    target = path + "/events" + ("?" + urlencode(query) if query else "")
    retry_ms: int | None = None
    while True:
        conn = _Connection(scheme, host, port, timeout)
        ended: Disconnected | None = None
        opened = False
        error: BaseException | None = None
        try:
            headers = {
                "Accept": "text/event-stream",
                "Authorization": f"Bearer {token() if callable(token) else token}",
            }
            if progress.last_event_id:
                headers["Last-Event-ID"] = progress.last_event_id
            await conn.send("GET", target, headers)
            status, answer_headers = await conn.read_head()
            if status != 200:
                body = _decode_body(await conn.read_body(answer_headers))
                if 400 <= status < 500 and status != 429:
                    raise HubError(status, body)
                why = body.get("error") if isinstance(body, dict) else None
                raise ConnectionError(f"hub answered {status}" + (f": {why}" if why else ""))
            opened = True
            failures.opened()
            parser = SSEParser()
            over = False  # the hub's end frame came: no need to wait for its close
            async for chunk in conn.body(answer_headers, idle_timeout):
                for event_id, name, data in parser.feed(chunk):
                    if name == "end":  # the last frame: no id; says whether to come back
                        ended, over = _end(data), True
                        break
                    last = progress.last_event_id
                    order = compare_ids(event_id, last) if last else None
                    if name == "reset" and order is not None and order < 0:
                        log.warning(
                            "the hub sent a reset to %s, older than the last event id %s "
                            "(same epoch): the last event id stays, events up to it are skipped",
                            event_id,
                            last,
                        )
                        yield _stream_event(event_id, name, data, backwards=True)
                        continue
                    if name != "reset" and order is not None and order <= 0:
                        progress.duplicates_skipped += 1  # the client has it already
                        continue
                    progress.advance(event_id)
                    yield _stream_event(event_id, name, data)
                progress.advance(parser.last_id)  # the opening's id too: a cut before any event
                retry_ms = parser.retry_ms if parser.retry_ms is not None else retry_ms
                if over:
                    break
        except (OSError, TimeoutError, ValueError) as exc:
            error = exc
        finally:
            await conn.close()
        if ended is not None:
            raise ended
        if opened:  # the stream ended (or was cut): back after the hub's `retry:`
            await asyncio.sleep((retry_ms or 1000) / 1000)
            continue
        assert error is not None
        wait = min(max_backoff, backoff * 2**failures.count) * random.uniform(0.5, 1.0)
        await asyncio.sleep(failures.failed(error, wait))
