"""GET /events: authenticate (a token, or a one-time ticket from POST /tickets), parse the
query, then ask the core to open the stream (Hub.open_stream), which admits it or refuses it,
and takes the socket from the handler once it is admitted.

The response head goes out with the stream's first bytes, and the connection is detached.
The body is close-delimited (`Connection: close`, no Content-Length, no chunked encoding),
which HTTP/1.1 allows for a response that ends when the connection does; an SSE stream ends
only that way anyway. So the bytes the hub writes are the SSE frames themselves, and one
shared bytes object can go to every socket without per-stream framing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from handlers.base import HubHandler, access_log, redact
from handlers.server import USER_TIMEOUT
from hub.auth import Claims
from hub.broker import BrokerUnavailable
from hub.core import Hub
from hub.query import QueryError, check_names, parse_topics
from hub.refusal import Refusal
from hub.stream import StreamRequest
from hub.tickets import TicketRefused, parse_ticket
from hub.transport import SocketTransport

__all__ = ["HEAD", "STREAM_PARAMS", "EventsHandler", "stream_query", "stream_transport"]

log = logging.getLogger("hub")

# The query parameters GET /events reads, besides the type table's filter parameters
# (TypeTable.filter_params: `level`, `service`): any other name is a 400 that lists these.
# `_` is the one name read and ignored: the cache-buster that jQuery (`cache: false`) and
# many request wrappers add; a stream is never cached anyway (Cache-Control: no-cache).
STREAM_PARAMS = ("token", "ticket", "topic", "lastEventId", "_")
# The response head, but for CORS headers and the blank line that ends it.
HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Connection: close\r\n"
)


def stream_query(
    hub: Hub, arguments: Callable[[str], list[str]]
) -> tuple[tuple[str, ...], dict[int, Any]]:
    """The topics and the filters a stream's query asks for (`arguments(name)`: the values
    of a query parameter); QueryError for a bad one."""
    topics = parse_topics(arguments("topic"))
    types = hub.types
    filters = types.stream_filters({name: arguments(name) for name in types.filter_params})
    return topics, filters


def log_open(level: int, uri: str, address: str) -> None:
    access_log.log(level, "200 GET %s (%s) stream open", redact(uri), address)


def stream_transport(sock: socket.socket) -> SocketTransport:
    """An admitted stream's socket, as its transport."""
    # Each write is already a whole pass's worth of frames, coalesced in the flusher;
    # Nagle would only hold it back waiting for the client's (possibly delayed) ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if USER_TIMEOUT is not None:  # the flusher, not the kernel, cuts a stalled stream
        sock.setsockopt(socket.IPPROTO_TCP, USER_TIMEOUT, 0)
    return SocketTransport(sock, asyncio.get_running_loop())


class EventsHandler(HubHandler):
    route = "stream"

    async def get(self) -> None:
        if self.hub.stopping:
            self.fail(503, "the hub is shutting down")
            return
        try:  # a misspelt name (`topics=`) must not open a stream without what it asked for
            check_names(
                self.request.query_arguments, (*STREAM_PARAMS, *self.hub.types.filter_params)
            )
        except QueryError as exc:
            self.fail(400, exc.message, **exc.extra)
            return
        ticket = bool(self.get_query_arguments("ticket"))
        claims = await self._redeem() if ticket else self.authenticate()
        if claims is None:
            return
        if self.hub.stopping:  # it began while the ticket was looked up
            self.fail(503, "the hub is shutting down")
            return
        try:
            topics, filters = stream_query(self.hub, self.get_query_arguments)
        except QueryError as exc:
            self.fail(400, exc.message, **exc.extra)
            return
        for topic in topics:
            if not claims.may_subscribe(topic):
                self.fail(403, f'topic "{topic}" is not allowed by the token', topic=topic)
                return
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "lastEventId", None
        )
        # The origin is one the operator listed (or the request's own, echoed only when it
        # is listed): no CR/LF can reach the head.
        cors = "".join(f"{name}: {value}\r\n" for name, value in self.cors_headers())
        head = HEAD + cors.encode("latin-1") + b"\r\n"
        # one send for the head and the stream's opening
        request = StreamRequest(claims, topics, filters, last_id, prefix=head, by_ticket=ticket)
        opened = await self.hub.open_stream(request, self._take_transport)
        if isinstance(opened, Refusal):
            self.answer_refusal(opened)

    def _take_transport(self) -> SocketTransport | None:
        """The request's socket, detached from Tornado, as the stream's transport; None if
        the client left while its request was being checked."""
        level = self.settings["access_success_level"]
        if access_log.isEnabledFor(level):  # (redacting costs, at thousands of connects/s)
            log_open(level, self.request.uri or "", self.request.remote_ip or "")
        stream = self.detach()
        if stream.closed():
            return None
        sock = stream.socket
        stream.io_loop.remove_handler(sock.fileno())
        return stream_transport(sock)

    async def _redeem(self) -> Claims | None:
        """The claims of the request's `?ticket=` (spent here, whatever the answer), or None
        after answering: 400 for a ticket beside a token (Authorization: Bearer or ?token=;
        the hub_token cookie is ambient and does not count) or for two tickets, 401 for one
        that is malformed, unknown, used or expired, 503 if the broker cannot answer."""
        bearer = self.request.headers.get("Authorization", "")[:7].lower() == "bearer "
        if bearer or self.get_query_arguments("token"):
            self.fail(400, "a ticket or a token, not both")
            return None
        try:
            ticket = parse_ticket(self.get_query_arguments("ticket"))
            if ticket is None:  # (the caller saw one)
                return self.authenticate()
            return await self.hub.tickets.redeem(ticket)
        except QueryError as exc:
            self.fail(400, exc.message, **exc.extra)
        except TicketRefused as exc:
            if exc.reason == "malformed":  # (redeem counts the others)
                self.hub.tickets.reject(exc.reason)
            self.answer_refusal(exc.refusal)
        except BrokerUnavailable:
            self.fail_retry(503, "the broker cannot look tickets up now: retry", 1.0)
        return None
