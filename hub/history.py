"""Bounded history for Last-Event-ID resume.

Ids are "<ms>-<seq>" (the shape of Redis stream ids), with "-<epoch>" after them where the
broker has epochs (Redis: hub.redis_broker), and order as integer pairs. The history holds
every event of its epoch after `floor` and nothing before it. A resume is exact only when the
client's id names a position the history can prove: the floor itself, or an event it holds,
both of its epoch. Anything else (older than the floor, another epoch, between two held events,
newer than the newest, not an id at all) is told that it may have missed events (`reset`): an
id the history does not hold cannot be shown to belong to the order it serves (after Redis
lost or rolled back data, the same offsets name other events).

Events also get a local sequence number (`Event.seq`, contiguous) as they are appended: the
order of delivery in this process, by which the flusher merges a stream's channels and a
resume's replay reads the history in place.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from itertools import islice
from operator import attrgetter

from hub.message import UNDECODED, Event

__all__ = ["EVENT_OVERHEAD", "History", "format_id", "parse_id", "parse_position"]

EventKey = tuple[int, int]
_key = attrgetter("key")
# ASCII digits only (str.isdigit() also takes "²" and "①", which int() then refuses), and
# at most 20 of them each side: a client-supplied id costs nothing to refuse.
# An epoch is 1-16 lower-case letters and digits (hub.redis_broker makes them).
_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})(?:-([0-9a-z]{1,16}))?")
MAX_ID_LENGTH = 64
# What an event in the history costs in memory: its frame, its JSON body (an ASCII str, the
# frame's size less the id and name lines), and the Event object with its id, key and route
# (measured 390-980 bytes with a short user name; a restored logout holds its user three
# times). Its decoded `data` is not kept (History.append drops it; Event.data decodes it again
# for a filter): it can take 25 times the body, and counting it would scan every body and still
# over-count most (bench.history measured both ways). Counted into --history-bytes, so that the
# limit bounds what the history holds.
EVENT_OVERHEAD = 1024


def parse_position(event_id: str) -> tuple[EventKey, str] | None:
    """((ms, seq), epoch) from "<ms>-<seq>[-<epoch>]" (epoch "" when there is none), or None
    for anything else."""
    if len(event_id) > MAX_ID_LENGTH:
        return None
    match = _ID.fullmatch(event_id.strip(" \t"))
    if match is None:
        return None
    return (int(match[1]), int(match[2])), match[3] or ""


def parse_id(event_id: str) -> EventKey | None:
    """(ms, seq) from "<ms>-<seq>[-<epoch>]", or None for anything else."""
    position = parse_position(event_id)
    return None if position is None else position[0]


def format_id(key: EventKey, epoch: str) -> str:
    """The id of position `key` in `epoch` (the inverse of parse_position)."""
    return f"{key[0]}-{key[1]}-{epoch}" if epoch else f"{key[0]}-{key[1]}"


def event_cost(event: Event) -> int:
    """The bytes --history-bytes counts for an event (see EVENT_OVERHEAD)."""
    return 2 * len(event.frame) + EVENT_OVERHEAD


class History:
    """The last `limit` events, and at most `limit_bytes` of them (see event_cost)."""

    def __init__(self, limit: int, limit_bytes: int, floor: EventKey, epoch: str = "") -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.floor = floor
        self.epoch = epoch
        self.past_epochs: deque[str] = deque(maxlen=16)  # the epochs it left, newest last
        self.events: deque[Event] = deque()
        self.end_seq = 0  # seq of the next event appended
        self.size = 0

    def append(self, event: Event) -> None:
        event.seq = self.end_seq
        self.end_seq += 1
        # The history holds frames and bodies, not the decoded data (see EVENT_OVERHEAD):
        # Event.data decodes it again if a filter asks. A plain store: a hot path.
        event._data = UNDECODED
        events = self.events
        events.append(event)
        self.size += 2 * len(event.frame) + EVENT_OVERHEAD  # event_cost, inline: a hot path
        while len(events) > self.limit or self.size > self.limit_bytes:
            old = events.popleft()
            self.floor = old.key
            self.size -= 2 * len(old.frame) + EVENT_OVERHEAD

    def clear(self, floor: EventKey, epoch: str) -> None:
        """Forget every event: what comes next follows `floor` of `epoch` (seqs go on, never
        reused)."""
        self.events.clear()
        self.size = 0
        self.floor = floor
        if epoch != self.epoch:
            self.past_epochs.append(self.epoch)
        self.epoch = epoch

    def reserve_seq(self) -> int:
        """A seq for something delivered in order but not kept (a `reset`): only with no
        event held, whose seqs must stay contiguous."""
        assert not self.events, "a seq is reserved only in an empty history"
        seq = self.end_seq
        self.end_seq += 1
        return seq

    @property
    def first_seq(self) -> int:
        """The seq of the oldest event held (end_seq when none is)."""
        return self.end_seq - len(self.events)

    def read(self, seq: int) -> Iterator[Event]:
        """The held events from seq on, oldest first (first_seq <= seq <= end_seq)."""
        return islice(self.events, seq - self.first_seq, None)

    def resume_seq(self, last_id: str) -> int | None:
        """The seq of the first event after `last_id`; None if the history cannot prove where
        `last_id` stands (see the module's docstring)."""
        position = parse_position(last_id)
        if position is None or position[1] != self.epoch:
            return None
        key = position[0]
        if key == self.floor:
            return self.first_seq
        events = self.events
        i = bisect_left(events, key, key=_key)
        if i == len(events) or events[i].key != key:
            return None
        return self.first_seq + i + 1

    def since(self, last_id: str) -> list[Event] | None:
        """The events after `last_id`, oldest first; None if the history cannot say."""
        seq = self.resume_seq(last_id)
        return None if seq is None else list(self.read(seq))

    @property
    def last_id(self) -> str:
        """The newest id held (or the floor): where a client told to reset resumes from."""
        return format_id(self.events[-1].key if self.events else self.floor, self.epoch)

    def __len__(self) -> int:
        return len(self.events)
