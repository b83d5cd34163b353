"""POST /publish: read the body within its limit, decode it whole, hand it to the hub.

The publisher limits (README, Operations) are answered here: a publisher whose rate bucket
is empty is refused at the request's head, before its body is read; --max-batch and
--max-event-bytes while the body is decoded; the rate once the batch's size is known."""

from __future__ import annotations

import hashlib

from tornado.web import stream_request_body

from handlers.base import DRAIN_FACTOR, BodyDeadlines, DrainsRefusedBody, HubHandler
from handlers.tornado_internals import response_finished
from hub.auth import Verifier
from hub.broker import BrokerUnavailable, Idempotency, IdempotencyConflict, OutcomeUnknown
from hub.core import Hub
from hub.decode import Decoder, decode_frames, decode_json, decode_ndjson
from hub.dispatch import outside_grants
from hub.limits import INTERNAL, Throttled, retry_after
from hub.message import ParseError, Rejected, TooLarge
from hub.topics import Grants

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
class PublishHandler(DrainsRefusedBody, HubHandler):
    """The body is streamed in so that the size limit and the auth check cost nothing:
    a request over the limit or without a valid token is answered before its body is read.
    What is left of a body refused at the head is then read and dropped (nothing decoded or
    kept), up to twice --max-body and within --body-timeout, so that a proxy writing it gets the
    answer (handlers.base.DrainsRefusedBody)."""

    route = "publish"

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
        self.publish_topics: Grants | None = None  # the token's limit, if it has one
        self.idempotency_key: str | None = None

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        self.deadlines.start(self)  # the body must arrive within --body-timeout
        self.body_expected()  # an answer from here on, before the body is in, drains it
        if self.hub.stopping:
            self.fail(
                503,
                "not published: the hub is shutting down: publish to another instance or retry",
                outcome="not_published",
            )
            return
        if self.authenticated:
            claims = self.authenticate(publisher=True)
            if claims is None:
                return
            self.publisher = claims.user
            self.publish_topics = claims.publish_topics
        try:
            self.hub.check_rate(self.publisher)
        except Throttled as exc:
            self.throttle(exc)
            return
        key = self.request.headers.get("Idempotency-Key")
        if key is not None:
            if not idempotency_key_ok(key):
                self.fail(
                    400,
                    f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII "
                    "characters (a UUID, say)",
                )
                return
            self.idempotency_key = key
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        decoder = DECODERS.get(ctype)
        if decoder is None:
            self.fail(
                415,
                f"unsupported content type {ctype[:64] or 'none'!r}",
                accepted=sorted(DECODERS),
            )
            return
        self.decoder = decoder
        limit = self.hub.config.max_body
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.fail(413, f"body of {length} bytes is over the limit of {limit}", limit=limit)

    def drain_limit(self) -> int:
        # A body refused midway (the --max-body-memory budget full: the hub is short of room
        # for bodies) is cut, not drained.
        return DRAIN_FACTOR * self.hub.config.max_body if self.size == 0 else 0

    def data_received(self, chunk: bytes) -> None:
        if self.draining or response_finished(self):
            return  # refused: the rest is dropped
        self.size += len(chunk)
        limit = self.hub.config.max_body
        if self.size > limit:
            self.chunks = []
            self.fail(413, f"body is over the limit of {limit} bytes", limit=limit)
            return
        if not self.deadlines.hold(self, len(chunk)):
            self.chunks = []
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

    def throttle(self, exc: Throttled) -> None:
        """429: the publisher's bucket will hold what it asked for in `exc.wait` seconds."""
        self.fail_retry(
            429,
            f"publish rate over the limit of {exc.rate:g} events/s (bursts of "
            f"{exc.burst}) for this publisher: retry after the time Retry-After says",
            retry_after(exc.wait),
            rate=exc.rate,
            burst=exc.burst,
        )

    async def post(self) -> None:
        if self.body_in():
            return  # refused before the body was in, which was then read and dropped
        body = b"".join(self.chunks)
        self.chunks = []
        config = self.hub.config
        try:
            events = self.hub.decode(body, self.decoder, self.publisher)
        except Throttled as exc:
            self.throttle(exc)
            return
        except TooLarge as exc:
            if exc.what == "event_bytes":
                message = f"{exc.message} (--max-event-bytes)"
            elif exc.limit < config.max_batch:
                message = (
                    f"{exc.message}: over the publish burst ({exc.limit} events at "
                    f"{config.publish_rate:g}/s), a batch this large can never pass; split it"
                )
            else:
                message = f"{exc.message}: over the limit of {exc.limit} (--max-batch); split it"
            self.fail(413, message, limit=exc.limit, index=exc.index)
            return
        except ParseError as exc:
            extra: dict[str, object] = {"offset": exc.offset}
            if exc.index is not None:
                extra["index"] = exc.index
            self.fail(400, exc.message, **extra)
            return
        except Rejected as exc:
            extra = {"known_types": self.hub.types.describe()}
            if exc.index is not None:
                extra["index"] = exc.index
            self.fail(422, exc.message, **extra)
            return
        if self.publish_topics is not None:
            for index, event in enumerate(events):
                assert event.route is not None
                outside = outside_grants(event.route, self.publish_topics)
                if outside is not None:
                    self.fail(
                        403,
                        f"event {index}: {outside}: this publisher may publish only to the "
                        "topics its publish_topics claim grants",
                        index=index,
                    )
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
            result = await self.hub.publish(events, idempotency)
        except OutcomeUnknown as exc:
            self.fail(503, str(exc), outcome="unknown")
            return
        except BrokerUnavailable as exc:
            self.fail(503, f"not published: {exc}", outcome="not_published")
            return
        except IdempotencyConflict:
            self.fail(
                422,
                "this Idempotency-Key was used for a different body within "
                f"{config.idempotency_window:g} s: use a new key for a new publish",
            )
            return
        if result.replayed:
            self.set_header("Idempotent-Replayed", "true")
        self.answer(202, {"ids": result.ids})
