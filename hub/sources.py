"""Event sources: events taken from where they are born (a PostgreSQL outbox table, a NATS
JetStream stream) instead of an HTTP POST, with the promise an HTTP publish has.

A source reads records, hands each one's body to `Intake.take` (the publish body's decoder,
the type table, the publish limits: the same refusals as POST /publish), and lets go of a
record (deletes the row, acks the message) only after `take` says its event is stored. Each
record's idempotency key is made from where it sits in its source (the outbox table and the
row id, the stream and its sequence number), so a record taken twice (a crash after storing
and before letting go, a redelivery, two hubs racing) is stored once: the broker answers the
second time with the first ids, and the source lets go of it then. What the hub refuses
(ParseError, Rejected, TooLarge) is dead-lettered by the source, with the reason; it never
blocks the records behind it.

A source runs until the hub stops: a failure of its server (down, restarted, unreachable)
is ordinary, logged once per outage, shown in /readyz and /metrics, and retried with a
capped backoff. Each source holds at most one batch at a time: a hub that cannot store
(the broker is down or slow) stops reading, and the records wait where they were born.

The implementations: hub.outbox.PostgresOutbox and hub.jetstream.JetStreamSource (hub.core
makes them from --source; hub.config checks the URLs at start). Both client libraries are
imported only when a source of theirs is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from hub.broker import BrokerUnavailable, Idempotency, IdempotencyConflict, PublishResult
from hub.decode import decode_json
from hub.dispatch import TypeTable
from hub.message import Event, ParseError, Rejected, TooLarge

__all__ = [
    "Backoff",
    "Intake",
    "Limits",
    "Publishing",
    "Refused",
    "Source",
    "SourceError",
    "SourceStats",
    "options",
    "shown_url",
    "went_down",
]

log = logging.getLogger("hub.sources")


class SourceError(ValueError):
    """A --source URL that cannot work: the message says why (no password in it)."""


class Refused(Exception):
    """A record the hub will never take as it is (malformed, an unknown type, too large):
    it goes to the dead letters with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourceStats:
    """A source's numbers, read by the metrics at scrape time (hub.metrics): plain fields."""

    __slots__ = (
        "dead",
        "held",
        "lag",
        "lag_seconds",
        "leading",
        "published",
        "replayed",
        "restarts",
        "state",
        "up",
    )

    def __init__(self) -> None:
        self.published = 0  # records stored by this node
        self.replayed = 0  # records stored before (a retake after a crash or a redelivery)
        self.dead = 0  # records dead-lettered
        self.restarts = 0  # connections lost and made again
        self.held = 0  # records read and not yet let go of (at most one batch)
        self.lag = 0  # records waiting in the source (bounded count: the source says)
        self.lag_seconds = 0.0  # how long the oldest waiting record has waited, where known
        self.up = False  # connected to its server
        self.leading = False  # reading now (an outbox has one reader among the hubs)
        self.state = "starting"  # what /readyz shows


class Source:
    """One configured source, read until the hub stops: every failure of its server ends a
    session (`_session`, one connection's life), which starts again after a capped backoff.
    An implementation gives `_session`, `_disconnect` and `_expected` (the client's errors
    that mean the server is down or unusable: logged once per outage, with no traceback).
    `name` is its URL without a password: the metrics' label."""

    def __init__(self, url: str, intake: Intake) -> None:
        self.name = shown_url(url)
        self.intake = intake
        self.stats = SourceStats()
        self.closing = False
        self._wake = asyncio.Event()  # set by close() (and by a NOTIFY, for an outbox)

    async def close(self) -> None:
        """Stop reading: what was stored is let go of, what was not waits in the source
        (hub.core bounds the wait for run() to end)."""
        self.closing = True
        self._wake.set()

    async def run(self) -> None:
        expected = self._expected()
        backoff = Backoff()
        while not self.closing:
            try:
                await self._session(backoff)
            except expected as exc:
                went_down(self.stats, self.name, exc)
            except Exception as exc:  # a bug or a surprise of the client: retried all the same
                log.exception("source %s: unexpected failure", self.name)
                went_down(self.stats, self.name, exc)
            finally:
                await self._disconnect()
            if not self.closing:
                await self._pause(backoff)
        self.stats.up = self.stats.leading = False
        self.stats.state = "stopped"

    async def _pause(self, backoff: Backoff) -> None:
        """Wait before the next attempt, ended early by close()."""
        waiting = asyncio.ensure_future(backoff.wait())
        closed = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiting, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            closed.cancel()
        if not self.closing:
            self._wake.clear()

    def _expected(self) -> tuple[type[BaseException], ...]:
        return (OSError, TimeoutError)

    async def _session(self, backoff: Backoff) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError


class Limits(Protocol):
    """The settings a record is held to (hub.config.Config: --max-body and the others)."""

    max_body: int
    max_batch: int
    max_event_bytes: int
    idempotency_window: float


