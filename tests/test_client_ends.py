"""hub.client.subscribe() against a real hub on loopback (conftest's hub_server) as the hub
ends its streams: it stops for good, raising Disconnected, exactly when the end frame says
`reconnect: false` (a logout), and reconnects otherwise (token expiry with a fresh token,
shutdown), losing nothing."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from sse import wait_for

from hub.client import Disconnected, StreamEvent, subscribe


async def streams(server) -> int:
    return int((await server.get_json("/healthz"))["streams"])


async def follow(url: str, token, got: list[StreamEvent]) -> None:
    async for event in subscribe(url, token, timeout=5):
        got.append(event)


@pytest.mark.gen_test(timeout=30)
async def test_a_logout_ends_subscribe_for_good_with_disconnected_after_the_logout_event(
    hub_server,
):
    server = await hub_server(retry=0.1)
    got: list[StreamEvent] = []
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return server.token("u1", sid="s1")

    task = asyncio.ensure_future(follow(server.url, token, got))
    assert await wait_for(lambda: streams(server), 10)
    [paid] = await server.publish_ok({"type": "payment", "user": "u1", "data": 1})
    [logout] = await server.publish_ok({"type": "logout", "user": "u1", "data": {"session": "s1"}})
    with pytest.raises(Disconnected) as ended:
        await asyncio.wait_for(task, 10)
    assert (ended.value.code, ended.value.reason) == (4003, "logout")
    assert [(e.id, e.name) for e in got] == [(paid, "payment"), (logout, "logout")]
    assert len(calls) == 1  # it never came back
    assert await wait_for(lambda: _zero(server), 5)


async def _zero(server) -> bool:
    return await streams(server) == 0


@pytest.mark.gen_test(timeout=30)
async def test_an_expired_token_ends_the_stream_and_subscribe_comes_back_with_a_fresh_one(
    hub_server,
):
    server = await hub_server(retry=0.1)
    tokens = [server.token("u2", exp_in=2), server.token("u2")]
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return tokens[min(len(calls), 2) - 1]

    got: list[StreamEvent] = []
    task = asyncio.ensure_future(follow(server.url, token, got))
    try:
        assert await wait_for(lambda: streams(server), 10)
        sent = await server.publish_ok({"type": "payment", "user": "u2", "data": "before"})
        assert await wait_for(lambda: len(calls) == 2, 10)  # ended with 4002: a new token
        sent += await server.publish_ok(
            [{"type": "payment", "user": "u2", "data": n} for n in "ab"]
        )
        assert await wait_for(lambda: len(got) == 3, 10)
        assert [e.id for e in got] == sent  # nothing lost, nothing twice, no `end` yielded
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.gen_test(timeout=30)
async def test_a_shutdown_ends_the_stream_and_subscribe_tries_to_come_back(hub_server):
    server = await hub_server(retry=0.1, shutdown_spread=0.1)
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return server.token("u3")

    got: list[StreamEvent] = []
    task = asyncio.ensure_future(follow(server.url, token, got))
    try:
        assert await wait_for(lambda: streams(server), 10)
        sent = await server.publish_ok({"type": "payment", "user": "u3", "data": "owed"})
        await server.hub.stop()
        assert await wait_for(lambda: len(calls) >= 2, 10)  # 4000 says reconnect: it tries
        assert [e.id for e in got] == sent  # what the stream was owed came before the end
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
