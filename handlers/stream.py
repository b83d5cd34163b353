"""GET /events: authenticate (a token, or a one-time ticket from POST /tickets), parse the
query, then hand the socket to the core.

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

from handlers.base import HubHandler, access_log, redact
from handlers.server import USER_TIMEOUT
from hub.auth import Claims
from hub.broker import BrokerUnavailable
from hub.query import QueryError, parse_topics
from hub.refusal import RefusalKind
from hub.tickets import TicketRefused, parse_ticket
from hub.transport import SocketTransport

__all__ = ["EventsHandler"]

# How long a stream whose Last-Event-ID is ahead of this node waits for the node's feed to
# read that far (nodes of one Redis are milliseconds apart; a node further behind is
# overloaded, and its client gets `reset` or, with the feed not live, a 503).
CATCH_UP_WAIT = 1.0

log = logging.getLogger("hub")

# The refusals that are a stream cap: hub_streams_capped_total's label.
CAPS = {RefusalKind.CAPACITY: "total", RefusalKind.PER_USER: "per_user"}


class EventsHandler(HubHandler):
    def fail(self, status: int, error: str, **extra: object) -> None:
        """Every refusal of a stream is counted by status (hub_streams_refused_total)."""
        self.hub.metrics.streams_refused.labels(str(status)).inc()
        super().fail(status, error, **extra)

    def fail_retry(self, status: int, error: str, retry_after: float, **extra: object) -> None:
        self.hub.metrics.streams_refused.labels(str(status)).inc()
        super().fail_retry(status, error, retry_after, **extra)

    async def get(self) -> None:
        if self.hub.stopping:
            self.fail(503, "the hub is shutting down")
            return
        ticket = bool(self.get_query_arguments("ticket"))
        claims = await self._redeem() if ticket else self.authenticate()
        if claims is None:
            return
        if self.hub.stopping:  # it began while the ticket was looked up
            self.fail(503, "the hub is shutting down")
            return
        refused = self.hub.admit(claims)
        if refused is not None:
            if ticket and refused.kind is RefusalKind.REVOKED:
                self.hub.tickets.reject("revoked")
            cap = CAPS.get(refused.kind)
            if cap is not None:
                self.hub.metrics.streams_capped.labels(cap).inc()
            self.answer_refusal(refused)
            return
        try:
            topics = parse_topics(self.get_query_arguments("topic"))
        except QueryError as exc:
            self.fail(400, exc.message, **exc.extra)
            return
        for topic in topics:
            if not claims.may_subscribe(topic):
                self.fail(403, f'topic "{topic}" is not allowed by the token', topic=topic)
                return
        try:
            filters = self.hub.types.stream_filters(
                {name: self.get_query_arguments(name) for name in self.hub.types.filter_params}
            )
        except QueryError as exc:
            self.fail(400, exc.message, **exc.extra)
            return
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "lastEventId", None
        )
        if last_id and self.hub.behind(last_id):
            # Served by a node further ahead: wait for this one's feed to read as far. Still
            # behind a client of its own epoch, the client retries (here or elsewhere): a
            # reset would move it back to where this node is, and it would take again what it
            # already has. (An epoch still unknown after the wait is an old one: reset.)
            await self.hub.catch_up(last_id, CATCH_UP_WAIT)
            if self.hub.ahead(last_id):
                self.fail_retry(503, "this node has not read up to Last-Event-ID yet: retry", 1.0)
                return

        access_log.log(
            self.settings["access_success_level"],
            "200 GET %s (%s) stream open",
            redact(self.request.uri or ""),
            self.request.remote_ip,
        )
        stream = self.detach()
        if stream.closed():  # the client left while its request was being checked
            return
        sock = stream.socket
        stream.io_loop.remove_handler(sock.fileno())
        # Each write is already a whole pass's worth of frames, coalesced in the flusher;
        # Nagle would only hold it back waiting for the client's (possibly delayed) ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if USER_TIMEOUT is not None:  # the flusher, not the kernel, cuts a stalled stream
            sock.setsockopt(socket.IPPROTO_TCP, USER_TIMEOUT, 0)
        transport = SocketTransport(sock, asyncio.get_running_loop())
        # The origin is one the operator listed (or the request's own, echoed only when it
        # is listed): no CR/LF can reach the head.
        cors = "".join(f"{name}: {value}\r\n" for name, value in self.cors_headers())
        head = (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\n"
            b"Connection: close\r\n" + cors.encode("latin-1") + b"\r\n"
        )
        self.hub.subscribe(
            transport,
            claims.user,
            prefix=head,  # one send for the head and the stream's opening
            sid=claims.sid,
            topics=topics,
            exp=claims.exp,
            last_event_id=last_id,
            filters=filters,
        )

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
