"""Publish bodies -> validated, routed events: one JSON object, a JSON array, NDJSON, or
concatenated binary frames. A body is taken whole or not at all: the first bad event
rejects the batch, so nothing partial is ever delivered. The JSON in every format is
read by `loads` (RFC 8259 JSON, its errors naming the byte in the body).

Limits (--max-batch, --max-event-bytes) are `max_events` and `max_event_bytes` (0 = none),
refused with TooLarge. NDJSON and binary frames count events as they read them and
stop at the first one past `max_events`, before building it; a JSON array is parsed whole by
ujson first (a body is at most --max-body, so that costs at most one parse of it) and
counted before any of its events is built. An event's size is that of its encoded body
(`Event.body`, the JSON a stream's `data:` line carries), known once it is built."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, NoReturn, Protocol

import ujson

from hub.dispatch import DEFAULT_TYPES, TypeTable
from hub.message import FRAME_HEADER, Event, ParseError, Rejected, TooLarge
from hub.topics import MAX_EVENT_TOPICS, MAX_TOPIC_LENGTH, topic_error

__all__ = [
    "MAX_TS",
    "MAX_USER_LENGTH",
    "Decoder",
    "build_event",
    "decode_frames",
    "decode_json",
    "decode_ndjson",
    "loads",
]

MAX_USER_LENGTH = 256
# The largest integer a browser's JSON.parse reads exactly (Number.MAX_SAFE_INTEGER): ms
# since the epoch up to the year 287,396, and no `ts` a page would read as another number.
MAX_TS = 2**53 - 1
_TS_RANGE = f"ts must be a non-negative integer (ms since the epoch) of at most {MAX_TS}"
_SHOWN_FIELDS = 5  # an error names at most this many unknown fields, each cut to 32 chars
_FIELDS = frozenset(("type", "user", "data", "ts", "topics", "topic"))
# a binary frame's header has type and ts
_PAYLOAD_FIELDS = frozenset(("user", "data", "topics", "topic"))


# Control characters JSON never allows raw, inside strings or out (TAB, LF, CR are allowed
# between tokens, and checked inside strings by the strict parser below).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20)])
# Numbers ujson reads that JSON does not have: a bare minus (read as 0!), a leading zero (01),
# a point with no digit after it (1., 1.e5). Each pattern starts with one literal byte, which
# the regex engine scans for at memory speed (a character class first is ten times slower);
# a hit inside a string is a false alarm that the strict parser then clears. Bodies with a raw
# TAB, LF or CR go to the strict parser anyway, so only a space can sit before a number here.
_BAD_NUMBERS = (
    re.compile(rb"-(?![0-9])(?<=[\[:, ]-)"),
    re.compile(rb"\.(?=[eE,\]} ])(?<=[0-9]\.)"),
    # (the lookbehind first: only a 0 after a separator scans the digits that follow, so a
    # run of zeros costs its length once, not its square)
    re.compile(rb"0(?:(?<=[\[:, ]0)|(?<=[\[:, ]-0))(?=[0-9]+[.eE,\]} ])"),
    re.compile(rb"\A *(?:-(?![0-9])|-?0[0-9]|-?[0-9]+\.(?![0-9]))"),  # a bare number
)


def loads(raw: bytes, base_offset: int = 0, index: int | None = None) -> Any:
    """Parse JSON as RFC 8259 has it; errors name the byte offset in the body.

    ujson is the fast path, but it is lenient where browsers' JSON.parse and the RFC are not:
    it takes invalid UTF-8 (CESU-8 surrogates included), raw control characters inside
    strings, and numbers such as `-`, `01` and `1.`. So the body is checked as UTF-8 and
    searched for control characters first (both at C speed, on the bytes, which ujson also
    parses fastest), and only a body with a raw TAB, LF or CR (pretty-printed JSON, say) or
    what may be a malformed number is checked again by the strict standard parser.
    NaN and Infinity, which ujson accepts and JSON.parse refuses, are caught when the event
    body is encoded. A body nested deeper than ujson's limit is refused like any other
    malformed body."""
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(
                f"invalid UTF-8 at byte {base_offset + exc.start}",
                offset=base_offset + exc.start,
                index=index,
            ) from None
    # translate() drops the control bytes at memory speed; the regex, slower, only says where
    if len(raw.translate(None, _CONTROL_BYTES)) != len(raw):
        control = _CONTROL.search(raw)
        assert control is not None
        at = base_offset + control.start()
        raise ParseError(
            f"control character U+{control.group()[0]:04X} at byte {at}: not allowed in JSON",
            offset=at,
            index=index,
        )
    try:
        value = ujson.loads(raw)
    except (ValueError, OverflowError):
        _raise_json_error(raw.decode(), base_offset, index)
    if (
        b"\n" in raw
        or b"\r" in raw
        or b"\t" in raw
        or any(pattern.search(raw) for pattern in _BAD_NUMBERS)
    ):
        _check_strictly(raw.decode(), base_offset, index)
    return value


def _check_strictly(text: str, base_offset: int, index: int | None) -> None:
    """The standard parser refuses what ujson lets through (raw TAB/LF/CR in strings,
    malformed numbers)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        pos = base_offset + len(text[: exc.pos].encode())
        raise ParseError(
            f"malformed JSON at byte {pos}: {exc.msg}", offset=pos, index=index
        ) from None
    except ValueError:
        # int() refuses to convert more digits than sys.get_int_max_str_digits() (4,300):
        # both parsers stop there, without saying where.
        limit = sys.get_int_max_str_digits()
        # from where a run of digits begins only: from every digit, shorter runs would cost
        # their square
        digits = re.search(rf"(?<![0-9])[0-9]{{{limit + 1},}}", text)
        pos = base_offset + (len(text[: digits.start()].encode()) if digits else 0)
        raise ParseError(
            f"number of more than {limit} digits at byte {pos}", offset=pos, index=index
        ) from None
    except RecursionError:
        raise ParseError(
            f"JSON nested too deeply at byte {base_offset}", offset=base_offset, index=index
        ) from None


