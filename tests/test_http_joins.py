"""Join and leave events (--join-leave) over HTTP, on a real hub: a subscriber of the topic's
presence topic (`presence:room:1`) sees a user's first stream on `room:1` join and their last
one leave, with ids it can resume from; nobody else sees them (the members of `room:1`
included), a token must grant the presence topic, and no publisher can send them."""

from __future__ import annotations

import pytest
from sse import SSEEvent


def about(name: str, user: str, topic: str = "room:1"):
    def check(event: SSEEvent) -> bool:
        if event.event != name:
            return False
        data = event.json()["data"]
        return bool(data["topic"] == topic and user in data["users"])

    return check


@pytest.mark.gen_test(timeout=20)
async def test_a_watcher_of_the_topic_sees_alice_join_then_leave_and_can_resume_them(hub_server):
    server = await hub_server(join_leave="room:*")
    watcher = await server.stream("dash", topics=["presence:room:1"])
    member = await server.stream("bob", topics=["room:1"])
    await watcher.events_until(about("join", "bob"))
    alice = await server.stream("alice", topics=["room:1", "lobby"])
    before = watcher.last_event_id
    assert await watcher.events_until(about("join", "alice")) == []
    joined = watcher.received[-1]
    assert joined.json() == {
        "type": 0x10,
        "name": "join",
        "user": None,
        "ts": joined.json()["ts"],
        "data": {"topic": "room:1", "users": ["alice"]},
    }
    await alice.aclose()
    assert await watcher.events_until(about("leave", "alice")) == []
    left = watcher.received[-1]
    assert left.json()["data"] == {"topic": "room:1", "users": ["alice"]}

    # they are in the history: a stream resuming from before them gets both
    again = await server.stream("dash", topics=["presence:room:1"], last_event_id=before)
    replayed = await again.events(2)
    assert [(e.id, e.event) for e in replayed] == [(joined.id, "join"), (left.id, "leave")]
    # a member of room:1 was told nothing of it
    assert await server.before_marker(member, "after") == []

    samples = await server.metrics()
    assert samples[("hub_membership_events_total", (("kind", "join"),))] == 2
    assert samples[("hub_membership_events_total", (("kind", "leave"),))] == 1
    assert samples[("hub_events_published_total", (("type", "join"),))] == 2


@pytest.mark.gen_test(timeout=20)
async def test_only_a_token_that_grants_the_presence_topic_sees_the_joins(hub_server):
    server = await hub_server(join_leave="room:*")
    refused = await server.stream("eve", topics=["presence:room:1"], claim_topics=["room:*"])
    assert refused.status == 403  # room:* grants room:1, not who is in it
    watcher = await server.stream("dash", topics=["presence:room:1"], claim_topics=["presence:*"])
    other = await server.stream("ops", topics=["presence:room:2"])
    await server.stream("alice", topics=["room:1"])
    await watcher.events_until(about("join", "alice"))
    assert await server.before_marker(other, "after-alice") == []


@pytest.mark.gen_test(timeout=10)
async def test_a_publish_of_a_join_or_a_leave_is_refused_422(hub_server):
    server = await hub_server(join_leave="*")
    for type_ in ("join", 0x10, "leave", 0x11):
        response = await server.publish(
            {"type": type_, "data": {"topic": "room:1", "users": ["mallory"]}}
        )
        assert response.code == 422, (type_, response.body)
        assert b"published by the hub itself" in response.body
