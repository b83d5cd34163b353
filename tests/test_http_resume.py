"""Resume over real sockets: Last-Event-ID (header or ?lastEventId=) replays exactly what the
stream missed and is entitled to, in order, then live events; an id the history cannot
answer for gets a `reset` event first."""

from __future__ import annotations

import time

import pytest
from sse import wait_for


def payments(user: str, ns) -> list[dict]:
    return [{"type": "payment", "user": user, "data": {"n": n}} for n in ns]


async def missed_while_away(server, sub: str = "u1", topics=("logs",), count: int = 5):
    """A stream of `sub` sees `count` events then leaves; more are published, some for it and
    some not. Returns (last id it saw, ids it is entitled to that it missed, in order)."""
    client = await server.stream(sub, list(topics), sid="s1")
    seen_ids = await server.publish_ok(payments(sub, range(count)))
    seen = await client.events(count)
    assert [e.id for e in seen] == seen_ids
    client.close()
    assert await wait_for(lambda: sub not in server.hub.registry.by_user, 5)
    batch = [
        {"type": "payment", "user": sub, "data": {"n": 100}},
        {"type": "payment", "user": "other", "data": {"n": 101}},
        {"type": "log", "data": {"n": 102}},
        {"type": "login", "user": "other", "data": {"n": 103}},
        {"type": "broadcast", "data": {"n": 104}},
        {"type": "login", "user": sub, "data": {"n": 105}},
    ]
    ids = await server.publish_ok(batch)
    entitled = [ids[i] for i in (0, 2, 4, 5)]
    return seen_ids[-1], entitled


@pytest.mark.parametrize("how", ["header", "query"])
@pytest.mark.gen_test(timeout=10)
async def test_resume_inside_history_replays_exactly_the_missed_entitled_events_then_live(
    hub_server, how
):
    server = await hub_server()
    last_id, missed = await missed_while_away(server)

    if how == "header":
        client = await server.stream("u1", ["logs"], sid="s1", last_event_id=last_id)
    else:
        client = await server.stream("u1", ["logs"], sid="s1", query={"lastEventId": last_id})
    assert client.status == 200, client.raw_body
    (live_id,) = await server.publish_ok(payments("u1", [200]))

    events = await client.events(len(missed) + 1)
    assert [e.id for e in events] == [*missed, live_id]
    assert [e.json()["data"]["n"] for e in events] == [100, 102, 104, 105, 200]
    assert "reset" not in {e.event for e in events}
    assert await server.before_marker(client, "end") == []


@pytest.mark.gen_test(timeout=10)
async def test_resume_from_the_newest_id_replays_nothing_and_gets_live_events(hub_server):
    server = await hub_server()
    first = await server.stream("u1")
    ids = await server.publish_ok(payments("u1", range(3)))
    await first.events(3)

    client = await server.stream("u1", last_event_id=ids[-1])
    (live_id,) = await server.publish_ok(payments("u1", [9]))

    event = await client.next_event()
    assert (event.id, event.event) == (live_id, "payment")


@pytest.mark.gen_test(timeout=10)
async def test_resume_from_an_id_older_than_the_history_gets_reset_first_then_live(hub_server):
    server = await hub_server(history=5)
    client = await server.stream("u1")
    ids = await server.publish_ok(payments("u1", range(20)))
    await client.events(20)
    client.close()

    resumed = await server.stream("u1", last_event_id=ids[0])
    (live_id,) = await server.publish_ok(payments("u1", [20]))

    first = await resumed.next_event()
    assert first.event == "reset", first
    second = await resumed.next_event()
    assert (second.id, second.event) == (live_id, "payment")
    assert second.json()["data"] == {"n": 20}


@pytest.mark.gen_test(timeout=10)
async def test_resume_from_the_oldest_id_still_reachable_replays_without_reset(hub_server):
    """history=5 and 20 published: ids[15..19] are held, so ids[14] is where the history
    begins and a client that saw it missed nothing the hub forgot."""
    server = await hub_server(history=5)
    ids = await server.publish_ok(payments("u1", range(20)))

    client = await server.stream("u1", last_event_id=ids[14])
    events = await client.events(5)

    assert [e.id for e in events] == ids[15:]
    assert await server.before_marker(client, "end") == []


