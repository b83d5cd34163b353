"""GET /events reads a known set of query parameters and refuses any other name with a 400
that lists them: `?topics=payments` (for `topic=`) used to open a stream that silently lacked
the topic. Over real sockets; the name check itself is held to its rules by hypothesis."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http_types import WITH_REFUND

from handlers.stream import STREAM_PARAMS
from hub.query import MAX_NAME_SHOWN, MAX_UNKNOWN_SHOWN, QueryError, check_names

ALLOWED = ["_", "lastEventId", "level", "service", "ticket", "token", "topic"]


def error_body(client) -> dict:
    body = json.loads(client.raw_body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return body


@pytest.mark.gen_test(timeout=10)
async def test_a_misspelt_topic_parameter_is_a_400_naming_it_and_every_allowed_name(hub_server):
    server = await hub_server()
    token = server.token("alice", topics=["payments"])
    client = await server.stream(token=token, query={"topics": "payments"})
    assert client.status == 400, client.raw_body
    assert client.headers["content-type"].startswith("application/json")
    body = error_body(client)
    assert body["unknown"] == ["topics"]
    assert body["allowed"] == ALLOWED
    assert '"topics"' in body["error"] and "topic" in body["error"]
    assert not server.hub.registry.all
    samples = await server.metrics()
    assert samples[("hub_streams_refused_total", (("status", "400"),))] == 1


@pytest.mark.gen_test(timeout=10)
async def test_every_name_the_stream_reads_is_accepted_and_the_stream_gets_its_topic(hub_server):
    server = await hub_server()
    token = server.token("alice", topics=["payments", "logs"])
    last = await server.marker("before")
    client = await server.stream(
        topics=["payments", "logs"],
        token=token,
        transport="query",
        query=[
            ("lastEventId", last),
            ("level", "warning"),
            ("service", "api"),
            ("_", str(int(time.time() * 1000))),  # a cache-buster: read and ignored
        ],
    )
    assert client.status == 200, client.raw_body
    [event_id] = await server.publish_ok({"type": "payment", "user": "bob", "data": 7})
    got = await client.next_event()
    assert (got.id, got.event) == (event_id, "payment")


@pytest.mark.gen_test(timeout=10)
async def test_an_added_types_filter_parameter_is_allowed_and_listed(hub_server):
    server = await hub_server(types=WITH_REFUND)
    ok = await server.stream("desk", topics=["refunds"], query={"currency": "EUR"})
    assert ok.status == 200, ok.raw_body
    refused = await server.stream("desk", query={"curency": "EUR"})
    assert refused.status == 400
    assert "currency" in error_body(refused)["allowed"]


@pytest.mark.gen_test(timeout=10)
async def test_a_query_of_a_thousand_unknown_names_is_refused_at_once_in_a_short_answer(
    hub_server,
):
    server = await hub_server()
    # (Tornado parses at most 1,000 arguments: past that, its own empty 400)
    names = [("L" * 200 + str(i), "1") for i in range(5)] + [(f"n{i}", "") for i in range(995)]
    started = time.perf_counter()
    client = await server.stream(query=names, timeout=10)
    took = time.perf_counter() - started
    assert client.status == 400
    body = error_body(client)
    assert len(body["unknown"]) == MAX_UNKNOWN_SHOWN
    assert all(len(name) <= MAX_NAME_SHOWN for name in body["unknown"])
    assert f"and {1000 - MAX_UNKNOWN_SHOWN} more" in body["error"]
    assert len(client.raw_body) < 1024
    assert took < 2.0, took


@pytest.mark.gen_test(timeout=10)
async def test_an_unknown_name_beside_a_ticket_is_refused_before_the_ticket_is_spent(hub_server):
    server = await hub_server()
    issued = await server.fetch(
        "/tickets", "POST", b"", {"Authorization": f"Bearer {server.token('alice')}"}
    )
    ticket = json.loads(issued.body)["ticket"]
    query = [("ticket", ticket)]
    refused = await server.stream(token="unused", transport="none", query=[*query, ("x", "1")])
    assert refused.status == 400
    stream = await server.stream(token="unused", transport="none", query=query)
    assert stream.status == 200, stream.raw_body


def test_the_stream_reads_exactly_the_names_it_allows():
    """Every name handlers/stream.py reads (and hub.js sends) is allowed; the table's filter
    parameters come on top (the test above)."""
    assert set(STREAM_PARAMS) == {"token", "ticket", "topic", "lastEventId", "_"}


names = st.text(max_size=80) | st.sampled_from(ALLOWED)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(names, max_size=40), st.lists(st.text(min_size=1, max_size=12), max_size=8))
def test_check_names_refuses_exactly_the_unknown_names_and_shows_a_bounded_few(query, allowed):
    unknown = [name for name in query if name not in allowed]
    try:
        check_names(query, allowed)
    except QueryError as exc:
        assert unknown
        assert exc.extra["allowed"] == sorted(allowed)
        shown = exc.extra["unknown"]
        assert isinstance(shown, list)
        assert shown == [name[:MAX_NAME_SHOWN] for name in unknown[:MAX_UNKNOWN_SHOWN]]
        if len(unknown) > MAX_UNKNOWN_SHOWN:
            assert f"and {len(unknown) - MAX_UNKNOWN_SHOWN} more" in exc.message
        budget = 200 + MAX_UNKNOWN_SHOWN * (MAX_NAME_SHOWN + 4) + sum(len(a) + 2 for a in allowed)
        assert len(exc.message) <= budget
    else:
        assert not unknown
