"""hub.js never moves its last event id back: a `reset` whose id is of the same epoch and older
than what the tab has (an older hub, a buggy node, a hostile proxy) reaches onReset and the
listeners with `backwards: true` and a console warning, the last id stays (a reconnect resumes
from it), and the events up to it that come again are dropped. A forward reset and a reset of
another epoch are taken as they always were. Each stream is exactly what the test crafts: the
stand-in hub of test_browser_end, serving static/ and the crafted streams on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from browser_support import wait_until
from test_browser_end import ScriptedHub, event

pytestmark = pytest.mark.browser

# Start hub.js on the page, recording the last event id after each event and every warning,
# before any event can arrive (start() returns before the stream opens).
START = """async (options) => {
  window.warnings = [];
  const warn = console.warn;
  console.warn = (...args) => { warnings.push(args.join(" ")); warn(...args); };
  await window.start(options);
  h.lasts = [];
  h.conn.on("*", () => h.lasts.push(h.conn.lastEventId));
}"""
# A token that comes only when the test calls window.release() (instead of a test binding).
GATED_TOKEN = """() => {
  window.nextToken = () => new Promise((resolve) => (window.release = () => resolve("a.b.c")));
}"""
SEEN = "() => h.events.map((e) => [e.id, e.name, e.backwards ?? null])"
# What a tab delivers of 1-0-e, 2-0-e, 3-0-e, reset to 1-0-e, 2-0-e, 3-0-e, 4-0-e: 4-0-e once
# (2-0-e and 3-0-e again are dropped), the reset marked; its last id after each.
BACKWARDS_SEEN = [
    ["1-0-e", "broadcast", None],
    ["2-0-e", "broadcast", None],
    ["3-0-e", "broadcast", None],
    ["1-0-e", "reset", True],
    ["4-0-e", "broadcast", None],
]
BACKWARDS_LASTS = ["1-0-e", "2-0-e", "3-0-e", "3-0-e", "4-0-e"]


def reset(event_id: str) -> str:
    body = {"reason": "history does not reach back", "resume_from": event_id}
    return f"id: {event_id}\nevent: reset\ndata: {json.dumps(body)}\n\n"


def events(*positions: int, epoch: str = "e") -> str:
    return "".join(event(f"{n}-0-{epoch}", "broadcast", f"e{n}{epoch}") for n in positions)


def open_page(context: Any, hub: ScriptedHub, gated: bool = False, **options: Any) -> Any:
    page = context.new_page()
    page.goto(hub.base + "/blank")
    if gated:
        page.evaluate(GATED_TOKEN)
        options["tokenFromTest"] = True
    page.evaluate(START, {"share": False, "token": "a.b.c", **options})
    return page


def stand_in(*streams: str) -> contextlib.closing[ScriptedHub]:
    """test_browser_end's stand-in hub, answering its n-th /events request with streams[n]."""
    return contextlib.closing(ScriptedHub(list(streams)))


def wait_requests(hub: ScriptedHub, n: int) -> None:
    wait_until(lambda: len(hub.requests) >= n, 15, f"{n} requests for /events")


def last_event_id_header(hub: ScriptedHub, n: int) -> str | None:
    return hub.requests[n]["headers"].get("last-event-id")


def test_a_backwards_reset_keeps_the_last_id_and_drops_what_the_tab_has(context):
    with stand_in(events(1, 2, 3) + reset("1-0-e") + events(2, 3, 4)) as hub:
        page = open_page(context, hub)
        page.wait_for_function("h.events.length === 5")
        assert page.evaluate(SEEN) == BACKWARDS_SEEN
        assert page.evaluate("h.lasts") == BACKWARDS_LASTS
        assert page.evaluate("h.resets.map((e) => [e.id, e.backwards])") == [["1-0-e", True]]
        [warning] = page.evaluate("warnings")
        assert "1-0-e" in warning and "3-0-e" in warning
        # The stream ended: EventSource's own reconnect, with the id it read last (the real one).
        wait_requests(hub, 2)
        assert last_event_id_header(hub, 1) == "4-0-e"


def test_a_reconnect_after_a_backwards_reset_resumes_from_the_last_id(context):
    # Cut after the reset and one duplicate: EventSource would come back with 2-0-e, the id it
    # read last. Then a node behind the tab: an opening id and a reset at 1-0-e again.
    first = events(1, 2, 3) + reset("1-0-e") + events(2)
    second = "id: 1-0-e\n\n" + reset("1-0-e") + events(2, 3, 4)
    with stand_in(first, second) as hub:
        page = open_page(context, hub, backoff={"base": 50, "max": 50})
        page.wait_for_function("h.events.length === 6")
        assert page.evaluate(SEEN) == [
            ["1-0-e", "broadcast", None],
            ["2-0-e", "broadcast", None],
            ["3-0-e", "broadcast", None],
            ["1-0-e", "reset", True],
            ["1-0-e", "reset", True],
            ["4-0-e", "broadcast", None],
        ]
        assert page.evaluate("h.lasts") == ["1-0-e", "2-0-e", "3-0-e", "3-0-e", "3-0-e", "4-0-e"]
        assert len(page.evaluate("warnings")) == 2
        wait_requests(hub, 3)
        # A new EventSource from the last id (no header: a new one has read nothing) ...
        assert hub.requests[1]["query"].get("lastEventId") == ["3-0-e"]
        assert last_event_id_header(hub, 1) is None
        # ... and after 4-0-e, EventSource's own reconnect carries the right id.
        assert last_event_id_header(hub, 2) == "4-0-e"


def test_a_forward_reset_and_a_reset_of_another_epoch_are_taken_as_before(context):
    stream = events(1, 2) + reset("5-0-e") + events(6) + reset("1-0-f") + events(2, epoch="f")
    with stand_in(stream) as hub:
        page = open_page(context, hub)
        page.wait_for_function("h.events.length === 6")
        assert page.evaluate(SEEN) == [
            ["1-0-e", "broadcast", None],
            ["2-0-e", "broadcast", None],
            ["5-0-e", "reset", False],
            ["6-0-e", "broadcast", None],
            ["1-0-f", "reset", False],  # another epoch: no order, taken
            ["2-0-f", "broadcast", None],
        ]
        assert page.evaluate("h.lasts") == ["1-0-e", "2-0-e", "5-0-e", "6-0-e", "1-0-f", "2-0-f"]
        assert page.evaluate("warnings") == []
        wait_requests(hub, 2)
        assert last_event_id_header(hub, 1) == "2-0-f"


def test_tabs_that_share_the_stream_each_keep_their_last_id(context):
    with stand_in(events(1, 2, 3) + reset("1-0-e") + events(2, 3, 4)) as hub:
        # The leader's token waits for the test: the follower is in place before any event.
        leader = open_page(context, hub, gated=True, share=True, key="k")
        leader.wait_for_function("h.conn.role === 'leader'")
        follower = open_page(context, hub, share=True, key="k")
        follower.wait_for_function("h.conn.role === 'follower'")
        leader.evaluate("window.release()")
        for page in (leader, follower):  # each tab judges the reset by its own last id
            page.wait_for_function("h.events.length === 5")
            assert page.evaluate(SEEN) == BACKWARDS_SEEN
            assert page.evaluate("h.lasts") == BACKWARDS_LASTS
            assert len(page.evaluate("warnings")) == 1
        wait_requests(hub, 2)  # the leader's EventSource came back, from the real last id
        assert last_event_id_header(hub, 1) == "4-0-e"
