"""POST /publish: read the body within its limit, decode it whole, hand it to the hub."""

from __future__ import annotations

from collections.abc import Callable

from tornado.web import stream_request_body

from handlers.base import HubHandler
from handlers.server import BodyDeadlines
from hub.auth import Verifier
from hub.broker import BrokerUnavailable
from hub.core import Hub
from hub.decode import decode_frames, decode_json, decode_ndjson
from hub.dispatch import TypeTable
from hub.message import Event, ParseError, Rejected

__all__ = ["DECODERS", "PublishHandler"]

DECODERS: dict[str, Callable[[bytes, TypeTable], list[Event]]] = {
    "application/json": decode_json,
    "application/x-ndjson": decode_ndjson,
    "application/jsonl": decode_ndjson,
    "application/octet-stream": decode_frames,
}


@stream_request_body
class PublishHandler(HubHandler):
    """The body is streamed in so that the size limit and the auth check cost nothing:
    a request over the limit or without a valid token is answered before its body is read."""

    def initialize(
        self,
        hub: Hub,
        verifier: Verifier,
        authenticated: bool = True,
        deadlines: BodyDeadlines | None = None,
    ) -> None:
        super().initialize(hub, verifier)
        self.deadlines = deadlines or BodyDeadlines(
            hub.config.body_timeout, hub.config.max_body_memory
        )
        self.authenticated = authenticated
        self.chunks: list[bytes] = []
        self.size = 0
        self.decoder: Callable[[bytes, TypeTable], list[Event]] = decode_json

    def refuse(self, status: int, error: str, **extra: object) -> None:
        self.hub.metrics.rejected.labels(str(status)).inc()
        self.fail(status, error, **extra)

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        self.deadlines.start(self)  # the body must arrive within --body-timeout
        if self.hub.stopping:
            self.refuse(503, "the hub is shutting down: publish to another instance or retry")
            return
        if self.authenticated and self.authenticate(publisher=True) is None:
            self.hub.metrics.rejected.labels(str(self.get_status())).inc()
            return
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        decoder = DECODERS.get(ctype)
        if decoder is None:
            self.refuse(
                415,
                f"unsupported content type {ctype[:64] or 'none'!r}",
                accepted=sorted(DECODERS),
            )
            return
        self.decoder = decoder
        limit = self.hub.config.max_body
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.refuse(413, f"body of {length} bytes is over the limit of {limit}", limit=limit)

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self.size += len(chunk)
        limit = self.hub.config.max_body
        if self.size > limit:
            self.chunks = []
            self.refuse(413, f"body is over the limit of {limit} bytes", limit=limit)
            return
        if not self.deadlines.hold(self, len(chunk)):
            self.chunks = []
            self.hub.metrics.rejected.labels("503").inc()
            self.fail_retry(
                503,
                "the hub holds its most bytes of publish bodies in progress "
                f"(--max-body-memory {self.deadlines.limit}): retry shortly",
                self.hub.config.retry,
            )
            return
        self.chunks.append(chunk)

    def on_finish(self) -> None:
        self.deadlines.done(self)

    def on_connection_close(self) -> None:
        self.deadlines.done(self)
        self.chunks = []  # now, not when the collector gets to this handler
        # Ends the wait for the rest of the body (Tornado's own version): without it, the
        # request's task waited for ever, and was cancelled at shutdown, which Tornado logs
        # as an ERROR 500.
        super().on_connection_close()

    async def post(self) -> None:
        body = b"".join(self.chunks)
        self.chunks = []
        try:
            events = self.decoder(body, self.hub.types)
        except ParseError as exc:
            extra: dict[str, object] = {"offset": exc.offset}
            if exc.index is not None:
                extra["index"] = exc.index
            self.refuse(400, exc.message, **extra)
            return
        except Rejected as exc:
            extra = {"known_types": self.hub.types.describe()}
            if exc.index is not None:
                extra["index"] = exc.index
            self.refuse(422, exc.message, **extra)
            return
        try:
            ids = await self.hub.publish(events)
        except BrokerUnavailable as exc:
            self.refuse(503, f"not published: {exc}")
            return
        self.answer(202, {"ids": ids})
