"""hub.client.SSEParser, the project's one event-stream parser, against the WHATWG rules: a
literal transcription of the standard's algorithm ("Interpreting an event stream", HTML 9.2.6)
run on the whole stream at once is the reference, and the parser, fed the same bytes cut
anywhere (empty pieces, a CRLF or a UTF-8 sequence cut in two), must agree with it on every
event, the last event id, the reconnection time and the comments."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.client import SSEParser

SPEC_LINE_END = re.compile(r"\r\n|\r|\n")


def by_the_standard(raw: bytes) -> tuple[list[tuple[str, str, str]], str, int | None, list[str]]:
    """The standard's steps, one by one, on the whole stream: UTF-8 decode (one BOM dropped,
    errors replaced), split at CRLF/CR/LF (the piece after the last line end is no line),
    then the field rules."""
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines = SPEC_LINE_END.split(text)[:-1]
    events: list[tuple[str, str, str]] = []
    comments: list[str] = []
    data, event_type, id_buffer, last_event_id, retry = "", "", "", "", None
    for line in lines:
        if line == "":  # dispatch
            last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            data = data.removesuffix("\n")
            events.append((id_buffer, event_type or "message", data))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        if ":" in line:
            field, value = line.split(":", 1)
            value = value.removeprefix(" ")
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id":
            if "\x00" not in value:
                id_buffer = value
        elif field == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events, last_event_id, retry, comments


# Bytes that matter to the rules, and some that do not; joined at random.
FRAGMENTS = [
    b"data", b"id", b"event", b"retry", b"Data", b"dat", b":", b": ", b" ", b"  ", b"\r",
    b"\n", b"\r\n", b"\n\n", b"\r\r", b"\x00", b"\xef\xbb\xbf", b"12", b"0", b"\xd9\xa3",
    b"\xef\xbc\x91", b"+1", b"-", b"x", b"message", b"end", b"\xc3\xa9", b"\xe2\x80\xa8",
    b"\xff", b"\xe2\x82", b"\xf0\x9f\x98", b"\x85", b"\x0b", b"\x0c", b"\t",
]  # fmt: skip
streams = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=3), max_size=60).map(b"".join)
# piece sizes, used in turn; 0 feeds an empty piece (the trailing 1: the stream moves on)
cuts = st.lists(st.integers(min_value=0, max_value=9), max_size=30).map(lambda s: [*s, 1])


def fed_in_pieces(raw: bytes, steps: list[int]) -> tuple[SSEParser, list[tuple[str, str, str]]]:
    comments: list[str] = []
    parser = SSEParser(comments.append)
    parser.comments = comments  # type: ignore[attr-defined]
    events, at, i = [], 0, 0
    while at < len(raw):
        step = steps[i % len(steps)]
        events += parser.feed(raw[at : at + step])
        at += step
        i += 1
    return parser, events


@settings(max_examples=1000, deadline=None)
@given(streams, cuts, st.booleans())
def test_any_bytes_cut_anywhere_parse_as_the_standard_says(raw, steps, bom):
    if bom:
        raw = b"\xef\xbb\xbf" + raw
    events, last_id, retry, comments = by_the_standard(raw)
    # cut at random, and cut everywhere with an empty piece between every two bytes
    for parser, got in (fed_in_pieces(raw, steps), fed_in_pieces(raw, [1, 0])):
        assert got == events
        assert (parser.last_id, parser.retry_ms) == (last_id, retry)
        assert parser.comments == comments  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(streams, cuts, cuts)
def test_the_same_bytes_give_the_same_events_however_they_are_cut(raw, one, other):
    first, second = fed_in_pieces(raw, one), fed_in_pieces(raw, other)
    assert first[1] == second[1]
    assert (first[0].last_id, first[0].retry_ms) == (second[0].last_id, second[0].retry_ms)


line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=20,
)


@given(
    st.lists(
        st.tuples(
            line_text.filter(lambda s: "\x00" not in s),
            st.sampled_from(["payment", "reset", "", "end"]),
            st.lists(line_text),
        ),
        max_size=8,
    ),
    st.sampled_from(["\n", "\r\n", "\r"]),
    cuts,
)
def test_what_an_encoder_writes_reads_back_as_written_in_every_line_ending(events, eol, steps):
    text = "\ufeffretry: 100" + eol + ": comment" + eol + eol
    expected = []
    for event_id, name, lines in events:
        block = f"id: {event_id}{eol}" + (f"event: {name}{eol}" if name else "")
        block += "".join(f"data: {line}{eol}" for line in lines)
        text += block + eol
        if lines:
            expected.append((event_id, name or "message", "\n".join(lines)))
    parser, got = fed_in_pieces(text.encode(), steps)
    assert got == expected
    assert parser.retry_ms == 100
    assert parser.last_id == (events[-1][0] if events else "")


def test_an_id_moves_the_last_event_id_only_when_its_block_ends():
    parser = SSEParser()
    assert parser.feed(b"id: 1-0\nretry: 5\n") == []
    assert parser.last_id == "" and parser.retry_ms == 5  # retry at once, the id at the end
    assert parser.feed(b"\n") == [] and parser.last_id == "1-0"  # a block without data
    assert parser.feed(b"id: 1-\x002\ndata\n\n") == [("1-0", "message", "")]  # NUL: ignored


def test_a_line_or_an_event_past_its_limit_is_refused():
    with pytest.raises(ValueError, match="line longer than 100"):
        SSEParser(max_line=100).feed(b"data: " + b"x" * 200)
    parser = SSEParser(max_event=100)
    with pytest.raises(ValueError, match="data longer than 100"):
        for _ in range(30):
            parser.feed(b"data: 0123456789\n")
    assert SSEParser().max_line >= 1 << 20  # an event's whole JSON is one data line
