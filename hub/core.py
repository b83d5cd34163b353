"""The hub: publish, deliver, open streams (a stream ends itself: hub.stream.Stream.end).
The HTTP layer calls these and nothing below them.

Life of an event: a handler decodes and routes it (hub.decode, with the hub's type table),
`publish` hands it to the broker, which gives it its id and feeds it to `deliver` on every
node; `deliver` keeps it in the history and queues it once per audience (hub.flusher); the
flusher writes. Events of the --source sources take the same way from `publish` on
(hub.sources.Intake).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

import ujson

from hub.auth import Claims
from hub.broker import Broker, BrokerUnavailable, Idempotency, MemoryBroker, PublishResult
from hub.config import Config
from hub.decode import Decoder
from hub.disconnect import EXPIRED, LOGOUT, SHUTDOWN, Disconnect
from hub.dispatch import DEFAULT_TYPES, EventFilter, TypeTable
from hub.flusher import Flusher
from hub.history import History, parse_position
from hub.joins import JoinLeave
from hub.limits import PublishLimiter, Throttled
from hub.message import Event, TooLarge, encode_frame
from hub.metrics import Metrics
from hub.presence import Presence, TopicPresence, UserPresence
from hub.refusal import Refusal, RefusalKind
from hub.registry import Registry
from hub.revocations import Revocations
from hub.sources import Intake, Source
from hub.stream import Stream, StreamRequest
from hub.tickets import Tickets
from hub.transport import SocketTransport

__all__ = ["Hub"]

log = logging.getLogger("hub")

# The refusals that are a stream cap: hub_streams_capped_total's label.
_CAPS = {RefusalKind.CAPACITY: "total", RefusalKind.PER_USER: "per_user"}
_NEVER = 2**63  # a position past every event's (`<ms>-<seq>` never reaches it)


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
        wait_replicas=config.redis_wait_replicas,
        wait_timeout=config.redis_wait_timeout,
    )


def _make_presence(config: Config, registry: Registry) -> Presence:
    """Who is online: this process's registry, and with Redis every node's share too."""
    if config.broker == "memory":
        return Presence(registry)
    from hub.redis_presence import RedisPresence

    return RedisPresence(registry, config.broker, config.redis_prefix, config.presence_ttl)


def _make_source(url: str, intake: Intake) -> Source:
    """The source a --source URL names (checked at start: hub.config.source_urls). The client
    library is imported only when a source of its kind is configured."""
    if url.startswith("nats://"):
        from hub.jetstream import JetStreamSource

        return JetStreamSource(url, intake)
    from hub.outbox import PostgresOutbox

    return PostgresOutbox(url, intake)


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
            on_end=self._ended,
        )
        # Token buckets by publisher identity (--publish-rate; the handler asks them).
        self.publishers = PublishLimiter(config.publish_rate, config.publish_burst)
        self.publishing = 0  # publishes handed to the broker and not answered yet
        # Counted here, read by the metrics at scrape time (hub_events_published_total by type,
        # hub_publish_replayed_total): plain integers on the publish path.
        self.published: Counter[str] = Counter()
        self.replayed = 0
        self.metrics = Metrics(self)
        # Join and leave events of the --join-leave topics: with none, no watcher at all.
        self.joins: JoinLeave | None = None
        followed = config.join_leave_topics()
        if followed:
            count = self.metrics.membership
            self.joins = JoinLeave(
                self.registry, followed, types, self.publish, lambda k, n: count.labels(k).inc(n)
            )
            self.registry.watchers.append(self.joins.watch)
        # One-time stream tickets, kept by the broker: shared where it is (hub.tickets).
        self.tickets = Tickets(self.broker, config.ticket_ttl, self.metrics)
        # Logouts refusing the tokens issued before them (--revoke-ttl, --max-revocations).
        self.revocations = Revocations(config.revoke_ttl, config.max_revocations)
        self.stopping = False
        # Open streams in all past which new ones are refused (serve() sets it from the
        # descriptor limit unless --max-streams does).
        self.stream_limit = config.max_streams or 1_000_000
        # One tick for the whole process: expiry, heartbeats, stalled sockets.
        self.tick_interval = min(1.0, config.heartbeat)
        self._tick_handle: asyncio.TimerHandle | None = None
        # Streams waiting for this node's feed to read up to their Last-Event-ID (catch_up):
        # a heap by the position each waits for, so an event wakes only those it reaches
        # (a storm of resumes must not cost every delivered event a pass over all of them).
        self._catching_up: list[tuple[tuple[int, int], int, asyncio.Future[None]]] = []
        self._waiters = 0  # a tie-break for the heap: futures do not compare
        self._gone = 0  # entries of waiters that stopped waiting (swept when they are many)
        self.broker.start(self)
        # GET /presence (hub.presence): with Redis, a writer of this node's share starts.
        self.presence = _make_presence(config, self.registry)
        self.presence.start()
        # --source: events also read from an outbox table or a JetStream stream (hub.sources).
        intake = Intake(self)
        self.sources: list[Source] = [_make_source(url, intake) for url in config.source_urls()]
        self._source_tasks = [
            asyncio.get_running_loop().create_task(source.run()) for source in self.sources
        ]

    # -- lifecycle ------------------------------------------------------------------------

    async def stop(self, publish_wait: float = 5.0) -> None:
        """Refuse new streams and publishes; let the publishes already handed to the broker
        finish, for up to `publish_wait` seconds (their events then reach the streams below;
        a broker that does not answer must not keep the streams from what they are owed);
        end every stream after writing what it is owed; wait until each has taken it (or
        had the flusher's grace to: hub.flusher.CLOSE_GRACE), then close the broker. The
        caller bounds the whole (handlers.app: --shutdown-timeout)."""
        self.stopping = True
        await self._stop_sources()
        if self.joins is not None:
            self.joins.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        loop = asyncio.get_running_loop()
        until = loop.time() + publish_wait
        while self.publishing and loop.time() < until:
            await asyncio.sleep(0.01)
        # Each stream's last bytes are a `retry:` drawn from [retry, retry + spread] and the
        # end frame: a fleet of clients cut at once then comes back spread out, not in the
        # same second.
        low = int(self.config.retry * 1000)
        high = low + int(self.config.shutdown_spread * 1000)
        for stream in list(self.registry.all):
            stream.end(SHUTDOWN, random.randint(low, high))
        # The flusher writes each what it is owed, a window at a time, then its end frame;
        # it closes once the client has taken them, or after the grace: the loop must keep
        # running until then, or they would be lost.
        while self.streams_closing():
            await asyncio.sleep(0.02)
        self.flusher.cancel()
        await self.presence.close()  # this node's share in Redis goes
        await self.broker.close()

    async def _stop_sources(self, wait: float = 2.0) -> None:
        """Stop reading the sources: a batch being stored may finish within `wait` seconds
        (and is let go of); what is cut then stays in its source, for the next relay."""
        for source in self.sources:
            await source.close()
        tasks, self._source_tasks = self._source_tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=wait)
            for task in pending:
                task.cancel()

    def streams_closing(self) -> int:
        """Ended streams whose sockets are still open: their clients have not taken what
        they are owed and the end frame yet (within the flusher's grace)."""
        return self.flusher.closing()

    @property
    def ready(self) -> bool:
        """Whether new streams and publishes are served here now (the readiness probe)."""
        return not self.stopping and self.broker.ready

    # -- publishing -----------------------------------------------------------------------

    def check_rate(self, publisher: str) -> None:
        """Throttled if `publisher`'s bucket is empty: asked at a request's head, so that a
        throttled publisher costs the hub a head, not a body's read and decode."""
        if not self.publishers.rate:
            return
        wait = self.publishers.delay(publisher, 1, take=False)
        if wait:
            self.metrics.limited.labels("rate").inc()
            raise Throttled(wait, self.publishers.rate, self.publishers.burst)

    def decode(self, body: bytes, decoder: Decoder, publisher: str) -> list[Event]:
        """A publish body's events, decoded whole within the publish limits and routed, with
        the publisher's rate taken for them. ParseError, Rejected (hub.message); TooLarge
        over --max-batch, --max-event-bytes, or a burst no rate lets through; Throttled over
        the rate. Limits reached are counted (hub_publish_limited)."""
        config, limiter = self.config, self.publishers
        max_events = config.max_batch
        if limiter.rate:  # no batch over the burst can ever pass: TooLarge, not Throttled
            max_events = min(max_events, limiter.burst)
        try:
            events = decoder(
                body, self.types, max_events=max_events, max_event_bytes=config.max_event_bytes
            )
        except TooLarge as exc:
            self.metrics.limited.labels(exc.what).inc()
            raise
        if limiter.rate:
            wait = limiter.delay(publisher, len(events))
            if wait:
                self.metrics.limited.labels("rate").inc()
                raise Throttled(wait, limiter.rate, limiter.burst)
        return events

    async def publish(
        self, events: Sequence[Event], idempotency: Idempotency | None = None
    ) -> PublishResult:
        """Send validated, routed events (see decode) to every node; their ids.
        BrokerUnavailable if they cannot be taken now: nothing of them is published
        (OutcomeUnknown: they may have been). A batch repeated under its Idempotency-Key is
        not published again: its first ids come back, marked replayed."""
        if self.stopping:
            raise BrokerUnavailable("the hub is shutting down")
        accepted = time.time()
        for event in events:
            event.accepted = accepted
        self.publishing += 1
        try:
            result = await self.broker.publish(events, idempotency)
        finally:
            self.publishing -= 1
        if result.replayed:
            self.replayed += 1
        else:
            published = self.published
            for event in events:
                published[event.name] += 1
        return result

    def deliver(self, event: Event) -> None:
        """Keep one event (with its id) in the history and queue it for the local streams
        its route reaches."""
        self.history.append(event)
        self.flusher.deliver(event)
        waiting = self._catching_up
        if waiting and waiting[0][0] <= event.key:
            while waiting and waiting[0][0] <= event.key:
                waiter = heapq.heappop(waiting)[2]
                if not waiter.done():
                    waiter.set_result(None)
        route = event.route
        if route is not None and route.ends is not None:
            self._end_sessions(*route.ends, event.accepted * 1000 or time.time() * 1000)

    def _end_sessions(self, user: str, sid: str | None, at_ms: float) -> None:
        """After a logout accepted at `at_ms`: the session's streams get what they are owed,
        the logout included, then end; tokens issued before the logout stop working for
        `revoke_ttl` seconds. (A node loading the history meets old logouts: a token issued
        since one of them must keep working.)"""
        self.revoke(user, sid, at_ms)
        for stream in self.registry.sessions(user, sid):
            stream.end(LOGOUT)

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
        position = parse_position(last_event_id)
        while position is not None and self.behind(last_event_id) and loop.time() < deadline:
            # An epoch not met yet is waited for by resync, which wakes everyone.
            key = position[0] if position[1] == self.history.epoch else (_NEVER, _NEVER)
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters += 1
            heapq.heappush(self._catching_up, (key, self._waiters, waiter))
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except TimeoutError:
                return
            finally:
                if waiter.cancelled():  # timed out, or the client left: an entry left behind
                    self._gone += 1
                    if self._gone > 64 and self._gone * 2 > len(self._catching_up):
                        self._catching_up = [e for e in self._catching_up if not e[2].done()]
                        heapq.heapify(self._catching_up)
                        self._gone = 0

    def _wake_catching_up(self) -> None:
        waiters, self._catching_up, self._gone = self._catching_up, [], 0
        for _, _, waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- streams --------------------------------------------------------------------------

    def session_refusal(self, claims: Claims) -> Refusal | None:
        """None while the token's session stands; a refusal once a logout since the token
        was issued ended it (or all the user's sessions)."""
        if self.revocations.is_revoked(claims.user, claims.sid, claims.iat):
            return Refusal(RefusalKind.REVOKED, "session logged out: sign in again for a new token")
        return None

    def limit_streams(self, most: int) -> None:
        """Refuse streams past `most` open ones (the server sets it from its descriptors)."""
        self.stream_limit = most

    def admit(self, claims: Claims) -> Refusal | None:
        """Whether one more stream may open for the token's user: None, or why not."""
        refused = self.session_refusal(claims)
        if refused is not None:
            return refused
        if not self.broker.ready:
            # Only a live feed can say where a resume stands: a node that has not heard from
            # its broker for a moment may be behind its client (it would send it back) or
            # miss what is published meanwhile. Its client retries, here or elsewhere.
            return Refusal(
                RefusalKind.UNREADY,
                f"this node cannot serve streams now: {self.broker.unready_reason()}: retry",
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

    async def open_stream(
        self, request: StreamRequest, take_transport: Callable[[], SocketTransport | None]
    ) -> Stream | Refusal | None:
        """Admit a stream, or refuse it; then take its transport (None: the client left
        meanwhile, and None comes back) and open it (`subscribe`). A client whose
        Last-Event-ID may come from a node further ahead waits, up to --catch-up-wait, for
        this node's feed to read as far; still behind a client of its own epoch, it is told
        to retry (BEHIND): a reset would move it back to where this node is, and it would
        take again what it already has. (An epoch still unknown after the wait is an old
        one: reset.)"""
        claims = request.claims
        refused = self.admit(claims)
        if refused is not None:
            if request.by_ticket and refused.kind is RefusalKind.REVOKED:
                self.tickets.reject("revoked")
            cap = _CAPS.get(refused.kind)
            if cap is not None:
                self.metrics.streams_capped.labels(cap).inc()
            return refused
        last_id = request.last_event_id
        if last_id and self.behind(last_id):
            await self.catch_up(last_id, self.config.catch_up_wait)
            if self.ahead(last_id):
                return Refusal(
                    RefusalKind.BEHIND,
                    "this node has not read up to Last-Event-ID yet: retry",
                    retry_after=1.0,
                )
            if self.stopping:  # it began while the stream waited: stop() ended the others
                return Refusal(RefusalKind.UNREADY, "the hub is shutting down: retry")
        return self.open_admitted(request, take_transport)

    def may_open_now(self, request: StreamRequest) -> bool:
        """Whether open_stream would open this stream at once, without waiting or refusing
        (the hub not stopping, the stream admitted, its resume not ahead of this node): a
        caller that cannot wait or answer may then open it with `open_admitted`."""
        last_id = request.last_event_id
        return (
            not self.stopping
            and self.admit(request.claims) is None
            and not (last_id and self.behind(last_id))
        )

    def open_admitted(
        self, request: StreamRequest, take_transport: Callable[[], SocketTransport | None]
    ) -> Stream | None:
        """Take the transport of a stream admitted a moment ago (None: the client left
        meanwhile, and None comes back) and open it (`subscribe`)."""
        transport = take_transport()
        if transport is None:
            return None
        claims = request.claims
        return self.subscribe(
            transport,
            claims.user,
            sid=claims.sid,
            topics=request.topics,
            exp=claims.exp,
            last_event_id=request.last_event_id,
            filters=request.filters,
            prefix=request.prefix,
        )

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
    ) -> Stream:
        """Register a stream and open it, admitted already (open_stream admits; the core's
        tests call this directly). Its opening carries the id the stream starts after, so a
        client cut before its first event still resumes exactly. With `last_event_id`, what
        it missed is replayed first (or a reset event comes, when the history cannot say).
        No await between the replay's end and the live channels' start, so nothing falls
        between them. `prefix` (the HTTP head, say) goes out in the same write as the
        opening. A client already gone ends the stream at once (it comes back closed)."""
        stream = Stream(user, sid, topics, exp, filters)
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
        self.registry.add(stream)
        self.metrics.connects.inc()
        self.flusher.open(stream, transport, prefix + opening + reset, replay_from)
        if self._tick_handle is None and not self.stopping:
            self._schedule_tick()  # the tick runs while the loop does; no start() call
        return stream

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

    def _ended(self, stream: Stream, why: Disconnect) -> None:
        """Told by the flusher of every stream's end, once (Stream.end)."""
        self.metrics.disconnects.labels(why.reason).inc()
        log.debug("stream of %r ended: %s", stream.user, why.reason)

    # -- presence -------------------------------------------------------------------------

    async def presence_of_users(self, users: Sequence[str]) -> dict[str, UserPresence]:
        """Each user's streams, sessions and oldest stream's opening, over every node.
        PresenceUnavailable (hub.presence) when Redis cannot answer."""
        return await self.presence.users(users)

    async def presence_of_topic(
        self, topic: str, limit: int, after: str | None = None
    ) -> TopicPresence:
        """A topic's streams and distinct users over every node, and a page of the users
        (sorted, strictly after `after`). PresenceUnavailable when Redis cannot answer."""
        return await self.presence.topic(topic, limit, after)

    # -- the tick -------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        """End streams whose token expired, ping quiet ones, cut stalled ones, forget old
        logouts."""
        now = time.time()
        for stream in [s for s in self.registry.all if s.exp <= now]:
            stream.end(EXPIRED)
        self.flusher.tick()
        self.revocations.expire(now)
        self._schedule_tick()
