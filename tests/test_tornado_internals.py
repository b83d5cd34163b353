"""Tornado's private parts that the hub relies on exist in the installed Tornado, with the shape
handlers.tornado_internals expects, and what the hub builds on them still works; no other module
of hub/ or handlers/ names a private part of Tornado. A Tornado upgrade that renames one fails
here, not at the first EMFILE in production."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import socket
from pathlib import Path

import pytest
import tornado
import tornado.testing
from sse import wait_for
from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerRequest,
    RequestStartLine,
)
from tornado.iostream import IOStream
from tornado.tcpserver import TCPServer
from tornado.web import Application, RequestHandler, stream_request_body

import handlers.server
from handlers.server import HubApplication, accept_within
from handlers.tornado_internals import (
    HandlerDelegate,
    follow_requests,
    hand_over,
    head_received,
    listen_through,
    open_connections,
    response_finished,
    streams_its_body,
)

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "handlers" / "tornado_internals.py"

# Every private name the adapter uses; each has a test below.
CHECKED = {
    "_HandlerDelegate",
    "_has_stream_request_body",
    "_sockets",
    "_handlers",
    "_handle_connection",
    "_connections",
    "_finished",
    "_request_start_line",
}


def private_names_used(tree: ast.AST) -> set[str]:
    """Names starting with one underscore that a module imports or reads as an attribute."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.update(a.name for a in node.names if re.match(r"_[a-zA-Z]", a.name))
        elif isinstance(node, ast.Attribute) and re.match(r"_[a-zA-Z]", node.attr):
            found.add(node.attr)
    return found


def test_every_private_name_the_adapter_uses_is_checked_here():
    assert private_names_used(ast.parse(ADAPTER.read_text())) == CHECKED


# -- shapes: no sockets ---------------------------------------------------------------------


class Plain(RequestHandler):
    def get(self) -> None:
        self.finish("plain")


@stream_request_body
class Streaming(RequestHandler):
    def data_received(self, chunk: bytes) -> None:
        pass


def test_get_handler_delegate_returns_the_handler_delegate_and_the_hub_overrides_it_exactly():
    assert issubclass(HandlerDelegate, HTTPMessageDelegate)
    theirs = inspect.signature(Application.get_handler_delegate)
    ours = inspect.signature(HubApplication.get_handler_delegate)
    assert list(ours.parameters) == list(theirs.parameters)
    request = HTTPServerRequest(
        headers=HTTPHeaders({"Host": "hub"}), start_line=RequestStartLine("GET", "/", "HTTP/1.1")
    )
    delegate = HubApplication([]).get_handler_delegate(request, Plain)
    assert type(delegate) is HandlerDelegate
    assert delegate.handler_class is Plain


def test_streams_its_body_tells_a_streaming_handler_from_one_that_is_not():
    assert streams_its_body(Streaming) is True
    assert streams_its_body(Plain) is False


def test_a_tcp_server_keeps_its_listening_sockets_and_their_removers_in_dicts_by_descriptor():
    server = TCPServer()
    assert vars(server)["_sockets"] == {} and vars(server)["_handlers"] == {}
    assert list(inspect.signature(server._handle_connection).parameters) == [
        "connection",
        "address",
    ]


def test_server_stop_calls_the_remover_and_closes_a_socket_listened_through():
    server = TCPServer()
    sock, _ = tornado.testing.bind_unused_port()
    stopped = []
    listen_through(server, sock, lambda: stopped.append(True))
    server.stop()
    assert stopped == [True]
    assert sock.fileno() == -1  # closed


@pytest.mark.gen_test
async def test_an_http1_connection_notes_its_request_start_line_none_until_the_head_is_read():
    with socket.socket() as sock:
        request = HTTP1Connection(IOStream(sock), False)
        assert vars(request)["_request_start_line"] is None
    assert "self._request_start_line = req_start_line" in inspect.getsource(
        HTTP1Connection._read_message_inner
    )  # set once the head is parsed, before the delegate is told of it


def test_an_http_server_keeps_its_open_connections_in_a_set():
    server = HTTPServer(Application([]))
    assert vars(server)["_connections"] == set()
    assert open_connections(server) == 0


