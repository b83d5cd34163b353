"""A type added to a hub's table (one route function, one entry, an optional filter) works end
to end over HTTP: published by name and number, routed, filtered by the stream's query, listed
by GET /types, refused by name in 422s no more, and counted in /metrics."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.dispatch import DEFAULT_TYPES, EventFilter, Kind, QueryError, Route
from hub.message import Event, Rejected


def route_refund(event: Event) -> Route:
    if not event.user:
        raise Rejected("refund events need a user")
    return Route(users=(event.user,), topics=("refunds",))


def filter_refund(query: Mapping[str, Sequence[str]]) -> EventFilter | None:
    """?currency=EUR (repeatable): only refunds in those currencies."""
    wanted = set(query.get("currency") or ())
    if not wanted:
        return None
    if not all(c.isalpha() and len(c) == 3 for c in wanted):
        raise QueryError("currency must be a three-letter code")
    return lambda event: isinstance(event.data, dict) and event.data.get("currency") in wanted


WITH_REFUND = DEFAULT_TYPES.with_kind(
    Kind(0x06, "refund", route_refund, filter_refund, ("currency",))
)


def published(metrics_text: str, name: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "hub_events_published_total" and sample.labels.get("type") == name:
                return sample.value
    return 0.0


@pytest.mark.gen_test(timeout=15)
async def test_an_added_type_is_routed_filtered_listed_and_counted(hub_server):
    server = await hub_server(types=WITH_REFUND)
    owner = await server.stream("u1")
    desk = await server.stream("desk", topics=["refunds"], query={"currency": "EUR"})
    everything = await server.stream("audit", topics=["refunds"])

    ids = await server.publish_ok(
        [
            {"type": "refund", "user": "u1", "data": {"currency": "USD"}},
            {"type": 6, "user": "u2", "data": {"currency": "EUR"}},
        ]
    )

    got = await owner.events(1)
    assert [(e.id, e.event) for e in got] == [(ids[0], "refund")]
    assert json.loads(got[0].data)["name"] == "refund"
    assert [e.id for e in await desk.events(1)] == [ids[1]]
    assert [e.id for e in await everything.events(2)] == ids
    marker = await server.before_marker(desk, "end")
    assert marker == []  # the USD refund never reached the EUR desk

    types = await server.get_json("/types")
    assert {
        "type": 6,
        "name": "refund",
        "filters": ["currency"],
        "topics": False,
        "internal": False,
    } in types["types"]
    assert {
        "type": 4,
        "name": "log",
        "filters": ["level", "service"],
        "topics": False,
        "internal": False,
    } in types["types"]

    metrics = (await server.fetch("/metrics")).body.decode()
    assert published(metrics, "refund") == 2


@pytest.mark.gen_test(timeout=10)
async def test_an_added_types_filter_refuses_a_bad_query_value_with_400(hub_server):
    server = await hub_server(types=WITH_REFUND)
    refused = await server.stream("desk", topics=["refunds"], query={"currency": "euro!"})
    assert refused.status == 400
    assert refused.body["error"] == "currency must be a three-letter code"


@pytest.mark.gen_test(timeout=10)
async def test_the_default_table_knows_no_added_type(hub_server):
    server = await hub_server()
    response = await server.publish({"type": "refund", "user": "u1"})
    assert response.code == 422
    body = json.loads(response.body)
    assert "refund" not in {t["name"] for t in body["known_types"]}
    assert [t["name"] for t in (await server.get_json("/types"))["types"]] == [
        "login",
        "payment",
        "logout",
        "log",
        "broadcast",
        "join",
        "leave",
    ]
