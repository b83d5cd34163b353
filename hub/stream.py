"""One open stream as one object (`Stream`): who it is and what it may see, its write state,
and the one way it ends (`Stream.end`); the shared logs streams read (`Channel`); and what a
client asks to open one with (`StreamRequest`).

A module of its own because the registry indexes streams and the flusher writes them, and
both need their shape, while a stream needs neither: what it asks of the write loop is the
`Writer` Protocol, which hub.flusher.Flusher satisfies, bound once per stream when it opens.
A channel lives here too: its readers are streams and a stream's positions are in channels.
Both are shapes here; the flusher is the code that reads and moves them (a pass then goes
from the flusher to the transport and back, and nowhere else).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from hub.auth import Claims
from hub.disconnect import Disconnect
from hub.dispatch import EventFilter
from hub.message import Event
from hub.transport import SocketTransport

__all__ = ["Channel", "Stream", "StreamRequest", "Writer"]

log = logging.getLogger("hub")


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A stream the client asks for, authorized: the core admits it or refuses it
    (Hub.open_stream). `prefix` goes out before the stream's first bytes, in the same write
    (the HTTP response head)."""

    claims: Claims
    topics: tuple[str, ...] = ()
    filters: dict[int, EventFilter] | None = None
    last_event_id: str | None = None
    prefix: bytes = b""
    by_ticket: bool = False  # the claims came from a one-time ticket (hub.tickets)


class Writer(Protocol):
    """What a stream asks of the write loop it belongs to (hub.flusher.Flusher)."""

    def mark(self, stream: Stream) -> None:
        """The stream may have something to write: visit it."""

    def end(self, stream: Stream, why: Disconnect, retry_ms: int | None) -> None:
        """End the stream (Stream.end calls it once)."""


class Stream:
    """One open stream: its identity (user, login session, topics, token expiry, filters) and
    its write state: its transport, where it is in the everyone channel and its topics'
    channels, the private events it has not taken, a resume's replay still to read. The
    flusher reads and moves the write state; `transport` and `writer` are bound when it opens
    the stream (Flusher.open). Thousands live at once: slots, and no task, timer or closure
    per stream (one object, where a subscriber and an outbox that pointed at each other were
    two)."""

    __slots__ = (
        "channels",
        "closed",
        "dirty",
        "exp",
        "filters",
        "final",
        "plain",
        "pos",
        "private",
        "private_size",
        "progress_at",
        "replay",
        "replay_end",
        "sent_seen",
        "sid",
        "since",
        "topic_pos",
        "topics",
        "transport",
        "user",
        "writer",
        "written_at",
    )

    transport: SocketTransport
    writer: Writer

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
        self.since = time.time()  # when it opened (epoch s): presence says since when
        self.filters = filters or None  # type number -> predicate, from the stream's query
        # Ended: out of the registry and of every channel; end() does nothing more.
        self.closed = False
        # While it ends: its end frame, written once it has taken what it was owed.
        self.final: bytes | None = None
        # no topics, no filters: its writes take the fast paths
        self.plain = not topics and self.filters is None
        self.pos = 0  # position in the everyone channel
        self.channels: list[Channel] | None = None  # its topics' channels, if any
        self.topic_pos: list[int] | None = None  # and its position in each
        self.private: list[Event] | None = None  # events for its user, not taken yet
        self.private_size = 0  # their frames' bytes
        self.replay: int | None = None  # next history seq to replay, while replaying
        self.replay_end = 0  # the first seq that comes live instead
        self.dirty = False  # in the flusher's lists of streams to write
        self.written_at = 0.0  # loop time of the last write (heartbeats go to quiet streams)
        self.progress_at = 0.0  # loop time the socket was last seen taking bytes
        self.sent_seen = 0

    def end(self, why: Disconnect, retry_ms: int | None = None) -> None:
        """End the stream, the one way: the flusher writes what it is owed (a window at a
        time), then the `end` frame (after a `retry:` where `retry_ms` is given), then the
        transport closes once it has sent them, or after the flusher's grace. A slow stream
        is owed nothing more: its frame is written only if its socket holds nothing. The
        client leaving (GONE) is an end too: nothing is written. Ending twice does
        nothing."""
        if not self.closed:
            self.closed = True
            self.writer.end(self, why, retry_ms)

    def drained(self) -> None:
        """Its socket sent all it held (the transport says): it may be written again."""
        self.writer.mark(self)

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
        return f"Stream(user={self.user!r}, sid={self.sid!r}, topics={self.topics!r})"


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


class Channel:
    """The events of one audience (everyone, or a topic), in delivery order, at absolute
    positions base .. end - 1, kept until every reader has taken them (or the slowest is cut).
    `tail` is the flusher's last answer for a reader's position (hub.flusher.tail): most
    readers ask for the same one in a pass."""

    __slots__ = ("base", "dirty", "end", "events", "name", "readers", "size", "tail", "tail_key")

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[Event] = []
        self.base = 0
        self.end = 0
        self.size = 0  # frame bytes held
        # reader -> the index of this channel in the reader's channel lists (-1: everyone)
        self.readers: dict[Stream, int] = {}
        self.dirty = False  # in the flusher's list of channels with unread events
        self.tail_key = (-1, -1)  # (position, end) the kept tail was asked for
        self.tail: tuple[bytes, int, int] = (b"", 0, 0)