def _raise_json_error(text: str, base_offset: int, index: int | None) -> NoReturn:
    """ujson says what is wrong but not where; the standard parser says where (error path
    only). It recurses, so a body nested past its limit is named as such, not a crash."""
    _check_strictly(text, base_offset, index)
    if "depth" in _ujson_error(text):
        raise ParseError(
            f"JSON nested too deeply at byte {base_offset}", offset=base_offset, index=index
        )
    raise ParseError(f"malformed JSON at byte {base_offset}", offset=base_offset, index=index)


def _ujson_error(text: str) -> str:
    try:
        ujson.loads(text)
    except (ValueError, OverflowError) as exc:
        return str(exc)
    return ""


def build_event(
    obj: Any,
    index: int,
    offset: int,
    header_type: int | None = None,
    header_ts: int | None = None,
    now: int | None = None,
    types: TypeTable = DEFAULT_TYPES,
) -> Event:
    """Validate one event object and route it. `offset` is where it starts in the body.
    (On the publish hot path: exact type checks, no intermediate sets.)"""
    if type(obj) is not dict:
        raise Rejected("an event must be a JSON object", index)
    fields = _FIELDS if header_type is None else _PAYLOAD_FIELDS
    if not fields.issuperset(obj):
        unknown = [k for k in obj if k not in fields]
        shown = ", ".join(sorted(k[:32] for k in unknown[:_SHOWN_FIELDS]))
        if len(unknown) > _SHOWN_FIELDS:
            shown += f" and {len(unknown) - _SHOWN_FIELDS} more"
        raise Rejected(
            f"unknown field(s) {shown}; an event has {', '.join(sorted(fields))}",
            index,
        )
    try:
        if header_type is None:
            if "type" not in obj:
                raise Rejected("missing field type")
            kind = types.lookup(obj["type"])
            ts = obj.get("ts")
            if ts is not None and (type(ts) is not int or not 0 <= ts <= MAX_TS):
                raise Rejected(_TS_RANGE)
        else:
            kind = types.lookup(header_type)
            ts = header_ts
            if ts is not None and ts > MAX_TS:
                raise Rejected(_TS_RANGE)
        if kind.internal:
            raise Rejected(f"{kind.name} events are published by the hub itself, not by publishers")
        user = obj.get("user")
        if user is not None and (type(user) is not str or not 0 < len(user) <= MAX_USER_LENGTH):
            raise Rejected(f"user must be a non-empty string of at most {MAX_USER_LENGTH} chars")
        topics = _named_topics(obj) if "topics" in obj or "topic" in obj else ()
        if topics and not kind.topics:
            takers = ", ".join(k.name for k in types if k.topics) or "none"
            raise Rejected(f"{kind.name} events do not take topics (types that do: {takers})")
        try:
            event = Event(kind.number, kind.name, user, obj.get("data"), ts or now, topics)
        except OverflowError:
            raise ParseError(
                f"invalid JSON in event at byte {offset}: NaN and Infinity are not JSON",
                offset=offset,
                index=index,
            ) from None
        event.route = kind.route(event)
    except Rejected as exc:
        exc.index = index
        raise
    return event


