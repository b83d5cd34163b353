"""hub.client.subscribe() against a hub on a real socket (the `hub_server` fixture): the topics
it asks for reach it, a name the hub does not read is a HubError, and a hub it cannot reach is
said (WARNINGs, rate-limited) and, when asked, given up on (HubUnreachable)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import pytest
from sse import wait_for

from hub import client as hub_client
from hub.client import HubError, HubUnreachable, StreamEvent, subscribe


async def first_event(stream) -> StreamEvent:
    async for event in stream:
        return event
    raise AssertionError("the stream ended")


@pytest.mark.gen_test(timeout=15)
async def test_subscribe_with_topics_gets_another_users_event_of_that_topic(hub_server):
    """alice's own payments reach her by the user route anyway: bob's only by the topic."""
    server = await hub_server()
    stream = subscribe(server.url, server.token("alice", topics=["payments"]), topics=["payments"])
    reader = asyncio.ensure_future(first_event(stream))
    assert await wait_for(lambda: len(server.hub.registry.all) == 1, 5), "no stream opened"
    [stream_of] = server.hub.registry.all
    assert stream_of.topics == ("payments",)
    [event_id] = await server.publish_ok({"type": "payment", "user": "bob", "data": {"a": 7}})
    got = await asyncio.wait_for(reader, 5)
    assert (got.id, got.name, got.user, got.data) == (event_id, "payment", "bob", {"a": 7})
    await stream.aclose()


@pytest.mark.gen_test(timeout=15)
async def test_subscribe_sends_params_as_they_are_and_an_unknown_one_is_a_hub_error(hub_server):
    server = await hub_server()
    token = server.token("alice", topics=["logs"])
    with pytest.raises(HubError) as refused:
        await first_event(subscribe(server.url, token, topics=["logs"], params={"lvl": "x"}))
    assert refused.value.status == 400
    assert refused.value.body["unknown"] == ["lvl"]

    stream = subscribe(server.url, token, topics=["logs"], params={"level": "error"})
    reader = asyncio.ensure_future(first_event(stream))
    assert await wait_for(lambda: len(server.hub.registry.all) == 1, 5), "no stream opened"
    ids = await server.publish_ok(
        [{"type": "log", "data": {"level": "info"}}, {"type": "log", "data": {"level": "error"}}]
    )
    assert (await asyncio.wait_for(reader, 5)).id == ids[1]  # the info one was filtered out
    await stream.aclose()


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A port nothing listens on: bound (so no one else takes it), never listening, so every
    connect is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hub.client" and r.levelno == logging.WARNING
    ]


@pytest.mark.gen_test(timeout=15)
async def test_a_dead_hub_is_warned_about_and_given_up_on_after_max_attempts(dead_url, caplog):
    caplog.set_level(logging.DEBUG, logger="hub.client")
    stream = subscribe(dead_url, "t", max_attempts=4, backoff=0.01, max_backoff=0.02)
    with pytest.raises(HubUnreachable) as gave_up:
        await first_event(stream)
    assert gave_up.value.attempts == 4
    assert isinstance(gave_up.value.__cause__, ConnectionRefusedError)
    assert dead_url in str(gave_up.value) and "4 attempts" in str(gave_up.value)
    # the first failure says so at once; the next ones, seconds apart at most, at DEBUG
    [warning] = warnings_of(caplog)
    assert dead_url in warning and "1 failed attempts" in warning, warning
    debug = [r for r in caplog.records if r.name == "hub.client" and r.levelno == logging.DEBUG]
    assert len(debug) == 2  # attempts 2 and 3; the 4th raised


@pytest.mark.gen_test(timeout=15)
async def test_a_dead_hub_is_given_up_on_after_give_up_after_seconds(dead_url):
    stream = subscribe(dead_url, "t", give_up_after=0.3, backoff=0.02, max_backoff=0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(HubUnreachable) as gave_up:
        await first_event(stream)
    took = asyncio.get_running_loop().time() - started
    assert 0.3 <= took < 3.0, took
    assert gave_up.value.elapsed >= 0.3 and gave_up.value.attempts > 2


@pytest.mark.gen_test(timeout=15)
async def test_by_default_it_keeps_trying_and_warns_again_every_warn_every_seconds(
    dead_url, caplog, monkeypatch
):
    monkeypatch.setattr(hub_client, "WARN_EVERY", 0.05)  # (10 s in real life)
    caplog.set_level(logging.WARNING, logger="hub.client")
    stream = subscribe(dead_url, "t", backoff=0.01, max_backoff=0.02)
    reader = asyncio.ensure_future(first_event(stream))
    assert await wait_for(lambda: len(warnings_of(caplog)) >= 3, 10), warnings_of(caplog)
    assert not reader.done()  # still trying
    reader.cancel()
    counts = [int(w.split("): ")[1].split()[0]) for w in warnings_of(caplog)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > 3, counts


@pytest.mark.gen_test(timeout=15)
async def test_the_hub_coming_back_resets_the_count_and_is_logged(hub_server, caplog):
    """A 503 (the hub shutting down, or cut off from its broker) fails an attempt like a refused
    connect; the first attempt that opens a stream ends the run of failures."""
    caplog.set_level(logging.INFO, logger="hub.client")
    server = await hub_server()
    server.hub.stopping = True  # /events answers 503
    stream = subscribe(server.url, server.token("alice"), backoff=0.01, max_backoff=0.02)
    reader = asyncio.ensure_future(first_event(stream))
    assert await wait_for(lambda: warnings_of(caplog), 5)
    assert "hub answered 503: the hub is shutting down" in warnings_of(caplog)[0]
    server.hub.stopping = False
    assert await wait_for(lambda: len(server.hub.registry.all) == 1, 5), "never reconnected"
    back = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("stream open at" in line and "failed attempts" in line for line in back), back
    await server.marker("m")
    await asyncio.wait_for(reader, 5)
    await stream.aclose()


def test_max_attempts_below_one_is_refused_at_once():
    with pytest.raises(ValueError, match="max_attempts"):
        subscribe("http://127.0.0.1:1", "t", max_attempts=0)
