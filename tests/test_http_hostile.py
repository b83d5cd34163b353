"""Properties against a running hub (hypothesis): whatever a publisher sends, the answer is a
202 or a precise 4xx with a JSON body, never a 5xx, never an unhandled exception in the log,
never a partial batch; and what a WHATWG parser reads from a stream equals what was published."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse import wait_for

CONTENT_TYPES = ["application/json", "application/x-ndjson", "application/octet-stream", None]
HTTP = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30
) | st.sampled_from(["\n", "\r\n", "\r", "\u2028", "\x00", "data: x\n\nid: 1", '"}\n'])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | json_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_text, inner, max_size=3),
    max_leaves=8,
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from([1, 2, 3, 4, 5, 6, "payment", "nope", None, "5"])},
            optional={"user": st.none() | st.text(max_size=5) | st.integers(), "data": json_values},
        ),
        max_size=5,
    ).map(lambda events: json.dumps(events).encode()),
)


def run(io_loop, coroutine):
    return io_loop.run_sync(lambda: coroutine, timeout=20)


@pytest.fixture
def server(io_loop, hub_server):
    return io_loop.run_sync(lambda: hub_server(history=100_000))


@HTTP
@given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_any_publish_is_202_or_a_json_4xx_and_never_half_delivered(
    io_loop, server, caplog, body, content_type
):
    before = len(server.hub.history)
    with caplog.at_level(logging.ERROR):
        response = run(io_loop, server.publish(body, content_type))
    assert response.code == 202 or 400 <= response.code < 500, (response.code, response.body)
    answer = json.loads(response.body)
    if response.code == 202:
        assert len(server.hub.history) - before == len(answer["ids"])
    else:
        assert isinstance(answer["error"], str) and answer["error"]
        assert len(server.hub.history) == before  # all or nothing
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@HTTP
@given(data=st.lists(json_values, min_size=1, max_size=5))
def test_what_a_stream_reads_back_is_exactly_what_was_published(io_loop, server, data):
    async def scenario() -> None:
        client = await server.stream("u1")
        ids = await server.publish_ok([{"type": "payment", "user": "u1", "data": d} for d in data])
        got = await client.events(len(ids))
        assert [e.id for e in got] == ids
        assert [e.json()["data"] for e in got] == data
        assert {e.event for e in got} == {"payment"}
        client.close()
        assert await wait_for(lambda: "u1" not in server.hub.registry.by_user, 5)

    run(io_loop, scenario())


@pytest.mark.parametrize(
    "path",
    [
        "/static/a%00b",
        "/static/%00",
        "/%00",
        "/static/" + "a" * 3000,
        "/static/..%2f..%2fetc%2fpasswd",
        "/" + "x" * 20_000,
        "/events/%00",
        "/static/%ff",
    ],
    ids=["static-nul", "static-only-nul", "root-nul", "static-long", "dotdot", "long", "nul", "ff"],
)
def test_a_hostile_path_is_a_4xx_never_a_5xx_and_its_answer_stays_short(
    io_loop, server, caplog, path
):
    with caplog.at_level(logging.WARNING):
        response = run(io_loop, server.fetch(path))
    assert 400 <= response.code < 500, (response.code, response.body[:200])
    assert len(response.body) < 1024
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:200] for r in errors]


@pytest.mark.parametrize(
    "data",
    [{"service": {}}, {"service": ["api"]}, {"level": {"a": 1}}, {"level": ["x"] * 1000}],
    ids=["service-object", "service-list", "level-object", "level-list"],
)
def test_a_log_event_with_odd_level_or_service_values_stops_no_stream(io_loop, server, data):
    """Filters read what a publisher sent: an unhashable `service` once raised inside the
    flusher, and no stream got anything after it."""

    async def scenario() -> None:
        filtered = await server.stream("u1", topics=["logs"], query={"service": "api"})
        leveled = await server.stream("u2", topics=["logs"], query={"level": "warning"})
        plain = await server.stream("u3")
        await server.publish_ok({"type": "log", "data": data})
        ids = await server.publish_ok(
            [{"type": "log", "data": {"service": "api", "level": "error"}}, {"type": 5}]
        )
        for client in (filtered, leveled):
            assert [e.id for e in await client.events(2)] == ids
        assert [e.id for e in await plain.events(1)] == ids[1:]
        for client in (filtered, leveled, plain):
            client.close()

    run(io_loop, scenario())
