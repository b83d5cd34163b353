"""Every private part of Tornado the hub uses, and nothing else: no other module names one.

Tornado gives no public way to do five things the hub needs: accept connections itself (to stop
accepting at its connection limit and on EMFILE, handlers.server), count the open HTTP
connections of a server, tell which of them are still waiting for a request head (to close the
oldest at that limit, handlers.server), answer a request at its head according to whether its
handler streams its body (handlers.server.HubApplication), and ask whether a handler already
answered. A Tornado
release may rename any of these without notice; tests/test_tornado_internals.py checks each one
against the installed Tornado, shape and behaviour, so that an upgrade fails at test time, not at
the first EMFILE in production. Written against Tornado 6.6.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, cast

from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPConnection, HTTPMessageDelegate
from tornado.tcpserver import TCPServer
from tornado.web import RequestHandler, _HandlerDelegate, _has_stream_request_body

__all__ = [
    "HandlerDelegate",
    "follow_requests",
    "hand_over",
    "head_received",
    "listen_through",
    "open_connections",
    "response_finished",
    "streams_its_body",
]

HandlerDelegate = _HandlerDelegate
"""What `Application.get_handler_delegate` (public, documented) returns: an override must be
annotated with it to type-check. If renamed: handlers.server fails to import."""


def streams_its_body(handler_class: type[RequestHandler]) -> bool:
    """Whether the handler takes its body as it arrives (`@stream_request_body`). HubApplication
    answers a body sent to any other handler at its head, before Tornado would read it all. If
    renamed: handlers.server fails to import."""
    return _has_stream_request_body(handler_class)


def listen_through(server: TCPServer, sock: socket.socket, stop: Callable[[], None]) -> None:
    """Make `server.stop()` call `stop` and close `sock`, as for a socket of `add_sockets`, whose
    accept loop the hub replaces by its own (handlers.server.accept_within). Tornado keeps the
    listening sockets in `_sockets` and each one's remover in `_handlers`. If renamed: shutdown
    leaves the sockets listening (or fails), and clients wait on a hub that no longer answers."""
    fd = sock.fileno()
    server._sockets[fd] = sock
    server._handlers[fd] = stop


def hand_over(server: TCPServer, connection: socket.socket, address: Any) -> None:
    """Serve a connection the hub accepted itself: what Tornado's accept loop calls for each one.
    If renamed: every accepted connection fails (AttributeError), at the first request."""
    server._handle_connection(connection, address)


def open_connections(server: HTTPServer) -> int:
    """The HTTP connections the server holds open (streams are detached from it and counted
    by the hub's registry). The accept gate, the `hub_connections_open` gauge and the shutdown
    warning count them. If renamed: the first count fails, at the first accepted connection."""
    return len(server._connections)


def response_finished(handler: RequestHandler) -> bool:
    """Whether the handler has finished its response (`finish()` was called): a handler that
    answered early (a refusal) ignores the rest of the body. If renamed: AttributeError on the
    first body chunk."""
    return bool(handler._finished)


def follow_requests(
    server: HTTPServer,
    waiting: Callable[[HTTP1ServerConnection, HTTP1Connection], None],
    closed: Callable[[HTTP1ServerConnection], None],
) -> None:
    """Call `waiting(connection, request)` each time one of the server's connections starts
    waiting for a request head (its first, and the next one of a keep-alive connection), and
    `closed(connection)` when the connection leaves the server (closed, or detached: a stream).

    Tornado's serving loop (HTTP1ServerConnection) calls its delegate, the server, with
    `start_request` for each request before it reads the head, and with `on_close` as it ends:
    both are the public HTTPServerConnectionDelegate interface, wrapped here on this server only
    (two calls and a lookup more per request). If Tornado called `start_request` only once the
    head is in, every request would be taken for one still waiting: the test checks the order."""
    start_request = server.start_request
    on_close = server.on_close

    def starting(connection: object, request: HTTPConnection) -> HTTPMessageDelegate:
        waiting(cast("HTTP1ServerConnection", connection), cast("HTTP1Connection", request))
        return start_request(connection, request)

    def ending(connection: object) -> None:
        closed(cast("HTTP1ServerConnection", connection))
        on_close(connection)

    vars(server).update(start_request=starting, on_close=ending)  # this instance's only


def head_received(request: HTTP1Connection) -> bool:
    """Whether the request's head is in: Tornado sets `_request_start_line` once it has read and
    parsed it, before the handler is even found, on the HTTP1Connection it makes for each
    request. Before that, the connection is waiting for the head (or idle between two requests).
    If renamed: AttributeError at the first connection closed at the limit."""
    return request._request_start_line is not None
