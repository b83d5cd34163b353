"""The core without Tornado: registry, history, flusher and the hub's delivery rules, over
real sockets (socketpairs) and a real asyncio loop."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import ujson
from core_support import Peer, config, parse_blocks
from sse import wait_for

from hub.auth import Claims
from hub.core import Hub
from hub.decode import decode_json
from hub.disconnect import EXPIRED, GONE, LOGOUT, SHUTDOWN, Disconnect
from hub.dispatch import DEFAULT_TYPES, Kind, Route
from hub.flusher import WINDOW
from hub.history import History, event_cost, parse_id, parse_position
from hub.message import Event
from hub.refusal import Refusal, RefusalKind
from hub.registry import Registry
from hub.stream import Stream, StreamRequest
from hub.topics import Grants
from hub.transport import SocketTransport


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """sse.wait_for, failing the test at the deadline."""
    assert await wait_for(cond, timeout), "condition not met before the deadline"


def counts(peers: list[Peer], needle: bytes) -> list[int]:
    """Read every peer (all of them, each time: a slow one must not starve the rest), then
    count `needle` in what each has received."""
    for p in peers:
        p.read()
    return [p.received.count(needle) for p in peers]


async def publish(hub: Hub, body: object) -> list[str]:
    return (await hub.publish(decode_json(ujson.dumps(body).encode()))).ids


def test_registry_drops_empty_index_entries_when_the_last_stream_leaves():
    reg = Registry()
    subs = [Stream("u1", topics=("a", "b")) for _ in range(3)]
    for s in subs:
        reg.add(s)
    assert len(reg.by_user["u1"]) == 3 and len(reg.by_topic["a"]) == 3
    for s in subs:
        assert reg.remove(s)
    assert not reg.remove(subs[0])
    assert (reg.all, reg.by_user, reg.by_topic) == (set(), {}, {})


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


def test_history_resumes_only_from_an_id_it_holds_in_its_epoch():
    history = History(limit=10, limit_bytes=1 << 20, floor=(100, 0), epoch="e1")
    for n in (2, 4, 6):  # ids 100-2, 100-4, 100-6 of epoch e1
        event = make_event(n)
        event.assign_id(100, n, "e1")
        history.append(event)
    assert [e.id for e in history.since("100-2-e1") or []] == ["100-4-e1", "100-6-e1"]
    assert history.since("100-0-e1") is not None  # the floor
    assert history.since("100-3-e1") is None  # between two events: not an event it holds
    assert history.since("100-7-e1") is None  # newer than the newest
    assert history.since("100-4-e0") is None  # the same offset in another epoch
    assert history.since("100-4") is None
    history.clear((200, 0), "e2")
    assert history.past_epochs[-1] == "e1" and history.last_id == "200-0-e2"
    assert history.since("200-0-e2") == []


def test_a_node_is_behind_a_client_ahead_of_it_in_its_epoch_or_in_one_it_has_not_met():
    async def scenario() -> None:
        hub = Hub(config())
        assert not hub.behind("9999999999999-0-e1")  # the memory broker has no epochs
        hub.resync("100-5-e1")
        assert hub.behind("100-6-e1")
        assert not hub.behind("100-5-e1") and not hub.behind("99-0-e1")
        assert hub.behind("1-0-e0")  # an epoch it has not met: maybe a newer one
        assert hub.ahead("100-6-e1") and not hub.ahead("1-0-e0")  # ahead: of its own epoch
        assert not hub.behind("1-0") and not hub.behind("junk")
        hub.resync("200-0-e2")
        assert not hub.behind("100-6-e1")  # an epoch it left
        await hub.stop()

    run(scenario)


def test_history_is_bounded_by_bytes_too():
    history = History(limit=1000, limit_bytes=3000, floor=(100, 0))
    for n in range(1, 200):
        history.append(make_event(n))
    assert history.size <= 3000 and len(history) > 1
    assert sum(event_cost(e) for e in history.read(history.first_seq)) == history.size


def test_ids_from_clients_parse_strictly_or_not_at_all():
    assert parse_id("12-3") == (12, 3)
    assert parse_id(" 12-3 ") == (12, 3)
    assert parse_position("12-3-e4") == ((12, 3), "e4")
    assert parse_position("12-3") == ((12, 3), "")
    bad_ids = ["²-1", "①-1", "1-²", "١٢-3", "12-", "-3", "12-3-", "12-3-E", "12-3-4-5"]
    for bad in [*bad_ids, "12-3-" + "a" * 17, "1" * 21 + "-1", "", "a-b"]:
        assert parse_id(bad) is None, bad
    assert parse_id("1" * 30 + "-" + "2" * 30) is None  # over the length bound before parsing


def test_private_and_broadcast_events_reach_a_stream_in_id_order_in_one_write():
    async def scenario() -> None:
        hub = Hub(config(flush_interval=0.01))
        peer = Peer()
        hub.subscribe(peer.transport, "u1", topics=("payments",))
        body = []
        for n in range(30):
            body.append({"type": 5, "data": n} if n % 3 else {"type": 2, "user": "u1", "data": n})
        ids = await publish(hub, body)
        await until(lambda: len(peer.events()) == 30)
        assert [i for i, _ in peer.events()] == ids
        assert hub.flusher.writes == 1  # coalesced: one send for 30 events
        peer.shutdown()

    run(scenario)


def test_a_stream_gets_an_event_once_even_when_routed_to_it_twice():
    async def scenario() -> None:
        hub = Hub(config())
        mine, other = Peer(), Peer()
        hub.subscribe(mine.transport, "u1", topics=("payments",))
        hub.subscribe(other.transport, "u2")
        ids = await publish(hub, [{"type": 2, "user": "u1"}, {"type": 5}])
        await until(lambda: len(mine.events()) == 2 and len(other.events()) == 1)
        await until(lambda: hub.flusher.idle)
        assert [i for i, _ in mine.events()] == ids
        assert [i for i, _ in other.events()] == ids[1:]
        assert hub.flusher.delivered == 3
        mine.shutdown()
        other.shutdown()

    run(scenario)


def test_log_filters_pick_level_and_service():
    async def scenario() -> None:
        hub = Hub(config())
        errors, api = Peer(), Peer()
        filters = DEFAULT_TYPES.stream_filters
        hub.subscribe(
            errors.transport, "ops", topics=("logs",), filters=filters({"level": ["error"]})
        )
        hub.subscribe(api.transport, "ops", topics=("logs",), filters=filters({"service": ["api"]}))
        ids = await publish(
            hub,
            [
                {"type": 4, "data": {"level": "info", "service": "api"}},
                {"type": 4, "data": {"level": "error", "service": "db"}},
                {"type": 5},
                {"type": 4, "data": {"level": "critical", "service": "api"}},
            ],
        )
        await until(lambda: len(errors.events()) == 3 and len(api.events()) == 3)
        assert [i for i, _ in errors.events()] == ids[1:]
        assert [i for i, _ in api.events()] == [ids[0], ids[2], ids[3]]
        errors.shutdown()
        api.shutdown()

    run(scenario)


def route_refund(event: Event) -> Route:
    return Route(users=(event.user or "",), topics=("refunds",))


def refund_filter(query):
    wanted = query.get("currency")
    if not wanted:
        return None
    return lambda event: isinstance(event.data, dict) and event.data.get("currency") in wanted


def test_a_type_added_to_the_table_is_routed_and_filtered_with_no_other_change():
    async def scenario() -> None:
        types = DEFAULT_TYPES.with_kind(
            Kind(0x06, "refund", route_refund, refund_filter, ("currency",))
        )
        hub = Hub(config(), types=types)
        user, eur = Peer(), Peer()
        hub.subscribe(user.transport, "u1")
        hub.subscribe(
            eur.transport,
            "ops",
            topics=("refunds",),
            filters=types.stream_filters({"currency": ["EUR"]}),
        )
        ids = await publish_with(
            hub,
            types,
            [
                {"type": "refund", "user": "u1", "data": {"currency": "USD"}},
                {"type": 6, "user": "u2", "data": {"currency": "EUR"}},
            ],
        )
        await until(lambda: len(user.events()) == 1 and len(eur.events()) == 1)
        assert user.events() == [(ids[0], "refund")]
        assert eur.events() == [(ids[1], "refund")]
        assert {
            "type": 6,
            "name": "refund",
            "filters": ["currency"],
            "topics": False,
            "internal": False,
        } in types.describe()
        user.shutdown()
        eur.shutdown()

    run(scenario)


async def publish_with(hub: Hub, types, body: object) -> list[str]:
    return (await hub.publish(decode_json(ujson.dumps(body).encode(), types))).ids


def test_a_topic_event_is_queued_once_for_all_its_subscribers():
    async def scenario() -> None:
        hub = Hub(config())
        peers = [Peer() for _ in range(50)]
        for i, p in enumerate(peers):
            hub.subscribe(p.transport, f"u{i}", topics=("payments",))
        channel = hub.flusher.topics["payments"]
        ids = await publish(hub, [{"type": 2, "user": "u0", "data": 1}])
        assert len(channel.events) == 1  # once, however many read it
        await until(lambda: all(len(p.events()) == 1 for p in peers))
        await until(lambda: hub.flusher.idle)
        assert all(p.events() == [(ids[0], "payment")] for p in peers)
        hub.flusher.tick()  # channels are trimmed on the tick (and when they grow)
        assert channel.events == []  # every reader took it: nothing is kept
        for p in peers:
            p.shutdown()

    run(scenario)


def test_a_burst_larger_than_the_bound_reaches_every_reading_stream_and_cuts_none():
    """12,000 broadcasts published at once (1.3 MB of frames, more than the kernel takes or a
    write carries): streams that keep reading get all of it, in order, and nobody is cut."""

    async def scenario() -> None:
        hub = Hub(config(history=20_000))  # the default bound: 16 MiB behind
        peers = [Peer() for _ in range(3)]
        for i, p in enumerate(peers):
            hub.subscribe(p.transport, f"u{i}")
        ids = []
        for _ in range(12):
            ids += await publish(hub, [{"type": 5, "data": "x" * 40}] * 1000)

        await until(lambda: counts(peers, b"event: broadcast") == [12_000] * 3, timeout=20)
        for p in peers:
            assert [i for i, _ in p.events()] == ids
            assert not p.closed
        assert hub.metrics.disconnects.labels("slow")._value.get() == 0
        for p in peers:
            p.shutdown()

    run(scenario)


def test_a_stream_that_stops_reading_holds_one_write_at_most_is_cut_and_delays_no_one():
    async def scenario() -> None:
        hub = Hub(config(max_pending=64 * 1024, flush_interval=0.001))
        stuck = Peer(rcvbuf=4096)
        readers = [Peer() for _ in range(3)]
        stuck_sub = hub.subscribe(stuck.transport, "stuck")
        for r in readers:
            hub.subscribe(r.transport, "reader")
        payload = "x" * 1000
        total = 0
        most_held = 0
        while total < 400 and not stuck.closed:
            await publish(hub, [{"type": 5, "data": payload}] * 10)
            total += 10
            await until(lambda: hub.flusher.idle)
            most_held = max(most_held, stuck.transport.pending_size)
            for r in readers:
                r.read()
        await until(lambda: stuck.closed)
        assert stuck_sub not in hub.registry.all
        assert 0 < most_held <= WINDOW  # it never held more than one write
        await until(lambda: counts(readers, b"\nevent: broadcast\n") == [total] * 3)
        assert hub.metrics.disconnects.labels("slow")._value.get() == 1
        for p in [stuck, *readers]:
            p.shutdown()

    run(scenario)


def test_a_stream_whose_socket_takes_nothing_is_cut_after_slow_after_even_when_owing_little():
    async def scenario() -> None:
        hub = Hub(config(slow_after=0.3, heartbeat=0.05))
        stuck = Peer(rcvbuf=4096)
        sub = hub.subscribe(stuck.transport, "stuck")
        await publish(hub, [{"type": 5, "data": "x" * 2000}] * 40)  # ~90 KB: far under the bound
        await until(lambda: stuck.transport.pending_size > 0)
        started = time.monotonic()
        await until(lambda: stuck.closed, timeout=5)
        assert time.monotonic() - started >= 0.2
        assert sub not in hub.registry.all
        assert hub.metrics.disconnects.labels("slow")._value.get() == 1
        stuck.shutdown()

    run(scenario)


class Owner:
    """What a transport tells its owner, written down."""

    def __init__(self) -> None:
        self.ends: list[Disconnect] = []
        self.drains = 0

    def end(self, why: Disconnect, retry_ms: int | None = None) -> None:
        self.ends.append(why)

    def drained(self) -> None:
        self.drains += 1


def test_the_transport_sends_partially_keeps_the_rest_in_order_and_reports_draining():
    async def scenario() -> None:
        peer = Peer(rcvbuf=4096)
        owner = Owner()
        peer.transport.watch(owner)
        data = bytes(range(256)) * 4096  # 1 MiB: far more than the socket takes at once
        peer.transport.write(data)
        assert 0 < peer.transport.pending_size < len(data)
        peer.transport.write(b"tail")
        await until(lambda: peer.read() is not None and len(peer.received) == len(data) + 4)
        assert bytes(peer.received) == data + b"tail"
        await until(lambda: owner.drains)
        assert peer.transport.pending is None and peer.transport.sent == len(data) + 4
        assert owner.ends == [] and owner.drains == 1
        peer.shutdown()

    run(scenario)


def test_the_transport_reports_a_peer_that_closes_once_and_releases_the_socket():
    async def scenario() -> None:
        peer = Peer()
        owner = Owner()
        peer.transport.watch(owner)
        peer.client.close()
        await until(lambda: owner.ends)
        assert owner.ends == [GONE] and peer.transport.socket is None
        assert peer.server.fileno() == -1
        peer.transport.write(b"after")  # writing to a gone stream is a no-op, never an error
        assert owner.ends == [GONE]

    run(scenario)


def test_the_transport_closes_after_flushing_what_it_holds():
    async def scenario() -> None:
        peer = Peer(rcvbuf=4096)
        owner = Owner()
        peer.transport.watch(owner)
        data = b"y" * 200_000
        peer.transport.write(data)
        peer.transport.close(flush=True)
        assert peer.transport.socket is not None  # still sending what it holds
        await until(lambda: peer.read() is not None and peer.eof)
        assert bytes(peer.received) == data
        assert owner.ends == [GONE] and owner.drains == 0
        peer.shutdown()

    run(scenario)


def test_a_stream_registered_for_a_client_already_gone_is_removed_at_once():
    async def scenario() -> None:
        hub = Hub(config())
        peer = Peer()
        peer.client.close()
        peer.transport.close()  # the socket is shut before the hub subscribes it
        sub = hub.subscribe(peer.transport, "u1")
        assert sub.closed and len(hub.registry) == 0 and hub.flusher.everyone.readers == {}

    run(scenario)


def test_the_opening_carries_the_id_to_resume_from_so_a_cut_before_any_event_loses_nothing():
    async def scenario() -> None:
        hub = Hub(config())
        before = await publish(hub, [{"type": 5}])
        first = Peer()
        hub.subscribe(first.transport, "u1")
        await until(lambda: first.opening_id() is not None)
        start = first.opening_id()
        assert start == before[0]
        first.client.close()  # cut before its first event
        await until(lambda: first.closed)
        missed = await publish(hub, [{"type": 5}, {"type": 2, "user": "u1"}])
        again = Peer()
        hub.subscribe(again.transport, "u1", last_event_id=start)
        await until(lambda: len(again.events()) == 2)
        assert [i for i, _ in again.events()] == missed
        assert again.opening_id() == start
        again.shutdown()

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
        peer = Peer()
        hub.subscribe(peer.transport, "u1", last_event_id=ids[0])
        live = await publish(hub, [{"type": 2, "user": "u1"}])
        await until(lambda: len(peer.events()) >= 3)
        assert [i for i, _ in peer.events()] == [ids[2], ids[3], live[0]]
        peer.shutdown()

    run(scenario)


def test_slow_resumers_share_the_historys_bytes_and_hold_one_write_each():
    async def scenario() -> None:
        hub = Hub(config(history=5000))
        ids = await publish(hub, [{"type": 5, "data": "z" * 200}] * 3000)  # ~800 KB of frames
        peers = [Peer(rcvbuf=4096) for _ in range(20)]
        for p in peers:
            hub.subscribe(p.transport, "u1", last_event_id=ids[0])
        assert all(p.transport.pending_size <= WINDOW for p in peers)
        await until(lambda: counts(peers, b"\nevent: ") == [2999] * 20, timeout=30)
        assert all([i for i, _ in p.events()] == ids[1:] for p in peers)
        for p in peers:
            p.shutdown()

    run(scenario)


def test_resumes_share_a_replay_budget_a_pass_and_none_is_left_behind():
    """Clients resuming from the oldest id at once (or in a loop) get the history's bytes
    within one budget a pass, taken in turns, so that the live streams keep their passes:
    each finishes exactly, and no pass replays more than the budget (and one event)."""

    async def scenario() -> None:
        hub = Hub(config(history=5000))
        flusher = hub.flusher
        flusher.replay_budget = 16 * 1024
        ids = await publish(hub, [{"type": 5, "data": "z" * 200}] * 2000)
        frame = max(len(e.frame) for e in hub.history.events)
        per_pass: list[int] = []
        begin = flusher._begin

        def counted_begin() -> None:  # (observes each pass: the bytes written in the last)
            per_pass.append(flusher.bytes_written)
            begin()

        flusher._begin = counted_begin  # type: ignore[method-assign]
        peers = [Peer() for _ in range(8)]
        for i, p in enumerate(peers):
            hub.subscribe(p.transport, f"u{i}", last_event_id=ids[0])
        await until(lambda: counts(peers, b"\nevent: ") == [1999] * 8, timeout=30)
        assert all([i for i, _ in p.events()] == ids[1:] for p in peers)
        written = [b - a for a, b in itertools.pairwise(per_pass)]
        assert len(written) > 8 * 1999 * frame // flusher.replay_budget // 2
        assert max(written) <= flusher.replay_budget + frame
        for p in peers:
            p.shutdown()

    run(scenario)


def test_resume_from_beyond_the_history_starts_with_a_reset_event():
    async def scenario() -> None:
        hub = Hub(config(history=3))
        ids = await publish(hub, [{"type": 5, "data": n} for n in range(10)])
        for bad in (ids[2], "²-1", "①-1", "x" * 5000):
            peer = Peer()
            hub.subscribe(peer.transport, "u1", last_event_id=bad)
            await until(lambda: peer.events() != [])  # noqa: B023
            assert peer.events() == [(ids[-1], "reset")]
            peer.shutdown()
        assert len(hub.registry) == 0

    run(scenario)


def test_logout_ends_only_the_named_session_after_it_gets_the_event_and_revokes_it():
    async def scenario() -> None:
        hub = Hub(config())
        s1, s2 = Peer(), Peer()
        # s1 reads the logout twice over (its user's, and topic presence's): it gets it once
        hub.subscribe(s1.transport, "u1", sid="s1", topics=("presence",))
        hub.subscribe(s2.transport, "u1", sid="s2")
        issued = time.time() - 1
        [logout] = await publish(hub, {"type": 3, "user": "u1", "data": {"session": "s1"}})
        await until(lambda: s1.closed)
        assert s1.events() == [(logout, "logout"), ("", "end")]  # the end frame comes last
        end = parse_blocks(bytes(s1.received))[-1]
        assert ujson.loads(end["data"]) == {
            "code": 4003,
            "reason": "logout",
            "reconnect": False,
            "detail": "this session logged out",
        }
        assert not s2.closed and len(hub.registry) == 1
        assert hub.revocations.is_revoked("u1", "s1", issued)
        assert not hub.revocations.is_revoked("u1", "s2", issued)
        assert not hub.revocations.is_revoked("u1", "s1", time.time() + 2)  # issued later: works
        s1.shutdown()
        s2.shutdown()

    run(scenario)


def test_quiet_streams_get_heartbeats_and_expired_tokens_end_their_streams():
    async def scenario() -> None:
        hub = Hub(config(heartbeat=0.05))
        quiet, expiring = Peer(), Peer()
        hub.subscribe(quiet.transport, "u1")
        sub = hub.subscribe(expiring.transport, "u2", exp=time.time() + 0.1)
        await until(lambda: quiet.read() is not None and quiet.received.count(b": ping\n\n") >= 2)
        await until(lambda: expiring.closed)
        await until(lambda: expiring.read() is not None and expiring.eof)
        last = parse_blocks(bytes(expiring.received))[-1]
        assert last["event"] == "end" and "id" not in last  # says why, moves no last id
        assert ujson.loads(last["data"])["reason"] == "expired"
        assert ujson.loads(last["data"])["code"] == 4002
        assert ujson.loads(last["data"])["reconnect"] is True
        assert sub not in hub.registry.all
        assert hub.metrics.disconnects.labels(EXPIRED.reason)._value.get() == 1
        await hub.stop()
        assert quiet.closed and len(hub.registry) == 0
        quiet.shutdown()
        expiring.shutdown()

    run(scenario)


def test_nothing_of_a_stream_remains_after_it_leaves():
    async def scenario() -> None:
        hub = Hub(config())
        peers = [Peer() for _ in range(200)]
        subs = [hub.subscribe(p.transport, f"u{i % 7}", topics=("t",)) for i, p in enumerate(peers)]
        await publish(hub, [{"type": 5}, {"type": 2, "user": "u1"}])
        for s in subs:
            s.end(GONE)
        assert (hub.registry.all, hub.registry.by_user, hub.registry.by_topic) == (set(), {}, {})
        flusher = hub.flusher
        assert (flusher.topics, flusher.everyone.readers) == ({}, {})
        await until(lambda: flusher.idle)
        await publish(hub, [{"type": 5}])
        await until(lambda: flusher.idle)
        flusher.tick()
        assert flusher.everyone.events == []
        assert all(p.closed for p in peers)
        for p in peers:
            p.shutdown()

    run(scenario)


@pytest.mark.parametrize("n", [1, 3])
def test_delivered_counter_counts_one_per_stream_per_event(n: int):
    async def scenario() -> None:
        hub = Hub(config())
        peers = [Peer() for _ in range(n)]
        for p in peers:
            hub.subscribe(p.transport, "u")
        await publish(hub, [{"type": 5}] * 4)
        await until(lambda: hub.flusher.idle)
        assert hub.flusher.delivered == 4 * n
        for p in peers:
            p.shutdown()

    run(scenario)


def test_reset_on_an_empty_history_still_carries_an_id_to_resume_from():
    async def scenario() -> None:
        hub = Hub(config())
        peer = Peer()
        hub.subscribe(peer.transport, "u1", last_event_id="12-3")
        await until(lambda: peer.events() != [])
        assert peer.events() == [(f"{hub.broker.floor[0]}-0", "reset")]
        peer.shutdown()

    run(scenario)


def test_on_shutdown_every_stream_gets_what_it_is_owed_then_a_spread_out_retry():
    async def scenario() -> None:
        hub = Hub(config(retry=2.0, shutdown_spread=5.0))
        peers = [Peer() for _ in range(30)]
        for i, p in enumerate(peers):
            hub.subscribe(p.transport, f"u{i}")
        [last] = await publish(hub, [{"type": 5}])
        await hub.stop()
        retries = []
        for p in peers:
            await until(lambda p=p: p.read() is not None and p.eof)
            blocks = parse_blocks(bytes(p.received))
            # what it was owed, then the retry, then the end frame
            assert blocks[-3].get("id") == last
            retries.append(int(blocks[-2]["retry"]))
            assert blocks[-1]["event"] == "end" and "id" not in blocks[-1]
            assert ujson.loads(blocks[-1]["data"])["code"] == 4000
        assert all(2000 <= r <= 7000 for r in retries)
        assert len(set(retries)) > 10  # spread, not one second for all
        assert hub.metrics.disconnects.labels("shutdown")._value.get() == 30
        for p in peers:
            p.shutdown()

    run(scenario)


def test_a_filter_that_raises_drops_the_event_for_its_stream_and_stops_nothing_else():
    async def scenario() -> None:
        def broken(query):
            return (lambda event: 1 / 0) if query.get("boom") else None

        types = DEFAULT_TYPES.with_kind(Kind(0x06, "refund", route_refund, broken, ("boom",)))
        hub = Hub(config(), types=types)
        fragile, plain = Peer(), Peer()
        filters = types.stream_filters({"boom": ["1"]})
        hub.subscribe(fragile.transport, "ops", topics=("refunds",), filters=filters)
        hub.subscribe(plain.transport, "ops", topics=("refunds",))
        ids = await publish_with(hub, types, [{"type": 6, "user": "u1"}, {"type": 5}])
        await until(lambda: len(plain.events()) == 2 and len(fragile.events()) == 1)
        assert [i for i, _ in fragile.events()] == ids[1:]  # the broadcast still came
        assert [i for i, _ in plain.events()] == ids
        fragile.shutdown()
        plain.shutdown()

    run(scenario)


def test_a_client_that_sends_on_its_stream_is_cut_rather_than_read_for_ever():
    async def scenario() -> None:
        hub = Hub(config())
        peer = Peer()
        sub = hub.subscribe(peer.transport, "u1")
        peer.client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a few bytes: tolerated
        await publish(hub, [{"type": 5}])
        await until(lambda: len(peer.events()) == 1)
        assert not sub.closed
        for _ in range(10):  # in small pieces: counted in all, not per read
            peer.client.sendall(b"x" * 1000)
        await until(lambda: sub.closed)
        peer.shutdown()

    run(scenario)


def test_a_reset_goes_through_the_flusher_in_order_after_what_each_stream_is_owed():
    """Hub.resync queues the `reset` behind what each stream is owed and before what comes
    next, written by the passes like any broadcast (never past a socket that holds bytes)."""

    async def scenario() -> None:
        hub = Hub(config(flush_interval=0.01))
        live, resuming = Peer(), Peer()
        hub.subscribe(live.transport, "u1")
        before = await publish(hub, [{"type": 5, "data": n} for n in range(3)])
        hub.subscribe(resuming.transport, "u2", last_event_id=before[0])  # replay owed: 2
        hub.resync("9000000000000-0-e1")
        after = await publish(hub, [{"type": 5, "data": "after"}])
        await until(lambda: len(live.events()) == 5 and len(resuming.events()) == 4)
        reset = ("9000000000000-0-e1", "reset")
        assert live.events() == [
            *((i, "broadcast") for i in before),
            reset,
            (after[0], "broadcast"),
        ]
        # its replay was written when it opened: then the reset, then what came next
        assert resuming.events() == [
            *((i, "broadcast") for i in before[1:]),
            reset,
            (after[0], "broadcast"),
        ]
        for p in (live, resuming):
            p.shutdown()
        await hub.stop()

    run(scenario)


async def held_at_most_a_window(peer: Peer, done: Callable[[], bool]) -> int:
    """Watch what the hub's end of `peer` holds (the client reads nothing) until `done`,
    within a deadline: the most it held."""
    most = 0

    def sample() -> bool:
        nonlocal most
        most = max(most, peer.transport.pending_size)
        return done()

    assert await wait_for(sample, 10, interval=0.001), "the flusher never went idle"
    return most


def test_an_ending_stream_takes_what_it_is_owed_a_window_at_a_time_then_its_end_frame():
    """A stream that owes several windows when it ends is written them as it drains, never
    more than a window at once, then `retry:` and the end frame, then its socket closes;
    what is published after its end does not reach it. Ending it again does nothing."""

    async def scenario() -> None:
        hub = Hub(config(flush_interval=0.001))
        peer = Peer(rcvbuf=4096)
        stream = hub.subscribe(peer.transport, "u1")
        ids = await publish(hub, [{"type": 5, "data": "x" * 1000}] * 1000)  # ~1 MB
        await until(lambda: hub.flusher.idle and peer.transport.pending is not None)
        stream.end(SHUTDOWN, 2500)
        stream.end(EXPIRED)  # ending twice does nothing
        assert stream not in hub.registry.all and hub.flusher.everyone.readers == {}
        assert stream.private and len(stream.private) * 1000 > 2 * WINDOW  # still owed
        await publish(hub, [{"type": 5, "data": "after"}])
        most = await held_at_most_a_window(peer, lambda: hub.flusher.idle)
        assert 0 < most <= WINDOW
        await until(lambda: peer.read() is not None and peer.eof, timeout=10)
        blocks = parse_blocks(bytes(peer.received))
        assert [b.get("id") for b in blocks if b.get("event") == "broadcast"] == ids
        assert blocks[-2] == {"retry": "2500"} and blocks[-1]["event"] == "end"
        assert ujson.loads(blocks[-1]["data"])["reason"] == "shutdown"
        assert hub.metrics.disconnects.labels("shutdown")._value.get() == 1
        assert hub.metrics.disconnects.labels("expired")._value.get() == 0
        assert stream.private is None and stream.final is None
        peer.shutdown()
        await hub.stop()

    run(scenario)


def test_an_ending_stream_whose_client_takes_nothing_is_cut_after_the_grace():
    async def scenario() -> None:
        hub = Hub(config(flush_interval=0.001))
        hub.flusher.grace = 0.2
        peer = Peer(rcvbuf=4096)
        stream = hub.subscribe(peer.transport, "u1")
        await publish(hub, [{"type": 5, "data": "x" * 1000}] * 1000)
        await until(lambda: hub.flusher.idle and peer.transport.pending is not None)
        started = time.monotonic()
        stream.end(LOGOUT)
        assert hub.streams_closing() == 1  # what stop() waits for (within the grace)
        await until(lambda: peer.closed, timeout=3)
        assert 0.15 <= time.monotonic() - started < 2
        assert hub.streams_closing() == 0
        assert stream.private is None and stream.final is None
        assert b"event: end" not in peer.received + peer.read()  # it never got that far
        peer.shutdown()
        await hub.stop()

    run(scenario)


def test_a_reset_is_written_within_the_window_behind_a_backlog():
    """Hub.resync queues the reset behind what a stream owes: a stream several windows
    behind is never written more than a window at once, and gets the reset after it all."""

    async def scenario() -> None:
        hub = Hub(config(flush_interval=0.001))
        peer = Peer(rcvbuf=4096)
        hub.subscribe(peer.transport, "u1")
        ids = await publish(hub, [{"type": 5, "data": "x" * 1000}] * 1000)
        await until(lambda: hub.flusher.idle and peer.transport.pending is not None)
        hub.resync("9000000000000-0-e1")
        assert await held_at_most_a_window(peer, lambda: hub.flusher.idle) <= WINDOW
        await until(lambda: len(peer.events()) == 1001, timeout=10)
        assert peer.events() == [*((i, "broadcast") for i in ids), ("9000000000000-0-e1", "reset")]
        peer.shutdown()
        await hub.stop()

    run(scenario)


def test_open_stream_admits_waits_takes_the_transport_and_opens_or_refuses_in_core_terms():
    async def scenario() -> None:
        hub = Hub(config(catch_up_wait=0.05))
        now = time.time()
        claims = Claims("u1", now + 60, now, "s1", Grants.of(["*"]), publish=False)
        taken: list[Peer] = []

        def take() -> SocketTransport:
            taken.append(Peer())
            return taken[-1].transport

        stream = await hub.open_stream(StreamRequest(claims, ("t",), prefix=b"HEAD\n"), take)
        assert isinstance(stream, Stream) and stream in hub.registry.by_topic["t"]
        assert (stream.user, stream.sid, stream.topics) == ("u1", "s1", ("t",))
        peer = taken[0]
        await until(lambda: peer.read() is not None and b": hub stream open" in peer.received)
        assert peer.received.startswith(b"HEAD\nretry: ")

        assert await hub.open_stream(StreamRequest(claims), lambda: None) is None  # it left
        assert len(hub.registry) == 1

        hub.resync("100-5-e1")  # a node of epoch e1 that has read up to 100-5
        behind = await hub.open_stream(StreamRequest(claims, last_event_id="100-6-e1"), take)
        assert isinstance(behind, Refusal) and behind.kind is RefusalKind.BEHIND
        assert behind.message == "this node has not read up to Last-Event-ID yet: retry"
        assert behind.retry_after == 1.0 and len(taken) == 1  # its socket was never taken

        hub.stream_limit = 1
        full = await hub.open_stream(StreamRequest(claims), take)
        assert isinstance(full, Refusal) and full.kind is RefusalKind.CAPACITY
        assert len(taken) == 1
        peer.shutdown()
        await hub.stop()

    run(scenario)


def test_a_storm_of_resumes_each_owed_a_little_is_written_as_each_opens():
    """A reconnect storm's resumes are each owed the few events they missed: each gets them
    in the write that opens it, whatever the replay budget has left (counting them in it held
    10,000 reconnects back for tens of seconds, python -m bench.storm)."""

    async def scenario() -> None:
        hub = Hub(config(history=5000))
        hub.flusher.replay_budget = 1  # spent by the first byte of any pass
        ids = await publish(hub, [{"type": 5, "data": "z" * 200}] * 30)
        peers = [Peer() for _ in range(200)]
        for i, p in enumerate(peers):
            hub.subscribe(p.transport, f"u{i}", last_event_id=ids[0])
            # written at once, in the open's own write (before any pass could run)
            assert p.client.recv(1 << 20, socket.MSG_PEEK).count(b"\nevent: ") == 29
        for p in peers:
            p.shutdown()

    run(scenario)
