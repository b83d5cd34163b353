"""GET /events taken straight from the socket: the plain request of a reconnect storm.

Tornado's request machinery (an IOStream, an HTTP1Connection, a request, a handler, their
futures, and the collector's work on the cycles they leave) was most of a stream's connect,
and a stream needs none of it once open (issue 18; README, Performance). So the accept loop
(handlers.server) first peeks at what a new connection has sent. When that is a whole, plain
`GET /events` (the head complete and alone, HTTP/1.1, one Host, no Origin, no body, a token in
Authorization or ?token=, no ticket) that passes every check of `EventsHandler` and that
the core would open at once (`Hub.may_open_now`), the stream is opened here by the same core
call. Anything else, or any doubt, goes to Tornado untouched (it was only peeked at), which
serves it as before: refusals, tickets, cookies, CORS, a head that came in pieces, a resume
that waits for the node to catch up. Nothing is refused here, so every answer the hub gives
still comes from one place.
"""

from __future__ import annotations

import math
import re
import socket
from typing import Any

from tornado.escape import parse_qs_bytes
from tornado.httputil import HTTPHeaders, HTTPInputError, parse_request_start_line
from tornado.tcpserver import TCPServer

from handlers.base import access_log
from handlers.server import client_address
from handlers.stream import HEAD, STREAM_PARAMS, log_open, stream_query, stream_transport
from handlers.tornado_internals import hand_over
from hub.auth import AuthError, Verifier
from hub.config import Network
from hub.core import Hub
from hub.query import QueryError, check_names
from hub.stream import StreamRequest
from hub.transport import SocketTransport

__all__ = ["MAX_HEAD", "DirectStreams", "defer_accept"]

MAX_HEAD = 8192  # a longer head goes to Tornado (its own limit is --max-header-size's)
# What Tornado's get_query_argument turns into a space (RequestHandler._get_arguments): a
# value with one of them goes to Tornado rather than be read differently here.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")
_NOT_HERE = ("Origin", "Content-Length", "Transfer-Encoding", "Expect", "Upgrade")
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def defer_accept(sock: socket.socket, seconds: float) -> None:
    """Let the kernel hand over a connection of this listening socket only once the client
    has sent something (or after `seconds`): the first peek then finds the request head, a
    client that connects and says nothing costs no descriptor and no wake-up, as nginx's
    `listen ... deferred` (Linux; elsewhere nothing changes)."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(seconds)))


class _Differs(Exception):
    """A query value Tornado reads otherwise (its control characters made spaces)."""


def _argument(value: bytes) -> str:
    """A query value as RequestHandler.get_query_argument reads it: UTF-8, stripped; one
    with a control character goes to Tornado (_Differs)."""
    text = value.decode("utf-8")
    if _CONTROL.search(text):
        raise _Differs
    return text.strip()


class DirectStreams:
    """What the accept loop calls with each new connection of the public port."""

    __slots__ = (
        "allowed",
        "handed_over",
        "hub",
        "level",
        "opened",
        "proxies",
        "server",
        "verifier",
    )

    def __init__(
        self,
        hub: Hub,
        verifier: Verifier,
        server: TCPServer,
        success_level: int,
        proxies: tuple[Network, ...],
    ) -> None:
        self.hub = hub
        self.verifier = verifier
        self.server = server
        self.level = success_level
        self.proxies = proxies
        self.allowed = frozenset((*STREAM_PARAMS, *hub.types.filter_params))
        self.opened = 0  # streams opened here
        self.handed_over = 0  # connections given to Tornado

    def __call__(self, connection: socket.socket, address: Any) -> None:
        try:
            head = connection.recv(MAX_HEAD, _PEEK)
        except OSError:  # nothing sent yet (BlockingIOError), or gone: Tornado's to see
            head = b""
        if not (
            head.startswith((b"GET /events ", b"GET /events?"))
            and self._open(connection, head, address)
        ):
            self.handed_over += 1
            hand_over(self.server, connection, address)

    def _open(self, connection: socket.socket, head: bytes, address: Any) -> bool:
        """Open the stream `head` asks for, if it is plain and admitted now (True); else
        leave the connection as it was (False)."""
        end = head.find(b"\r\n\r\n")
        if end < 0 or end + 4 != len(head):  # in pieces, or more after it: Tornado's
            return False
        try:
            first, _, lines = head[:end].decode("latin-1").partition("\r\n")
            start = parse_request_start_line(first)
            headers = HTTPHeaders.parse(lines)
        except HTTPInputError:
            return False
        path, _, query = start.path.partition("?")
        if start.version != "HTTP/1.1" or path != "/events":
            return False
        if len(headers.get_list("Host")) != 1 or any(name in headers for name in _NOT_HERE):
            return False
        raw = parse_qs_bytes(query, keep_blank_values=True)

        def arguments(name: str) -> list[str]:
            return [_argument(value) for value in raw.get(name, ())]

        def last(name: str) -> str | None:  # get_query_argument's: the last value given
            values = raw.get(name)
            return _argument(values[-1]) if values else None

        try:
            check_names(raw, self.allowed)
            if "ticket" in raw:
                return False
            authorization = headers.get("Authorization", "")
            if authorization[:7].lower() == "bearer ":
                token: str | None = authorization[7:].strip()
            else:
                token = last("token")
            if not token:  # (a cookie's, or none: Tornado's)
                return False
            claims = self.verifier.verify(token)
            topics, filters = stream_query(self.hub, arguments)
            last_id = headers.get("Last-Event-ID") or last("lastEventId")
        except (QueryError, AuthError, UnicodeDecodeError, _Differs):
            return False
        if claims.publish or not all(claims.may_subscribe(topic) for topic in topics):
            return False
        request = StreamRequest(claims, topics, filters, last_id, prefix=HEAD + b"\r\n")
        if not self.hub.may_open_now(request):
            return False

        def take_transport() -> SocketTransport | None:
            try:
                taken = connection.recv(len(head))  # what was peeked: the head is read
            except OSError:
                taken = b""
            if len(taken) != len(head):
                connection.close()
                return None
            if access_log.isEnabledFor(self.level):
                peer = address[0] if isinstance(address, tuple) else ""
                log_open(self.level, start.path, client_address(peer, headers, self.proxies))
            return stream_transport(connection)

        connection.setblocking(False)
        self.opened += 1
        self.hub.open_admitted(request, take_transport)
        return True
