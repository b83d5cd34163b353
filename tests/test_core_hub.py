"""The core without Tornado: registry, history, flusher and the hub's delivery rules, over
real sockets (socketpairs) and a real asyncio loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import ujson
from core_support import SocketConnection, config
from sse import wait_for

from hub.core import Hub
from hub.decode import decode_json
from hub.history import History
from hub.message import Event
from hub.registry import Reason, Registry, Subscriber


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


def flushed(hub: Hub) -> bool:
    """No flush pass running or scheduled: every stream has been written what it owes."""
    return hub.flusher._pass is None and hub.flusher._handle is None


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """sse.wait_for, failing the test at the deadline."""
    assert await wait_for(cond, timeout), "condition not met before the deadline"


async def publish(hub: Hub, body: object) -> list[str]:
    return await hub.publish(decode_json(ujson.dumps(body).encode()))


def test_registry_drops_empty_index_entries_when_the_last_stream_leaves():
    reg = Registry()
    conns = [SocketConnection() for _ in range(3)]
    subs = [Subscriber(c, "u1", topics=("a", "b")) for c in conns]
    for s in subs:
        reg.add(s)
    assert len(reg.by_user["u1"]) == 3 and len(reg.by_topic["a"]) == 3
    for s in subs:
        assert reg.remove(s)
    assert not reg.remove(subs[0])
    assert (reg.all, reg.by_user, reg.by_topic) == (set(), {}, {})
    for c in conns:
        c.shutdown()


def make_event(n: int) -> Event:
    [event] = decode_json(b'{"type": 5, "data": "%d"}' % n)
    event.assign_id(100, n)
    return event


def test_history_replays_after_an_id_and_refuses_what_it_no_longer_holds():
    history = History(limit=5, limit_bytes=1 << 20, floor=(100, 0))
    for n in range(1, 9):
        history.append(make_event(n))
    assert [e.id for e in history.since("100-6") or []] == ["100-7", "100-8"]
    assert history.since("100-8") == []
    assert [e.id for e in history.since("100-3") or []] == [
        "100-4",
        "100-5",
        "100-6",
        "100-7",
        "100-8",
    ]
    assert history.since("100-2") is None  # 100-3 was evicted: 100-3 would be missed
    assert history.since("99-50") is None  # an earlier run
    assert history.since("100-9") is None  # not issued yet
    assert history.since("garbage") is None
    assert history.last_id == "100-8"


def test_history_is_bounded_by_bytes_too():
    history = History(limit=1000, limit_bytes=1000, floor=(100, 0))
    for n in range(1, 200):
        history.append(make_event(n))
    assert history.size <= 1000
    assert sum(len(e.frame) for e in history.events) == history.size


def test_private_and_broadcast_events_reach_a_stream_in_id_order_in_one_write():
    async def scenario() -> None:
        hub = Hub(config(flush_interval=0.01))
        conn = SocketConnection()
        hub.subscribe(conn, "u1", topics=("payments",))
        body = []
        for n in range(30):
            body.append({"type": 5, "data": n} if n % 3 else {"type": 2, "user": "u1", "data": n})
        ids = await publish(hub, body)
        await until(lambda: conn.writes > 0)
        got = conn.events()
        assert [i for i, _ in got] == ids
        assert conn.writes == 1  # coalesced: one send for 30 events
        conn.shutdown()

    run(scenario)


def test_a_stream_gets_an_event_once_even_when_routed_to_it_twice():
    async def scenario() -> None:
        hub = Hub(config())
        mine, other = SocketConnection(), SocketConnection()
        hub.subscribe(mine, "u1", topics=("payments",))
        hub.subscribe(other, "u2")
        ids = await publish(hub, [{"type": 2, "user": "u1"}, {"type": 5}])
        await until(lambda: mine.writes and other.writes)
        assert [i for i, _ in mine.events()] == ids
        assert [i for i, _ in other.events()] == ids[1:]
        assert hub.delivered == 3
        mine.shutdown()
        other.shutdown()

    run(scenario)


def test_log_filters_pick_level_and_service():
    async def scenario() -> None:
        hub = Hub(config())
        errors, api = SocketConnection(), SocketConnection()
        hub.subscribe(errors, "ops", topics=("logs",), min_level=40)
        hub.subscribe(api, "ops", topics=("logs",), services=frozenset({"api"}))
        ids = await publish(
            hub,
            [
                {"type": 4, "data": {"level": "info", "service": "api"}},
                {"type": 4, "data": {"level": "error", "service": "db"}},
                {"type": 4, "data": {"level": "critical", "service": "api"}},
            ],
        )
        await until(lambda: errors.writes and api.writes)
        assert [i for i, _ in errors.events()] == ids[1:]
        assert [i for i, _ in api.events()] == [ids[0], ids[2]]
        errors.shutdown()
        api.shutdown()

    run(scenario)


def test_a_stream_that_stops_reading_is_cut_and_the_others_get_everything():
    async def scenario() -> None:
        hub = Hub(config(max_pending=64 * 1024, flush_interval=0.001))
        stuck = SocketConnection(sndbuf=4096)
        readers = [SocketConnection() for _ in range(3)]
        stuck_sub = hub.subscribe(stuck, "stuck")
        for r in readers:
            hub.subscribe(r, "reader")
        received = [b""] * 3
        payload = "x" * 1000
        total = 0
        while total < 400:
            await publish(hub, [{"type": 5, "data": payload}] * 10)
            total += 10
            await until(lambda: flushed(hub))  # the pass carrying this batch is done
            for i, r in enumerate(readers):
                received[i] += r.read()
            if stuck.closed:
                break
        await until(lambda: stuck.closed)
        assert stuck_sub not in hub.registry.all
        assert stuck.flushed_on_close is False
        # the hub never wrote again to a stream it held more than the bound for
        assert stuck.most_held_before_a_write <= 64 * 1024
        assert len(stuck.pending) > 64 * 1024

        def all_read() -> bool:
            for i, r in enumerate(readers):
                received[i] += r.read()
            return all(b.count(b"\nevent: broadcast\n") == total for b in received)

        await until(all_read)
        assert hub.metrics.disconnects.labels("slow")._value.get() == 1
        for c in [stuck, *readers]:
            c.shutdown()

    run(scenario)


def test_resume_replays_only_what_the_stream_is_entitled_to_then_live_events():
    async def scenario() -> None:
        hub = Hub(config())
        ids = await publish(
            hub,
            [
                {"type": 2, "user": "u1", "data": 1},
                {"type": 2, "user": "u2", "data": 2},
                {"type": 5},
                {"type": 1, "user": "u1"},
            ],
        )
        conn = SocketConnection()
        hub.subscribe(conn, "u1", last_event_id=ids[0])
        live = await publish(hub, [{"type": 2, "user": "u1"}])
        got: list[tuple[str, str]] = []
        await until(lambda: got.extend(conn.events()) or len(got) >= 3)
        assert [i for i, _ in got] == [ids[2], ids[3], live[0]]
        conn.shutdown()

    run(scenario)


def test_resume_from_beyond_the_history_starts_with_a_reset_event():
    async def scenario() -> None:
        hub = Hub(config(history=3))
        ids = await publish(hub, [{"type": 5, "data": n} for n in range(10)])
        conn = SocketConnection()
        hub.subscribe(conn, "u1", last_event_id=ids[2])
        await until(lambda: conn.writes > 0)
        assert conn.events() == [(ids[-1], "reset")]
        conn.shutdown()

    run(scenario)


def test_logout_ends_only_the_named_session_after_it_gets_the_event_and_revokes_it():
    async def scenario() -> None:
        hub = Hub(config())
        s1, s2 = SocketConnection(), SocketConnection()
        hub.subscribe(s1, "u1", sid="s1")
        hub.subscribe(s2, "u1", sid="s2")
        issued = time.time() - 1
        [logout] = await publish(hub, {"type": 3, "user": "u1", "data": {"session": "s1"}})
        assert s1.closed and s1.flushed_on_close is True
        assert s1.events() == [(logout, "logout")]
        assert not s2.closed and len(hub.registry) == 1
        assert hub.is_revoked("u1", "s1", issued)
        assert not hub.is_revoked("u1", "s2", issued)
        assert not hub.is_revoked("u1", "s1", time.time() + 2)  # a token issued later works
        s1.shutdown()
        s2.shutdown()

    run(scenario)


def test_quiet_streams_get_heartbeats_and_expired_tokens_end_their_streams():
    async def scenario() -> None:
        hub = Hub(config(heartbeat=0.05))
        quiet, expiring = SocketConnection(), SocketConnection()
        hub.subscribe(quiet, "u1")
        sub = hub.subscribe(expiring, "u2", exp=time.time() + 0.1)
        got = b""

        def pinged_twice() -> bool:
            nonlocal got
            got += quiet.read()
            return got.count(b": ping\n\n") >= 2

        await until(pinged_twice)
        await until(lambda: expiring.closed)
        assert sub not in hub.registry.all
        assert hub.metrics.disconnects.labels(Reason.EXPIRED.value)._value.get() == 1
        await hub.stop()
        assert quiet.closed and len(hub.registry) == 0
        quiet.shutdown()
        expiring.shutdown()

    run(scenario)


def test_nothing_of_a_stream_remains_after_it_leaves():
    async def scenario() -> None:
        hub = Hub(config())
        conns = [SocketConnection() for _ in range(200)]
        subs = [hub.subscribe(c, f"u{i % 7}", topics=("t",)) for i, c in enumerate(conns)]
        await publish(hub, [{"type": 5}, {"type": 2, "user": "u1"}])
        for s in subs:
            hub.disconnect(s, Reason.GONE)
        assert (hub.registry.all, hub.registry.by_user, hub.registry.by_topic) == (set(), {}, {})
        await until(lambda: not hub.flusher.dirty and hub.flusher._pass is None)
        await publish(hub, [{"type": 5}])
        await until(lambda: flushed(hub))
        assert hub.flusher.log == []
        for c in conns:
            c.shutdown()

    run(scenario)


@pytest.mark.parametrize("n", [1, 3])
def test_delivered_counter_counts_one_per_stream_per_event(n: int):
    async def scenario() -> None:
        hub = Hub(config())
        conns = [SocketConnection() for _ in range(n)]
        for c in conns:
            hub.subscribe(c, "u")
        await publish(hub, [{"type": 5}] * 4)
        assert hub.delivered == 4 * n
        for c in conns:
            c.shutdown()

    run(scenario)


def test_reset_on_an_empty_history_still_carries_an_id_to_resume_from():
    async def scenario() -> None:
        hub = Hub(config())
        conn = SocketConnection()
        hub.subscribe(conn, "u1", last_event_id="12-3")
        await until(lambda: conn.writes > 0)
        assert conn.events() == [(f"{hub.broker.floor[0]}-0", "reset")]
        conn.shutdown()

    run(scenario)