@pytest.mark.parametrize(
    "last_id",
    ["garbage", "12-x", "-", "1-2-3", "", "\u00e9-1", "\u00b2-1", "\u2460-1", "1" * 60 + "-1"],
    ids=[
        "word",
        "non-digit-seq",
        "dash",
        "three-parts",
        "empty",
        "non-ascii",
        "superscript-digit",
        "circled-digit",
        "too-long",
    ],
)
@pytest.mark.parametrize("how", ["header", "query"])
@pytest.mark.gen_test(timeout=10)
async def test_resume_with_unparseable_id_gets_reset_first_then_live(hub_server, last_id, how):
    server = await hub_server()
    await server.publish_ok(payments("u1", range(3)))

    if how == "header":
        headers = {"Last-Event-ID": last_id.encode("utf-8").decode("latin-1")}
        client = await server.stream("u1", headers=headers)
    else:
        client = await server.stream("u1", query={"lastEventId": last_id})
    assert client.status == 200, client.raw_body
    (live_id,) = await server.publish_ok(payments("u1", [3]))

    if last_id == "":
        # An empty Last-Event-ID is what a browser sends when it never saw an id: no resume.
        event = await client.next_event()
        assert (event.id, event.event) == (live_id, "payment")
        return
    first = await client.next_event()
    assert first.event == "reset", first
    second = await client.next_event()
    assert (second.id, second.event) == (live_id, "payment")


@pytest.mark.gen_test(timeout=10)
async def test_resume_with_an_id_from_an_earlier_run_gets_reset(hub_server):
    earlier = await hub_server()
    (old_id,) = await earlier.publish_ok(payments("u1", [0]))
    server = await hub_server()
    await server.publish_ok(payments("u1", range(3)))
    ancient = "1000-1"

    for last_id in (old_id, ancient):
        client = await server.stream("u1", last_event_id=last_id)
        first = await client.next_event()
        assert first.event == "reset", (last_id, first)
        assert await server.before_marker(client, f"after-{last_id}") == []


@pytest.mark.gen_test(timeout=10)
async def test_resume_with_an_id_from_the_future_gets_reset(hub_server):
    server = await hub_server()
    ids = await server.publish_ok(payments("u1", range(3)))
    boot = int(ids[0].split("-")[0])
    future = f"{max(boot, int(time.time() * 1000)) + 10**9}-1"

    client = await server.stream("u1", last_event_id=future)

    first = await client.next_event()
    assert first.event == "reset", first


@pytest.mark.gen_test(timeout=10)
async def test_reset_event_carries_an_id_from_which_a_reconnect_resumes_cleanly(hub_server):
    server = await hub_server(history=5)
    ids = await server.publish_ok(payments("u1", range(10)))
    client = await server.stream("u1", last_event_id=ids[0])
    reset = await client.next_event()
    assert reset.event == "reset"
    client.close()
    (later,) = await server.publish_ok(payments("u1", [10]))

    again = await server.stream("u1", last_event_id=reset.id)
    event = await again.next_event()

    assert reset.id, "the reset event has no id, so the browser would resend the old one"
    assert (event.id, event.event) == (later, "payment")


@pytest.mark.gen_test(timeout=20)
async def test_ids_with_unicode_digits_leave_no_stream_behind_when_their_clients_leave(hub_server):
    """`²-1` passed str.isdigit() and then failed int() after the 200 head: the stream stayed
    registered after its client left. Every such request gets a reset and leaves nothing."""
    server = await hub_server()
    clients = []
    for n in range(40):
        bad = ["\u00b2-1", "\u2460-1", "1-\u00b3", "\u0661\u0662-3"][n % 4]
        if n % 2:
            client = await server.stream(f"u{n}", query={"lastEventId": bad})
        else:
            client = await server.stream(
                f"u{n}", headers={"Last-Event-ID": bad.encode().decode("latin-1")}
            )
        assert client.status == 200
        assert (await client.next_event()).event == "reset"
        clients.append(client)
    assert len(server.hub.registry) == 40
    for client in clients:
        client.close()
    assert await wait_for(lambda: len(server.hub.registry) == 0, 5)
    health = await server.get_json("/healthz")
    assert health["streams"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_a_client_cut_before_its_first_event_resumes_from_the_openings_id(hub_server):
    """The opening block carries `id:` (no data: no event fires, but EventSource keeps the
    id), so a client cut before any event still reconnects with a Last-Event-ID."""
    server = await hub_server()
    (before,) = await server.publish_ok(payments("u1", [0]))
    client = await server.stream("u1")
    assert client.last_event_id == before  # from the opening block alone
    assert client.pending() == 0  # and no event fired
    client.close()
    assert await wait_for(lambda: len(server.hub.registry) == 0, 5)
    missed = await server.publish_ok([*payments("u1", [1, 2]), {"type": "broadcast"}])
    again = await server.stream("u1", last_event_id=client.last_event_id)
    assert [e.id for e in await again.events(3)] == missed
