"""Join and leave events (--join-leave) across hub processes sharing Redis: a user whose stream
on `room:1` opens on node A joins, and a watcher of `presence:room:1` on node B sees it (the
events travel through the broker as any event does), then the leave when it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import redis_support
from browser_support import SECRET
from sse import SSEClient, SSEEvent
from test_redis_processes import hubs  # noqa: F401 (the fixture)

redis_url = redis_support.redis_url


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


async def subscribe(port: int, user: str, topic: str) -> SSEClient:
    claims = {"sub": user, "exp": int(time.time()) + 600, "topics": [topic]}
    bearer = jwt.encode(claims, SECRET, algorithm="HS256")
    client = await SSEClient.connect(
        port, f"/events?topic={topic}", {"Authorization": f"Bearer {bearer}"}
    )
    assert client.status == 200, (client.status, client.body)
    assert await client.wait_until(lambda: "hub stream open" in client.comments)
    return client


def about(name: str, user: str) -> Callable[[SSEEvent], bool]:
    def check(event: SSEEvent) -> bool:
        return event.event == name and user in event.json()["data"]["users"]

    return check


def test_a_join_on_node_a_reaches_a_watcher_on_node_b_and_so_does_the_leave(redis_url, hubs):  # noqa: F811
    a = hubs(redis_url, "--join-leave", "room:*")
    b = hubs(redis_url, "--join-leave", "room:*")

    async def scenario() -> None:
        watcher = await subscribe(b.port, "dash", "presence:room:1")
        alice = await subscribe(a.port, "alice", "room:1")
        try:
            await watcher.events_until(about("join", "alice"), timeout=10)
            joined = watcher.received[-1]
            assert joined.json()["data"] == {"topic": "room:1", "users": ["alice"]}
            assert joined.id.count("-") == 2  # an id of the shared order (ms-seq-epoch)
            await alice.aclose()
            await watcher.events_until(about("leave", "alice"), timeout=10)
        finally:
            await alice.aclose()
            await watcher.aclose()

    run(scenario)
