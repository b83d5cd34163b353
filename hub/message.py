"""Events: what a publisher sends, what a stream receives, and the bytes in between.

An event is validated and routed once, when it is published; its SSE frame is encoded once,
when it gets its id, and the same bytes object then goes to every recipient.
"""

from __future__ import annotations

import re
import struct
import time
from collections import deque
from typing import Any, NamedTuple

import ujson

__all__ = [
    "DECODED_BYTES",
    "FRAME_HEADER",
    "UNDECODED",
    "Event",
    "ParseError",
    "Rejected",
    "Route",
    "TooLarge",
    "encode_frame",
]

# The binary publish frame: uint32 event_type | uint64 ts (ms) | uint32 payload_len | payload.
FRAME_HEADER = struct.Struct(">IQI")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FIELD_UNSAFE = re.compile(r"[\r\n\x00]")


class Route(NamedTuple):
    """Who receives an event (a route function of hub.dispatch says, at publish time): the
    streams of these users, the subscribers of these topics, or everyone. `ends` names the
    streams that end once they have the event: (user, session), where session None means all
    of the user's streams."""

    users: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    everyone: bool = False
    ends: tuple[str, str | None] | None = None


class ParseError(Exception):
    """The body is not well-formed. `offset` is the byte where reading failed."""

    def __init__(self, message: str, offset: int, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.index = index


class Rejected(Exception):
    """The body is well-formed but an event in it is not acceptable."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


class TooLarge(Exception):
    """A publish over a size limit: more events than a batch may have (`what` is
    "batch"), or an event whose body is over the bytes an event may have ("event_bytes").
    `index` is the first event past the limit."""

    def __init__(self, message: str, what: str, limit: int, index: int) -> None:
        super().__init__(message)
        self.message = message
        self.what = what
        self.limit = limit
        self.index = index


def encode_frame(event_id: str | None, event: str | None, data: str) -> bytes:
    """One SSE frame. Nothing in `data` can end a field early or start a second event:
    every line break in it becomes a new `data:` line, and CR, LF and NUL are dropped from
    the single-line `id:` and `event:` fields."""
    parts = []
    if event_id is not None:
        parts.append("id: " + _FIELD_UNSAFE.sub("", event_id))
    if event is not None:
        parts.append("event: " + _FIELD_UNSAFE.sub("", event))
    if "\n" in data or "\r" in data:
        parts.extend("data: " + line for line in _LINE_BREAK.split(data))
    else:
        parts.append("data: " + data)
    parts.append("\n")
    return "\n".join(parts).encode()


# An Event's `_data` while it is not decoded: another node's event (Event.restore), or one in
# the history (History.append drops the decoded data; Event.data decodes it again if asked).
UNDECODED = object()
# Bytes of bodies whose `data` is kept decoded after a reader asked for it (Event.data): the
# filtered streams of a flush pass read the same few events, and decode each once.
DECODED_BYTES = 1024 * 1024


class _Decoded:
    """The events whose `data` was decoded from their body on demand, oldest first: past
    `limit` bytes of their bodies, the oldest forget it again (a later read decodes it
    anew). This bounds what reading the history brings back into memory: it holds events
    without their decoded data (hub.history), which can take 25 times their body's size."""

    __slots__ = ("events", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.events: deque[Event] = deque()
        self.limit = limit
        self.size = 0

    def keep(self, event: Event, data: Any) -> None:
        event._data = data
        self.events.append(event)
        self.size += len(event.body)
        while self.size > self.limit:
            old = self.events.popleft()
            old._data = UNDECODED
            self.size -= len(old.body)


_decoded = _Decoded(DECODED_BYTES)


class Event:
    """One published event. `body` is the JSON a stream's `data:` line carries; `frame` is
    the whole SSE frame, set once the broker has given the event its id. The decoded `data`
    is kept until the event enters the history (History.append drops it); after that it is
    decoded from `body` when a filter asks, and kept for the next readers within
    DECODED_BYTES."""

    __slots__ = (
        "_data",
        "accepted",
        "body",
        "frame",
        "id",
        "key",
        "name",
        "route",
        "seq",
        "topics",
        "ts",
        "type",
        "user",
    )

    def __init__(
        self,
        type: int,
        name: str,
        user: str | None,
        data: Any,
        ts: int | None = None,
        topics: tuple[str, ...] = (),
    ) -> None:
        self.type = type
        self.name = name
        self.user = user
        self._data = data
        self.ts = ts or int(time.time() * 1000)
        # The topics its publisher named (hub.topics names), for its route function; a
        # stream on several topics reads them in the body.
        self.topics = topics
        fields = {"type": type, "name": name, "user": user, "ts": self.ts}
        if topics:
            fields["topics"] = topics
        fields["data"] = data
        # allow_nan=False raises OverflowError for NaN/Infinity: not JSON to any browser.
        self.body = ujson.dumps(fields, escape_forward_slashes=False, allow_nan=False)
        self.id = ""
        self.key = (0, 0)  # the id as (ms, seq), for ordering in the history
        self.frame = b""
        self.route: Route | None = None
        self.seq = -1  # order of delivery in this process (set by the history)
        self.accepted = 0.0  # when the publish was accepted (epoch s), for the latency metric

    @classmethod
    def restore(
        cls, type: int, name: str, user: str | None, ts: int, body: str, accepted: float = 0.0
    ) -> Event:
        """An event another node published, from what the broker carried: its body is
        already encoded, and its `data` is decoded from it only if a filter asks (Event.data)."""
        event = cls.__new__(cls)
        event.type = type
        event.name = name
        event.user = user
        event.ts = ts
        event.body = body
        event.topics = ()  # (routed already: the broker carries the route)
        event._data = UNDECODED
        event.id = ""
        event.key = (0, 0)
        event.frame = b""
        event.route = None
        event.seq = -1
        event.accepted = accepted
        return event

    @property
    def data(self) -> Any:
        data = self._data
        if data is UNDECODED:
            data = ujson.loads(self.body)["data"]
            _decoded.keep(self, data)
        return data

    def assign_id(self, ms: int, seq: int, epoch: str = "") -> None:
        """Set the id `<ms>-<seq>` (`<ms>-<seq>-<epoch>` with an epoch) and encode the frame.
        Neither the id (digits, and an epoch of letters and digits) nor the name (from the
        dispatch table) can hold a line break, and the body is ujson output, which escapes
        every control character: the frame is safe without encode_frame's checks."""
        self.id = event_id = f"{ms}-{seq}-{epoch}" if epoch else f"{ms}-{seq}"
        self.key = (ms, seq)
        self.frame = f"id: {event_id}\nevent: {self.name}\ndata: {self.body}\n\n".encode()

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, name={self.name!r}, user={self.user!r})"