def _named_topics(obj: dict[str, Any]) -> tuple[str, ...]:
    """The topics an event names, `topics` (a list) or `topic` (one): each a topic name
    (hub.topics), at most MAX_EVENT_TOPICS, each once, in order. Counted before any is read."""
    if "topic" in obj:
        if "topics" in obj:
            raise Rejected("an event names its topics in topics or in topic, not both")
        named = [obj["topic"]]
        field = "topic"
    else:
        named = obj["topics"]
        field = "topics"
        if type(named) is not list or not named:
            raise Rejected("topics must be a non-empty list of topic names")
        if len(named) > MAX_EVENT_TOPICS:
            raise Rejected(f"an event names at most {MAX_EVENT_TOPICS} topics, not {len(named)}")
    for i, name in enumerate(named):
        error = topic_error(name)
        if error is not None:
            where = field if field == "topic" else f"topics[{i}]"
            shown = f" ({name[:MAX_TOPIC_LENGTH]!r})" if type(name) is str else ""
            raise Rejected(f"{where}: {error}{shown}")
    return tuple(dict.fromkeys(named))


class Decoder(Protocol):
    """What decodes one publish body (decode_json, decode_ndjson, decode_frames)."""

    def __call__(
        self,
        body: bytes,
        types: TypeTable = ...,
        *,
        max_events: int = ...,
        max_event_bytes: int = ...,
    ) -> list[Event]: ...


def _now_ms() -> int:
    return int(time.time() * 1000)


def _too_many(limit: int) -> TooLarge:
    return TooLarge(f"more than {limit} events in one publish", "batch", limit, limit)


def _check_size(event: Event, index: int, limit: int) -> None:
    """TooLarge if the event's encoded body is over `limit` bytes (it is ASCII: ujson
    escapes every other character)."""
    if limit and len(event.body) > limit:
        raise TooLarge(
            f"event {index} is {len(event.body)} bytes encoded, over the limit of {limit}",
            "event_bytes",
            limit,
            index,
        )


def decode_json(
    body: bytes,
    types: TypeTable = DEFAULT_TYPES,
    *,
    max_events: int = 0,
    max_event_bytes: int = 0,
) -> list[Event]:
    """One event object, or an array of them."""
    if not body.strip():
        raise ParseError("empty body", offset=0)
    value = loads(body)
    if isinstance(value, list):
        if not value:
            raise Rejected("empty batch")
        if max_events and len(value) > max_events:
            raise _too_many(max_events)
        now = _now_ms()  # one stamp for the batch: its events are published together
        events = [build_event(obj, i, 0, now=now, types=types) for i, obj in enumerate(value)]
    else:
        events = [build_event(value, 0, 0, types=types)]
    if max_event_bytes:
        for i, event in enumerate(events):
            _check_size(event, i, max_event_bytes)
    return events


def decode_ndjson(
    body: bytes,
    types: TypeTable = DEFAULT_TYPES,
    *,
    max_events: int = 0,
    max_event_bytes: int = 0,
) -> list[Event]:
    """One event object per line; blank lines are skipped."""
    events: list[Event] = []
    offset = 0
    now = _now_ms()
    for line in body.split(b"\n"):
        if line.strip():
            index = len(events)
            if index == max_events and max_events:
                raise _too_many(max_events)
            # CRLF line ends: the CR is the line end's, not a raw CR in the event's JSON
            obj = loads(line.removesuffix(b"\r"), base_offset=offset, index=index)
            event = build_event(obj, index, offset, now=now, types=types)
            _check_size(event, index, max_event_bytes)
            events.append(event)
        offset += len(line) + 1
    if not events:
        raise ParseError("empty body", offset=0)
    return events


def decode_frames(
    body: bytes,
    types: TypeTable = DEFAULT_TYPES,
    *,
    max_events: int = 0,
    max_event_bytes: int = 0,
) -> list[Event]:
    """Concatenated binary frames: uint32 type | uint64 ts ms (0 = stamp it) | uint32 length |
    payload (UTF-8 JSON object with user and data)."""
    events: list[Event] = []
    offset = 0
    size = len(body)
    now = _now_ms()
    if not size:
        raise ParseError("empty body", offset=0)
    while offset < size:
        index = len(events)
        if index == max_events and max_events:
            raise _too_many(max_events)
        if size - offset < FRAME_HEADER.size:
            raise ParseError(
                f"truncated frame header at byte {offset}: {size - offset} of "
                f"{FRAME_HEADER.size} bytes",
                offset=offset,
                index=index,
            )
        type_, ts, length = FRAME_HEADER.unpack_from(body, offset)
        start = offset + FRAME_HEADER.size
        if start + length > size:
            raise ParseError(
                f"truncated frame at byte {offset}: payload length {length}, "
                f"{size - start} bytes left",
                offset=offset,
                index=index,
            )
        # An empty payload is an event without user or data (a bare broadcast, say).
        obj = loads(body[start : start + length], base_offset=start, index=index) if length else {}
        event = build_event(obj, index, offset, header_type=type_, header_ts=ts or now, types=types)
        _check_size(event, index, max_event_bytes)
        events.append(event)
        offset = start + length
    return events
