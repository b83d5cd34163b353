"""Who is connected: every open stream as a Subscriber, indexed by user and by topic."""

from __future__ import annotations

import enum
from typing import Protocol

from hub.dispatch import LOG
from hub.message import Event

__all__ = ["LOG_LEVELS", "Connection", "Reason", "Registry", "Subscriber"]

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class Reason(enum.Enum):
    """Why a stream ended; feeds logs and the disconnect metric's label."""

    GONE = "gone"  # the client closed the connection
    SLOW = "slow"  # its socket stopped draining and its pending bytes passed the bound
    LOGOUT = "logout"  # a logout event ended its session
    EXPIRED = "expired"  # its token's exp passed
    SHUTDOWN = "shutdown"  # the hub is stopping


class Connection(Protocol):
    """The transport under a stream, as the core needs it."""

    def write(self, data: bytes) -> int:
        """Send or queue `data`; return how many bytes are still waiting to reach the socket."""
        ...

    def close(self, flush: bool) -> None:
        """End the stream; with flush, after what is queued has been sent."""
        ...


class Subscriber:
    """One open stream. Thousands live at once, so: slots, no per-object task or timer."""

    __slots__ = (
        "active",
        "allowance",
        "backlog",
        "bcast_pos",
        "closed",
        "conn",
        "dirty",
        "exp",
        "min_level",
        "outbox",
        "queued",
        "services",
        "sid",
        "topics",
        "user",
    )

    def __init__(
        self,
        conn: Connection,
        user: str,
        sid: str | None = None,
        topics: tuple[str, ...] = (),
        exp: float = float("inf"),
        min_level: int = 0,
        services: frozenset[str] | None = None,
    ) -> None:
        self.conn = conn
        self.user = user
        self.sid = sid
        self.topics = topics
        self.exp = exp
        self.min_level = min_level
        self.services = services
        self.outbox: list[bytes] = []  # frames not yet written, shared bytes objects
        self.queued = 0  # bytes in outbox
        self.backlog = 0  # bytes the connection still held after the last write
        # Extra room over max_pending for a resume's replay: the replayed frames are the
        # history's own bytes objects, held by reference. It shrinks as the client drains.
        self.allowance = 0
        self.bcast_pos = 0  # index into the flusher's broadcast log: what it has taken
        self.dirty = False  # in the flusher's list of streams to write
        self.active = False  # written to since the last heartbeat tick
        self.closed = False

    def accepts(self, event: Event) -> bool:
        """Whether this stream's own filters let the event through (log level and service)."""
        if event.type != LOG or (self.min_level == 0 and self.services is None):
            return True
        data = event.data if isinstance(event.data, dict) else {}
        level = LOG_LEVELS.get(str(data.get("level", "info")).lower(), 0)
        if level < self.min_level:
            return False
        return self.services is None or data.get("service") in self.services

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
