"""GET /events: authenticate, subscribe, then step out of Tornado's way.

After the checks, the handler writes the response head itself and detaches the connection:
no handler, request, coroutine or Future stays alive per stream, only the IOStream, an
SSEConnection and the hub's Subscriber. The body is close-delimited (`Connection: close`,
no Content-Length, no chunked encoding), which HTTP/1.1 allows for a response that ends
when the connection does; an SSE stream ends only that way anyway. So the bytes the hub
writes are the SSE frames themselves, and one shared bytes object can go to every socket
without per-stream framing.
"""

from __future__ import annotations

import logging

from tornado.iostream import IOStream, StreamClosedError

from handlers.base import HubHandler, access_log, redact
from hub.core import Hub
from hub.registry import LOG_LEVELS, Reason, Subscriber

__all__ = ["EventsHandler", "SSEConnection"]

MAX_TOPICS = 64
MAX_TOPIC_LENGTH = 128

log = logging.getLogger("hub")


class SSEConnection:
    """The core's Connection over a detached IOStream.

    write() sends straight to the socket while the IOStream has nothing queued: a plain
    `send()`, no Future, no callback. Only what the kernel does not take (a short send) goes
    to IOStream.write, which queues it and writes it when the socket drains; while anything
    is queued there, later data goes behind it, so the order of bytes never changes.
    """

    __slots__ = ("hub", "socket", "stream", "sub")

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self.hub: Hub | None = None
        self.sub: Subscriber | None = None

    def watch(self, hub: Hub, sub: Subscriber) -> None:
        """From now on, the client going away ends the subscription."""
        self.hub = hub
        self.sub = sub
        self.stream.set_close_callback(self._on_close)

    def write(self, data: bytes) -> int:
        stream = self.stream
        if stream.closed():
            return 0
        buffer = stream._write_buffer  # IOStream's queue; empty means the socket is ours
        if not len(buffer):
            try:
                sent = self.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                stream.close()
                return 0
            if sent == len(data):
                return 0
            data = memoryview(data)[sent:]  # type: ignore[assignment]
        try:
            stream.write(data)
        except StreamClosedError:
            return 0
        return len(stream._write_buffer)

    def close(self, flush: bool) -> None:
        stream = self.stream
        if stream.closed():
            return
        if flush and len(stream._write_buffer):
            # Close once the queued bytes are out (the logout event, say), or after a grace
            # period if the client does not read them.
            stream.write(b"").add_done_callback(lambda _: stream.close())
            stream.io_loop.call_later(5.0, stream.close)
        else:
            stream.close()

    def _on_close(self) -> None:
        if self.hub is not None and self.sub is not None:
            self.hub.disconnect(self.sub, Reason.GONE)
        self.hub = None


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
        # Each write is already a whole pass's worth of frames, coalesced in the flusher;
        # Nagle would only hold it back waiting for the client's (possibly delayed) ACK.
        stream.set_nodelay(True)
        conn = SSEConnection(stream)
        retry_ms = int(self.hub.config.retry * 1000)
        conn.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\n"
            b"Connection: close\r\n"
            b"\r\n"
            b"retry: %d\n: hub stream open\n\n" % retry_ms
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
