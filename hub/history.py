"""Bounded history for Last-Event-ID resume.

Ids are "<ms>-<seq>" (the shape of Redis stream ids) and compare as integer pairs. The
history holds every event after `floor` and nothing before it: a client whose last id is at
or after the floor can be replayed exactly; one whose id is older, from another run of the
hub, or not an id at all, is told that it missed events instead.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from itertools import islice
from operator import attrgetter

from hub.message import Event

__all__ = ["History", "parse_id"]

EventKey = tuple[int, int]
_key = attrgetter("key")


def parse_id(event_id: str) -> EventKey | None:
    ms, sep, seq = event_id.strip().partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(event_id) > 48:
        return None
    return int(ms), int(seq)


class History:
    """The last `limit` events, and at most `limit_bytes` of frames, whichever is less."""

    def __init__(self, limit: int, limit_bytes: int, floor: EventKey) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.floor = floor
        self.events: deque[Event] = deque()
        self.size = 0

    def append(self, event: Event) -> None:
        events = self.events
        events.append(event)
        self.size += len(event.frame)
        while len(events) > self.limit or self.size > self.limit_bytes:
            old = events.popleft()
            self.floor = old.key
            self.size -= len(old.frame)

    def since(self, last_id: str) -> list[Event] | None:
        """The events after `last_id`, oldest first; None if the history cannot say."""
        key = parse_id(last_id)
        events = self.events
        if key is None or key < self.floor:
            return None
        if events and key > events[-1].key:
            return None  # from the future: another hub's, or another run's
        if not events and key != self.floor:
            return None
        start = bisect_right(events, key, key=_key)
        return list(islice(events, start, None))

    @property
    def last_id(self) -> str:
        """The newest id held (or the floor): where a client told to reset resumes from."""
        ms, seq = self.events[-1].key if self.events else self.floor
        return f"{ms}-{seq}"

    def __len__(self) -> int:
        return len(self.events)
