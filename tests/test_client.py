"""hub.client against a real hub process: the blocking and the asyncio publisher, and
subscribe(), through a proxy that cuts connections and loses answers the way a network does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
from browser_support import free_port, wait_until
from net_support import proxy
from sse import wait_for
from test_process import SECRET, healthy, start_hub  # noqa: F401  (start_hub: a fixture)

from hub.client import AsyncPublisher, HubError, Publisher, StreamEvent, subscribe


def token(sub: str, ttl: float = 600, **claims: Any) -> str:
    now = time.time()
    return jwt.encode(
        {"sub": sub, "iat": int(now), "exp": int(now + ttl), **claims}, SECRET, algorithm="HS256"
    )


PUBLISHER = token("billing", ttl=3600, publish=True)  # made at collection: long-lived


@pytest.fixture
def hub(start_hub) -> Iterator[str]:  # noqa: F811
    port = free_port()
    start_hub("--port", str(port), "--retry", "0.2", "--heartbeat", "0.3")
    wait_until(lambda: healthy(port), what="hub healthy")
    yield f"http://127.0.0.1:{port}"


async def collect(stream: AsyncIterator[StreamEvent], out: list[StreamEvent], n: int) -> None:
    async for event in stream:
        out.append(event)
        if len(out) >= n:
            return


async def until(cond: Any, timeout: float = 10.0) -> None:
    assert await wait_for(cond, timeout), "condition not met before the deadline"


def test_publish_by_name_and_number_and_subscribe_gets_parsed_events_and_no_opening(hub):
    async def main() -> tuple[list[str], list[StreamEvent]]:
        got: list[StreamEvent] = []
        reader = asyncio.create_task(collect(subscribe(hub, token("alice")), got, 2))
        await until(lambda: _streams(hub) == 1)
        with Publisher(hub, PUBLISHER) as publisher:
            first = publisher.publish("payment", user="alice", data={"amount": 42})
            publisher.publish_many([{"type": 2, "user": "bob"}])  # not alice's
        async with AsyncPublisher(hub, PUBLISHER) as publisher:
            last = await publisher.publish(2, user="alice", data="by number")
        await asyncio.wait_for(reader, 10)
        return [first, last], got

    sent, got = asyncio.run(main())
    assert [e.id for e in got] == sent  # the opening (id and retry, no data) yields nothing
    assert [(e.name, e.type, e.user, e.data) for e in got] == [
        ("payment", 2, "alice", {"amount": 42}),
        ("payment", 2, "alice", "by number"),
    ]
    assert all(isinstance(e.ts, int) and e.ts > 0 for e in got)


def _streams(hub: str) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(hub + "/healthz", timeout=5) as resp:
        return int(json.loads(resp.read())["streams"])


def test_the_hubs_refusal_is_a_typed_error_with_status_and_body_and_is_not_retried(hub):
    subscriber = token("alice")  # may not publish
    with Publisher(hub, subscriber) as publisher, pytest.raises(HubError) as refused:
        publisher.publish("payment", user="alice")
    assert refused.value.status == 403 and "publish" in refused.value.body["error"]
    with Publisher(hub, PUBLISHER) as publisher, pytest.raises(HubError) as unknown:
        publisher.publish("no-such-type")
    assert unknown.value.status == 422 and "known_types" in unknown.value.body

    async def async_refusal() -> HubError:
        async with AsyncPublisher(hub, "not-a-token") as publisher:
            with pytest.raises(HubError) as caught:
                await publisher.publish("payment", user="alice")
            return caught.value

    assert asyncio.run(async_refusal()).status == 401


def test_a_publish_whose_answer_is_lost_is_retried_and_delivered_once(hub):
    port = int(hub.rsplit(":", 1)[1])

    async def main() -> tuple[list[str], list[StreamEvent], int]:
        got: list[StreamEvent] = []
        reader = asyncio.create_task(collect(subscribe(hub, token("alice")), got, 2))
        await until(lambda: _streams(hub) == 1)
        with proxy(port) as net:
            net.lose_answers = 1  # the hub stores the first attempt; its 202 never arrives
            with Publisher(net.url, PUBLISHER, backoff=0.01) as publisher:
                ids = await asyncio.to_thread(
                    publisher.publish_many,
                    [{"type": 2, "user": "alice", "data": 1}, {"type": 2, "user": "alice"}],
                )
            lost = net.answers_lost
        with Publisher(hub, PUBLISHER) as publisher:
            sentinel = publisher.publish(2, user="alice", data="sentinel")
        await asyncio.wait_for(reader, 10)
        async for event in subscribe(hub, token("alice"), last_event_id=ids[-1]):
            got.append(event)  # what follows the batch: only the sentinel, no second copy
            break
        assert got[-1].id == sentinel
        return ids, got, lost

    ids, got, lost = asyncio.run(main())
    assert lost == 1
    assert [e.id for e in got[:2]] == ids


def test_the_async_publisher_retries_a_lost_answer_under_the_same_key_too(hub):
    port = int(hub.rsplit(":", 1)[1])

    async def main() -> tuple[list[str], list[StreamEvent], int]:
        got: list[StreamEvent] = []
        reader = asyncio.create_task(collect(subscribe(hub, token("bob")), got, 2))
        await until(lambda: _streams(hub) == 1)
        with proxy(port) as net:
            net.lose_answers = 1
            async with AsyncPublisher(net.url, PUBLISHER, backoff=0.01) as publisher:
                ids = await publisher.publish_many([{"type": 5, "data": "once"}])
            lost = net.answers_lost
        async with AsyncPublisher(hub, PUBLISHER) as publisher:
            await publisher.publish(5, data="end")
        await asyncio.wait_for(reader, 10)
        return ids, got, lost

    ids, got, lost = asyncio.run(main())
    assert lost == 1
    assert [e.data for e in got] == ["once", "end"]  # a second copy would come before "end"
    assert got[0].id == ids[0]


def test_subscribe_reconnects_with_last_event_id_after_a_cut_and_loses_nothing(hub):
    port = int(hub.rsplit(":", 1)[1])

    async def main() -> tuple[list[str], list[str], int]:
        with proxy(port) as net:
            got: list[StreamEvent] = []
            reader = asyncio.create_task(collect(subscribe(net.url, token("carol")), got, 6))
            await until(lambda: _streams(hub) == 1)
            sent = []
            with Publisher(hub, PUBLISHER) as publisher:
                for n in range(6):
                    sent.append(publisher.publish(2, user="carol", data=n))
                    if n == 2:
                        await until(lambda: len(got) == 3)
                        net.cut()  # the next three are published while the client is away
            await asyncio.wait_for(reader, 15)
            return sent, [e.id for e in got], net.accepted

    sent, received, connections = asyncio.run(main())
    assert received == sent
    assert connections >= 2


def test_subscribe_surfaces_reset_when_the_history_cannot_reach_back(hub):
    async def main() -> StreamEvent:
        async for event in subscribe(hub, token("dave"), last_event_id="1-0"):
            return event
        raise AssertionError("the stream ended")

    event = asyncio.run(main())
    assert event.name == "reset" and "refetch" in event.data["reason"]


def test_subscribe_takes_a_fresh_token_after_expiry_and_misses_nothing(hub):
    tokens = [token("erin", ttl=2), token("erin")]
    calls = []

    def next_token() -> str:
        calls.append(1)
        return tokens[min(len(calls), 2) - 1]

    async def main() -> tuple[list[str], list[str]]:
        got: list[StreamEvent] = []
        reader = asyncio.create_task(collect(subscribe(hub, next_token), got, 4))
        await until(lambda: _streams(hub) == 1)
        sent = []
        with Publisher(hub, PUBLISHER) as publisher:
            sent.append(publisher.publish(2, user="erin", data="before"))
            await until(lambda: len(calls) == 2)  # the stream ended with the first token
            sent += publisher.publish_many([{"type": 2, "user": "erin", "data": n} for n in "abc"])
        await asyncio.wait_for(reader, 15)
        return sent, [e.id for e in got]

    sent, received = asyncio.run(main())
    assert received == sent