# Private uses not moved behind the adapter yet, each with its replacement there
# (publish.py: `response_finished(self)`). Delete an entry once it is moved.
NOT_YET_MOVED: dict[str, set[str]] = {}


def test_the_hub_uses_no_private_part_of_tornado_outside_the_adapter():
    """A name Tornado's source gives something private, read or imported by a module of hub/ or
    handlers/ (the adapter aside) that does not define that name itself."""
    tornado_dir = Path(tornado.__file__).parent
    tornados = set()
    for path in tornado_dir.glob("*.py"):
        tornados.update(re.findall(r"\b_[a-zA-Z]\w*", path.read_text()))
    found = {}
    for path in [*(ROOT / "hub").glob("*.py"), *(ROOT / "handlers").glob("*.py")]:
        if path == ADAPTER:
            continue
        tree = ast.parse(path.read_text())
        own = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
        modules = {"os", "sys"}  # os._exit, sys._getframe: not Tornado's
        used = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and not (isinstance(node.value, ast.Name) and node.value.id in modules)
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tornado")
            for alias in node.names
        }
        private = (
            (used & tornados) - own - NOT_YET_MOVED.get(path.relative_to(ROOT).as_posix(), set())
        )
        if private:
            found[path.relative_to(ROOT).as_posix()] = private
    assert found == {}


# -- behaviours, on loopback ----------------------------------------------------------------


class Recording(RequestHandler):
    """Answers "ok", and notes whether it had finished before and after finish()."""

    seen: list[tuple[bool, bool]] = []

    def get(self) -> None:
        before = response_finished(self)
        self.finish("ok")
        Recording.seen.append((before, response_finished(self)))


REQUEST = b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n"


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One response of Recording's, head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.readexactly(2)


async def until(condition, timeout: float = 5.0) -> None:
    assert await wait_for(condition, timeout), "timed out"


@pytest.mark.gen_test(timeout=10)
async def test_a_connection_handed_over_is_served_and_counted_while_it_is_open():
    Recording.seen.clear()
    server = HTTPServer(Application([("/", Recording)]))
    listener, port = tornado.testing.bind_unused_port()
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection, address = await loop.sock_accept(listener)
        hand_over(server, connection, address)
        writer.write(REQUEST)
        response = await answer(reader)
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"ok")
        assert Recording.seen == [(False, True)]
        assert open_connections(server) == 1  # kept alive
        writer.close()
        await until(lambda: open_connections(server) == 0)
    finally:
        listener.close()
        await server.close_all_connections()


@pytest.mark.gen_test(timeout=10)
async def test_accept_within_pauses_at_the_limit_resumes_below_it_and_server_stop_ends_it():
    server = HTTPServer(Application([("/", Recording)]))
    listener, port = tornado.testing.bind_unused_port()
    pauses: list[str] = []
    accept_within(server, [listener], 1, lambda: open_connections(server), pauses.append)
    try:
        first_reader, first = await asyncio.open_connection("127.0.0.1", port)
        first.write(REQUEST)
        assert (await answer(first_reader)).endswith(b"ok")
        # The kernel completes the second handshake; the hub does not accept it.
        second_reader, second = await asyncio.open_connection("127.0.0.1", port)
        second.write(REQUEST)
        waiting = asyncio.ensure_future(answer(second_reader))
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        assert not done and "limit" in pauses
        first.close()
        assert (await asyncio.wait_for(waiting, 5)).endswith(b"ok")
        second.close()
        server.stop()
        assert listener.fileno() == -1
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        server.stop()
        await server.close_all_connections()


async def waited(future: asyncio.Future, timeout: float = 0.5) -> bool:
    """Whether `future` is done within `timeout` (a bound on a wait for what must NOT happen)."""
    done, _ = await asyncio.wait({future}, timeout=timeout)
    return bool(done)


