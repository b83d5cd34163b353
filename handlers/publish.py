"""POST /publish: read the body within its limit, decode it whole, hand it to the hub.

The publisher limits (README, Operations) are answered here: a publisher whose rate bucket
is empty is refused at the request's head, before its body is read; --max-batch and
--max-event-bytes while the body is decoded; the rate once the batch's size is known."""

from __future__ import annotations

import hashlib

from tornado.web import stream_request_body

from handlers.base import HubHandler
from handlers.server import BodyDeadlines
from handlers.tornado_internals import response_finished
from hub.auth import Verifier
from hub.broker import (
    BrokerUnavailable,
    Idempotency,
    IdempotencyConflict,
    OutcomeUnknown,
    Replayed,
)
from hub.core import Hub
from hub.decode import Decoder, decode_frames, decode_json, decode_ndjson
from hub.limits import INTERNAL, retry_after
from hub.message import ParseError, Rejected, TooLarge

__all__ = ["DECODERS", "PublishHandler"]

DECODERS: dict[str, Decoder] = {
    "application/json": decode_json,
    "application/x-ndjson": decode_ndjson,
    "application/jsonl": decode_ndjson,
    "application/octet-stream": decode_frames,
}


# An Idempotency-Key longer than this is refused: keys are UUIDs or the like.
MAX_IDEMPOTENCY_KEY = 255


def idempotency_key_ok(key: str) -> bool:
    """1 to MAX_IDEMPOTENCY_KEY printable ASCII characters (space to tilde)."""
    return 0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()


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
        self.decoder: Decoder = decode_json
        self.publisher = INTERNAL  # the rate bucket's identity: the token's sub, if any
        self.idempotency_key: str | None = None

    def refuse(self, status: int, error: str, **extra: object) -> None:
        self.hub.metrics.rejected.labels(str(status)).inc()
        self.fail(status, error, **extra)

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        self.deadlines.start(self)  # the body must arrive within --body-timeout
        if self.hub.stopping:
            self.refuse(
                503,
                "not published: the hub is shutting down: publish to another instance or retry",
                outcome="not_published",
            )
            return
        if self.authenticated:
            claims = self.authenticate(publisher=True)
            if claims is None:
                self.hub.metrics.rejected.labels(str(self.get_status())).inc()
                return
            self.publisher = claims.user
        # An empty bucket is refused before the body is read: a throttled publisher costs
        # the hub a request head, not a body's read and decode.
        wait = self.hub.publishers.delay(self.publisher, 1, take=False)
        if wait:
            self.throttle(wait)
            return
        key = self.request.headers.get("Idempotency-Key")
        if key is not None:
            if not idempotency_key_ok(key):
                self.refuse(
                    400,
                    f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII "
                    "characters (a UUID, say)",
                )
                return
            self.idempotency_key = key
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
        if response_finished(self):
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

    def throttle(self, wait: float) -> None:
        """429: the publisher's bucket will hold what it asked for in `wait` seconds."""
        limiter = self.hub.publishers
        self.hub.metrics.limited.labels("rate").inc()
        self.hub.metrics.rejected.labels("429").inc()
        self.fail_retry(
            429,
            f"publish rate over the limit of {limiter.rate:g} events/s (bursts of "
            f"{limiter.burst}) for this publisher: retry after the time Retry-After says",
            retry_after(wait),
            rate=limiter.rate,
            burst=limiter.burst,
        )

    async def post(self) -> None:
        body = b"".join(self.chunks)
        self.chunks = []
        config = self.hub.config
        limiter = self.hub.publishers
        # With a rate, no batch over the burst can ever pass: a 413 says so, not 429s for ever.
        max_events = config.max_batch
        if limiter.enabled:
            max_events = min(max_events, limiter.burst)
        try:
            events = self.decoder(
                body,
                self.hub.types,
                max_events=max_events,
                max_event_bytes=config.max_event_bytes,
            )
        except TooLarge as exc:
            self.hub.metrics.limited.labels(exc.what).inc()
            if exc.what == "event_bytes":
                message = f"{exc.message} (--max-event-bytes)"
            elif exc.limit < config.max_batch:
                message = (
                    f"{exc.message}: over the publish burst ({exc.limit} events at "
                    f"{limiter.rate:g}/s), a batch this large can never pass; split it"
                )
            else:
                message = f"{exc.message}: over the limit of {exc.limit} (--max-batch); split it"
            self.refuse(413, message, limit=exc.limit, index=exc.index)
            return
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
        wait = limiter.delay(self.publisher, len(events))
        if wait:
            self.throttle(wait)
            return
        idempotency = None
        if self.idempotency_key is not None:
            # Keys are the publisher's own: another publisher's same key is another publish.
            named = f"{self.publisher}\n{self.idempotency_key}".encode()
            idempotency = Idempotency(
                hashlib.sha256(named).hexdigest(),
                hashlib.sha256(body).hexdigest(),
                config.idempotency_window,
            )
        try:
            ids = await self.hub.publish(events, idempotency)
        except OutcomeUnknown as exc:
            self.refuse(503, str(exc), outcome="unknown")
            return
        except BrokerUnavailable as exc:
            self.refuse(503, f"not published: {exc}", outcome="not_published")
            return
        except IdempotencyConflict:
            self.refuse(
                422,
                "this Idempotency-Key was used for a different body within "
                f"{config.idempotency_window:g} s: use a new key for a new publish",
            )
            return
        if isinstance(ids, Replayed):
            self.set_header("Idempotent-Replayed", "true")
        self.answer(202, {"ids": ids})
