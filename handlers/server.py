"""Connections, bounded: in number, in time, and in what they make the hub hold.

Here: the accept gate (`accept_within`), the kernel's write timeout on every connection, an
Application that reads no body on a route that takes none (`HubApplication`), and the client's
address behind a trusted reverse proxy (`client_address`). The private parts of Tornado these
need are in handlers.tornado_internals. How a handler takes the body it does read (deadlines,
byte budget, draining a refused one) is in handlers.base.

Tornado's accept loop, at the descriptor limit, gets EMFILE on every `accept()` while the
listening socket stays readable: the loop spins at 100% CPU writing a traceback each turn (one
run: 500 MB of log a minute) and nothing else is served. Here the hub stops accepting before
that: past `limit` open connections (HTTP connections plus open streams) the listening sockets
are taken off the event loop, and put back once the count is below the limit again; an EMFILE
or ENFILE that happens anyway (descriptors used elsewhere) pauses accepting briefly instead of
spinning. The condition is logged once per interval, not once per connection. Connections the
kernel queues meanwhile wait in the listen backlog. At the limit, before pausing, the gate
closes the connection that has waited the longest for a request head (or idled between two
requests) if it has for SHED_AFTER: a flood of heads that never end no longer holds every slot,
and the queue behind it, until the header timeout (20 s) frees them; streams and requests in
progress are never closed.

The other way to hold a connection for ever is to stop reading answers: a client that
pipelines requests for a static file and reads nothing held its connection (and megabytes
of the kernel's buffers) with no timeout at all, since Tornado has no write timeout. Every
accepted socket gets TCP_USER_TIMEOUT: the kernel aborts a connection whose sent data has not
been taken (zero window, or no acknowledgment) for that long, at no cost to the loop. Streams
clear it: the flusher cuts them as slow, with the reason counted.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

import ujson
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.ioloop import IOLoop
from tornado.tcpserver import TCPServer
from tornado.web import Application, RequestHandler, stream_request_body

from handlers.tornado_internals import (
    HandlerDelegate,
    follow_requests,
    hand_over,
    head_received,
    listen_through,
    streams_its_body,
)
from hub.config import Network

__all__ = ["HubApplication", "accept_within"]

log = logging.getLogger("hub")

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RECHECK = 0.1  # seconds between checks while accepting is paused
USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux
LOG_EVERY = 10.0  # seconds between two log lines about it
# At the limit, a connection idle or in its request head for this long at least is closed to let
# the next one in; a younger one is not: its head may be in the kernel's buffer, not read yet
# (the loop accepts before it reads), as in a reconnect storm, where a pause serves better.
SHED_AFTER = 1.0


class _Waiting:
    """The connections of one HTTPServer waiting for a request head, the longest waiting first:
    a new one that has not had a complete head yet ("head"), or a keep-alive one between two
    requests ("idle"). At the connection limit the gate closes the first of them, as nginx
    drains its reusable connections, rather than let a flood of heads that never end hold every
    slot until the header timeout (and the accept queue behind them) while new clients wait.

    Per request: an OrderedDict entry set and moved to the end when the connection starts
    waiting (Tornado's `start_request`), nothing when its head arrives (an entry whose head is
    in is skipped, and sent to the back, when the gate looks for one to close), and the entry
    dropped when the connection closes or becomes a stream. No timer, no task."""

    __slots__ = ("closing", "since")

    def __init__(self, server: HTTPServer) -> None:
        # connection -> (when it began waiting, its current request, whether it is keep-alive)
        self.since: OrderedDict[HTTP1ServerConnection, tuple[float, HTTP1Connection, bool]] = (
            OrderedDict()
        )
        # closed here, still counted by Tornado until its serving loop ends (a few loop turns)
        self.closing: set[HTTP1ServerConnection] = set()
        follow_requests(server, self._waiting, self._closed)

    def _waiting(self, connection: HTTP1ServerConnection, request: HTTP1Connection) -> None:
        since = self.since
        again = connection in since
        since[connection] = (time.monotonic(), request, again)
        if again:
            since.move_to_end(connection)

    def _closed(self, connection: HTTP1ServerConnection) -> None:
        self.since.pop(connection, None)
        self.closing.discard(connection)

    def oldest(self, began_by: float) -> HTTP1ServerConnection | None:
        """The connection waiting the longest for a head, if it began waiting by `began_by`.
        Those whose head has arrived since (a request in progress: never closed here) go to the
        back, where their next wait would put them anyway."""
        since = self.since
        for _ in range(len(since)):
            connection, (began, request, _) = next(iter(since.items()))
            if not head_received(request) and not connection.stream.closed():
                return connection if began <= began_by else None
            since.move_to_end(connection)
        return None

    def shed(self, connection: HTTP1ServerConnection) -> str:
        """Close `connection` (one `oldest` gave); what it was doing: "head" or "idle"."""
        _, _, again = self.since.pop(connection)
        self.closing.add(connection)
        connection.stream.close()
        return "idle" if again else "head"


class _Gate:
    # Set by accept_within: the server's connections waiting for a head (an HTTPServer's), of
    # which the gate closes the oldest at the limit, and who counts them.
    waiting: _Waiting | None = None
    on_shed: Callable[[str], None] | None = None
    shed_since_log = 0
    last_shed_log = float("-inf")

    def __init__(
        self,
        server: TCPServer,
        limit: int,
        count_open: Callable[[], int],
        on_pause: Callable[[str], None] | None,
        write_timeout: float,
        take: Callable[[socket.socket, Any], None] | None = None,
    ) -> None:
        self.server = server
        # what serves each accepted connection: Tornado, or a path that may hand it on
        self.take = take or functools.partial(hand_over, server)
        self.limit = limit
        self.count_open = count_open
        self.on_pause = on_pause
        self.write_timeout_ms = int(write_timeout * 1000)
        self.io_loop = IOLoop.current()
        self.paused: dict[int, socket.socket] = {}
        self.active: dict[int, socket.socket] = {}
        self.stopped = False
        self.refused_since_log = 0
        self.last_log = float("-inf")

    def add(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self.active[fd] = sock
        self.io_loop.add_handler(sock, self._on_readable, IOLoop.READ)
        listen_through(self.server, sock, lambda: self._remove(sock))  # server.stop() calls it

    def _remove(self, sock: socket.socket) -> None:
        self.stopped = True
        if self.active.pop(sock.fileno(), None) is not None:
            self.io_loop.remove_handler(sock)
        self.paused.pop(sock.fileno(), None)

    def _on_readable(self, sock: socket.socket, events: int) -> None:
        """Tornado calls this with the object it was registered with: the socket."""
        if sock.fileno() not in self.active:
            return
        for _ in range(128):
            if self._full() and not self._shed():
                self._pause(sock, "limit", "connection limit")
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    why = f"out of descriptors ({errno.errorcode[exc.errno]})"
                    self._pause(sock, "descriptors", why)
                    return
                raise
            if self.write_timeout_ms and USER_TIMEOUT is not None:
                connection.setsockopt(socket.IPPROTO_TCP, USER_TIMEOUT, self.write_timeout_ms)
            self.take(connection, address)

    def _full(self) -> bool:
        """At the limit: the connections closed here and not yet gone count as gone."""
        closing = 0 if self.waiting is None else len(self.waiting.closing)
        return self.count_open() - closing >= self.limit

    def _sheddable(self) -> HTTP1ServerConnection | None:
        if self.waiting is None:
            return None
        return self.waiting.oldest(time.monotonic() - SHED_AFTER)

    def _shed(self) -> bool:
        """Make room for one more: close the connection waiting the longest for a request head
        (or idle between requests), if it has for SHED_AFTER at least. Streams and requests in
        progress are never closed."""
        connection = self._sheddable()
        if connection is None:
            return False
        assert self.waiting is not None
        why = self.waiting.shed(connection)
        if self.on_shed is not None:
            self.on_shed(why)
        self.shed_since_log += 1
        now = time.monotonic()
        if now - self.last_shed_log >= LOG_EVERY:
            log.warning(
                "at the connection limit (%d): closing the connections waiting the longest for a "
                "request head (%gs at least), to let new ones in; closed since the last report: "
                "%d",
                self.limit,
                SHED_AFTER,
                self.shed_since_log,
            )
            self.last_shed_log = now
            self.shed_since_log = 0
        return True

    def _pause(self, sock: socket.socket, kind: str, why: str) -> None:
        fd = sock.fileno()
        if self.active.pop(fd, None) is not None:
            self.io_loop.remove_handler(sock)
            self.paused[fd] = sock
        if self.on_pause is not None:
            self.on_pause(kind)
        self.refused_since_log += 1
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY:
            log.warning(
                "not accepting new connections: %s (%d open, limit %d); pauses since the last "
                "report: %d",
                why,
                self.count_open(),
                self.limit,
                self.refused_since_log,
            )
            self.last_log = now
            self.refused_since_log = 0
        self.io_loop.call_later(RECHECK, self._resume)

    def _resume(self) -> None:
        if self.stopped or not self.paused:
            return
        if self._full() and self._sheddable() is None:
            self.io_loop.call_later(RECHECK, self._resume)
            return
        for fd, sock in list(self.paused.items()):
            del self.paused[fd]
            self.active[fd] = sock
            self.io_loop.add_handler(sock, self._on_readable, IOLoop.READ)


def accept_within(
    server: TCPServer,
    sockets: Iterable[socket.socket],
    limit: int,
    count_open: Callable[[], int],
    on_pause: Callable[[str], None] | None = None,
    write_timeout: float = 0.0,
    take: Callable[[socket.socket, Any], None] | None = None,
    *,
    on_shed: Callable[[str], None] | None = None,
) -> None:
    """server.add_sockets(sockets), but never past `limit` open connections and never
    spinning on EMFILE. `on_pause(kind)` is told each pause: "limit" or "descriptors".
    A connection whose peer takes nothing of what was sent for `write_timeout` seconds is
    aborted by the kernel (0: never). `take(connection, address)` serves each connection
    accepted (handlers.stream_direct for the public port), Tornado by default.
    At the limit, the server's connection waiting the longest for a request head (or idle
    between requests) since SHED_AFTER at least is closed to let the next one in (an
    HTTPServer's: `on_shed(why)` is told each, "head" or "idle"); only if there is none is
    accepting paused."""
    gate = _Gate(server, limit, count_open, on_pause, write_timeout, take)
    if isinstance(server, HTTPServer):
        gate.waiting = _Waiting(server)
    gate.on_shed = on_shed
    for sock in sockets:
        sock.setblocking(False)
        gate.add(sock)


class HubApplication(Application):
    """An Application that answers a request carrying a body to a route that takes none
    (every route but the publish one) at its head, with a JSON 413 (or the 404 of a route
    that does not exist: the default handler answers in `prepare`, now before the body).

    Tornado reads such a body in full before the handler runs, up to the server's
    max_body_size and with no timeout: a stranger sending `GET /healthz` with
    `Content-Length: 2000000` and most of the bytes held 2 MB per connection for ever, no
    token needed.

    Behind --trusted-proxies, `request.remote_ip` is the client's address that a trusted
    proxy forwarded (client_address), for the access log and anything else that reads it."""

    @functools.cached_property
    def trusted_proxies(self) -> tuple[Network, ...]:
        hub = self.settings.get("hub")
        return () if hub is None else hub.config.trusted_networks()

    def get_handler_delegate(
        self,
        request: HTTPServerRequest,
        target_class: type[RequestHandler],
        target_kwargs: dict[str, Any] | None = None,
        path_args: list[bytes] | None = None,
        path_kwargs: dict[str, bytes] | None = None,
    ) -> HandlerDelegate:
        headers = request.headers
        proxies = self.trusted_proxies
        if proxies and request.remote_ip:
            request.remote_ip = client_address(request.remote_ip, headers, proxies)
        if not streams_its_body(target_class) and (
            headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers
        ):
            if target_class is not self.settings.get("default_handler_class"):
                return super().get_handler_delegate(request, _NoBodyHere)
            target_class = _before_the_body(target_class)
        return super().get_handler_delegate(
            request, target_class, target_kwargs, path_args, path_kwargs
        )


# Proxies in front of the hub that X-Forwarded-For is read through, at most.
MAX_FORWARDED_HOPS = 16


def client_address(peer: str, headers: HTTPHeaders, proxies: tuple[Network, ...]) -> str:
    """The client's address: the peer's, unless the peer is one of `proxies` (--trusted-proxies);
    then the nearest address of X-Forwarded-For that is not a trusted proxy (read from the
    right: each proxy appends the address it got the request from, and what a client wrote
    itself is on the left), else X-Real-IP. Tornado's `xheaders=True` believes these headers
    from any peer, so that any client could write its own address into the logs."""
    if not _within(peer, proxies):
        return peer
    forwarded = headers.get("X-Forwarded-For")
    if forwarded:
        nearest = peer
        # Only the nearest hops are read: a client can write thousands of trusted addresses
        # to the left of its own (measured: 6,000 of them cost 29 ms a request).
        hops = forwarded.rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]
        for hop in reversed(hops):
            if not _is_address(hop.strip()):
                break  # garbage from here on leftwards: the last good hop is the client
            nearest = hop.strip()
            if not _within(nearest, proxies):
                break
        return nearest
    real = headers.get("X-Real-IP", "").strip()
    return real if _is_address(real) else peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _ignore_chunk(handler: RequestHandler, chunk: bytes) -> None:
    """What arrives before the connection closes."""


@functools.cache
def _before_the_body(handler: type[RequestHandler]) -> type[RequestHandler]:
    """The handler, run as soon as the head is in (its prepare answers; no body is read)."""
    subclass = type(handler.__name__, (handler,), {"data_received": _ignore_chunk})
    return stream_request_body(cast("type[RequestHandler]", subclass))


@stream_request_body
class _NoBodyHere(RequestHandler):
    """Answers before the body is read; Tornado then closes the connection unread."""

    def prepare(self) -> None:
        self.set_status(413)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        where = f"{self.request.method} {self.request.path}"[:160]
        self.finish(ujson.dumps({"error": f"{where} takes no request body", "limit": 0}) + "\n")

    def data_received(self, chunk: bytes) -> None:
        pass  # what arrives before the connection closes
