"""The test clients themselves, against hand-written bytes from a loopback socket server: the
WHATWG parsing rules the byte-exact hub tests rely on (both read through hub.client.SSEParser),
the framings the hub answers with, and that nothing waits forever."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import httpx
import pytest
from sse import SSEClient, StreamEnded, http_request, wait_for
from sse_httpx import open_url


class ScriptedServer:
    """Answers each connection with the given byte pieces, then holds it open or closes it."""

    def __init__(self, pieces: list[bytes], close: bool) -> None:
        self.pieces = pieces
        self.close = close
        self.request = b""  # the last request's head and Content-Length body
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
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.request = head + (await reader.readexactly(length) if length else b"")
        for piece in self.pieces:
            writer.write(piece)
            await writer.drain()
        if self.close:
            writer.close()

    def reset(self) -> None:
        """End every connection with a TCP reset instead of a close."""
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"

BODY = (
    b"retry: 1500\n"
    b": hello\r\n"
    b"\r\n"
    b"id: 1-1\revent: a\rdata: one\r\r"  # CR line ends
    b"data: first\r\ndata:second\r\ndata\r\n\r\n"  # CRLF; no space; field without colon
    b'id: 1-3\nevent: b\ndata: {"x": 1}\n\n'
    b"event: no-data\n\n"  # not dispatched
    b"retry: soon\n"  # ignored: not digits
    b"id: 1-\x004\n"  # ignored: contains NUL
    b"data: caf\xc3\xa9 \xe2\x80\xa8\n"
    b"unknown: field\n\n"
    b":no-space comment\n"
)


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
@pytest.mark.gen_test(timeout=10)
async def test_client_parses_every_line_ending_and_field_rule_whatever_the_read_boundaries(split):
    pieces = [STREAM_HEAD] + [BODY[i : i + split] for i in range(0, len(BODY), split)]

    async with ScriptedServer(pieces, close=True) as port:
        client = await SSEClient.connect(port, "/events?x=1", {"Authorization": "Bearer t"})
        events = await client.events(4)
        assert await client.wait_closed(5)
        await client.aclose()

    assert client.status == 200
    assert [e.data for e in events] == [e.data for e in client.received]
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
    assert bytes(client.raw) == BODY
    assert client.error is None


@pytest.mark.gen_test(timeout=10)
async def test_client_sends_one_get_and_keeps_the_head_as_sent_with_repeated_headers_joined():
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nVary: Origin\r\n"
        b"X-Accel-Buffering:no\r\nvary: Accept\r\n\r\n"
    )
    server = ScriptedServer([head], close=True)

    async with server as port:
        client = await SSEClient.connect(port, "/events?x=1", {"Authorization": "Bearer t"})
        assert await client.wait_closed(5)
        await client.aclose()

    assert server.request == (
        b"GET /events?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
        b"Authorization: Bearer t\r\n\r\n" % port
    )
    assert (client.status, client.version) == (200, "HTTP/1.1")
    assert client.headers["vary"] == "Origin, Accept"
    assert client.header_list == [
        ("content-type", "text/event-stream"),
        ("vary", "Origin"),
        ("x-accel-buffering", "no"),
        ("vary", "Accept"),
    ]


@pytest.mark.parametrize("framing", ["length", "close"])
@pytest.mark.gen_test(timeout=10)
async def test_client_reads_a_refusal_body_as_json(framing):
    body = json.dumps({"error": "token expired"}).encode()
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
    if framing == "length":
        pieces = [head + b"Content-Length: %d\r\n\r\n" % len(body), body]
    else:
        pieces = [head + b"\r\n", body]

    async with ScriptedServer(pieces, close=framing == "close") as port:
        client = await SSEClient.connect(port, "/events")

    assert client.status == 401
    assert client.body == {"error": "token expired"}
    assert client.raw_body == body
    assert client.headers["content-type"] == "application/json"
    assert client.closed
    with pytest.raises(StreamEnded):
        await client.next_event(5)


@pytest.mark.parametrize("framing", ["length", "close"])
@pytest.mark.gen_test(timeout=10)
async def test_http_request_sends_the_given_bytes_and_reads_the_answer_by_its_framing(framing):
    body = b'{"ids": ["1-0"]}'
    head = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
    if framing == "length":
        head += b"Content-Length: %d\r\n" % len(body)
    server = ScriptedServer([head + b"\r\n" + body], close=framing == "close")

    async with server as port:
        response = await http_request(port, "POST", "/publish", {"X-Test": "1"}, b"[1, 2]")
        assert server.request == (
            b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
            b"X-Test: 1\r\nContent-Length: 6\r\n\r\n[1, 2]" % port
        )
        await http_request(port, "POST", "/publish", {"Content-Length": "3"}, b"abc")
        assert server.request.count(b"Content-Length") == 1, server.request

    assert response.status == 202
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"ids": ["1-0"]}


@pytest.mark.parametrize("status", [b"200 OK", b"401 Unauthorized"])
@pytest.mark.gen_test(timeout=10)
async def test_client_refuses_a_transfer_encoding_instead_of_misreading_it(status):
    head = b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n" % status

    async with ScriptedServer([head, b"5\r\nhello\r\n0\r\n\r\n"], close=False) as port:
        with pytest.raises(ValueError, match="Transfer-Encoding"):
            await SSEClient.connect(port, "/events")
        with pytest.raises(ValueError, match="Transfer-Encoding"):
            await http_request(port, "GET", "/healthz")


@pytest.mark.gen_test(timeout=10)
async def test_a_body_cut_short_of_its_content_length_is_an_error():
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 50\r\n\r\n"

    async with ScriptedServer([head, b'{"error": '], close=True) as port:
        with pytest.raises(ValueError, match="closed after 10 of 50 body bytes"):
            await http_request(port, "GET", "/x")
        with pytest.raises(ValueError, match="closed after 10 of 50 body bytes"):
            await SSEClient.connect(port, "/events")


@pytest.mark.gen_test(timeout=10)
async def test_client_gives_up_at_its_deadlines_instead_of_hanging():
    async with ScriptedServer([STREAM_HEAD, b": quiet\n\n"], close=False) as port:
        client = await SSEClient.connect(port, "/events")
        with pytest.raises(TimeoutError):
            await client.next_event(0.2)
        with pytest.raises(TimeoutError, match="got 0 of 1 events"):
            await client.events(1, timeout=0.2)
        assert not await client.wait_closed(0.2)
        assert not await client.wait_until(lambda: False, 0.2)
        await client.aclose()

    async with ScriptedServer([], close=False) as port:
        with pytest.raises(TimeoutError):
            await SSEClient.connect(port, "/events", timeout=0.2)
        with pytest.raises(TimeoutError):
            await http_request(port, "GET", "/healthz", timeout=0.2)

    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    async with ScriptedServer([head, b"12"], close=False) as port:
        with pytest.raises(TimeoutError, match="not complete in time"):
            await http_request(port, "GET", "/healthz", timeout=0.2)


@pytest.mark.gen_test(timeout=10)
async def test_client_takes_events_in_order_until_a_match_and_counts_what_is_left():
    body = b"data: 1\n\ndata: 2\n\ndata: stop\n\ndata: 4\n\n"

    async with ScriptedServer([STREAM_HEAD, body], close=False) as port:
        client = await SSEClient.connect(port, "/events")
        assert await client.wait_until(lambda: len(client.received) == 4, 5)
        assert client.pending() == 4
        with pytest.raises(AssertionError, match="no matching event in 1 events"):
            await client.events_until(lambda e: False, limit=1)
        before = await client.events_until(lambda e: e.data == "stop")
        assert [e.data for e in before] == ["2"]
        assert client.pending() == 1
        assert (await client.next_event()).data == "4"
        with pytest.raises(TimeoutError, match="no matching event after 0"):
            await client.events_until(lambda e: True, timeout=0.2)
        assert not client.closed
        await client.aclose()


@pytest.mark.gen_test(timeout=10)
async def test_client_reports_a_stream_that_ends_before_the_awaited_event():
    async with ScriptedServer(
        [STREAM_HEAD, b"data: last\n\ndata: unfinished\n"], close=True
    ) as port:
        client = await SSEClient.connect(port, "/events")
        assert (await client.next_event()).data == "last"
        with pytest.raises(StreamEnded):
            await client.next_event(5)
        with pytest.raises(StreamEnded, match="no matching event after 0"):
            await client.events_until(lambda e: True)
        assert not await client.wait_until(lambda: False, 5)
        assert client.error is None
        await client.aclose()


@pytest.mark.gen_test(timeout=10)
async def test_client_keeps_the_error_of_a_reset_stream():
    server = ScriptedServer([STREAM_HEAD], close=False)

    async with server as port:
        client = await SSEClient.connect(port, "/events")
        server.reset()
        assert await client.wait_closed(5)
        with pytest.raises(StreamEnded):
            await client.next_event(5)
        await client.aclose()

    assert isinstance(client.error, ConnectionResetError), client.error


@pytest.mark.gen_test(timeout=10)
async def test_wait_for_polls_plain_and_awaitable_predicates_until_true_or_the_deadline():
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    async def truthy() -> int:
        return 1

    def done_future() -> asyncio.Future[bool]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(True)
        return future

    async def never() -> bool:
        await asyncio.Event().wait()
        return True

    assert await wait_for(third_time, 5, interval=0.001)
    assert len(calls) == 3
    assert await wait_for(truthy)
    assert await wait_for(done_future)
    assert not await wait_for(lambda: 0, 0.1)
    with pytest.raises(TimeoutError):
        await wait_for(never, 0.1)


# -- httpx (sse_httpx) ------------------------------------------------------------------------

# The hub's opening block, an event, and a heartbeat.
OPENING = b"retry: 3000\nid: 7-0\n: hub stream open\n\n"
PAYMENT = b'id: 7-1\nevent: payment\ndata: {"n": 1}\n\n'
PING = b": ping\n\n"


@pytest.mark.gen_test(timeout=10)
async def test_both_test_clients_read_through_the_one_parser_and_see_no_event_without_data():
    async with ScriptedServer([STREAM_HEAD, OPENING, PAYMENT, PING], close=True) as port:
        stream = await open_url(f"http://127.0.0.1:{port}/events")
        event = await stream.next_event()
        with pytest.raises(StreamEnded):
            await stream.next_event(5)
        with pytest.raises(StreamEnded):  # the end stays visible
            await stream.next_event(5)
        assert stream.closed and stream.pending() == 0 and stream.error is None
        await stream.aclose()

        raw = await SSEClient.connect(port, "/events")
        assert await raw.wait_closed(5)
        await raw.aclose()

    assert (event.id, event.event, event.json()) == ("7-1", "payment", {"n": 1})
    assert stream.received == [event] == raw.received  # the opening and the ping: no event
    assert (raw.retry, raw.comments, raw.last_event_id) == (
        3000,
        ["hub stream open", "ping"],
        "7-1",
    )


@pytest.mark.gen_test(timeout=10)
async def test_httpx_stream_takes_events_in_order_under_deadlines_and_keeps_a_reset():
    body = b"data: 1\n\ndata: 2\n\ndata: stop\n\ndata: 4\n\n"
    server = ScriptedServer([STREAM_HEAD, OPENING, body], close=False)

    async with server as port:
        stream = await open_url(f"http://127.0.0.1:{port}/events", {"X-Test": "1"})
        assert b"\r\nX-Test: 1\r\n" in server.request.replace(b"x-test", b"X-Test")
        assert stream.status == 200
        assert await wait_for(lambda: len(stream.received) == 4)
        assert stream.pending() == 4
        with pytest.raises(AssertionError, match="no matching event in 1 events"):
            await stream.events_until(lambda e: False, limit=1)
        before = await stream.events_until(lambda e: e.data == "stop")
        assert [e.data for e in before] == ["2"]
        assert stream.pending() == 1
        assert (await stream.next_event()).data == "4"
        with pytest.raises(TimeoutError):
            await stream.next_event(0.2)
        with pytest.raises(TimeoutError, match="no matching event after 0"):
            await stream.events_until(lambda e: True, timeout=0.2)
        assert not stream.closed

        server.reset()
        assert await wait_for(lambda: stream.closed)
        with pytest.raises(StreamEnded):
            await stream.next_event(5)
        assert isinstance(stream.error, httpx.ReadError), stream.error
        await stream.aclose()


@pytest.mark.gen_test(timeout=10)
async def test_httpx_stream_reads_a_refusal_whole_and_gives_up_at_its_deadline():
    body = json.dumps({"error": "token expired"}).encode()
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
    pieces = [head + b"Content-Length: %d\r\n\r\n" % len(body), body]

    async with ScriptedServer(pieces, close=False) as port:
        refused = await open_url(f"http://127.0.0.1:{port}/events")
        assert (refused.status, refused.body, refused.raw_body) == (401, json.loads(body), body)
        assert refused.headers["content-type"] == "application/json"
        assert refused.closed and refused.pending() == 0
        with pytest.raises(StreamEnded, match="not a stream"):
            await refused.next_event()
        await refused.aclose()

    async with ScriptedServer([], close=False) as port:
        with pytest.raises(TimeoutError):
            await open_url(f"http://127.0.0.1:{port}/events", timeout=0.2)
