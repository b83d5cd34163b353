"""The hub: publish, deliver, subscribe, unsubscribe. The HTTP layer calls these and
nothing below them.

Life of an event: a handler decodes and routes it (hub.decode, with the hub's type table),
`publish` hands it to the broker, which gives it its id and feeds it to `deliver` on every
node; `deliver` keeps it in the history and queues it once per audience (hub.flusher); the
flusher writes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

import ujson

from hub.auth import Claims
from hub.broker import Broker, BrokerUnavailable, Idempotency, MemoryBroker, Replayed
from hub.config import Config
from hub.disconnect import EXPIRED, LOGOUT, SHUTDOWN, SLOW, Disconnect
from hub.dispatch import DEFAULT_TYPES, EventFilter, TypeTable
from hub.flusher import Flusher
from hub.history import History, parse_position
from hub.limits import PublishLimiter
from hub.message import Event, encode_frame
from hub.metrics import Metrics
from hub.refusal import Refusal, RefusalKind
from hub.registry import Registry, Subscriber
from hub.revocations import Revocations
from hub.tickets import Tickets
from hub.transport import SocketTransport

__all__ = ["Hub"]

log = logging.getLogger("hub")


def _make_broker(config: Config) -> Broker:
    """The broker --broker names (Redis is imported only when asked for)."""
    if config.broker == "memory":
        return MemoryBroker()
    from hub.redis_broker import RedisBroker

    return RedisBroker(
        config.broker,
        prefix=config.redis_prefix,
        history=config.history,
        revoke_ttl=config.revoke_ttl,
        max_revocations=config.max_revocations,
    )


class Hub:
    def __init__(
        self, config: Config, broker: Broker | None = None, types: TypeTable = DEFAULT_TYPES
    ) -> None:
        self.config = config
        self.types = types
        self.registry = Registry()
        if broker is None:
            broker = _make_broker(config)
        self.broker: Broker = broker
        self.history = History(config.history, config.history_bytes, self.broker.floor)
        self.flusher = Flusher(
            self.registry,
            self.history,
            interval=config.flush_interval,
            max_lag=config.max_pending,
            slow_after=config.slow_after,
            heartbeat=config.heartbeat,
            on_slow=self._cut_slow,
        )
        # Token buckets by publisher identity (--publish-rate; the handler asks them).
        self.publishers = PublishLimiter(config.publish_rate, config.publish_burst)
        self.publishing = 0  # publishes handed to the broker and not answered yet
        self.metrics = Metrics(self)
        # One-time stream tickets, kept by the broker: shared where it is (hub.tickets).
        self.tickets = Tickets(self.broker, config.ticket_ttl, self.metrics)
        # Logouts refusing the tokens issued before them (--revoke-ttl, --max-revocations).
        self.revocations = Revocations(config.revoke_ttl, config.max_revocations)
        self.stopping = False
        self._closing: list[SocketTransport] = []  # the streams stop() ended (streams_closing)
        # Open streams in all past which new ones are refused (serve() sets it from the
        # descriptor limit unless --max-streams does).
        self.stream_limit = config.max_streams or 1_000_000
        # One tick for the whole process: expiry, heartbeats, stalled sockets.
        self.tick_interval = min(1.0, config.heartbeat)
        self._tick_handle: asyncio.TimerHandle | None = None
        # Streams waiting for this node's feed to read up to their Last-Event-ID (catch_up).
        self._catching_up: list[asyncio.Future[None]] = []
        # bound once: every stream's transport shares them (see SocketTransport.watch)
        self._stream_closed = self.disconnect
        self._stream_drained = self._drained
        self.broker.start(self)

    # -- lifecycle ------------------------------------------------------------------------

    async def stop(self, publish_wait: float = 5.0) -> None:
        """Refuse new streams and publishes; let the publishes already handed to the broker
        finish, for up to `publish_wait` seconds (their events then reach the streams below;
        a broker that does not answer must not keep the streams from what they are owed);
        end every stream after writing what it is owed; wait until each has taken it (or
        had CLOSE_GRACE to), then close the broker. The caller bounds the whole
        (handlers.app: --shutdown-timeout)."""
        self.stopping = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        loop = asyncio.get_running_loop()
        until = loop.time() + publish_wait
        while self.publishing and loop.time() < until:
            await asyncio.sleep(0.01)
        self.flusher.cancel()
        # Each stream's last bytes are a `retry:` drawn from [retry, retry + spread] and the
        # end frame: a fleet of clients cut at once then comes back spread out, not in the
        # same second.
        low = int(self.config.retry * 1000)
        high = low + int(self.config.shutdown_spread * 1000)
        closing = self._closing
        for sub in list(self.registry.all):
            if sub.outbox is not None:
                closing.append(sub.outbox.transport)
            self.end(sub, SHUTDOWN, random.randint(low, high))
        # A stream that still holds bytes closes once the client has taken them, or after
        # CLOSE_GRACE: the loop must keep running until then, or they would be lost.
        while self.streams_closing():
            await asyncio.sleep(0.02)
        await self.broker.close()

    def streams_closing(self) -> int:
        """Streams ended by stop() whose sockets still hold bytes their clients have not
        taken."""
        return sum(transport.socket is not None for transport in self._closing)

    @property
    def ready(self) -> bool:
        """Whether new streams and publishes are served here now (the readiness probe)."""
        return not self.stopping and self.broker.ready

    # -- publishing -----------------------------------------------------------------------

    async def publish(
        self, events: Sequence[Event], idempotency: Idempotency | None = None
    ) -> list[str]:
        """Send validated, routed events (see hub.decode) to every node; return their ids.
        BrokerUnavailable if they cannot be taken now: nothing of them is published. A batch
        repeated under its Idempotency-Key is not published again: its first ids come back
        (as hub.broker.Replayed)."""
        if self.stopping:
            raise BrokerUnavailable("the hub is shutting down")
        accepted = time.time()
        for event in events:
            event.accepted = accepted
        self.publishing += 1
        try:
            ids = await self.broker.publish(events, idempotency)
        finally:
            self.publishing -= 1
        if isinstance(ids, Replayed):
            self.metrics.replayed.inc()
        else:
            self.metrics.count_published(events)
        return ids

    def deliver(self, event: Event) -> None:
        """Keep one event (with its id) in the history and queue it for the local streams
        its route reaches."""
        self.history.append(event)
        self.flusher.deliver(event)
        if self._catching_up:
            self._wake_catching_up()
        route = event.route
        if route is not None and route.ends is not None:
            self._end_sessions(*route.ends, event.accepted * 1000 or time.time() * 1000)

    def _end_sessions(self, user: str, sid: str | None, at_ms: float) -> None:
        """After a logout accepted at `at_ms`: the session's streams get what they are owed,
        the logout included, then end; tokens issued before the logout stop working for
        `revoke_ttl` seconds. (A node loading the history meets old logouts: a token issued
        since one of them must keep working.)"""
        self.revoke(user, sid, at_ms)
        for sub in self.registry.sessions(user, sid):
            self.end(sub, LOGOUT)

    def revoke(self, user: str, sid: str | None, at_ms: float) -> None:
        """Refuse the tokens of the session (every session: sid None) issued before `at_ms`,
        for --revoke-ttl seconds from then. Past --max-revocations, the oldest logout is
        forgotten (a token issued before it works again until its exp)."""
        self.revocations.revoke(user, sid, at_ms)

    def resync(self, floor: str) -> None:
        """The broker cannot give this node the events up to `floor` (a position
        `<ms>-<seq>[-<epoch>]`) it has not seen, or cannot vouch for them: the history starts
        after `floor`, and every open stream gets what it is owed, then a `reset` whose id is
        `floor` (a reconnect resumes from there)."""
        key, epoch = parse_position(floor) or ((0, 0), "")
        self.history.clear(key, epoch)
        if self.registry.all:
            self.flusher.interject(self._reset_frame(None, floor))
        self._wake_catching_up()  # those of another epoch now get their reset

    def history_floor(self) -> tuple[int, int]:
        return self.history.floor

    def behind(self, last_event_id: str) -> bool:
        """Whether the client may have been served by a node further ahead than this one: its
        id is of this node's epoch and newer than all this node has read, or of an epoch this
        node has not met yet (not one it left; never with the memory broker, which has no
        epochs)."""
        position = parse_position(last_event_id)
        if position is None:
            return False
        epoch, history = position[1], self.history
        if epoch != history.epoch:
            return bool(epoch and history.epoch) and epoch not in history.past_epochs
        return self.ahead(last_event_id)

    def ahead(self, last_event_id: str) -> bool:
        """Whether `last_event_id` is of this node's epoch and newer than all it has read
        (never with the memory broker: no other node can be ahead of the only one)."""
        position = parse_position(last_event_id)
        history = self.history
        if position is None or not history.epoch or position[1] != history.epoch:
            return False
        return position[0] > (history.events[-1].key if history.events else history.floor)

    async def catch_up(self, last_event_id: str, timeout: float) -> None:
        """Wait, up to `timeout` seconds, until this node is no longer behind
        `last_event_id`. Resetting such a client instead would send it again, after the
        reset, the events between where this node is and where the client is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.behind(last_event_id) and loop.time() < deadline:
            waiter: asyncio.Future[None] = loop.create_future()
            self._catching_up.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except TimeoutError:
                return

    def _wake_catching_up(self) -> None:
        waiters, self._catching_up = self._catching_up, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- streams --------------------------------------------------------------------------

    def session_refusal(self, claims: Claims) -> Refusal | None:
        """None while the token's session stands; a refusal once a logout since the token
        was issued ended it (or all the user's sessions)."""
        if self.revocations.is_revoked(claims.user, claims.sid, claims.iat):
            return Refusal(RefusalKind.REVOKED, "session logged out: sign in again for a new token")
        return None

    def admit(self, claims: Claims) -> Refusal | None:
        """Whether one more stream may open for the token's user: None, or why not."""
        refused = self.session_refusal(claims)
        if refused is not None:
            return refused
        if not self.broker.synced:
            return Refusal(
                RefusalKind.NOT_SYNCED,
                "the hub has not loaded the shared history yet (is Redis up?): retry",
            )
        if len(self.registry) >= self.stream_limit:
            return Refusal(
                RefusalKind.CAPACITY,
                f"the hub holds its most streams ({self.stream_limit}): retry later",
            )
        limit = self.config.max_streams_per_user
        if len(self.registry.by_user.get(claims.user, ())) >= limit:
            return Refusal(
                RefusalKind.PER_USER,
                f"at most {limit} streams per user (hub.js shares one among tabs)",
            )
        return None

    def subscribe(
        self,
        transport: SocketTransport,
        user: str,
        *,
        sid: str | None = None,
        topics: tuple[str, ...] = (),
        exp: float = float("inf"),
        last_event_id: str | None = None,
        filters: dict[int, EventFilter] | None = None,
        prefix: bytes = b"",
    ) -> Subscriber:
        """Register a stream and write its opening. The opening carries the id the stream
        starts after, so a client cut before its first event still resumes exactly. With
        `last_event_id`, what it missed is replayed first (or a reset event comes, when the
        history cannot say). No await between the replay's end and the live channels' start,
        so nothing falls between them. `prefix` (the HTTP head, say) goes out in the same write
        as the opening."""
        sub = Subscriber(user, sid, topics, exp, filters)
        history = self.history
        replay_from = None
        reset = b""
        start_id = history.last_id
        if last_event_id:
            replay_from = history.resume_seq(last_event_id)
            if replay_from is None:
                reset = self._reset_frame(last_event_id, history.last_id)
            else:
                start_id = last_event_id.strip(" \t")  # a position the history holds
        opening = b"retry: %d\nid: %s\n: hub stream open\n\n" % (
            int(self.config.retry * 1000),
            start_id.encode(),
        )
        self.registry.add(sub)
        self.metrics.connects.inc()
        self.flusher.open(sub, transport, prefix + opening + reset, replay_from)
        transport.watch(sub, self._stream_closed, self._stream_drained)
        if self._tick_handle is None and not self.stopping:
            self._schedule_tick()  # the tick runs while the loop does; no start() call
        return sub

    def _reset_frame(self, last_event_id: str | None, resume: str) -> bytes:
        """The `reset` event: the client may have missed events the history cannot give
        it, so it must refetch its state. Its id is `resume`: a reconnect resumes there."""
        if last_event_id is None:
            reason = "this hub node missed events (behind the shared history); refetch state"
        else:
            reason = "history does not reach back to the last event id; refetch state"
        fields: dict[str, str] = {"reason": reason}
        if last_event_id is not None:
            fields["last_event_id"] = last_event_id[:64]
        fields["resume_from"] = resume
        return encode_frame(resume, "reset", ujson.dumps(fields))

    def end(self, sub: Subscriber, why: Disconnect, retry_ms: int | None = None) -> None:
        """End a stream the one way: the flusher writes what it is owed, then the end frame
        (with a `retry:` where given), then its transport closes once it has sent them (or
        after a grace period). A slow stream is owed nothing more and closes at once, its end
        frame written only if its socket holds nothing. The frame has no `id:`, so a
        reconnect with Last-Event-ID loses nothing. Ending twice does nothing."""
        out = sub.outbox
        slow = why is SLOW  # its socket takes nothing: the frame only if it holds nothing
        if out is not None and not sub.closed and not (slow and out.transport.pending):
            self.flusher.finish(out, why.frame(retry_ms), owed=not slow)
        self.disconnect(sub, why, flush=not slow)

    def disconnect(self, sub: Subscriber, why: Disconnect, flush: bool = False) -> None:
        """Remove a stream from every index and close it. Idempotent: the first reason wins.
        (Without `end`, as when the client left: nothing is written.)"""
        if sub.closed:
            return
        sub.closed = True
        self.registry.remove(sub)
        self.metrics.disconnects.labels(why.reason).inc()
        log.debug("stream of %r ended: %s", sub.user, why.reason)
        out = sub.outbox
        if out is not None:
            self.flusher.close(out)
            out.transport.close(why, flush)

    def _drained(self, sub: Subscriber) -> None:
        if sub.outbox is not None:
            self.flusher.mark(sub.outbox)

    def _cut_slow(self, sub: Subscriber, why: str) -> None:
        log.info("stream of %r cut as slow: %s", sub.user, why)
        self.end(sub, SLOW)

    # -- the tick -------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        """End streams whose token expired, ping quiet ones, cut stalled ones, forget old
        logouts."""
        now = time.time()
        for sub in [s for s in self.registry.all if s.exp <= now]:
            self.end(sub, EXPIRED)
        self.flusher.tick()
        self.revocations.expire(now)
        self._schedule_tick()
