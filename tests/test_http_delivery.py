"""Routing and ordering over real sockets: who gets which event, once, in order.

Streams are read with httpx and hub.client's parser (sse_httpx): these tests check events,
not bytes. The one test of the frame's bytes reads them with the raw client (sse.SSEClient).
"""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest
from sse_httpx import open_stream

ID = re.compile(r"^\d+-\d+$")


def key(event_id: str) -> tuple[int, int]:
    assert ID.match(event_id), event_id
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def strictly_increasing(ids: list[str]) -> bool:
    keys = [key(i) for i in ids]
    return all(a < b for a, b in itertools.pairwise(keys))


@pytest.mark.gen_test(timeout=45)
async def test_thousand_payments_reach_each_session_once_in_order_and_only_payments_the_topic(
    hub_server,
):
    server = await hub_server()
    sessions = [await open_stream(server, "u1", sid=f"s{i}") for i in range(3)]
    topic = await open_stream(server, "u2", ["payments"], claim_topics=["payments", "presence"])
    bystander = await open_stream(server, "u3", sid="s1")

    payment_ids: list[str] = []
    for start in range(0, 1000, 100):
        batch = []
        for n in range(start, start + 100):
            batch.append({"type": "payment", "user": "u1", "data": {"n": n}})
            if n % 10 == 0:  # noise no stream here is entitled to
                batch.append({"type": "login", "user": "u9", "data": {"n": n}})
                batch.append({"type": "log", "data": {"n": n}})
                batch.append({"type": "payment", "user": "u9", "data": {"n": -n}})
        ids = await server.publish_ok(batch)
        assert len(ids) == len(batch)
        payment_ids.extend(
            i
            for i, e in zip(ids, batch, strict=True)
            if e["type"] == "payment" and e["user"] == "u1"
        )
    assert len(payment_ids) == 1000
    u9_payments = 100
    label = "end-of-payments"
    marker_id = await server.marker(label)

    for client in sessions:
        events = await client.events_until(server.is_marker(label), timeout=20)
        assert len(events) == 1000, len(events)
        assert [e.id for e in events] == payment_ids
        assert [e.json()["data"]["n"] for e in events] == list(range(1000))
        assert {e.event for e in events} == {"payment"}
        assert strictly_increasing([e.id for e in events] + [marker_id])
    events = await topic.events_until(server.is_marker(label), timeout=20)
    assert {(e.event, e.json()["type"]) for e in events} == {("payment", 2)}
    assert len(events) == 1000 + u9_payments
    assert [e.id for e in events if e.json()["user"] == "u1"] == payment_ids
    assert strictly_increasing([e.id for e in events])
    assert await bystander.events_until(server.is_marker(label)) == []
    for client in [*sessions, topic, bystander]:
        assert client.pending() == 0 and not client.closed


@pytest.mark.gen_test(timeout=10)
async def test_each_event_type_reaches_exactly_the_streams_its_route_names(hub_server):
    server = await hub_server()
    streams = {
        "u1": await open_stream(server, "u1", sid="s1"),
        "presence": await open_stream(server, "w1", ["presence"]),
        "payments": await open_stream(server, "w2", ["payments"]),
        "logs": await open_stream(server, "w3", ["logs"]),
        "nobody": await open_stream(server, "w4"),
    }
    published = [
        {"type": "login", "user": "u1", "data": {"n": 0}},
        {"type": "payment", "user": "u1", "data": {"n": 1}},
        {"type": "log", "data": {"n": 2}},
        {"type": "log", "user": "u1", "data": {"n": 3}},
        {"type": "broadcast", "data": {"n": 4}},
        {"type": "broadcast", "user": "u1", "data": {"n": 5}},
        {"type": "payment", "user": "u8", "data": {"n": 6}},
        {"type": "logout", "user": "u8", "data": {"n": 7}},
    ]
    ids = await server.publish_ok(published)
    label = "end-of-routing"
    await server.marker(label)

    expected = {
        "u1": [0, 1, 4, 5],
        "presence": [0, 4, 5, 7],
        "payments": [1, 4, 5, 6],
        "logs": [2, 3, 4, 5],
        "nobody": [4, 5],
    }
    for name, client in streams.items():
        events = await client.events_until(server.is_marker(label))
        got = [(e.id, e.event, e.json()["data"]["n"]) for e in events]
        want = [(ids[n], published[n]["type"], n) for n in expected[name]]
        assert got == want, name


@pytest.mark.gen_test(timeout=10)
async def test_event_for_the_streams_own_user_and_subscribed_topic_arrives_once(hub_server):
    server = await hub_server()
    client = await open_stream(server, "u1", ["payments", "presence"], sid="s1")

    ids = await server.publish_ok(
        [
            {"type": "payment", "user": "u1", "data": {"n": 1}},
            {"type": "login", "user": "u1", "data": {"n": 2}},
            {"type": "broadcast", "user": "u1", "data": {"n": 3}},
        ]
    )
    events = await server.before_marker(client, "once")

    assert [e.id for e in events] == ids


@pytest.mark.gen_test(timeout=10)
async def test_event_json_carries_type_name_user_ts_and_data_and_the_frame_names_the_event(
    hub_server,
):
    server = await hub_server()
    client = await server.stream("u1")

    (event_id,) = await server.publish_ok(
        {"type": 1, "user": "u1", "ts": 1234, "data": {"nested": {"list": [1, "two", None]}}}
    )

    event = await client.next_event()
    assert ID.match(event.id), event.id
    assert event.event == "login"
    assert event.json() == {
        "type": 1,
        "name": "login",
        "user": "u1",
        "ts": 1234,
        "data": {"nested": {"list": [1, "two", None]}},
    }
    raw = bytes(client.raw)
    frame = raw[raw.index(f"id: {event_id}\n".encode()) :]
    assert frame.startswith(f"id: {event_id}\nevent: login\ndata: ".encode()), frame
    assert frame.endswith(b"\n\n"), frame


@pytest.mark.gen_test(timeout=10)
async def test_ids_increase_across_separate_publish_requests(hub_server):
    server = await hub_server()
    ids = []
    for n in range(20):
        ids += await server.publish_ok({"type": "broadcast", "data": {"n": n}})
    assert strictly_increasing(ids)
    assert len({key(i)[0] for i in ids}) == 1  # one boot time per run


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_publishers_events_arrive_in_id_order_on_every_stream(hub_server):
    server = await hub_server()
    clients = [await open_stream(server, f"u{i}", ["payments"]) for i in range(3)]

    async def publisher(p: int) -> list[str]:
        ids = []
        for n in range(10):
            batch = [{"type": "payment", "user": f"u{p}", "data": {"p": p, "n": n}}] * 5
            ids += await server.publish_ok(batch)
        return ids

    results = await asyncio.gather(*(publisher(p) for p in range(3)))
    all_ids = sorted((i for ids in results for i in ids), key=key)
    label = "after-concurrent"
    await server.marker(label)

    for client in clients:
        events = await client.events_until(server.is_marker(label))
        assert [e.id for e in events] == all_ids
