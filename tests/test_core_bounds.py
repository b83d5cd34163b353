"""Bounds that bound (issue 15), in the core without Tornado: what the history holds in memory
is within what --history-bytes counts, whatever an event's data; filters still read the data
of events in the history, live and on resume. (The logouts remembered: test_core_revocations.)"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import ujson
from core_support import Peer, config
from sse import wait_for

from hub.config import ConfigError, parse_config
from hub.core import Hub
from hub.decode import decode_json
from hub.dispatch import DEFAULT_TYPES
from hub.history import History
from hub.message import DECODED_BYTES

WARNING_ONLY = DEFAULT_TYPES.stream_filters({"level": ["warning"]})


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    assert await wait_for(cond, timeout), "condition not met before the deadline"


def lists_event(level: str = "debug") -> dict[str, Any]:
    """A legal log event whose data decodes to ~20 times its JSON: 700 empty lists (the
    reviewer's: each `[]` is 3 bytes of JSON and a 56-byte list)."""
    return {"type": 4, "data": {"level": level, "pad": [[] for _ in range(700)]}}


def traced(fn: Callable[[], object]) -> int:
    """Bytes that `fn` leaves allocated (tracemalloc, after a full collection)."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()


def test_what_the_history_holds_is_no_more_than_it_counts_whatever_the_data():
    """It counted 3x the frame and kept the decoded data beside it: 25 x 1 MB of such events
    took a hub from 46 to 574 MB of RSS while it counted 67 MB."""
    history = History(limit=10_000, limit_bytes=1 << 40, floor=(0, 0))
    body = ujson.dumps([lists_event()] * 300).encode()

    def publish() -> None:
        for n, event in enumerate(decode_json(body)):
            event.assign_id(1_764_000_000_000, n)
            history.append(event)

    held = traced(publish)
    assert len(history) == 300
    assert held <= history.size, (held, history.size)


def test_a_level_filter_works_live_and_on_a_resume_from_the_history():
    async def scenario() -> None:
        hub = Hub(config())
        start = hub.history.last_id
        live = Peer()
        hub.subscribe(live.transport, "u1", topics=("logs",), filters=WARNING_ONLY)
        levels = ["debug", "warning", "info", "error", "warning", "critical"]
        body = [{"type": 4, "data": {"level": level, "n": n}} for n, level in enumerate(levels)]
        ids = (await hub.publish(decode_json(ujson.dumps(body).encode()))).ids
        wanted = [i for i, level in zip(ids, levels, strict=True) if level not in ("debug", "info")]
        await until(lambda: [i for i, _ in live.events()] == wanted)
        # the history holds them without their decoded data: a resume decodes it again
        resumed = Peer()
        hub.subscribe(
            resumed.transport, "u2", topics=("logs",), filters=WARNING_ONLY, last_event_id=start
        )
        await until(lambda: [i for i, _ in resumed.events()] == wanted)
        assert [i for i, _ in live.events()] == wanted  # nothing more came meanwhile
        live.shutdown()
        resumed.shutdown()
        await hub.stop()

    run(scenario)


def test_a_filtered_resume_through_the_whole_history_keeps_little_of_it_decoded():
    """A filter decodes what it reads from the body and keeps it for the next readers, but only
    the last DECODED_BYTES of bodies: reading the history must not bring back what the history
    left out."""

    async def scenario() -> None:
        hub = Hub(config())
        start = hub.history.last_id
        one = ujson.dumps(lists_event()).encode()
        batch = b"[" + b",".join([one] * 400) + b"]"
        for _ in range(3):  # 1,200 events: 2.5 MB of bodies, over DECODED_BYTES
            await hub.publish(decode_json(batch))
        per_event = traced(lambda: hub.history.events[0].data)  # one decoded, kept
        peer = Peer()

        async def resume() -> None:
            sub = hub.subscribe(
                peer.transport, "u1", topics=("logs",), filters=WARNING_ONLY, last_event_id=start
            )
            await until(lambda: sub.replay is None)

        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await resume()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert peer.events() == []  # every event read, and filtered out
        kept = DECODED_BYTES // len(hub.history.events[0].body) + 2
        assert len(hub.history) == 1200 > kept
        assert held <= kept * per_event + 256 * 1024, (held, kept * per_event)
        peer.shutdown()
        await hub.stop()

    run(scenario)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_revocations_is_at_least_one_from_the_flag_and_the_variable(value):
    with pytest.raises(ConfigError, match="--max-revocations must be at least 1"):
        parse_config(["--max-revocations", value], {})
    with pytest.raises(ConfigError, match="--max-revocations must be at least 1"):
        parse_config([], {"HUB_MAX_REVOCATIONS": value})
    with pytest.raises(ConfigError, match="not a valid value"):
        parse_config([], {"HUB_MAX_REVOCATIONS": "many"})
    assert parse_config([], {"HUB_MAX_REVOCATIONS": "7"}).max_revocations == 7
    assert parse_config(["--max-revocations", "9"], {}).max_revocations == 9
