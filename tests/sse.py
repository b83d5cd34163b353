"""A small Server-Sent Events client for the tests that need the bytes: raw HTTP/1.1 over a
loopback socket (the response head as sent, comments, `retry:`, line endings, injection).
Tests that only care which events arrive use httpx instead (sse_httpx).

It sends one GET, reads the status line and headers, then parses the body as an event stream
with hub.client.SSEParser, the project's one parser (the WHATWG rules). It reads only what
the hub sends: a stream body delimited by the close, other answers by Content-Length or the
close. A `Transfer-Encoding` is refused loudly rather than decoded, so a hub that starts
chunking its answers fails the tests.

Every await has a deadline: nothing here can hang a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hub.client import SSEParser

__all__ = ["EventReads", "SSEClient", "SSEEvent", "StreamEnded", "http_request", "wait_for"]


class StreamEnded(Exception):
    """The server closed the stream before the awaited thing arrived."""


@dataclass(frozen=True)
class SSEEvent:
    id: str
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class _EventParser:
    """hub.client's SSEParser (the project's one event-stream parser), calling back with each
    event and each comment (one leading space of a comment dropped)."""

    def __init__(self, on_event: Callable[[SSEEvent], None], on_comment: Callable[[str], None]):
        self._on_event = on_event
        self._parser = SSEParser(
            lambda comment: on_comment(comment.removeprefix(" ")),
            max_line=1 << 30,  # the hub's limits are tested, not this reader's
            max_event=1 << 30,
        )

    @property
    def last_event_id(self) -> str:
        return self._parser.last_id

    @property
    def retry(self) -> int | None:
        return self._parser.retry_ms

    def feed(self, raw: bytes) -> None:
        for event_id, name, data in self._parser.feed(raw):
            self._on_event(SSEEvent(event_id, name, data))


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str], list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    code, _, _reason = rest.partition(" ")
    header_list = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        header_list.append((name.strip().lower(), value.strip()))
    headers: dict[str, str] = {}
    for name, value in header_list:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "transfer-encoding" in headers:
        raise ValueError(
            f"Transfer-Encoding: {headers['transfer-encoding']}: the hub's answers carry"
            " Content-Length or end at the close, and this client decodes nothing else"
        )
    return int(code), version, headers, header_list


def _request_bytes(
    method: str, port: int, path: str, headers: Mapping[str, str], body: bytes
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    names = {name.lower() for name in headers}
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if (body or method not in ("GET", "HEAD")) and "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], deadline: float
) -> bytes:
    """The whole body of a response that is not a stream: to Content-Length, or to the close."""
    loop = asyncio.get_running_loop()
    length = int(headers["content-length"]) if "content-length" in headers else None
    body = b""
    while length is None or len(body) < length:
        try:
            piece = await asyncio.wait_for(reader.read(65536), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise TimeoutError(f"response body not complete in time; have {body[:300]!r}") from None
        if not piece:
            if length is not None:
                raise ValueError(f"closed after {len(body)} of {length} body bytes: {body!r}")
            break
        body += piece
    return body if length is None else body[:length]


async def _open(
    port: int, data: bytes, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float, bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=1 << 20), timeout
    )
    try:
        writer.write(data)
        head = await asyncio.wait_for(
            reader.readuntil(b"\r\n\r\n"), max(0.01, deadline - loop.time())
        )
    except BaseException:
        writer.close()
        raise
    return reader, writer, deadline, head


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> Response:
    """One raw HTTP/1.1 request on its own connection (for bodies no HTTP client would send)."""
    hdrs = {"Connection": "close", **(headers or {})}
    reader, writer, deadline, head = await _open(
        port, _request_bytes(method, port, path, hdrs, body), timeout
    )
    try:
        status, _version, resp_headers, _list = _parse_head(head[:-4])
        data = await _read_body(reader, resp_headers, deadline)
    finally:
        writer.close()
        await _wait_closed(writer)
    return Response(status, resp_headers, data)


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2)


E = TypeVar("E")


class EventReads(Generic[E]):
    """What every test client reads on top of its own `next_event`: a count of events, or the
    events before a marker, all within one deadline."""

    async def next_event(self, timeout: float = 5.0) -> E:
        raise NotImplementedError

    async def events(self, count: int, timeout: float = 10.0) -> list[E]:
        """The next `count` events, all within one deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out = []
        for _ in range(count):
            try:
                out.append(await self.next_event(max(0.0, deadline - loop.time())))
            except (TimeoutError, StreamEnded) as exc:
                raise type(exc)(f"got {len(out)} of {count} events: {exc}") from None
        return out

    async def events_until(
        self, predicate: Callable[[E], bool], timeout: float = 10.0, limit: int = 100_000
    ) -> list[E]:
        """The events before the first one that matches `predicate` (which is taken too but
        not returned), all within one deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        before: list[E] = []
        for _ in range(limit):
            try:
                event = await self.next_event(max(0.0, deadline - loop.time()))
            except (TimeoutError, StreamEnded) as exc:
                names = [e.event for e in before[-10:]]
                raise type(exc)(f"no matching event after {len(before)} ({names}): {exc}") from None
            if predicate(event):
                return before
            before.append(event)
        raise AssertionError(f"no matching event in {limit} events")


class SSEClient(EventReads[SSEEvent]):
    """One open event stream. Use `await SSEClient.connect(...)`, then `next_event`."""

    def __init__(self) -> None:
        self.status = 0
        self.version = ""
        self.headers: dict[str, str] = {}
        self.header_list: list[tuple[str, str]] = []
        self.body: Any = None  # the parsed JSON body of a non-200 answer
        self.raw_body = b""  # the undecoded body of a non-200 answer
        self.comments: list[str] = []
        self.received: list[SSEEvent] = []  # every event, in arrival order
        self.raw = bytearray()  # every body byte as received
        self._queue: asyncio.Queue[SSEEvent] = asyncio.Queue()
        self._progress = asyncio.Event()
        self._closed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._parser = _EventParser(self._got_event, self._got_comment)
        self.error: BaseException | None = None

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> SSEClient:
        """Send the GET and read the head. A 200 starts reading the stream in the background;
        anything else reads the whole body (to Content-Length or the close)."""
        self = cls()
        hdrs = {"Accept": "text/event-stream", **(headers or {})}
        reader, writer, deadline, head = await _open(
            port, _request_bytes("GET", port, path, hdrs, b""), timeout
        )
        self._reader, self._writer = reader, writer
        try:
            self.status, self.version, self.headers, self.header_list = _parse_head(head[:-4])
            if self.status != 200:
                self.raw_body = await _read_body(reader, self.headers, deadline)
                try:
                    self.body = json.loads(self.raw_body)
                except ValueError:
                    self.body = None
                self._closed.set()
                writer.close()
                await _wait_closed(writer)
                return self
        except BaseException:
            writer.close()
            raise
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    @property
    def retry(self) -> int | None:
        return self._parser.retry

    @property
    def last_event_id(self) -> str:
        """The stream's last event id as EventSource keeps it (an id-only block sets it too)."""
        return self._parser.last_event_id

    @property
    def closed(self) -> bool:
        """The server ended the stream (or it failed)."""
        return self._closed.is_set()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                piece = await self._reader.read(65536)
                if not piece:
                    break
                self.raw += piece
                self._parser.feed(piece)
                self._signal()
        except (OSError, ValueError) as exc:  # ValueError: the parser refused a line
            self.error = exc
        finally:
            self._closed.set()
            self._signal()

    def _signal(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _got_event(self, event: SSEEvent) -> None:
        self.received.append(event)
        self._queue.put_nowait(event)

    def _got_comment(self, comment: str) -> None:
        self.comments.append(comment)

    def _describe(self) -> str:
        tail = bytes(self.raw[-400:])
        return f"status {self.status}, closed={self.closed}, last bytes {tail!r}"

    async def next_event(self, timeout: float = 5.0) -> SSEEvent:
        """The next event not yet taken. TimeoutError if none comes in time; StreamEnded if the
        server closes the stream first."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue.empty():
            if self.closed:
                raise StreamEnded(f"stream ended with no further event ({self._describe()})")
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no event within {timeout} s ({self._describe()})")
            waiter = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), left)
        return self._queue.get_nowait()

    def pending(self) -> int:
        """Events received but not yet taken."""
        return self._queue.qsize()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until `predicate()` holds, re-checking as bytes arrive; False at the deadline
        or when the stream ends without it holding."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if self.closed:
                return predicate()
            left = deadline - loop.time()
            if left <= 0:
                return False
            waiter = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), left)
        return True

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server has ended the stream; False if it is still open at the deadline."""
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 2)
        if self._writer is not None:
            await _wait_closed(self._writer)


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01
) -> bool:
    """Poll `predicate` (sync, or returning an awaitable) until it is truthy; False at the
    deadline. The one place in the tests that sleeps, and only between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await asyncio.wait_for(result, max(0.01, deadline - loop.time()))
        if result:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
