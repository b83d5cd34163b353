"""Bounded history for Last-Event-ID resume.

Ids are "<ms>-<seq>" (the shape of Redis stream ids) and compare as integer pairs. The
history holds every event after `floor` and nothing before it: a client whose last id is at
or after the floor can be replayed exactly; one whose id is older, from another run of the
hub, or not an id at all, is told that it missed events instead.

Events also get a local sequence number (`Event.seq`, contiguous) as they are appended: the
order of delivery in this process, by which the flusher merges a stream's channels and a
resume's replay reads the history in place.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator
from itertools import islice
from operator import attrgetter

from hub.message import Event

__all__ = ["EVENT_OVERHEAD", "History", "parse_id"]

EventKey = tuple[int, int]
_key = attrgetter("key")
# ASCII digits only (str.isdigit() also takes "²" and "①", which int() then refuses), and
# at most 20 of them each side: a client-supplied id costs nothing to refuse.
_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
MAX_ID_LENGTH = 48
# What an event costs in memory: its frame, its JSON body (about the frame's size again), the
# decoded `data` (about as much again, often more), and the Event object with its id and route.
# Counted into --history-bytes so that the limit bounds what the history really holds, not only
# its frames (measured: ~3x the frame, plus ~400 bytes).
EVENT_OVERHEAD = 400


def parse_id(event_id: str) -> EventKey | None:
    """(ms, seq) from "<ms>-<seq>", or None for anything else."""
    if len(event_id) > MAX_ID_LENGTH:
        return None
    match = _ID.fullmatch(event_id.strip(" \t"))
    if match is None:
        return None
    return int(match[1]), int(match[2])


def event_cost(event: Event) -> int:
    """The bytes --history-bytes counts for an event (see EVENT_OVERHEAD)."""
    return 3 * len(event.frame) + EVENT_OVERHEAD


class History:
    """The last `limit` events, and at most `limit_bytes` of them (see event_cost)."""

    def __init__(self, limit: int, limit_bytes: int, floor: EventKey) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.floor = floor
        self.events: deque[Event] = deque()
        self.end_seq = 0  # seq of the next event appended
        self.size = 0

    def append(self, event: Event) -> None:
        event.seq = self.end_seq
        self.end_seq += 1
        events = self.events
        events.append(event)
        self.size += 3 * len(event.frame) + EVENT_OVERHEAD  # event_cost, inline: a hot path
        while len(events) > self.limit or self.size > self.limit_bytes:
            old = events.popleft()
            self.floor = old.key
            self.size -= 3 * len(old.frame) + EVENT_OVERHEAD

    def clear(self, floor: EventKey) -> None:
        """Forget every event: what comes next follows `floor` (seqs go on, never reused)."""
        self.events.clear()
        self.size = 0
        self.floor = floor

    @property
    def first_seq(self) -> int:
        """The seq of the oldest event held (end_seq when none is)."""
        return self.end_seq - len(self.events)

    def read(self, seq: int) -> Iterator[Event]:
        """The held events from seq on, oldest first (first_seq <= seq <= end_seq)."""
        return islice(self.events, seq - self.first_seq, None)

    def resume_seq(self, last_id: str) -> int | None:
        """The seq of the first event after `last_id`; None if the history cannot say."""
        key = parse_id(last_id)
        events = self.events
        if key is None or key < self.floor:
            return None
        if events and key > events[-1].key:
            return None  # from the future: another hub's, or another run's
        if not events and key != self.floor:
            return None
        return self.first_seq + bisect_right(events, key, key=_key)

    def since(self, last_id: str) -> list[Event] | None:
        """The events after `last_id`, oldest first; None if the history cannot say."""
        seq = self.resume_seq(last_id)
        return None if seq is None else list(self.read(seq))

    @property
    def last_id(self) -> str:
        """The newest id held (or the floor): where a client told to reset resumes from."""
        ms, seq = self.events[-1].key if self.events else self.floor
        return f"{ms}-{seq}"

    def __len__(self) -> int:
        return len(self.events)