class Publishing(Protocol):
    """What the sources publish through: the hub (hub.core.Hub)."""

    @property
    def config(self) -> Limits: ...

    @property
    def types(self) -> TypeTable: ...

    async def publish(
        self, events: Sequence[Event], idempotency: Idempotency | None = None
    ) -> PublishResult: ...


class Intake:
    """Where sources hand their records: decoded as a publish body and published under the
    record's idempotency key (see the module's docstring)."""

    def __init__(self, hub: Publishing) -> None:
        self.hub = hub

    def decode(self, body: bytes) -> list[Event]:
        """The events of one record, or Refused with the reason POST /publish would give."""
        config = self.hub.config
        if len(body) > config.max_body:
            raise Refused(f"body of {len(body)} bytes is over --max-body ({config.max_body})")
        try:
            return decode_json(
                body,
                self.hub.types,
                max_events=config.max_batch,
                max_event_bytes=config.max_event_bytes,
            )
        except (ParseError, Rejected, TooLarge) as exc:
            raise Refused(str(exc)) from None

    async def take(
        self, records: Sequence[tuple[str, bytes]], stats: SourceStats
    ) -> list[str | None]:
        """Store the records `(key, body)`, in order; per record, None once stored (now or
        before), or the reason it is refused for good. BrokerUnavailable if not all could be
        stored now: the caller keeps them all and tries again (those stored meanwhile come
        back replayed, keeping their first ids)."""
        window = self.hub.config.idempotency_window
        reasons: list[str | None] = [None] * len(records)
        pending: list[tuple[int, asyncio.Future[PublishResult]]] = []
        for n, (key, body) in enumerate(records):
            try:
                events = self.decode(body)
            except Refused as exc:
                reasons[n] = exc.reason
                continue
            # The body's hash is part of the key: an id reused for another body (a table
            # or stream made anew) is a new event, never mistaken for a replay.
            digest = hashlib.sha256(body).hexdigest()
            idempotency = Idempotency(f"source\n{key}\n{digest}", digest, window)
            # Handed over together: the Redis broker sends them in one script call, in order.
            pending.append((n, asyncio.ensure_future(self.hub.publish(events, idempotency))))
        failure: BaseException | None = None
        for n, future in pending:
            try:
                result = await future
            except IdempotencyConflict:  # cannot happen: the key holds the body's hash
                reasons[n] = "idempotency conflict"
                continue
            except BrokerUnavailable as exc:
                failure = failure or exc
                continue
            if result.replayed:
                stats.replayed += 1
            else:
                stats.published += 1
        if failure is not None:
            raise failure
        return reasons


class Backoff:
    """Waits between reconnects: doubling from `first` to `most`, with jitter (a fleet of
    hubs must not reconnect to a database that came back in the same instant)."""

    def __init__(self, first: float = 0.1, most: float = 5.0) -> None:
        self.first = first
        self.most = most
        self.next = first

    def reset(self) -> None:
        self.next = self.first

    async def wait(self) -> None:
        delay = self.next * (0.5 + random.random() / 2)
        self.next = min(self.most, self.next * 2)
        await asyncio.sleep(delay)


def shown_url(url: str) -> str:
    """The URL with the password of its userinfo as *** (a URL of several hosts too:
    nats://u:p@h1:4222,h2:4222/S, which urlsplit cannot take a port from)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def options(
    url: str, known: dict[str, type], *, keep_unknown: bool
) -> tuple[SplitResult, dict[str, object], str]:
    """The URL's parts, its hub options (`known`: name -> int, float or str) parsed, and its
    query without them (what the client library is given). An option twice, of the wrong
    kind, or unknown (when `keep_unknown` is false) raises SourceError."""
    parts = urlsplit(url)
    found: dict[str, object] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        kind = known.get(name)
        if kind is None:
            if not keep_unknown:
                allowed = ", ".join(sorted(known))
                raise SourceError(f"unknown option {name[:32]!r} (known: {allowed})")
            rest.append((name, value))
            continue
        if name in found:
            raise SourceError(f"option {name} given twice")
        try:
            parsed = kind(value)
        except ValueError:
            raise SourceError(f"option {name}={value[:32]!r} is not {kind.__name__}") from None
        if isinstance(parsed, int | float) and not parsed > 0:
            raise SourceError(f"option {name} must be positive")
        found[name] = parsed
    return parts, found, urlencode(rest)


def went_down(stats: SourceStats, name: str, exc: BaseException) -> None:
    """A source lost its server (or never reached it): a warning once per outage (then
    debug lines), and /readyz and /metrics say so."""
    why = (str(exc) or type(exc).__name__)[:200]
    first = not stats.state.startswith("down")
    if stats.up:
        stats.restarts += 1
    stats.up = False
    stats.leading = False
    stats.state = f"down: {why}"
    if first:
        log.warning("source %s: down (%s); retrying until it answers", name, why)
    else:
        log.debug("source %s: still down (%s)", name, why)
