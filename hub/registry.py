"""Who is connected: every open stream (hub.stream.Stream), indexed by user and by topic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hub.stream import Stream

__all__ = ["SHRINK_FLOOR", "Registry", "shrink"]

# A table whose peak was at most this many entries is not rebuilt before it empties.
SHRINK_FLOOR = 1024


class Registry:
    """Indexes of the open streams. An entry exists only while a stream is open: a user or
    topic whose last stream leaves is dropped from its index at once."""

    def __init__(self) -> None:
        self.all: set[Stream] = set()
        self.by_user: dict[str, set[Stream]] = {}
        self.by_topic: dict[str, set[Stream]] = {}
        self._user_peak = self._topic_peak = 0  # the indexes' peak sizes (shrink)
        # Told of every stream added (True) and removed (False), after the indexes changed:
        # presence (hub.presence) and join/leave events (hub.joins) follow the registry so.
        self.watchers: list[Callable[[Stream, bool], None]] = []

    def add(self, stream: Stream) -> None:
        self.all.add(stream)
        self.by_user.setdefault(stream.user, set()).add(stream)
        for topic in stream.topics:
            self.by_topic.setdefault(topic, set()).add(stream)
        for watcher in self.watchers:
            watcher(stream, True)

    def remove(self, stream: Stream) -> bool:
        """Drop the stream from every index; False if it was not there."""
        if stream not in self.all:
            return False
        self.all.discard(stream)
        by_user = self.by_user
        size = len(by_user)
        _discard(by_user, stream.user, stream)
        if len(by_user) < size:
            self._user_peak = shrink(by_user, max(self._user_peak, size))
        if stream.topics:
            by_topic = self.by_topic
            size = len(by_topic)
            for topic in stream.topics:
                _discard(by_topic, topic, stream)
            if len(by_topic) < size:
                self._topic_peak = shrink(by_topic, max(self._topic_peak, size))
        for watcher in self.watchers:
            watcher(stream, False)
        return True

    def sessions(self, user: str, sid: str | None) -> list[Stream]:
        """The user's streams, or only those of one login session."""
        streams = self.by_user.get(user, ())
        return [s for s in streams if sid is None or s.sid == sid]

    def __len__(self) -> int:
        return len(self.all)


def _discard(index: dict[str, set[Stream]], key: str, stream: Stream) -> None:
    streams = index.get(key)
    if streams is not None:
        streams.discard(stream)
        if not streams:
            del index[key]


def shrink(index: dict[str, Any], peak: int) -> int:
    """Give an index that lost entries its memory back once it holds less than a quarter of
    its `peak` (its largest size, taken before removals): a dict never shrinks on deletion,
    so a table that once held 5,000 topics would keep their room however few remain. The
    table is rebuilt in place (the same dict: a reference held elsewhere stays right); an
    empty one is emptied outright, a smaller one rebuilt only past a peak of SHRINK_FLOOR.
    Returns the peak to keep. A rebuild copies fewer entries than were removed since the
    peak: amortized O(1) a removal."""
    size = len(index)
    if size >= peak >> 2:
        return peak
    if size == 0:
        index.clear()
    elif peak > SHRINK_FLOOR:
        kept = dict(index)
        index.clear()
        index.update(kept)
    else:
        return peak
    return size
