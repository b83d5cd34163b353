"""The test SSE client itself, against hand-written bytes from a loopback socket server: the
WHATWG parsing rules the hub tests rely on, chunked bodies, and that nothing waits forever."""

from __future__ import annotations

import asyncio
import json

import pytest
from sse import SSEClient, StreamEnded


class ScriptedServer:
    """Answers one connection with the given byte pieces, then holds it open or closes it."""

    def __init__(self, pieces: list[bytes], close: bool) -> None:
        self.pieces = pieces
        self.close = close
        self.request = b""
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.request = await reader.readuntil(b"\r\n\r\n")
        for piece in self.pieces:
            writer.write(piece)
            await writer.drain()
        if self.close:
            writer.close()


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos, i = [], 0, 0
    while pos < len(body):
        size = sizes[i % len(sizes)]
        piece = body[pos : pos + size]
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        pos += size
        i += 1
    return b"".join(out) + b"0\r\nX-Trailer: y\r\n\r\n"


BODY = (
    b"\xef\xbb\xbfretry: 1500\n"
    b": hello\r\n"
    b"\r\n"
    b"id: 1-1\revent: a\rdata: one\r\r"  # CR line ends
    b"data: first\r\ndata:second\r\ndata\r\n\r\n"  # CRLF; no space; field without colon
    b'id: 1-3\nevent: b\ndata: {"x": 1}\n\n'
    b"event: no-data\n\n"  # not dispatched
    b"retry: soon\n"  # ignored: not digits
    b"data: caf\xc3\xa9 \xe2\x80\xa8\n"
    b"unknown: field\n\n"
    b":no-space comment\n"
)


def _expected(client: SSEClient) -> None:
    got = [(e.id, e.event, e.data) for e in client.received]
    assert got == [
        ("1-1", "a", "one"),
        ("1-1", "message", "first\nsecond\n"),
        ("1-3", "b", '{"x": 1}'),
        ("1-3", "message", "caf\u00e9 \u2028"),
    ]
    assert client.received[2].json() == {"x": 1}
    assert client.retry == 1500
    assert client.comments == ["hello", "no-space comment"]


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
@pytest.mark.gen_test(timeout=10)
async def test_client_parses_every_line_ending_and_field_rule_whatever_the_read_boundaries(split):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    pieces = [head] + [BODY[i : i + split] for i in range(0, len(BODY), split)]

    async with ScriptedServer(pieces, close=True) as port:
        client = await SSEClient.connect(port, "/events?x=1", {"Authorization": "Bearer t"})
        events = await client.events(4)
        assert await client.wait_closed(5)
        await client.aclose()

    assert client.status == 200
    assert [e.data for e in events] == [e.data for e in client.received]
    _expected(client)


@pytest.mark.gen_test(timeout=10)
async def test_client_decodes_a_chunked_stream_split_at_awkward_places():
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = chunked(BODY, [5, 1, 13])
    pieces = [head] + [body[i : i + 4] for i in range(0, len(body), 4)]

    async with ScriptedServer(pieces, close=False) as port:
        client = await SSEClient.connect(port, "/events")
        await client.events(4)
        assert await client.wait_closed(5), "the last chunk ends the stream"
        await client.aclose()

    _expected(client)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.gen_test(timeout=10)
async def test_client_reads_a_refusal_body_as_json(framing):
    body = json.dumps({"error": "token expired"}).encode()
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
    if framing == "length":
        pieces = [head + b"Content-Length: %d\r\n\r\n" % len(body), body]
    elif framing == "chunked":
        pieces = [head + b"Transfer-Encoding: chunked\r\n\r\n", chunked(body, [3])]
    else:
        pieces = [head + b"\r\n", body]

    async with ScriptedServer(pieces, close=framing == "close") as port:
        client = await SSEClient.connect(port, "/events")

    assert client.status == 401
    assert client.body == {"error": "token expired"}
    assert client.headers["content-type"] == "application/json"


@pytest.mark.gen_test(timeout=10)
async def test_client_gives_up_at_its_deadlines_instead_of_hanging():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"

    async with ScriptedServer([head, b": quiet\n\n"], close=False) as port:
        client = await SSEClient.connect(port, "/events")
        with pytest.raises(TimeoutError):
            await client.next_event(0.2)
        assert not await client.wait_closed(0.2)
        assert not await client.wait_until(lambda: False, 0.2)
        await client.aclose()

    async with ScriptedServer([], close=False) as port:
        with pytest.raises(TimeoutError):
            await SSEClient.connect(port, "/events", timeout=0.2)


@pytest.mark.gen_test(timeout=10)
async def test_client_reports_a_stream_that_ends_before_the_awaited_event():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"

    async with ScriptedServer([head, b"data: last\n\ndata: unfinished\n"], close=True) as port:
        client = await SSEClient.connect(port, "/events")
        assert (await client.next_event()).data == "last"
        with pytest.raises(StreamEnded):
            await client.next_event(5)
        await client.aclose()
