"""Event streams read over httpx (a maintained HTTP client: its own framing, pooling and
errors), for the tests that care which events arrive, in which order, and not about the bytes
on the wire; the body is parsed by hub.client.SSEParser, the project's one event-stream
parser. Tests of the bytes (the head as sent, comments, `retry:`, line endings, injection)
use sse.SSEClient.

A stream is read in a background task into a queue, so a test can open several streams,
publish, and then take each stream's events under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
from sse import EventReads, SSEEvent, StreamEnded, _EventParser

__all__ = ["HttpxStream", "open_stream", "open_url"]

_END = object()  # queued by the reader when the stream has ended


class HttpxStream(EventReads[SSEEvent]):
    """One GET /events read by httpx. A 200 is read in the background until closed;
    any other answer is read whole into `body` (its JSON) and `raw_body`."""

    def __init__(self, resources: contextlib.AsyncExitStack, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self.body: Any = None
        self.raw_body = b""
        self.received: list[SSEEvent] = []  # every event, in arrival order
        self.error: BaseException | None = None  # why the reader stopped, if not a clean close
        self._resources = resources  # the client and the response, closed by aclose
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        """The stream has ended (the server closed it, it failed, or it was never a stream)."""
        return self._task is None or self._task.done()

    def pending(self) -> int:
        """Events received but not yet taken."""
        return self._queue.qsize() - (1 if self.closed and self._task is not None else 0)

    def _got(self, event: SSEEvent) -> None:
        self.received.append(event)
        self._queue.put_nowait(event)

    async def _read(self, response: httpx.Response) -> None:
        parser = _EventParser(self._got, lambda comment: None)
        try:
            async for piece in response.aiter_bytes():
                parser.feed(piece)
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: the parser refused a line
            self.error = exc
        finally:
            self._queue.put_nowait(_END)

    async def next_event(self, timeout: float = 5.0) -> SSEEvent:
        """The next event not yet taken. TimeoutError if none comes in time; StreamEnded if
        the stream ends first."""
        if self._task is None:
            raise StreamEnded(f"not a stream: status {self.status}, body {self.raw_body!r}")
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no event within {timeout} s ({self._describe()})") from None
        if item is _END:
            self._queue.put_nowait(_END)  # every later call sees the end too
            raise StreamEnded(f"stream ended with no further event ({self._describe()})")
        assert isinstance(item, SSEEvent)
        return item

    def _describe(self) -> str:
        last = self.received[-1] if self.received else None
        return f"status {self.status}, closed={self.closed}, error={self.error!r}, last {last!r}"

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2)
        await self._resources.aclose()


async def open_url(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> HttpxStream:
    """GET `url` as an event stream; returns once the response head has arrived."""
    # No read timeout: a stream may be quiet for long; each read has its own deadline here.
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=None), trust_env=False)
    resources = contextlib.AsyncExitStack()
    try:
        await resources.enter_async_context(client)
        response = await asyncio.wait_for(
            resources.enter_async_context(
                client.stream(
                    "GET",
                    url,
                    headers={"Accept": "text/event-stream", "Cache-Control": "no-store"}
                    | dict(headers or {}),
                )
            ),
            timeout,
        )
        stream = HttpxStream(resources, response)
        if stream.status == 200:
            stream._task = asyncio.get_running_loop().create_task(stream._read(response))
        else:
            stream.raw_body = await asyncio.wait_for(response.aread(), timeout)
            with contextlib.suppress(ValueError):
                stream.body = json.loads(stream.raw_body)
    except BaseException:
        await resources.aclose()
        raise
    return stream


async def open_stream(
    server: Any,
    sub: str = "u1",
    topics: Iterable[str] = (),
    sid: str | None = None,
    *,
    claim_topics: Iterable[str] | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> HttpxStream:
    """Open GET /events on a conftest HubServer, the token (made for `sub`, allowing
    `claim_topics`, by default exactly `topics`) in the Authorization header.

    Returns once the response head has arrived: the hub writes the head and registers the
    stream in one step of the loop, so an event published from then on reaches it (the same
    readiness as conftest's `ready`, which waits for the opening block of the same write).
    The stream is added to
    `server.streams`, which the hub_server fixture closes at teardown.
    """
    topics = list(topics)
    if token is None:
        allowed = topics if claim_topics is None else list(claim_topics)
        token = server.token(sub, topics=allowed or None, sid=sid)
    query = urlencode([("topic", t) for t in topics])
    url = f"{server.url}/events" + (f"?{query}" if query else "")
    stream = await open_url(url, {**(headers or {}), "Authorization": f"Bearer {token}"}, timeout)
    server.streams.append(stream)
    return stream
