"""Every private part of Tornado the hub uses, and nothing else: no other module names one.

Tornado gives no public way to do four things the hub needs: accept connections itself (to stop
accepting at its connection limit and on EMFILE, handlers.server), count the open HTTP
connections of a server, answer a request at its head according to whether its handler streams
its body (handlers.server.HubApplication), and ask whether a handler already answered. A Tornado
release may rename any of these without notice; tests/test_tornado_internals.py checks each one
against the installed Tornado, shape and behaviour, so that an upgrade fails at test time, not at
the first EMFILE in production. Written against Tornado 6.6.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.tcpserver import TCPServer
from tornado.web import RequestHandler, _HandlerDelegate, _has_stream_request_body

__all__ = [
    "HandlerDelegate",
    "hand_over",
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
