"""GET /presence on the Redis broker: hub processes (browser_support.HubProcess) sharing a
Redis prefix count each other's streams, whichever is asked; a node killed (SIGKILL) drops out
within --presence-ttl, one stopped (SIGTERM) takes its keys with it; every key written has a
TTL; keys Redis loses are written again; a Redis out of reach is a 503, and the writer carries
on once it is back. Every wait has a deadline; processes are signalled by their own PIDs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import redis
import redis_support
from browser_support import SECRET, HubProcess, http_json, wait_until
from redis_support import PrivateRedis, RedisTarget
from sse import SSEClient, http_request, wait_for

from hub.stream import Stream

redis_url = redis_support.redis_url
private_redis = redis_support.private_redis

TTL = 2.0  # --presence-ttl of these tests' nodes: a killed one is gone within it
PUBLISHER = jwt.encode(
    {"sub": "presence-tests", "exp": int(time.time()) + 3600, "publish": True},
    SECRET,
    algorithm="HS256",
)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """Start hub processes on a Redis target; each is ended at teardown and its log printed
    (pytest shows it when a test fails)."""
    started: list[HubProcess] = []

    def start(target: RedisTarget, *args: str) -> HubProcess:
        hub = HubProcess(
            tmp_path / f"hub-{len(started)}.log",
            "--broker",
            target.url,
            "--redis-prefix",
            target.prefix,
            *args,
            demo=False,
        )
        started.append(hub)
        wait_until(lambda: http_json(hub.url + "/readyz")[0] == 200, 10, "hub ready")
        return hub

    try:
        yield start
    finally:
        for n, hub in enumerate(started):
            hub.stop()
            print(f"---- hub {n} (port {hub.port}, exit {hub.proc.returncode}) ----")
            print("\n".join(hub.log().splitlines()[-40:]))


def token(user: str, sid: str | None = None, topics: tuple[str, ...] = ()) -> str:
    claims: dict[str, Any] = {"sub": user, "exp": int(time.time()) + 600, "topics": list(topics)}
    if sid is not None:
        claims["sid"] = sid
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Streams:
    """The streams a scenario opens, closed at its end whatever happened."""

    def __init__(self) -> None:
        self.opened: list[SSEClient] = []

    async def __aenter__(self) -> Streams:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.opened:
            await client.aclose()

    async def open(
        self, port: int, user: str, sid: str | None = None, topics: tuple[str, ...] = ()
    ) -> SSEClient:
        path = "/events" + ("?" + urlencode([("topic", t) for t in topics]) if topics else "")
        headers = {"Authorization": f"Bearer {token(user, sid, topics)}"}
        client = await SSEClient.connect(port, path, headers)
        self.opened.append(client)
        assert client.status == 200, (client.status, client.body)
        assert await client.wait_until(lambda: "hub stream open" in client.comments)
        return client


async def ask(port: int, params: Any) -> tuple[int, Any]:
    path = "/presence?" + urlencode(params, doseq=True)
    answer = await http_request(port, "GET", path, {"Authorization": f"Bearer {PUBLISHER}"})
    return answer.status, json.loads(answer.body)


async def presence(port: int, params: Any) -> Any:
    status, body = await ask(port, params)
    assert status == 200, (status, body)
    return body


async def shows(port: int, params: Any, expected: Callable[[Any], bool]) -> bool:
    return expected(await presence(port, params))


def presence_keys(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Every presence key under the prefix, with its TTL in ms (-1: none)."""
    keys = client.scan_iter(match=f"{prefix}:presence*", count=1000)
    return {key.decode(): int(client.pttl(key)) for key in keys}


def users_key_holding(client: redis.Redis, prefix: str, user: str) -> str:
    """The users key of the node whose share holds `user`."""
    (key,) = [
        k for k in presence_keys(client, prefix) if k.endswith(":users") and client.hexists(k, user)
    ]
    return key


def node_of(users_key: str) -> str:
    return users_key.split(":node:", 1)[1].rsplit(":users", 1)[0]


