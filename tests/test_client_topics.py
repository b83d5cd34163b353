"""hub.client publishes to topics that publishers name (issue 19), against a real hub process:
`publish(..., topics=[...])` and `publish_many(..., topics=[...])`, blocking and asyncio, read
back by subscribe() streams on those topics and by the user's own stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from browser_support import free_port, wait_until
from test_client import PUBLISHER, _streams, collect, token, until
from test_process import healthy, start_hub  # noqa: F401  (start_hub: a fixture)

from hub.client import AsyncPublisher, HubError, Publisher, StreamEvent, subscribe


@pytest.fixture
def hub(start_hub) -> Iterator[str]:  # noqa: F811
    port = free_port()
    start_hub("--port", str(port), "--retry", "0.2", "--heartbeat", "0.3")
    wait_until(lambda: healthy(port), what="hub healthy")
    yield f"http://127.0.0.1:{port}"


def seen(events: list[StreamEvent]) -> list[tuple[str, str | None, object]]:
    return [(e.name, e.user, e.data) for e in events]


def test_a_payment_to_alice_and_a_merchant_topic_reaches_both_and_no_other_topic(hub):
    async def main() -> tuple[list[StreamEvent], ...]:
        merchant: list[StreamEvent] = []
        other: list[StreamEvent] = []
        alice: list[StreamEvent] = []
        dashboard = token("dashboard", topics=["merchant:*"])
        readers = [
            asyncio.create_task(collect(subscribe(hub, dashboard, ["merchant:7"]), merchant, 2)),
            asyncio.create_task(collect(subscribe(hub, dashboard, ["merchant:8"]), other, 1)),
            asyncio.create_task(collect(subscribe(hub, token("alice")), alice, 1)),
        ]
        await until(lambda: _streams(hub) == 3)
        with Publisher(hub, PUBLISHER) as publisher:
            paid = publisher.publish(
                "payment", user="alice", data={"amount": 7}, topics=["merchant:7"]
            )
        async with AsyncPublisher(hub, PUBLISHER) as publisher:
            # After the payment: merchant:8's first event is this one if it did not get the
            # payment; merchant:7 gets it as its second.
            await publisher.publish(
                "broadcast", data="sentinel", topics=["merchant:7", "merchant:8"]
            )
        await asyncio.wait_for(asyncio.gather(*readers), 10)
        assert alice[0].id == merchant[0].id == paid
        return merchant, other, alice

    merchant, other, alice = asyncio.run(main())
    assert seen(alice) == [("payment", "alice", {"amount": 7})]
    assert seen(merchant) == [("payment", "alice", {"amount": 7}), ("broadcast", None, "sentinel")]
    assert seen(other) == [("broadcast", None, "sentinel")]


def test_publish_many_names_its_topics_for_each_event_that_names_none(hub):
    async def main() -> tuple[list[StreamEvent], list[StreamEvent], list[str]]:
        org42: list[StreamEvent] = []
        org43: list[StreamEvent] = []
        member = token("member", topics=["org:*"])
        readers = [
            asyncio.create_task(collect(subscribe(hub, member, ["org:42"]), org42, 2)),
            asyncio.create_task(collect(subscribe(hub, member, ["org:43"]), org43, 1)),
        ]
        await until(lambda: _streams(hub) == 2)
        async with AsyncPublisher(hub, PUBLISHER) as publisher:
            ids = await publisher.publish_many(
                [
                    {"type": "broadcast", "data": "a"},
                    {"type": "broadcast", "data": "b", "topics": ["org:43"]},
                    {"type": "broadcast", "data": "c"},
                ],
                topics=["org:42"],
            )
        await asyncio.wait_for(asyncio.gather(*readers), 10)
        return org42, org43, ids

    org42, org43, ids = asyncio.run(main())
    assert [(e.id, e.data) for e in org42] == [(ids[0], "a"), (ids[2], "c")]
    assert [(e.id, e.data) for e in org43] == [(ids[1], "b")]


def test_topics_on_a_type_that_takes_none_is_the_hubs_422_and_a_bare_name_is_refused(hub):
    with Publisher(hub, PUBLISHER) as publisher:
        with pytest.raises(HubError) as refused:
            publisher.publish("login", user="alice", data={}, topics=["org:42"])
        assert refused.value.status == 422
        with pytest.raises(HubError) as bad:
            publisher.publish("broadcast", data="x", topics=["org 42"])
        assert bad.value.status in (400, 422) and "topic" in bad.value.body["error"]
        # A str is a sequence of its characters: refused before anything is sent.
        with pytest.raises(TypeError, match="not a str"):
            publisher.publish("broadcast", data="x", topics="org:42")
        with pytest.raises(TypeError, match="not a str"):
            publisher.publish_many([{"type": "broadcast"}], topics="org:42")
