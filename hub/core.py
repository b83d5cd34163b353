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
from collections import OrderedDict
from collections.abc import Sequence

import ujson

from hub.broker import Broker, BrokerUnavailable, Idempotency, MemoryBroker, Replayed
from hub.config import Config
from hub.dispatch import DEFAULT_TYPES, EventFilter, TypeTable
from hub.flusher import Flusher
from hub.history import History, parse_position
from hub.limits import PublishLimiter
from hub.message import Event, encode_frame
from hub.metrics import Metrics
from hub.registry import Reason, Registry, Subscriber
from hub.tickets import Tickets
from hub.transport import SocketTransport

__all__ = ["Hub"]

log = logging.getLogger("hub")

# Expired logouts forgotten per tick, at most (each ~0.3 us here): a wave of logouts an hour
# ago must not stall the loop when it expires; a later tick takes the rest.
EXPIRIES_PER_TICK = 10_000

_EXPIRED_FRAME = encode_frame(
    None,
    "end",
    ujson.dumps({"reason": "expired", "detail": "token expired: reconnect with a fresh token"}),
)


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
        # (user, sid) -> ms of the logout; sid None = every session of the user. In the order
        # the logouts came (a logout again moves to the end): expiry and the cap
        # (--max-revocations) drop from the front, never scanning the table.
        self.revoked: OrderedDict[tuple[str, str | None], float] = OrderedDict()
        self.revocations_dropped = 0  # logouts forgotten at the cap before their time
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
        self.flusher.flush_all()
        self.flusher.cancel()
        # Each stream's last bytes are a `retry:` drawn from [retry, retry + spread]: a fleet
        # of clients cut at once then comes back spread out, not in the same second.
        low = int(self.config.retry * 1000)
        high = low + int(self.config.shutdown_spread * 1000)
        closing = self._closing
        for sub in list(self.registry.all):
            if sub.outbox is not None:
                sub.outbox.transport.write(b"retry: %d\n\n" % random.randint(low, high))
                closing.append(sub.outbox.transport)
            self.disconnect(sub, Reason.SHUTDOWN, flush=True)
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
            self.end(sub, Reason.LOGOUT)

    def revoke(self, user: str, sid: str | None, at_ms: float) -> None:
        """Refuse the tokens of the session (every session: sid None) issued before `at_ms`,
        for --revoke-ttl seconds from then. Past --max-revocations, the oldest logout is
        forgotten (a token issued before it works again until its exp)."""
        if at_ms < (time.time() - self.config.revoke_ttl) * 1000:
            return  # already expired (a node loading old logouts): it must not push one out
        revoked = self.revoked
        key = (user, sid)
        revoked[key] = max(at_ms, revoked.pop(key, 0.0))  # popped: it moves to the end
        if len(revoked) > self.config.max_revocations:
            revoked.popitem(last=False)
            self.revocations_dropped += 1

    def resync(self, floor: str) -> None:
        """The broker cannot give this node the events up to `floor` (a position
        `<ms>-<seq>[-<epoch>]`) it has not seen, or cannot vouch for them: the history starts
        after `floor`, and every open stream gets what it is owed, then a `reset` whose id is
        `floor` (a reconnect resumes from there)."""
        key, epoch = parse_position(floor) or ((0, 0), "")
        if self.registry.all:
            self.flusher.flush_all()
            frame = self._reset_frame(None, floor)
            for sub in self.registry.all:
                if sub.outbox is not None and not sub.outbox.closed:
                    sub.outbox.transport.write(frame)
        self.history.clear(key, epoch)
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
        key, epoch = position
        history = self.history
        if epoch != history.epoch:
            return bool(epoch and history.epoch) and epoch not in history.past_epochs
        return key > (history.events[-1].key if history.events else history.floor)

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

    def is_revoked(self, user: str, sid: str | None, iat: float) -> bool:
        """Whether a logout since the token was issued ended its session (or all sessions).

        A whole-second `iat` (most issuers) cannot say whether the token came before or after
        a logout in the same second: such a token counts as issued after it (a sign-in right
        after a logout must work; the cost is that a token issued in the same second just
        before the logout stays usable). A fractional `iat` is compared exactly."""
        whole = iat == int(iat)
        for key in ((user, None), (user, sid)) if sid is not None else ((user, None),):
            at = self.revoked.get(key)
            if at is None:
                continue
            if (iat < at // 1000) if whole else (iat * 1000 <= at):
                return True
        return False

    def admit(self, user: str) -> tuple[int, str] | None:
        """Whether one more stream may open for `user`: None, or (status, why) to refuse."""
        if not self.broker.synced:
            return 503, "the hub has not loaded the shared history yet (is Redis up?): retry"
        if len(self.registry) >= self.stream_limit:
            return 503, f"the hub holds its most streams ({self.stream_limit}): retry later"
        limit = self.config.max_streams_per_user
        if len(self.registry.by_user.get(user, ())) >= limit:
            return 429, f"at most {limit} streams per user (hub.js shares one among tabs)"
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

    def end(self, sub: Subscriber, reason: Reason) -> None:
        """End a stream after it has been written everything it is owed. A stream whose token
        expired gets a last `end` event that says so: it has no `id:`, so the client's last
        event id stays that of the last real event, and a reconnect with a fresh token and
        Last-Event-ID loses nothing. (Clients that listen only for the table's names, hub.js
        among them, never see it.)"""
        out = sub.outbox
        if out is not None:
            self.flusher.finish(out)
            if reason is Reason.EXPIRED and not out.closed:
                out.transport.write(_EXPIRED_FRAME)
        self.disconnect(sub, reason, flush=True)

    def disconnect(self, sub: Subscriber, reason: Reason, flush: bool = False) -> None:
        """Remove a stream from every index and close it. Idempotent: the first reason wins."""
        if sub.closed:
            return
        sub.closed = True
        self.registry.remove(sub)
        self.metrics.disconnects.labels(reason.value).inc()
        log.debug("stream of %r ended: %s", sub.user, reason.value)
        out = sub.outbox
        if out is not None:
            self.flusher.close(out)
            out.transport.close(reason, flush)

    def _drained(self, sub: Subscriber) -> None:
        if sub.outbox is not None:
            self.flusher.mark(sub.outbox)

    def _cut_slow(self, sub: Subscriber, why: str) -> None:
        log.info("stream of %r cut as slow: %s", sub.user, why)
        self.disconnect(sub, Reason.SLOW)

    # -- the tick -------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        """End streams whose token expired, ping quiet ones, cut stalled ones, forget old
        logouts."""
        now = time.time()
        for sub in [s for s in self.registry.all if s.exp <= now]:
            self.end(sub, Reason.EXPIRED)
        self.flusher.tick()
        self._expire_revocations((now - self.config.revoke_ttl) * 1000)
        self._schedule_tick()

    def _expire_revocations(self, horizon: float) -> None:
        """Forget the logouts older than `horizon` (ms) from the front of the table, at most
        EXPIRIES_PER_TICK of them: the rest go on the next ticks, and no tick stalls the loop
        (a logout behind a newer one, from another node's clock, waits for it)."""
        revoked = self.revoked
        for _ in range(min(EXPIRIES_PER_TICK, len(revoked))):
            if revoked[next(iter(revoked))] >= horizon:
                break
            revoked.popitem(last=False)
