"""Who is connected: every open stream (hub.stream.Stream), indexed by user and by topic."""

from __future__ import annotations

from collections.abc import Callable

from hub.stream import Stream

__all__ = ["Registry"]


class Registry:
    """Indexes of the open streams. An entry exists only while a stream is open: a user or
    topic whose last stream leaves is dropped from its index at once."""

    def __init__(self) -> None:
        self.all: set[Stream] = set()
        self.by_user: dict[str, set[Stream]] = {}
        self.by_topic: dict[str, set[Stream]] = {}
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
        _discard(self.by_user, stream.user, stream)
        for topic in stream.topics:
            _discard(self.by_topic, topic, stream)
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