def test_nodes_count_each_others_streams_and_a_killed_node_drops_out_within_its_ttl(
    redis_url: RedisTarget, hubs: Callable[..., HubProcess]
):
    ttl = ("--presence-ttl", str(TTL))
    a, b, c = (hubs(redis_url, *ttl) for _ in range(3))
    plain = redis_url.client()

    def alice_bob(streams: int, sessions: int, bob: bool) -> Callable[[Any], bool]:
        def check(body: Any) -> bool:
            alice = body["users"]["alice"]
            return (
                alice["streams"] == streams
                and alice["sessions"] == sessions
                and body["users"]["bob"]["online"] is bob
            )

        return check

    def members(names: list[str], streams: int) -> Callable[[Any], bool]:
        return lambda body: body["members"] == names and body["streams"] == streams

    async def scenario() -> None:
        async with Streams() as streams:
            await streams.open(a.port, "alice", "s1", ("org:42",))
            await streams.open(b.port, "alice", "s1")  # the same session, on another node
            await streams.open(b.port, "alice")  # no sid: a session of its own
            await streams.open(b.port, "bob", None, ("org:42",))
            await streams.open(c.port, "carol", None, ("org:42",))
            users = {"user": ["alice", "bob"]}
            topic = {"topic": "org:42"}
            everyone = members(["alice", "bob", "carol"], 3)
            for port in (a.port, b.port, c.port):  # whichever node is asked, all count
                assert await wait_for(partial(shows, port, users, alice_bob(3, 2, True)), 5)
                assert await wait_for(partial(shows, port, topic, everyone), 5)
            page = await presence(a.port, {"topic": "org:42", "limit": 2})
            assert page["members"] == ["alice", "bob"] and page["next"] == "bob"
            assert page["users"] == 3
            since = (await presence(a.port, {"user": "alice"}))["users"]["alice"]["since"]
            assert since is not None and abs(since / 1000 - time.time()) < 30

            keys = presence_keys(plain, redis_url.prefix)
            assert keys and all(ttl > 0 for ttl in keys.values()), keys
            assert len([k for k in keys if k.endswith(":users")]) == 3

            # a clean stop (SIGTERM) deletes the node's keys before it exits
            carols = users_key_holding(plain, redis_url.prefix, "carol")
            c.stop()
            assert c.proc.returncode == 0
            left = presence_keys(plain, redis_url.prefix)
            assert not [k for k in left if node_of(carols) in k], left
            assert node_of(carols).encode() not in plain.zrange(
                f"{redis_url.prefix}:presence:nodes", 0, -1
            )
            assert await wait_for(
                lambda: shows(a.port, {"topic": "org:42"}, members(["alice", "bob"], 2)), 2
            )

            # a node killed outright drops out within the TTL, by its keys' expiry
            bobs = users_key_holding(plain, redis_url.prefix, "bob")
            os.kill(b.proc.pid, signal.SIGKILL)
            b.proc.wait(timeout=10)
            killed = time.monotonic()
            assert await wait_for(
                lambda: shows(a.port, {"user": ["alice", "bob"]}, alice_bob(1, 1, False)),
                TTL + 3,
            )
            assert time.monotonic() - killed < TTL + 1.0
            assert (await presence(a.port, {"topic": "org:42"}))["members"] == ["alice"]
            assert not plain.exists(bobs)
            keys = presence_keys(plain, redis_url.prefix)
            assert all(ttl > 0 for ttl in keys.values()), keys

    try:
        run(scenario)
    finally:
        plain.close()


async def on_redis(hub_server: Any, target: RedisTarget) -> Any:
    """An in-process hub on `target` with TTL, once it serves streams (its feed is live)."""
    server = await hub_server(broker=target.url, redis_prefix=target.prefix, presence_ttl=TTL)
    assert await wait_for(lambda: server.hub.ready, 10), "the hub never got ready"
    return server


@pytest.mark.gen_test(timeout=20)
async def test_keys_redis_loses_are_written_again_by_the_next_heartbeat(redis_url, hub_server):
    server = await on_redis(hub_server, redis_url)
    assert (await server.stream("alice", ["org:42"], sid="s1")).status == 200
    share = server.hub.presence
    plain = redis_url.client()
    topic_key = share._topic_key(share.node, "org:42")
    try:
        assert await wait_for(lambda: plain.hexists(share.users_key, "alice"), 5)
        assert plain.hget(topic_key, "alice") == b"1"
        streams, _since, anonymous, sids = json.loads(plain.hget(share.users_key, "alice"))
        assert (streams, anonymous, sids) == (1, 0, ["s1"])
        for key in presence_keys(plain, redis_url.prefix):
            plain.delete(key)  # as a Redis restart without persistence would
        assert await wait_for(
            lambda: plain.hexists(share.users_key, "alice") and plain.exists(topic_key), TTL + 2
        )
        assert plain.zscore(f"{redis_url.prefix}:presence:nodes", share.node) is not None
        assert all(ttl > 0 for ttl in presence_keys(plain, redis_url.prefix).values())
    finally:
        plain.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_redis_out_of_reach_is_a_503_and_the_writer_carries_on(
    private_redis: PrivateRedis, hub_server
):
    server = await on_redis(hub_server, private_redis.target())
    assert (await server.stream("alice")).status == 200
    publisher = {"Authorization": f"Bearer {server.publisher_token()}"}
    response = await server.fetch("/presence?user=alice", headers=publisher)
    assert response.code == 200 and json.loads(response.body)["users"]["alice"]["streams"] == 1
    share = server.hub.presence
    private_redis.kill()
    response = await server.fetch("/presence?topic=org:42", headers=publisher)
    assert response.code == 503, response.body
    assert "Redis" in json.loads(response.body)["error"] and response.headers["Retry-After"]
    # a change the writer cannot write now (in the registry itself: with Redis out of reach
    # the hub opens no stream)
    ghost = Stream("bob", "s9")
    server.hub.registry.add(ghost)
    try:
        assert await wait_for(lambda: share.failing is not None, 5)
        private_redis.start()
        plain = private_redis.client()
        try:
            assert await wait_for(lambda: plain.hexists(share.users_key, "bob"), 10)
        finally:
            plain.close()
        assert share.writer is not None and not share.writer.done()
        response = await server.fetch("/presence?user=bob", headers=publisher)
        assert response.code == 200 and json.loads(response.body)["users"]["bob"]["sessions"] == 1
    finally:
        server.hub.registry.remove(ghost)
