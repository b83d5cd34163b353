"""The hub: publish, deliver, subscribe, unsubscribe. The HTTP layer calls these and
nothing below them.

Life of an event: a handler decodes and routes it (hub.decode), `publish` hands it to the
broker, which gives it its id and feeds it to `deliver` on every node; `deliver` keeps it in
the history and queues its frame for each recipient stream; the flusher writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import ujson

from hub.broker import Broker, MemoryBroker
from hub.config import Config
from hub.dispatch import LOG
from hub.flusher import PING, Flusher
from hub.history import History
from hub.message import Event, encode_frame
from hub.metrics import Metrics
from hub.registry import Connection, Reason, Registry, Subscriber

__all__ = ["Hub"]

log = logging.getLogger("hub")


class Hub:
    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.registry = Registry()
        self.broker: Broker = broker if broker is not None else MemoryBroker()
        self.history = History(config.history, config.history_bytes, self.broker.floor)
        self.flusher = Flusher(
            self.registry,
            interval=config.flush_interval,
            max_pending=config.max_pending,
            on_slow=self._cut_slow,
        )
        self.metrics = Metrics(self)
        self.delivered = 0
        # (user, sid) -> ms of the logout; sid None = every session of the user.
        self.revoked: dict[tuple[str, str | None], float] = {}
        self.stopping = False
        self._heartbeat: asyncio.TimerHandle | None = None
        self.broker.start(self.deliver)

    # -- lifecycle ------------------------------------------------------------------------

    async def stop(self) -> None:
        """End every stream after writing what it is owed; refuse new ones."""
        self.stopping = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self.flusher.flush_all()
        self.flusher.cancel()
        for sub in list(self.registry.all):
            self.disconnect(sub, Reason.SHUTDOWN, flush=True)
        await self.broker.close()

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, events: Sequence[Event]) -> list[str]:
        """Send validated, routed events (see hub.decode) to every node; return their ids."""
        ids = await self.broker.publish(events)
        self.metrics.count_published(events)
        return ids

    def deliver(self, event: Event) -> None:
        """Queue one event (with its id) for every local stream its route reaches."""
        self.history.append(event)
        route = event.route
        if route is None:
            return
        frame = event.frame
        if route.everyone:
            self.flusher.broadcast(frame)
            self.delivered += len(self.registry.all)
        else:
            by_user = self.registry.by_user
            by_topic = self.registry.by_topic
            targets: set[Subscriber] | None = None
            for user in route.users:
                subs = by_user.get(user)
                if subs:
                    targets = subs if targets is None else targets | subs
            for topic in route.topics:
                subs = by_topic.get(topic)
                if subs:
                    targets = subs if targets is None else targets | subs
            if targets:
                chosen = [s for s in targets if s.accepts(event)] if event.type == LOG else targets
                push = self.flusher.push
                for sub in chosen:
                    push(sub, frame)
                self.delivered += len(chosen)
        if route.ends is not None:
            self._end_sessions(*route.ends)

    def _end_sessions(self, user: str, sid: str | None) -> None:
        """After a logout: the session's streams get what they are owed, the logout included,
        then end; tokens issued before now stop working for `revoke_ttl` seconds."""
        self.revoked[(user, sid)] = time.time() * 1000
        for sub in self.registry.sessions(user, sid):
            self.flusher.write(sub)
            self.disconnect(sub, Reason.LOGOUT, flush=True)

    # -- streams --------------------------------------------------------------------------

    def is_revoked(self, user: str, sid: str | None, iat: float) -> bool:
        """Whether a logout since the token was issued ended its session (or all sessions)."""
        issued_ms = iat * 1000
        for key in ((user, None), (user, sid)) if sid is not None else ((user, None),):
            at = self.revoked.get(key)
            if at is not None and issued_ms <= at:
                return True
        return False

    def subscribe(
        self,
        conn: Connection,
        user: str,
        *,
        sid: str | None = None,
        topics: tuple[str, ...] = (),
        exp: float = float("inf"),
        last_event_id: str | None = None,
        min_level: int = 0,
        services: frozenset[str] | None = None,
    ) -> Subscriber:
        """Register a stream; with `last_event_id`, first queue what it missed (or a reset
        event when the history cannot say). No await between the replay and registering, so
        nothing falls between replayed and live events."""
        sub = Subscriber(conn, user, sid, topics, exp, min_level, services)
        sub.bcast_pos = self.flusher.log_end
        self.registry.add(sub)
        if self._heartbeat is None and not self.stopping:
            self._schedule_heartbeat()  # the tick runs while the loop does; no start() call
        if last_event_id:
            # The replay is written at once, frame by frame, ahead of anything live: the
            # connection keeps what the socket does not take as references to the history's
            # frames, not as a copy, so a thousand clients resuming at once cost no more.
            missed = self.history.since(last_event_id)
            if missed is None:
                frames = [self._reset_frame(last_event_id)]
            else:
                frames = [e.frame for e in missed if sub.entitled(e)]
            for frame in frames:
                sub.backlog = conn.write(frame)
            if frames:
                sub.active = True
                sub.allowance = sub.backlog
        return sub

    def _reset_frame(self, last_event_id: str) -> bytes:
        """The `reset` event: the client's last id is beyond what the history holds, so it
        must refetch its state. Its id is where the history ends: a reconnect resumes there."""
        resume = self.history.last_id
        body = ujson.dumps(
            {
                "reason": "history does not reach back to the last event id; refetch state",
                "last_event_id": last_event_id,
                "resume_from": resume,
            }
        )
        return encode_frame(resume, "reset", body)

    def disconnect(self, sub: Subscriber, reason: Reason, flush: bool = False) -> None:
        """Remove a stream from every index and close it. Idempotent: the first reason wins."""
        if sub.closed:
            return
        sub.closed = True
        self.registry.remove(sub)
        sub.outbox.clear()
        self.metrics.disconnects.labels(reason.value).inc()
        log.debug("stream of %s ended: %s", sub.user, reason.value)
        sub.conn.close(flush)

    def _cut_slow(self, sub: Subscriber) -> None:
        log.info(
            "stream of %s cut: not draining (over %d bytes pending)",
            sub.user,
            self.config.max_pending,
        )
        self.disconnect(sub, Reason.SLOW)

    # -- the heartbeat tick ---------------------------------------------------------------

    def _schedule_heartbeat(self) -> None:
        self._heartbeat = asyncio.get_running_loop().call_later(self.config.heartbeat, self._tick)

    def _tick(self) -> None:
        """One tick for the whole process: ping quiet streams, end expired ones, forget old
        logouts."""
        now = time.time()
        push = self.flusher.push
        for sub in list(self.registry.all):
            if sub.exp <= now:
                self.flusher.write(sub)
                self.disconnect(sub, Reason.EXPIRED, flush=True)
            elif not sub.active:
                push(sub, PING)
            sub.active = False
        horizon = (now - self.config.revoke_ttl) * 1000
        for key in [k for k, at in self.revoked.items() if at < horizon]:
            del self.revoked[key]
        self._schedule_heartbeat()
