"""Topics a publisher names, across hub processes sharing a real Redis: an event published
on one node to a named topic reaches that topic's streams on the other node, once, and not
the others; a stream resuming on the other node gets the topic events it missed. The named
topics travel in the event's route (no key per topic in Redis)."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import jwt
import redis
import redis_support
from browser_support import SECRET
from sse import SSEClient
from test_redis_processes import Streams, hubs, publish, run  # noqa: F401  (hubs: a fixture)

redis_url = redis_support.redis_url


def token(user: str, topics: list[str]) -> str:
    claims = {"sub": user, "exp": int(time.time()) + 600, "topics": topics}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def open_on(streams: Streams, hub, user: str, topics: list[str], last_id=None) -> SSEClient:
    headers = {"Authorization": f"Bearer {token(user, ['org:*'])}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    path = "/events?" + urlencode([("topic", t) for t in topics])
    client = await SSEClient.connect(hub.port, path, headers)
    streams.opened.append(client)
    assert client.status == 200, (client.status, client.body)
    assert await client.wait_until(lambda: "hub stream open" in client.comments)
    return client


def test_a_named_topic_event_crosses_nodes_once_and_resumes_there(redis_url, hubs):  # noqa: F811
    a = hubs(redis_url)
    b = hubs(redis_url)

    async def scenario() -> None:
        async with Streams() as streams:
            on_b = await open_on(streams, b, "alice", ["org:1", "org:2"])
            other_b = await open_on(streams, b, "bob", ["org:3"])
            ids = await publish(
                a,
                [
                    {"type": "broadcast", "topics": ["org:1", "org:2"], "data": 1},
                    {"type": "payment", "user": "carol", "topic": "org:2", "data": 2},
                    {"type": "broadcast", "topic": "org:9", "data": 3},
                ],
            )
            [marker] = await publish(a, [{"type": "broadcast", "data": "end"}])
            got = await on_b.events(3)
            assert [e.id for e in got] == [ids[0], ids[1], marker]
            assert got[0].json()["topics"] == ["org:1", "org:2"]
            assert [e.id for e in await other_b.events(1)] == [marker]
            last = got[0].id
            await on_b.aclose()

            missed = await publish(a, [{"type": "broadcast", "topic": "org:2", "data": 4}])
            again = await open_on(streams, b, "alice", ["org:1", "org:2"], last_id=last)
            got = await again.events(3)
            assert [e.id for e in got] == [ids[1], marker, missed[0]]

    run(scenario)
    client = redis.Redis.from_url(redis_url.url)
    try:
        keys = [k.decode() for k in client.scan_iter(f"{redis_url.prefix}*")]
        # nothing per topic in Redis but presence's own (each with a TTL: test_redis_presence)
        per_topic = [k for k in keys if "org:" in k and ":presence" not in k]
        assert not per_topic, keys
    finally:
        client.close()