@pytest.mark.gen_test(timeout=10)
async def test_follow_requests_tells_each_wait_for_a_head_before_it_is_read_and_the_close():
    server = HTTPServer(Application([("/", Recording)]))
    events: list[tuple[str, object, object]] = []
    follow_requests(
        server,
        lambda connection, request: events.append(("waiting", connection, request)),
        lambda connection: events.append(("closed", connection, None)),
    )
    listener, port = tornado.testing.bind_unused_port()
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection, address = await loop.sock_accept(listener)
        hand_over(server, connection, address)
        await until(lambda: len(events) == 1)
        kind, first_connection, first_request = events[0]
        assert kind == "waiting" and isinstance(first_request, HTTP1Connection)
        assert not head_received(first_request)  # nothing sent yet
        writer.write(REQUEST)
        assert (await answer(reader)).endswith(b"ok")
        assert head_received(first_request)
        # Kept alive: the same connection waits for its next head, with a new request.
        await until(lambda: len(events) == 2)
        kind, connection_again, second_request = events[1]
        assert kind == "waiting" and connection_again is first_connection
        assert second_request is not first_request and not head_received(second_request)
        writer.close()
        await until(lambda: len(events) == 3)
        assert events[2][:2] == ("closed", first_connection)
        assert open_connections(server) == 0
    finally:
        listener.close()
        await server.close_all_connections()


@pytest.mark.gen_test(timeout=10)
async def test_at_the_limit_the_gate_closes_the_longest_idle_connection_never_one_in_progress(
    monkeypatch,
):
    """Limit 1. A request whose body is still arriving is never closed: the next client
    waits. Once that connection is idle (kept alive, between requests) it is closed to let the
    next one in, counted as "idle"."""
    monkeypatch.setattr(handlers.server, "SHED_AFTER", 0.0)
    Body.started = False
    server = HTTPServer(Application([("/", Recording), ("/body", Body)]))
    listener, port = tornado.testing.bind_unused_port()
    pauses: list[str] = []
    shed: list[str] = []
    accept_within(
        server, [listener], 1, lambda: open_connections(server), pauses.append, on_shed=shed.append
    )
    try:
        first_reader, first = await asyncio.open_connection("127.0.0.1", port)
        first.write(b"POST /body HTTP/1.1\r\nHost: hub\r\nContent-Length: 4\r\n\r\nab")
        await until(lambda: Body.started)
        second_reader, second = await asyncio.open_connection("127.0.0.1", port)
        second.write(REQUEST)
        waiting = asyncio.ensure_future(answer(second_reader))
        assert not await waited(waiting) and "limit" in pauses and shed == []
        first.write(b"cd")
        assert (await answer(first_reader)).endswith(b"ok")
        assert (await asyncio.wait_for(waiting, 5)).endswith(b"ok")
        assert shed == ["idle"]
        assert await first_reader.read() == b""  # closed by the hub
        first.close()
        second.close()
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.gen_test(timeout=10)
async def test_at_the_limit_a_head_younger_than_shed_after_is_not_closed(monkeypatch):
    monkeypatch.setattr(handlers.server, "SHED_AFTER", 0.3)
    server = HTTPServer(Application([("/", Recording)]))
    listener, port = tornado.testing.bind_unused_port()
    shed: list[str] = []
    accept_within(server, [listener], 1, lambda: open_connections(server), on_shed=shed.append)
    try:
        first_reader, first = await asyncio.open_connection("127.0.0.1", port)
        first.write(REQUEST[:20])  # a head that never ends
        await until(lambda: open_connections(server) == 1)
        began = asyncio.get_running_loop().time()
        second_reader, second = await asyncio.open_connection("127.0.0.1", port)
        second.write(REQUEST)
        assert (await asyncio.wait_for(answer(second_reader), 5)).endswith(b"ok")
        assert asyncio.get_running_loop().time() - began >= 0.25  # not at once
        assert shed == ["head"]
        assert await first_reader.read() == b""
        first.close()
        second.close()
    finally:
        server.stop()
        await server.close_all_connections()


@stream_request_body
class Body(RequestHandler):
    """Takes a body as it arrives; answers "ok" once it is in."""

    started = False

    def prepare(self) -> None:
        Body.started = True

    def data_received(self, chunk: bytes) -> None:
        pass

    def post(self) -> None:
        self.finish("ok")
