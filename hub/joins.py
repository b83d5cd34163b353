"""Join and leave events (--join-leave, off by default): when a user's first stream on a
followed topic opens, a `join`; when the user's last one there ends, a `leave` (Centrifugo's
join/leave), so that a dashboard can keep its own list of who is online.

They go to a topic of their own, `presence:<topic>` (hub.dispatch.membership_topic), not to the
topic's subscribers: a stream receives them only if it asks (`?topic=presence:room:1`) and its
token grants that topic. A member of `room:1` does not learn who else is there unless a grant
says so, and a storm of members is not a storm of membership writes to every member: pushed to
every subscriber of the topic, each join would reach every stream already there: N^2/2
deliveries and bytes for N members (README, Join and leave events).

`JoinLeave` watches the registry (Registry.watchers: told after each stream is added or
removed). Only the topics --join-leave grants (hub.topics: names, `name*` patterns, `*` for
all) are followed, never a `presence:` topic itself, nor a topic whose membership topic would be
longer than a topic name may be; with the setting off no watcher exists and a connect costs
nothing more.

Changes are batched: collected per topic and published at most every INTERVAL seconds (one
timer, armed by the first change), as one `join` event per topic, `{"topic": t, "users":
[...]}` (and one `leave` likewise; MAX_EVENT_USERS users an event at most), with no `user`. A
join and a leave of the same user on the same topic within one batch cancel out: a reconnect
shows as nothing. They are published as any event is (Hub.publish): ids, the history, resume
with Last-Event-ID, the broker to every node. One batch is in flight at a time, so that their
order holds; changes wait meanwhile, MAX_PENDING at most (past it, while a broker is down say,
they are dropped and counted). A failed publish is logged and counted, never raised into a
connect or a disconnect.

Per node: each node reports its own streams (a user with streams on two nodes joins from
each), and a node that dies sends no leaves. A dashboard counts (online while it has seen
more joins than leaves for the user) and refetches on `reset`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from hub.broker import BrokerUnavailable
from hub.dispatch import MEMBERSHIP_PREFIX, TypeTable, membership_topic
from hub.message import Event, Route
from hub.registry import Registry
from hub.stream import Stream
from hub.topics import MAX_TOPIC_LENGTH, Grants

__all__ = ["INTERVAL", "MAX_EVENT_USERS", "MAX_PENDING", "OUTCOMES", "JoinLeave", "followed"]

log = logging.getLogger("hub")

INTERVAL = 0.1  # seconds between two batches, at least
MAX_PENDING = 10_000  # changes (a user on a topic) waiting for a batch, at most
MAX_EVENT_USERS = 1_000  # users in one event: more go out as several events
MAX_PUBLISH_EVENTS = 1_000  # events in one publish: more go out as several, one after another
WARN_EVERY = 10.0  # seconds between two warnings of dropped or failed changes
# What becomes of a change (hub_membership_events_total's label): published in a join or a
# leave event; dropped past MAX_PENDING; failed: lost with a publish that failed.
OUTCOMES = ("join", "leave", "dropped", "failed")

Publish = Callable[[Sequence[Event]], Awaitable[object]]
Count = Callable[[str, int], None]


def followed(topic: str) -> bool:
    """Whether a topic that --join-leave grants has membership events: not a membership
    topic itself, and one whose membership topic is a topic name."""
    if topic.startswith(MEMBERSHIP_PREFIX):
        return False
    return len(topic) <= MAX_TOPIC_LENGTH - len(MEMBERSHIP_PREFIX)


class JoinLeave:
    """The join and leave events of the topics `grants` names, for the streams of `registry`,
    published through `publish` (Hub.publish); `count(outcome, n)` is told what became of
    the changes (OUTCOMES). `watch` is the registry's watcher."""

    def __init__(
        self,
        registry: Registry,
        grants: Grants,
        types: TypeTable,
        publish: Publish,
        count: Count,
        interval: float = INTERVAL,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.registry = registry
        self.grants = grants
        self.join_type = types.lookup("join").number
        self.leave_type = types.lookup("leave").number
        self.publish = publish
        self.count = count
        self.interval = interval
        self.max_pending = max_pending
        # topic -> users (dicts as ordered sets) since the last batch; a user is in one of
        # the two for a topic, never both (they cancel out)
        self.joins: dict[str, dict[str, None]] = {}
        self.leaves: dict[str, dict[str, None]] = {}
        self.pending = 0
        self.dropped = 0  # since the last batch
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._sending: asyncio.Task[None] | None = None
        self._warned = float("-inf")

    def watch(self, stream: Stream, added: bool) -> None:
        """A stream was added to the registry or removed from it (its indexes changed
        already): a join where it is the user's first on a followed topic, a leave where
        it was the last."""
        if self.closed:
            return
        grants = self.grants
        user = stream.user
        for topic in stream.topics:  # each once (hub.query.parse_topics)
            if topic not in grants or not followed(topic):
                continue
            # the user's streams, this one among them when it is added (few: a user's tabs)
            others = self.registry.by_user.get(user, ())
            if len(others) > added and any(s is not stream and topic in s.topics for s in others):
                continue
            self._note(topic, user, added)

    def _note(self, topic: str, user: str, joined: bool) -> None:
        same, opposite = (self.joins, self.leaves) if joined else (self.leaves, self.joins)
        undone = opposite.get(topic)
        if undone is not None and user in undone:
            del undone[user]  # a leave and a join in one batch: nothing changed
            if not undone:
                del opposite[topic]
            self.pending -= 1
            return
        if self.pending >= self.max_pending:
            self.dropped += 1
            return
        users = same.get(topic)
        if users is None:
            users = same[topic] = {}
        users[user] = None
        self.pending += 1
        if self._timer is None and self._sending is None:
            self._arm()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._flush)

    def _flush(self) -> None:
        """The batch: its events published in a task of its own (one at a time)."""
        self._timer = None
        if self.closed:
            return
        if self.dropped:
            self.count("dropped", self.dropped)
            self._warn(f"{self.dropped} join/leave changes dropped: {self.max_pending} waited")
            self.dropped = 0
        joined = sum(len(users) for users in self.joins.values())
        left = self.pending - joined
        events = self._events(self.joins, self.join_type, "join")
        events += self._events(self.leaves, self.leave_type, "leave")
        self.joins, self.leaves, self.pending = {}, {}, 0
        if events:
            self._sending = asyncio.get_running_loop().create_task(self._send(events, joined, left))

    def _events(self, changes: dict[str, dict[str, None]], number: int, name: str) -> list[Event]:
        events = []
        for topic, users in changes.items():
            listed = list(users)
            route = Route(topics=(membership_topic(topic),))
            for at in range(0, len(listed), MAX_EVENT_USERS):
                event = Event(
                    number,
                    name,
                    None,
                    {"topic": topic, "users": listed[at : at + MAX_EVENT_USERS]},
                )
                event.route = route
                events.append(event)
        return events

    async def _send(self, events: list[Event], joined: int, left: int) -> None:
        try:
            for at in range(0, len(events), MAX_PUBLISH_EVENTS):
                await self.publish(events[at : at + MAX_PUBLISH_EVENTS])
        except BrokerUnavailable as exc:
            self.count("failed", joined + left)
            self._warn(f"join/leave events not published ({joined + left} changes): {exc}")
        except Exception:
            self.count("failed", joined + left)
            log.exception("join/leave events not published (%d changes)", joined + left)
        else:
            self.count("join", joined)
            self.count("leave", left)
        finally:
            self._sending = None
            if self.pending and not self.closed:
                self._arm()

    def _warn(self, message: str) -> None:
        """A WARNING at most every WARN_EVERY seconds (a broker that is down would otherwise
        log every batch); DEBUG in between."""
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("%s", message)
        else:
            log.debug("%s", message)

    def close(self) -> None:
        """No more batches (the hub stops: its streams' ends are no leaves to publish); a
        batch in flight finishes (Hub.stop waits for the publishes in flight)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
