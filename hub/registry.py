"""Who is connected: every open stream as a Subscriber, indexed by user and by topic."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from hub.dispatch import EventFilter
from hub.message import Event

if TYPE_CHECKING:
    from hub.flusher import Outbox

__all__ = ["Registry", "Subscriber"]

log = logging.getLogger("hub")


class Subscriber:
    """One open stream: who it is and what it may see. Its write state is the flusher's
    (`outbox`). Thousands live at once, so: slots, no per-object task or timer."""

    __slots__ = ("closed", "exp", "filters", "outbox", "sid", "topics", "user")

    def __init__(
        self,
        user: str,
        sid: str | None = None,
        topics: tuple[str, ...] = (),
        exp: float = float("inf"),
        filters: dict[int, EventFilter] | None = None,
    ) -> None:
        self.user = user
        self.sid = sid
        self.topics = topics
        self.exp = exp
        self.filters = filters or None  # type number -> predicate, from the stream's query
        self.outbox: Outbox | None = None
        self.closed = False

    def accepts(self, event: Event) -> bool:
        """Whether this stream's own filters let the event through. A filter that raises
        drops the event for this stream only: it must never stop a flush pass for everyone
        (a log event with an object as its service once did)."""
        filters = self.filters
        if filters is None:
            return True
        accepts = filters.get(event.type)
        if accepts is None:
            return True
        try:
            return bool(accepts(event))
        except Exception:
            _filter_failed(event)
            return False

    def entitled(self, event: Event) -> bool:
        """Whether the event's route reaches this stream: used for replay, where no index
        lookup did the choosing."""
        route = event.route
        if route is None:
            return False
        if not (
            route.everyone
            or self.user in route.users
            or any(topic in self.topics for topic in route.topics)
        ):
            return False
        return self.accepts(event)

    def __repr__(self) -> str:
        return f"Subscriber(user={self.user!r}, sid={self.sid!r}, topics={self.topics!r})"


_last_filter_error = float("-inf")


def _filter_failed(event: Event) -> None:
    """Log a failing filter at most once a minute: one bad event meets every filtered stream."""
    global _last_filter_error
    now = time.monotonic()
    if now - _last_filter_error >= 60.0:
        _last_filter_error = now
        log.exception(
            "filter for %s events failed; the event is dropped for that stream", event.name
        )


class Registry:
    """Indexes of the open streams. An entry exists only while a stream is open: a user or
    topic whose last stream leaves is dropped from its index at once."""

    def __init__(self) -> None:
        self.all: set[Subscriber] = set()
        self.by_user: dict[str, set[Subscriber]] = {}
        self.by_topic: dict[str, set[Subscriber]] = {}

    def add(self, sub: Subscriber) -> None:
        self.all.add(sub)
        self.by_user.setdefault(sub.user, set()).add(sub)
        for topic in sub.topics:
            self.by_topic.setdefault(topic, set()).add(sub)

    def remove(self, sub: Subscriber) -> bool:
        """Drop the stream from every index; False if it was not there."""
        if sub not in self.all:
            return False
        self.all.discard(sub)
        _discard(self.by_user, sub.user, sub)
        for topic in sub.topics:
            _discard(self.by_topic, topic, sub)
        return True

    def sessions(self, user: str, sid: str | None) -> list[Subscriber]:
        """The user's streams, or only those of one login session."""
        subs = self.by_user.get(user, ())
        return [s for s in subs if sid is None or s.sid == sid]

    def __len__(self) -> int:
        return len(self.all)


def _discard(index: dict[str, set[Subscriber]], key: str, sub: Subscriber) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[key]
