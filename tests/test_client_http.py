"""hub.client's asyncio HTTP against a real server on 127.0.0.1 that misbehaves on purpose:
interim 1xx answers before the real one, chunked answers (as a proxy sends them), a stall at
every point of an answer, broken framing, and the ways a stream ends (the hub's `end` frame
with `reconnect` true or false, a plain close, silence). Every test runs under a deadline; a
stall is a server awaiting an event that never comes, and the client's timeout ends it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from hub.client import AsyncPublisher, Disconnected, ProtocolError, subscribe

T = TypeVar("T")
STALL = object()  # in a script: send nothing more, keep the connection open


class Misbehaving:
    """Connection n gets scripts[n] (the last one again for any later connection): byte
    pieces written one by one, or STALL; after the last piece the connection is closed."""

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = scripts
        self.requests: list[bytes] = []  # each request's head
        self._never = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self._never.set()  # every stalled answer ends: its connection is closed
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            script = self.scripts[min(len(self.requests), len(self.scripts) - 1)]
            self.requests.append(head)
            for piece in script:
                if piece is STALL:
                    await self._never.wait()
                    return
                writer.write(piece)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def chunk(data: bytes) -> bytes:
    return b"%x;ext=1\r\n%s\r\n" % (len(data), data)


IDS = json.dumps({"ids": ["1-1"]}).encode()
CHUNKED_202 = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </hub.js>; rel=preload\r\n\r\n"
)


async def publish(url: str, **options: Any) -> list[str]:
    async with AsyncPublisher(url, "token", **options) as publisher:
        return await publisher.publish_many([{"type": 5}])


def test_interim_answers_are_skipped_and_a_chunked_answer_with_trailers_is_read():
    script = [INTERIM, CHUNKED_202, chunk(IDS[:5]), chunk(IDS[5:]), b"0\r\nX-Trailer: 1\r\n\r\n"]

    async def main() -> list[str]:
        async with Misbehaving(script, [STALL]) as url:
            return await publish(url)

    assert run(main()) == ["1-1"]


STALLS = {
    "before the status line": [STALL],
    "between interim answers": [b"HTTP/1.1 100 Continue\r\n\r\n", STALL],
    "mid-head": [b"HTTP/1.1 202 Accepted\r\nContent-Length: 20\r\n", STALL],
    "before a chunk size": [CHUNKED_202, STALL],
    "mid-chunk": [CHUNKED_202, b"20\r\n" + IDS[:4], STALL],
    "before a chunk's end": [CHUNKED_202, b"%x\r\n%s" % (len(IDS), IDS), STALL],
    "before the trailers end": [CHUNKED_202, chunk(IDS), b"0\r\n", STALL],
    "mid-body": [b"HTTP/1.1 202 Accepted\r\nContent-Length: 50\r\n\r\n" + IDS[:5], STALL],
    "in a body that ends at the close": [b"HTTP/1.1 202 Accepted\r\n\r\n" + IDS[:5], STALL],
}


@pytest.mark.parametrize("where", STALLS)
def test_a_server_that_stalls_anywhere_in_an_answer_times_out_and_the_retry_gets_the_ids(where):
    async def main() -> tuple[float, list[str], int]:
        answer = [b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n\r\n%s" % (len(IDS), IDS)]
        server = Misbehaving(STALLS[where], STALLS[where], answer)
        async with server as url:
            with pytest.raises(TimeoutError):
                await publish(url, timeout=0.2, attempts=1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            ids = await publish(url, timeout=0.2, attempts=2, backoff=0.01)
            return loop.time() - started, ids, len(server.requests)

    took, ids, requests = run(main())
    assert ids == ["1-1"] and requests == 3  # stalled, stalled, answered
    assert took < 5


BROKEN = {
    "not HTTP": [b"SSH-2.0-OpenSSH\r\n\r\n"],
    "a status that is not 3 digits": [b"HTTP/1.1 2020 OK\r\n\r\n"],
    "an upgrade nobody asked for": [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"],
    "interim answers for ever": [b"HTTP/1.1 100 Continue\r\n\r\n" * 20],
    "a header without colon": [b"HTTP/1.1 202 Accepted\r\nnonsense\r\n\r\n"],
    "a chunk size that is not hex": [CHUNKED_202, b"0x10\r\n"],
    "a chunk longer than its size": [CHUNKED_202, b"2\r\nabc\r\n"],
    "a Content-Length that is not digits": [b"HTTP/1.1 202 Accepted\r\nContent-Length: -1\r\n\r\n"],
    "an unknown transfer coding": [
        b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    ],
    "a head line past the limit": [b"HTTP/1.1 202 Accepted\r\nX: " + b"x" * 70_000, STALL],
    "headers for ever": [b"HTTP/1.1 202 Accepted\r\n" + b"X: y\r\n" * 200],
}


@pytest.mark.parametrize("what", BROKEN)
def test_broken_framing_is_a_protocol_error_not_a_misread(what):
    async def main() -> None:
        async with Misbehaving(BROKEN[what]) as url:
            with pytest.raises(ProtocolError):
                await publish(url, attempts=1, timeout=2)

    run(main())


def test_a_body_that_ends_at_the_close_is_read_whole_and_the_connection_not_reused():
    async def main() -> tuple[list[str], list[str], int]:
        server = Misbehaving([b"HTTP/1.1 202 Accepted\r\n\r\n", IDS])
        async with server as url, AsyncPublisher(url, "t") as publisher:
            first = await publisher.publish(5)
            second = await publisher.publish(5)
            return [first], [second], len(server.requests)

    assert run(main()) == (["1-1"], ["1-1"], 2)


# -- subscribe: chunked streams, silence, and the ways a stream ends ----------------------------

STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
CHUNKED_STREAM = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def event(event_id: str, n: int) -> bytes:
    body = json.dumps({"type": 2, "user": "u", "ts": 1, "data": n})
    return f"id: {event_id}\nevent: payment\ndata: {body}\n\n".encode()


def end(code: int, reason: str, reconnect: bool, retry: int | None = None) -> bytes:
    body = {"code": code, "reason": reason, "reconnect": reconnect, "detail": "d"}
    frame = b"" if retry is None else b"retry: %d\n\n" % retry
    return frame + b"event: end\ndata: " + json.dumps(body).encode() + b"\n\n"


def header(request: bytes, name: bytes) -> bytes | None:
    for line in request.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.lower() == name.lower():
            return value.strip()
    return None


def test_subscribe_reads_a_chunked_stream_after_interim_answers_and_reconnects_when_it_goes_quiet():
    opening = b"retry: 10\nid: 1-0\n: hub stream open\n\n"
    one = event("1-1", 1)
    first = [INTERIM, CHUNKED_STREAM, chunk(opening + one[:9]), chunk(one[9:]), STALL]
    second = [CHUNKED_STREAM, chunk(event("1-2", 2)), STALL]

    async def main() -> tuple[list[Any], list[bytes]]:
        server = Misbehaving(first, second)
        got = []
        async with server as url:
            async for received in subscribe(url, "t", timeout=2, idle_timeout=0.3):
                got.append((received.id, received.name, received.data))
                if len(got) == 2:
                    break
        return got, server.requests

    got, requests = run(main())
    assert got == [("1-1", "payment", 1), ("1-2", "payment", 2)]
    assert header(requests[0], b"Last-Event-ID") is None
    assert header(requests[1], b"Last-Event-ID") == b"1-1"  # no byte for 0.3 s: a new stream


def test_subscribe_reconnects_on_a_close_and_on_ends_that_allow_it_and_stops_on_one_that_does_not():
    scripts = [
        [STREAM_HEAD, b"retry: 10\nid: 1-0\n\n", event("1-1", 1)],  # a plain close: reconnect
        # a minute's retry in the opening: the end frame's own retry must win
        [STREAM_HEAD, b"retry: 60000\n\n", event("1-2", 2), end(4000, "shutdown", True, 10), STALL],
        [STREAM_HEAD, b"retry: 10\n\n", end(4002, "expired", True), STALL],
        [STREAM_HEAD, event("1-3", 3), end(4003, "logout", False), STALL],
    ]
    tokens = iter(["a", "b", "c", "d"])

    async def main() -> tuple[list[str], Disconnected, list[bytes]]:
        server = Misbehaving(*scripts)
        got = []
        async with server as url:
            with pytest.raises(Disconnected) as ended:
                async for received in subscribe(url, lambda: next(tokens), timeout=2):
                    got.append(received.id)
        return got, ended.value, server.requests

    got, ended, requests = run(main())
    assert got == ["1-1", "1-2", "1-3"]  # no `end` is yielded
    assert (ended.code, ended.reason, ended.detail) == (4003, "logout", "d")
    assert [header(r, b"Last-Event-ID") for r in requests] == [None, b"1-1", b"1-2", b"1-2"]
    assert [header(r, b"Authorization") for r in requests] == [
        b"Bearer a", b"Bearer b", b"Bearer c", b"Bearer d"
    ]  # fmt: skip


def test_an_end_frame_without_reconnect_false_means_reconnect():
    odd = b"event: end\ndata: not json\n\n" + b"event: end\ndata: {}\n\n"
    scripts = [
        [STREAM_HEAD, b"retry: 10\n\n", event("1-1", 1), odd, STALL],
        [STREAM_HEAD, event("1-2", 2), STALL],
    ]

    async def main() -> tuple[list[str], int]:
        server = Misbehaving(*scripts)
        got = []
        async with server as url:
            async for received in subscribe(url, "t", timeout=2):
                got.append(received.id)
                if len(got) == 2:
                    break
        return got, len(server.requests)

    assert run(main()) == (["1-1", "1-2"], 2)
