"""Topics a publisher names (issue 19): who receives an event that names topics, per type;
the names' alphabet and bounds at publish and at subscribe; the `topics` grant with `name*`
patterns, the publisher's `publish_topics` limit, tickets carrying the grants, resume. Over
real sockets, against a real hub (the Redis broker: test_redis_topics.py)."""

from __future__ import annotations

import json

import pytest
from test_http_publish import frame
from test_http_tickets import ticket_of, with_ticket

from hub.topics import MAX_EVENT_TOPICS


def error_of(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = json.loads(response.body)
    assert isinstance(body.get("error"), str), body
    return body


def datas(events) -> list:
    return [e.json()["data"] for e in events]


@pytest.mark.gen_test(timeout=15)
async def test_a_broadcast_naming_a_topic_reaches_its_subscribers_only(hub_server):
    server = await hub_server()
    org = await server.stream("alice", ["org:42"])
    other = await server.stream("bob", ["org:43"])
    plain = await server.stream("carol")

    await server.publish_ok({"type": "broadcast", "topic": "org:42", "data": "to org 42"})
    await server.publish_ok({"type": "broadcast", "topics": ["org:43"], "data": "to org 43"})

    got = await server.before_marker(org, "end")
    assert datas(got) == ["to org 42"]
    assert got[0].json()["topics"] == ["org:42"]  # a stream on several topics can tell
    assert datas(await other.events_until(server.is_marker("end"))) == ["to org 43"]
    assert await plain.events_until(server.is_marker("end")) == []


@pytest.mark.gen_test(timeout=15)
async def test_a_payment_naming_a_topic_reaches_its_user_the_payments_topic_and_the_topic(
    hub_server,
):
    server = await hub_server()
    alice = await server.stream("alice")
    merchant = await server.stream("m7", ["merchant:7"])
    payments = await server.stream("ops", ["payments"])
    bob = await server.stream("bob")

    body = {"type": "payment", "user": "alice", "topics": ["merchant:7", "payments"], "data": 5}
    [event_id] = await server.publish_ok(body)

    await server.marker("end")
    for client in (alice, merchant, payments):
        got = await client.events_until(server.is_marker("end"))
        assert [e.id for e in got] == [event_id]  # once, though named twice for `payments`
        assert got[0].json()["topics"] == ["merchant:7", "payments"]
    assert await bob.events_until(server.is_marker("end")) == []


@pytest.mark.gen_test(timeout=15)
async def test_a_stream_on_two_named_topics_gets_an_event_for_both_once(hub_server):
    server = await hub_server()
    both = await server.stream("alice", ["org:1", "org:2"])

    ids = await server.publish_ok(
        [
            {"type": "broadcast", "topics": ["org:1", "org:2"], "data": 1},
            {"type": "broadcast", "topic": "org:2", "data": 2},
            {"type": "broadcast", "topics": ["org:3"], "data": 3},
        ]
    )

    got = await server.before_marker(both, "end")
    assert [e.id for e in got] == ids[:2]


@pytest.mark.gen_test(timeout=15)
async def test_named_topic_events_resume_with_last_event_id(hub_server):
    server = await hub_server()
    first = await server.stream("alice", ["org:42"])
    [kept] = await server.publish_ok({"type": "broadcast", "topic": "org:42", "data": "seen"})
    assert (await first.next_event()).id == kept
    first.close()

    missed = await server.publish_ok(
        [
            {"type": "broadcast", "topic": "org:42", "data": "missed"},
            {"type": "broadcast", "topic": "org:9", "data": "not hers"},
            {"type": "payment", "user": "bob", "topic": "org:42", "data": "bob's, on the topic"},
        ]
    )

    again = await server.stream("alice", ["org:42"], last_event_id=kept)
    got = await server.before_marker(again, "end")
    assert [e.id for e in got] == [missed[0], missed[2]]


@pytest.mark.parametrize(
    "event, says",
    [
        ({"type": "login", "user": "u1", "topic": "org:1"}, "login events do not take topics"),
        ({"type": "logout", "user": "u1", "topics": ["org:1"]}, "logout events do not take"),
        ({"type": "log", "topics": ["org:1"], "data": {}}, "log events do not take topics"),
        ({"type": "broadcast", "topic": "a", "topics": ["b"]}, "not both"),
        ({"type": "broadcast", "topics": []}, "non-empty list"),
        ({"type": "broadcast", "topics": "org:1"}, "non-empty list"),
        ({"type": "broadcast", "topic": ["org:1"]}, "topic: a topic name must be a string"),
        ({"type": "broadcast", "topics": ["ok", 7]}, "topics[1]: a topic name must be a string"),
        ({"type": "broadcast", "topic": "org 42"}, "letters, digits and _ - . : / @ ~"),
        ({"type": "broadcast", "topic": "org:*"}, "letters, digits"),
        ({"type": "broadcast", "topic": ""}, "must not be empty"),
        ({"type": "broadcast", "topic": "x" * 129}, "at most 128 characters"),
        (
            {"type": "broadcast", "topics": [f"t{i}" for i in range(MAX_EVENT_TOPICS + 1)]},
            f"at most {MAX_EVENT_TOPICS} topics",
        ),
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_topics_a_type_does_not_take_or_bad_names_are_a_422_saying_which(
    hub_server, event, says
):
    server = await hub_server()
    response = await server.publish([{"type": "broadcast", "data": "first"}, event])
    assert response.code == 422, response.body
    body = error_of(response)
    assert says in body["error"], body
    assert body["index"] == 1


@pytest.mark.gen_test(timeout=10)
async def test_the_binary_frame_names_topics_in_its_payload(hub_server):
    server = await hub_server()
    org = await server.stream("alice", ["org:42"])
    plain = await server.stream("bob")
    body = frame(5, 0, {"topic": "org:42", "data": "framed"}) + frame(1, 0, {"user": "u1"})
    await server.publish_ok(body, "application/octet-stream")
    got = await server.before_marker(org, "end")
    assert datas(got) == ["framed"]
    assert [e.event for e in await plain.events_until(server.is_marker("end"))] == []

    refused = await server.publish(
        frame(1, 0, {"user": "u1", "topic": "x"}), "application/octet-stream"
    )
    assert refused.code == 422 and "login events do not take topics" in error_of(refused)["error"]


@pytest.mark.gen_test(timeout=10)
async def test_a_type_published_by_the_hub_itself_is_refused_to_publishers(hub_server):
    from hub.dispatch import DEFAULT_TYPES, Kind, Route

    types = DEFAULT_TYPES.with_kind(Kind(0x30, "made-here", lambda e: Route(), internal=True))
    server = await hub_server(types=types)
    response = await server.publish({"type": "made-here"})
    assert response.code == 422
    assert "published by the hub itself" in error_of(response)["error"]
    listed = {t["name"]: t for t in (await server.get_json("/types"))["types"]}
    assert listed["made-here"]["internal"] is True
    assert listed["broadcast"]["topics"] is True and listed["login"]["topics"] is False


# -- subscribing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grant, asked, allowed",
    [
        (["org:42:*"], ["org:42:sales", "org:42:"], True),
        (["org:42:*"], ["org:42"], False),  # the pattern's start is `org:42:`
        (["org:42:*"], ["org:420:x"], False),
        (["org:*", "room:7"], ["org:1", "room:7"], True),
        (["org:*", "room:7"], ["room:70"], False),
        (["*"], ["anything:at/all", "payments"], True),
        (["payments"], ["payments", "logs"], False),
    ],
)
@pytest.mark.gen_test(timeout=10)
async def test_the_topics_grant_takes_names_and_prefix_patterns(hub_server, grant, asked, allowed):
    server = await hub_server()
    client = await server.stream("alice", asked, claim_topics=grant)
    if allowed:
        assert client.status == 200, client.raw_body
        return
    assert client.status == 403, client.raw_body
    body = json.loads(client.raw_body)
    assert "is not allowed by the token" in body["error"] and body["topic"] in asked


@pytest.mark.parametrize(
    "topic, says",
    [("org 42", "letters, digits"), ("org:*", "letters, digits"), ("é", "letters, digits")],
)
@pytest.mark.gen_test(timeout=10)
async def test_a_stream_asking_a_topic_outside_the_alphabet_is_a_400(hub_server, topic, says):
    server = await hub_server()
    client = await server.stream("alice", [topic], claim_topics=["*"])
    assert client.status == 400, client.raw_body
    body = json.loads(client.raw_body)
    assert "invalid topic name" in body["error"] and says in body["error"], body
    assert not server.hub.registry.all


@pytest.mark.parametrize(
    "claim",
    [["org:*:x"], ["a*b"], ["**"], ["org 42"], [7], "org:42", [f"t{i}" for i in range(1025)]],
)
@pytest.mark.gen_test(timeout=10)
async def test_a_token_whose_topics_claim_is_not_names_and_patterns_is_a_401(hub_server, claim):
    server = await hub_server()
    token = server.sign(server.claims("alice") | {"topics": claim})
    client = await server.stream("alice", token=token)
    assert client.status == 401, client.raw_body
    assert (
        "token claim topics must be a list of at most 1024 topic names"
        in json.loads(client.raw_body)["error"]
    )


@pytest.mark.gen_test(timeout=10)
async def test_a_ticket_carries_the_tokens_grants_patterns_included(hub_server):
    server = await hub_server()
    token = server.token("alice", topics=["org:42:*"])
    client = await with_ticket(server, await ticket_of(server, token), ["org:42:x"])
    assert client.status == 200, client.raw_body
    await server.publish_ok({"type": "broadcast", "topic": "org:42:x", "data": "via ticket"})
    assert datas(await server.before_marker(client, "end")) == ["via ticket"]

    refused = await with_ticket(server, await ticket_of(server, token), ["org:43"])
    assert refused.status == 403, refused.raw_body


# -- publishers limited to topics -----------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_a_publisher_limited_by_publish_topics_reaches_only_those_topics(hub_server):
    server = await hub_server()
    org = await server.stream("alice", ["org:42:sales"])
    limited = server.publisher_token(publish_topics=["org:42:*"])

    ok = await server.publish(
        {"type": "broadcast", "topic": "org:42:sales", "data": 1}, token=limited
    )
    assert ok.code == 202, ok.body
    assert datas(await server.before_marker(org, "end")) == [1]

    refusals = [
        ({"type": "broadcast", "topic": "org:43", "data": 2}, 'topic "org:43" is not allowed'),
        ({"type": "broadcast", "data": 3}, "would reach everyone"),
        ({"type": "payment", "user": "bob", "topic": "org:42:x"}, "a user's own streams"),
        ({"type": "log", "data": {}}, 'topic "logs" is not allowed'),
    ]
    for event, says in refusals:
        response = await server.publish(
            [{"type": "broadcast", "topic": "org:42:a"}, event], token=limited
        )
        assert response.code == 403, response.body
        body = error_of(response)
        assert says in body["error"] and "publish_topics" in body["error"], body
        assert body["index"] == 1
    # nothing of a refused batch was published
    assert await server.before_marker(org, "end2") == []

    unlimited = await server.publish({"type": "broadcast", "topic": "org:43"})
    assert unlimited.code == 202  # without the claim: any topic, as before


@pytest.mark.gen_test(timeout=10)
async def test_a_publisher_token_with_a_bad_publish_topics_claim_is_a_401(hub_server):
    server = await hub_server()
    token = server.publisher_token(publish_topics=["org:*:x"])
    response = await server.publish({"type": "broadcast", "topic": "org:1"}, token=token)
    assert response.code == 401, response.body
    assert "publish_topics" in error_of(response)["error"]
