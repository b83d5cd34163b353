"""GET /events: authenticate, subscribe, then step out of Tornado's way.

After the checks, the handler writes the response head itself and detaches the connection.
The body is close-delimited (`Connection: close`, no Content-Length, no chunked encoding),
which HTTP/1.1 allows for a response that ends when the connection does; an SSE stream ends
only that way anyway. So the bytes the hub writes are the SSE frames themselves, and one
shared bytes object can go to every socket without per-stream framing.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from tornado.iostream import IOStream

from handlers.base import HubHandler, access_log, redact
from hub.core import Hub
from hub.registry import LOG_LEVELS, Reason, Subscriber

__all__ = ["EventsHandler", "SSEConnection"]

MAX_TOPICS = 64
MAX_TOPIC_LENGTH = 128
CLOSE_GRACE = 5.0  # seconds a closing stream has to take what it is still owed
# The kernel's send buffer per stream. Left to autotuning, a client that stops reading can
# make the kernel hold up to tcp_wmem's maximum (4 MiB here) for it before the hub sees any
# backpressure: with thousands of streams that is memory --max-pending does not bound.
SEND_BUFFER = 128 * 1024

log = logging.getLogger("hub")


class SSEConnection:
    """The core's Connection: a detached stream's socket, driven directly.

    Once the response head is decided, Tornado's IOStream has nothing left to do that the hub
    needs, and it costs per stream what the stream does not use (two deques, a read buffer, a
    Future per write: ~2 KB and microseconds per write). So the socket is taken from it: a
    write is a plain `send()`; only what the kernel does not take is kept, in order, and sent
    when the socket is writable again, ahead of anything later. The event loop watches the
    socket for reads only to learn that the client went away.
    """

    __slots__ = ("closing", "fd", "hub", "loop", "pending", "pending_size", "socket", "sub")

    def __init__(self, stream: IOStream) -> None:
        sock = stream.socket
        stream.io_loop.remove_handler(sock.fileno())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.socket: socket.socket | None = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.pending: list[bytes | memoryview] | None = None
        self.pending_size = 0
        self.closing = False
        self.hub: Hub | None = None
        self.sub: Subscriber | None = None

    def watch(self, hub: Hub, sub: Subscriber) -> None:
        """From now on, the client going away ends the subscription."""
        self.hub = hub
        self.sub = sub
        if self.socket is not None:
            self.loop.add_reader(self.fd, self._on_readable)

    def write(self, data: bytes) -> int:
        sock = self.socket
        if sock is None:
            return 0
        pending = self.pending
        if pending is not None:
            pending.append(data)
            self.pending_size += len(data)
            return self.pending_size
        sent = self._send(sock, data)
        if sent < 0 or sent == len(data):
            return 0
        self._keep(data, sent)
        self.loop.add_writer(self.fd, self._on_writable)
        return self.pending_size

    def close(self, flush: bool) -> None:
        if self.socket is None:
            return
        if flush and self.pending:
            # Close once the queued bytes are out (the logout event, say), or after a grace
            # period if the client does not read them.
            self.closing = True
            self.loop.call_later(CLOSE_GRACE, self._shut)
        else:
            self._shut()

    def _on_writable(self) -> None:
        pending, sock = self.pending, self.socket
        if pending is None or sock is None:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        sent = self._send(sock, data)
        if sent < 0:
            return
        if sent < len(data):
            self._keep(data, sent)
            return
        self.pending = None
        self.pending_size = 0
        self.loop.remove_writer(self.fd)
        if self.closing:
            self._shut()

    def _send(self, sock: socket.socket, data: bytes | memoryview) -> int:
        """What the kernel took of `data`; -1 when the connection is gone (it is shut)."""
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self._shut()
            return -1

    def _keep(self, data: bytes | memoryview, sent: int) -> None:
        """Hold the unsent rest, by reference, to go out when the socket is writable."""
        self.pending = [memoryview(data)[sent:]]
        self.pending_size = len(data) - sent

    def _on_readable(self) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            data = sock.recv(4096)  # a client sends nothing on a stream: whatever comes is dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._shut()

    def _shut(self) -> None:
        sock = self.socket
        if sock is None:
            return
        self.socket = None
        self.loop.remove_reader(self.fd)
        if self.pending is not None:
            self.loop.remove_writer(self.fd)
            self.pending = None
        sock.close()
        if self.hub is not None and self.sub is not None:
            self.hub.disconnect(self.sub, Reason.GONE)  # no-op when the hub ended it
        self.hub = self.sub = None


class EventsHandler(HubHandler):
    def get(self) -> None:
        if self.hub.stopping:
            self.fail(503, "the hub is shutting down")
            return
        claims = self.authenticate()
        if claims is None:
            return
        if self.hub.is_revoked(claims.user, claims.sid, claims.iat):
            self.fail(401, "session logged out: sign in again for a new token")
            return
        topics: list[str] = []
        for arg in self.get_query_arguments("topic"):
            for topic in arg.split(","):
                topic = topic.strip()
                if topic and topic not in topics:
                    topics.append(topic)
        if len(topics) > MAX_TOPICS:
            self.fail(400, f"too many topics: at most {MAX_TOPICS}")
            return
        for topic in topics:
            if len(topic) > MAX_TOPIC_LENGTH or not topic.isprintable():
                self.fail(400, "invalid topic name", topic=topic[:MAX_TOPIC_LENGTH])
                return
            if not claims.may_subscribe(topic):
                self.fail(403, f'topic "{topic}" is not allowed by the token', topic=topic)
                return
        level_name = self.get_query_argument("level", None)
        min_level = 0
        if level_name is not None:
            if level_name.lower() not in LOG_LEVELS:
                self.fail(400, f"unknown level {level_name!r}", levels=list(LOG_LEVELS))
                return
            min_level = LOG_LEVELS[level_name.lower()]
        services = frozenset(self.get_query_arguments("service")) or None
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "lastEventId", None
        )

        access_log.log(
            self.settings["access_success_level"],
            "200 GET %s (%s) stream open",
            redact(self.request.uri or ""),
            self.request.remote_ip,
        )
        stream = self.detach()
        if stream.closed():  # the client left while its request was being checked
            return
        # Each write is already a whole pass's worth of frames, coalesced in the flusher;
        # Nagle would only hold it back waiting for the client's (possibly delayed) ACK.
        stream.set_nodelay(True)
        conn = SSEConnection(stream)
        retry_ms = int(self.hub.config.retry * 1000)
        # The origin is one the operator listed (or the request's own, echoed only when it
        # is listed): no CR/LF can reach the head.
        cors = "".join(f"{name}: {value}\r\n" for name, value in self.cors_headers())
        conn.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\n"
            b"Connection: close\r\n"
            + cors.encode("latin-1")
            + b"\r\nretry: %d\n: hub stream open\n\n" % retry_ms
        )
        sub = self.hub.subscribe(
            conn,
            claims.user,
            sid=claims.sid,
            topics=tuple(topics),
            exp=claims.exp,
            last_event_id=last_id,
            min_level=min_level,
            services=services,
        )
        conn.watch(self.hub, sub)
