"""GET /events straight from the socket (handlers.stream_direct) answers exactly as Tornado's
EventsHandler does: two hubs on real sockets, one accepting as the hub does (a plain request
opened directly, anything else handed to Tornado), one with Tornado's own accept loop; the
same request head, sent whole in one write, gets the same answer from both (hypothesis), and
the direct path opens only streams (it refuses nothing itself)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any
from urllib.parse import quote

import jwt
import pytest
import tornado.httpserver
import tornado.testing
from conftest import SECRET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse import wait_for

from handlers.app import build_app
from hub.config import Config

OPENING_END = b": hub stream open\n\n"
users = itertools.count()


async def answer(port: int, head: bytes) -> tuple[bytes, bytes]:
    """(the response head, its body or the stream's opening), the request sent in one write."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if head.startswith(b"HEAD "):  # (a Content-Length, and no body)
            body = b""
        elif response.startswith(b"HTTP/1.1 200"):
            body = await asyncio.wait_for(reader.readuntil(OPENING_END), 5)
        else:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in response.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            body = await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()
    return response, body


def comparable(response: bytes) -> list[bytes]:
    """The head's lines but Date (the two answers are not made in the same second)."""
    return [line for line in response.split(b"\r\n") if not line.startswith(b"Date:")]


@pytest.fixture
def pair(hub_server, io_loop):
    """Two hubs of the same settings: `direct` accepts as `hub` does, `tornado` by Tornado's
    own accept loop."""

    async def start() -> tuple[Any, int]:
        direct = await hub_server(max_streams_per_user=1000)
        app = build_app(Config(jwt_secret=SECRET, max_streams_per_user=1000))
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        return direct, port, server, app

    direct, port, server, app = io_loop.run_sync(start)
    yield direct, port
    server.stop()

    async def stop() -> None:
        await app.settings["hub"].stop()
        await server.close_all_connections()

    io_loop.run_sync(stop, timeout=15)


def token(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def heads(user: str) -> st.SearchStrategy[bytes]:
    """Request heads near the plain one: every part that decides between the two paths, or
    between an answer and another, varied."""
    now = int(time.time())
    tokens = st.sampled_from(
        [
            token({"sub": user, "exp": now + 600}),
            token({"sub": user, "exp": now + 600, "topics": ["news"]}),
            token({"sub": user, "exp": now - 10}),
            token({"sub": "svc", "exp": now + 600, "publish": True}),
            token({"sub": user, "exp": now + 600, "aud": "x"}),
            "not-a-token",
            "",
        ]
    )
    params = st.lists(
        st.sampled_from(
            [
                ("topic", "news"),
                ("topic", "a,b"),
                ("topic", ""),
                ("level", "warning"),
                ("level", "loud"),
                ("service", "api"),
                ("lastEventId", "1-1"),
                ("lastEventId", ""),
                ("topics", "news"),
                ("_", "123"),
                ("ticket", "abc"),
                ("topic", "\x01x"),
                ("level", "%FF"),
                ("lastEventId", "%011-1"),
                ("topic", "%01news"),
            ]
        ),
        max_size=3,
    )
    extra = st.lists(
        st.sampled_from(
            [
                "Last-Event-ID: 1-1",
                "Last-Event-ID: garbage",
                "Origin: http://elsewhere.example",
                "Cookie: hub_token=x",
                "Content-Length: 0",
                "Host: second",
                "Accept: text/event-stream",
                "Authorization: Basic Zm9vOmJhcg==",
            ]
        ),
        max_size=2,
        unique=True,
    )

    @st.composite
    def build(draw: Any) -> bytes:
        method = draw(st.sampled_from(["GET"] * 6 + ["HEAD", "POST"]))
        version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0"]))
        path = draw(st.sampled_from(["/events"] * 6 + ["/events/", "/eventsx"]))
        by = draw(st.sampled_from(["header", "query", "none"]))
        value = draw(tokens)
        query = draw(params)
        if by == "query":
            query = [*query, ("token", value)]
        target = path + (
            "?" + "&".join(f"{k}={quote(v, safe='%,')}" for k, v in query) if query else ""
        )
        lines = [f"{method} {target} {version}", "Host: 127.0.0.1"]
        if by == "header":
            lines.append(f"Authorization: Bearer {value}")
        lines += draw(extra)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    return build()


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_request_head_gets_the_same_answer_from_both_paths(pair, io_loop, data):
    direct, tornado_port = pair
    head = data.draw(heads(f"user{next(users)}"))
    opened_before = direct.direct.opened

    async def both() -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        return await answer(direct.port, head), await answer(tornado_port, head)

    (d_head, d_body), (t_head, t_body) = io_loop.run_sync(both, timeout=20)
    assert comparable(d_head) == comparable(t_head), head
    if d_head.startswith(b"HTTP/1.1 200"):
        assert d_body.split(b"\n")[0] == t_body.split(b"\n")[0]  # retry: the same
    else:
        assert d_body == t_body, head
        assert direct.direct.opened == opened_before  # refusals are Tornado's


def test_a_plain_stream_is_opened_directly_and_carries_events(hub_server, io_loop):
    """What the property test compares is the direct path at work: a plain request sent
    whole is opened there, and the stream delivers what is published after it."""

    async def run() -> None:
        hub = await hub_server()
        head = (
            "GET /events?topic=news HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {hub.token('alice', topics=['news'])}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(head)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.wait_for(reader.readuntil(OPENING_END), 5)
        assert hub.direct.opened == 1 and hub.direct.handed_over == 0
        answer = await hub.publish({"type": "payment", "user": "alice", "data": {"n": 7}})
        assert answer.code == 202
        frame = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert b"event: payment" in frame and b'"n":7' in frame
        writer.close()

    io_loop.run_sync(run, timeout=20)


def test_a_head_in_pieces_and_a_refusal_go_to_tornado(hub_server, io_loop):
    """A head not whole at accept, and a request the hub refuses, are Tornado's to answer
    (the direct path only ever opens)."""

    async def run() -> None:
        hub = await hub_server()
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(b"GET /events HTTP/1.1\r\n")
        assert await wait_for(lambda: hub.direct.handed_over == 1)
        writer.write(f"Host: x\r\nAuthorization: Bearer {hub.token('bob')}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
        writer.close()
        status, body = await answer(hub.port, b"GET /events?token=nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 401") and b"token" in body
        assert hub.direct.opened == 0 and hub.direct.handed_over == 2

    io_loop.run_sync(run, timeout=20)


def test_a_query_value_is_read_as_tornado_reads_it_or_left_to_tornado():
    """UTF-8 and stripped, as get_query_argument; a control character, which Tornado makes a
    space (so that `%011-1` is the id `1-1` there), sends the request to Tornado."""
    from handlers.stream_direct import _argument, _Differs

    assert _argument(b"  1-1 ") == "1-1"
    for value in (b"\x011-1", b"news\x1f", b"\x08"):
        with pytest.raises(_Differs):
            _argument(value)
    with pytest.raises(UnicodeDecodeError):
        _argument(b"\xff")
