"""hub.client.subscribe() never moves its last event id back: a `reset` whose id is of the
same epoch and older than what the client has (an older hub, a buggy node, a hostile proxy)
is delivered marked `backwards`, with a WARNING, the last event id stays, and the events
after it that the client already has (same epoch, not newer) are skipped and counted. A
forward reset and a reset of another epoch are taken as they always were.

The server is test_client_http's scripted one, on 127.0.0.1: each connection gets the bytes
the test gives it, so each stream is exactly the sequence the test crafts. Every wait has a
deadline. Last, property tests of compare_ids, the client's one comparison of positions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sse import wait_for
from test_client_http import STALL, STREAM_HEAD, Misbehaving, event, header, run

from hub.client import Subscription, compare_ids, subscribe
from hub.history import parse_position

OPEN = b"retry: 10\n\n"


def reset(event_id: str) -> bytes:
    body = json.dumps({"reason": "history does not reach back", "resume_from": event_id})
    return f"id: {event_id}\nevent: reset\ndata: {body}\n\n".encode()


def events(*positions: int, epoch: str = "e") -> list[bytes]:
    return [event(f"{n}-0-{epoch}", n) for n in positions]


Seen = tuple[str, str, bool, str | None]  # id, name, backwards, last_event_id after it


async def follow(
    scripts: list[list[Any]], requests: int
) -> tuple[list[Seen], Subscription, list[bytes]]:
    """Subscribe to a server that answers connection n with scripts[n] until `requests`
    requests have come; what was yielded, with the last event id after each."""
    server = Misbehaving(*scripts)
    seen: list[Seen] = []
    async with server as url:
        stream = subscribe(url, "t", timeout=2)

        async def read() -> None:
            async for got in stream:
                seen.append((got.id, got.name, got.backwards, stream.last_event_id))

        reader = asyncio.create_task(read())
        arrived = await wait_for(lambda: len(server.requests) >= requests or reader.done())
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        assert arrived, f"{len(server.requests)} requests, {requests} expected"
        await stream.aclose()
    return seen, stream, server.requests


def last_event_ids(requests: list[bytes]) -> list[str | None]:
    return [None if (v := header(r, b"Last-Event-ID")) is None else v.decode() for r in requests]


def backwards_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hub.client" and r.levelno == logging.WARNING and "reset" in r.getMessage()
    ]


def test_a_backwards_reset_keeps_the_last_id_and_skips_what_the_client_has(caplog):
    crafted = [STREAM_HEAD, OPEN, *events(1, 2, 3), reset("1-0-e"), *events(2, 3, 4)]
    with caplog.at_level(logging.WARNING, logger="hub.client"):
        seen, stream, requests = run(follow([crafted, [STREAM_HEAD, STALL]], 2))
    assert seen == [
        ("1-0-e", "payment", False, "1-0-e"),
        ("2-0-e", "payment", False, "2-0-e"),
        ("3-0-e", "payment", False, "3-0-e"),
        ("1-0-e", "reset", True, "3-0-e"),  # delivered, marked; the last id stays
        ("4-0-e", "payment", False, "4-0-e"),  # once: 2-0-e and 3-0-e again were skipped
    ]
    assert stream.duplicates_skipped == 2
    assert last_event_ids(requests) == [None, "4-0-e"]
    [warning] = backwards_warnings(caplog)
    assert "1-0-e" in warning and "3-0-e" in warning


def test_a_reconnect_after_a_backwards_reset_resumes_from_what_the_client_has(caplog):
    # Cut after the reset and one duplicate: a client that took their ids would come back
    # with 2-0-e. The next answer is a node behind the client: its opening and its reset
    # name 1-0-e again, then it sends from there.
    first = [STREAM_HEAD, b"retry: 10\nid: 0-0-e\n\n", *events(1, 2, 3), reset("1-0-e")]
    first += events(2)
    second = [STREAM_HEAD, b"retry: 10\nid: 1-0-e\n\n", reset("1-0-e"), *events(2, 3, 4)]
    with caplog.at_level(logging.WARNING, logger="hub.client"):
        seen, stream, requests = run(follow([first, second, [STREAM_HEAD, STALL]], 3))
    assert [(i, name, back) for i, name, back, _ in seen] == [
        ("1-0-e", "payment", False),
        ("2-0-e", "payment", False),
        ("3-0-e", "payment", False),
        ("1-0-e", "reset", True),
        ("1-0-e", "reset", True),
        ("4-0-e", "payment", False),
    ]
    assert [last for *_, last in seen] == ["1-0-e", "2-0-e", "3-0-e", "3-0-e", "3-0-e", "4-0-e"]
    assert stream.duplicates_skipped == 3
    assert last_event_ids(requests) == [None, "3-0-e", "4-0-e"]
    assert len(backwards_warnings(caplog)) == 2


def test_a_forward_reset_and_a_reset_of_another_epoch_are_taken_as_before(caplog):
    crafted = [STREAM_HEAD, OPEN, *events(1, 2), reset("5-0-e"), *events(6), reset("1-0-f")]
    crafted += events(2, epoch="f")
    with caplog.at_level(logging.WARNING, logger="hub.client"):
        seen, stream, requests = run(follow([crafted, [STREAM_HEAD, STALL]], 2))
    assert seen == [
        ("1-0-e", "payment", False, "1-0-e"),
        ("2-0-e", "payment", False, "2-0-e"),
        ("5-0-e", "reset", False, "5-0-e"),
        ("6-0-e", "payment", False, "6-0-e"),
        ("1-0-f", "reset", False, "1-0-f"),  # another epoch: no order, taken
        ("2-0-f", "payment", False, "2-0-f"),
    ]
    assert stream.duplicates_skipped == 0
    assert last_event_ids(requests) == [None, "2-0-f"]
    assert backwards_warnings(caplog) == []


def test_an_event_the_client_has_is_skipped_without_a_reset_and_other_ids_never_are():
    no_id = b'event: payment\ndata: {"type": 2, "data": 0}\n\n'
    crafted = [STREAM_HEAD, OPEN, no_id, *events(1, 2, 3), *events(2), *events(4)]
    crafted += [event("x", 5), event("x", 6), event("7-0-E", 7), *events(4), *events(5)]
    seen, stream, requests = run(follow([crafted, [STREAM_HEAD, STALL]], 2))
    assert [(i, last) for i, _, _, last in seen] == [
        ("", None),
        ("1-0-e", "1-0-e"),
        ("2-0-e", "2-0-e"),
        ("3-0-e", "3-0-e"),
        ("4-0-e", "4-0-e"),  # 2-0-e again (a hub replaying from too far back): skipped
        ("x", "x"),
        ("x", "x"),  # not positions: never dropped
        ("7-0-E", "7-0-E"),
        ("4-0-e", "4-0-e"),  # the last id, 7-0-E, is no position: nothing to compare with
        ("5-0-e", "5-0-e"),
    ]
    assert stream.duplicates_skipped == 1
    assert last_event_ids(requests) == [None, "5-0-e"]


# -- compare_ids: any strings, and the hub's own order ------------------------------------------

epochs = st.sampled_from(["", "e", "f", "0a1b2c3d"])
numbers = st.integers(0, 10**20 - 1) | st.integers(0, 3)
padding = st.integers(0, 2)


@st.composite
def positions(draw: st.DrawFn) -> str:
    ms, seq, epoch = draw(numbers), draw(numbers), draw(epochs)
    text = f"{ms:0{draw(padding) + 1}d}-{seq:0{draw(padding) + 1}d}"
    return f"{text}-{epoch}" if epoch else text


ids = (
    positions()
    | st.text(max_size=70)
    | st.from_regex(r"[0-9]{1,22}-[0-9]{1,3}(-[0-9a-zA-Z]{0,17})?")
)


@settings(max_examples=500, deadline=None)
@given(ids, ids)
def test_compare_ids_never_raises_and_is_antisymmetric(a, b):
    order = compare_ids(a, b)
    assert order in (-1, 0, 1, None)
    back = compare_ids(b, a)
    assert order == (None if back is None else -back)


@settings(max_examples=500, deadline=None)
@given(ids, ids)
def test_compare_ids_orders_as_the_hub_does(a, b):
    # The hub's reading of an id (hub.history.parse_position; it also strips the spaces and
    # tabs a client may send, which an id from the hub never has).
    hub_a, hub_b = parse_position(a), parse_position(b)
    if a != a.strip(" \t") or b != b.strip(" \t"):
        return
    assert (compare_ids(a, a) == 0) == (hub_a is not None)
    if hub_a is None or hub_b is None or hub_a[1] != hub_b[1]:
        assert compare_ids(a, b) is None
    else:
        assert compare_ids(a, b) == (hub_a[0] > hub_b[0]) - (hub_a[0] < hub_b[0])


@settings(max_examples=300, deadline=None)
@given(positions(), positions(), positions())
def test_compare_ids_is_transitive(a, b, c):
    ab, bc, ac = compare_ids(a, b), compare_ids(b, c), compare_ids(a, c)
    if ab is not None and bc is not None:
        assert ac is not None
        if ab <= 0 and bc <= 0:
            assert ac <= 0
        if ab == 0 and bc == 0:
            assert ac == 0
