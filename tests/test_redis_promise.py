"""Issue 15: the promise on Redis under faults. An event answered 202 reaches each entitled
stream once, in order, or the stream is told `reset`; a "not published" is never published;
the feed survives what it reads; Redis settings that break the promise are refused.

Real hub cores (hub.core.Hub) on a real Redis: the shared server under a prefix of the test's
own, or a private `redis-server` that a test flushes, restarts, rolls back, stops or
reconfigures. Streams are socketpairs under the hub's own transport (core_support.Peer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis_support
import ujson
from browser_support import HUB, SECRET, HubProcess
from core_support import Peer, config
from redis_support import PrivateRedis, RedisTarget
from sse import http_request, wait_for
from test_redis_broker import stop_following
from test_redis_processes import PUBLISHER, Streams, hubs, ids_of, post, readyz
from test_redis_processes import publish as http_publish

from bench.faults_clients import Blackhole
from hub.broker import BrokerUnavailable, Idempotency, OutcomeUnknown
from hub.client import Publisher
from hub.core import Hub
from hub.decode import decode_json
from hub.redis_broker import LIVE_FOR, RedisBroker

redis_url = redis_support.redis_url
private_redis = redis_support.private_redis
__all__ = ["hubs"]  # a fixture, taken by name


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    assert await wait_for(cond, timeout), f"not met before the deadline: {what}"


async def started(target: RedisTarget, **overrides: Any) -> Hub:
    hub = Hub(config(broker=target.url, redis_prefix=target.prefix, **overrides))
    await until(lambda: hub.ready, 10, "hub ready")
    return hub


@contextlib.asynccontextmanager
async def watched(target: RedisTarget) -> AsyncIterator[tuple[Hub, Peer]]:
    """A hub that is ready, and a stream of user u1 on it; both ended afterwards."""
    hub = await started(target)
    live = Peer()
    try:
        hub.subscribe(live.transport, "u1")
        yield hub, live
    finally:
        live.shutdown()
        await hub.stop()


def broker(hub: Hub) -> RedisBroker:
    assert isinstance(hub.broker, RedisBroker)
    return hub.broker


async def publish(hub: Hub, *tags: object, idempotency: Idempotency | None = None) -> list[str]:
    body = ujson.dumps([{"type": 5, "data": tag} for tag in tags]).encode()
    return (await hub.publish(decode_json(body), idempotency)).ids


async def publish_when_ready(hub: Hub, *tags: object) -> list[str]:
    """Publish once the hub takes publishes again (after Redis came back), as a client does:
    retried under one Idempotency-Key until it is answered, within a deadline."""
    key = Idempotency(f"retried-{time.monotonic_ns()}", "body", 60.0)
    deadline = time.monotonic() + 15
    while True:
        await until(lambda: hub.ready, 15, "hub ready again")
        try:
            return await publish(hub, *tags, idempotency=key)
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise


def names(peer: Peer) -> list[str]:
    return [name for _, name in peer.events()]


async def resumed(hub: Hub, last_event_id: str) -> Peer:
    """A client that resumes on `hub` with `last_event_id`, once its opening arrived."""
    peer = Peer()
    hub.subscribe(peer.transport, "u1", last_event_id=last_event_id)
    await until(lambda: peer.opening_id() is not None, 5, "the opening")
    return peer


def data_of(peer: Peer) -> list[object]:
    """The `data` of each broadcast the peer took."""
    from core_support import parse_blocks

    peer.read()
    return [
        ujson.loads(b["data"])["data"]
        for b in parse_blocks(bytes(peer.received))
        if b.get("event") == "broadcast"
    ]


# -- Redis loses data ------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["flushall", "restart-empty"])
def test_after_redis_loses_its_data_resumes_from_before_are_reset_on_every_node(
    tmp_path, loss: str
):
    """Events 2-4 are published (202) while a client is away; Redis then loses everything
    (FLUSHALL, or a restart without persistence); event 5 follows. The client coming back
    with event 1's id is told `reset`, on the node it left and on a node started after the
    loss, never handed event 5 as if nothing was missing. A stream open throughout gets
    1-4, then `reset`, then 5."""
    server = PrivateRedis(tmp_path / "redis", appendonly=False)
    server.start()
    target = server.target()

    async def scenario() -> None:
        hub = await started(target)
        late: Hub | None = None
        live = Peer()
        away: list[Peer] = []
        try:
            hub.subscribe(live.transport, "u1")
            first = await publish(hub, 1)
            await publish(hub, 2, 3, 4)
            await until(lambda: len(live.events()) == 4, what="1-4 on the live stream")
            if loss == "flushall":
                async with aioredis.Redis.from_url(server.url) as r:
                    await r.flushall()
            else:  # in a thread: the hub's loop runs on meanwhile, as in production
                await asyncio.to_thread(server.stop)
                await asyncio.to_thread(server.start)
            fifth = await publish_when_ready(hub, 5)
            await until(lambda: data_of(live)[-1:] == [5], what="5 on the live stream")
            assert names(live) == ["broadcast"] * 4 + ["reset", "broadcast"]
            assert data_of(live) == [1, 2, 3, 4, 5]
            assert broker(hub).resets["lost"] >= 1
            assert fifth[0].rpartition("-")[2] != first[0].rpartition("-")[2], "a new epoch"
            late = await started(target)
            for node in (hub, late):
                peer = await resumed(node, first[0])
                away.append(peer)
                await until(lambda p=peer: p.events(), what="what the resume gets first")  # type: ignore[misc]
                assert names(peer)[0] == "reset", (node, peer.events())
                assert 5 not in data_of(peer)
        finally:
            for peer in (live, *away):
                peer.shutdown()
            await hub.stop()
            if late is not None:
                await late.stop()
            server.close()

    run(scenario)


def test_entries_written_below_the_nodes_read_position_after_a_loss_still_arrive(redis_url):
    """After a loss, Redis's clock can be behind the ids the node already read (the last
    head was ahead of it, or Redis came back on another machine): new entries then sit below
    the node's XREAD position. The node must still deliver them, after a `reset`."""
    future_ms = int(time.time() * 1000) + 600_000

    async def scenario() -> None:
        async with aioredis.Redis.from_url(redis_url.url) as r:
            await r.set(f"{redis_url.prefix}:head", f"{future_ms}-0 aaaa1111 0-0")
        async with watched(redis_url) as (hub, live):
            ahead = await publish(hub, "ahead")
            assert ahead[0].startswith(f"{future_ms}-1-")
            await until(lambda: data_of(live) == ["ahead"], what="the event ahead of time")
            async with aioredis.Redis.from_url(redis_url.url) as r:
                await r.delete(f"{redis_url.prefix}:head", f"{redis_url.prefix}:events")
            now = await publish_when_ready(hub, "now")
            assert int(now[0].split("-")[0]) < future_ms
            await until(lambda: data_of(live) == ["ahead", "now"], what="the event below")
            assert names(live) == ["broadcast", "reset", "broadcast"]

    run(scenario)


def test_a_node_started_on_an_emptied_prefix_does_not_take_ids_of_the_run_before(redis_url):
    async def scenario() -> None:
        before = await started(redis_url)
        old = await publish(before, "old")
        await before.stop()
        async with aioredis.Redis.from_url(redis_url.url) as r:
            await r.delete(f"{redis_url.prefix}:head", f"{redis_url.prefix}:events")
        hub = await started(redis_url)
        peer: Peer | None = None
        try:
            await publish(hub, "new")
            peer = await resumed(hub, old[0])
            await until(lambda: peer.events(), what="the resume's answer")  # type: ignore[union-attr]
            assert names(peer) == ["reset"]
        finally:
            if peer is not None:
                peer.shutdown()
            await hub.stop()

    run(scenario)


# -- Redis goes back -------------------------------------------------------------------------


async def snapshot(target: RedisTarget) -> dict[str, bytes]:
    """DUMP of the stream and the head: what a lagging replica or an AOF that lost its last
    writes holds."""
    async with aioredis.Redis.from_url(target.url) as r:
        keys = [f"{target.prefix}:events", f"{target.prefix}:head"]
        return {k: v for k in keys if (v := await r.dump(k)) is not None}


async def roll_back(target: RedisTarget, saved: dict[str, bytes]) -> None:
    async with aioredis.Redis.from_url(target.url) as r:
        for k, v in saved.items():
            await r.restore(k, 0, v, replace=True)


def test_redis_going_back_resets_the_streams_and_every_id_of_the_old_epoch(redis_url):
    """Redis acknowledged events 2-3 and then went back to before them (a failover to a
    replica that lagged). The node that read them sees Redis behind its witness and starts a
    new epoch: its streams get `reset`, and a client resuming from event 1 or 3, on this node
    or one started later, gets `reset` too (event 4 may carry ids that 2-3 had)."""

    async def scenario() -> None:
        hub = await started(redis_url)
        late: Hub | None = None
        live = Peer()
        away: list[Peer] = []
        try:
            hub.subscribe(live.transport, "u1")
            first = await publish(hub, 1)
            await until(lambda: data_of(live) == [1], what="1 delivered")
            saved = await snapshot(redis_url)
            lost = await publish(hub, 2, 3)
            await until(lambda: data_of(live) == [1, 2, 3], what="2-3 delivered")
            await roll_back(redis_url, saved)
            await until(lambda: "reset" in names(live), what="the live stream told to reset")
            await publish_when_ready(hub, 4)
            await until(lambda: data_of(live) == [1, 2, 3, 4], what="4 after the reset")
            assert names(live) == ["broadcast"] * 3 + ["reset", "broadcast"]
            assert broker(hub).resets["rollback"] == 1
            late = await started(redis_url)
            for node in (hub, late):
                for old in (first[0], lost[-1]):
                    peer = await resumed(node, old)
                    away.append(peer)
                    await until(lambda p=peer: p.events(), what="the resume's answer")  # type: ignore[misc]
                    assert names(peer)[0] == "reset", (old, peer.events())
        finally:
            for peer in (live, *away):
                peer.shutdown()
            await hub.stop()
            if late is not None:
                await late.stop()

    run(scenario)


def test_an_acknowledged_publish_lost_before_any_node_read_it_is_noticed(redis_url):
    """A publish is stored (202) and Redis goes back before the feed read it: the chain the
    feed reads is whole, but the node knows what Redis acknowledged to it, and resets."""

    async def scenario() -> None:
        async with watched(redis_url) as (hub, live):
            await publish(hub, 1)
            await until(lambda: data_of(live) == [1], what="1 delivered")
            saved = await snapshot(redis_url)
            task = broker(hub).follower
            assert task is not None
            task.cancel()  # the feed stops reading
            await asyncio.wait([task], timeout=5)
            await publish(hub, 2)  # stored, acknowledged, never read
            await roll_back(redis_url, saved)
            broker(hub).start(hub)  # the feed reads again, from where it stopped
            await until(lambda: "reset" in names(live), what="the stream told to reset")
            await publish_when_ready(hub, 3)
            await until(lambda: data_of(live)[-1:] == [3], what="3 after the reset")
            assert names(live) == ["broadcast", "reset", "broadcast"]

    run(scenario)


# -- Redis stalls: three answers -------------------------------------------------------------


def test_a_publish_to_a_stalled_redis_is_outcome_unknown_and_a_keyed_retry_publishes_once(
    private_redis: PrivateRedis,
):
    """SIGSTOP Redis: a publish already sent is "outcome unknown" (it is stored when Redis
    runs again), never "not published"; once the feed has gone quiet the hub is unready and
    refuses publishes before sending them (provably not published). After SIGCONT, the retry
    under the same Idempotency-Key answers the first ids: the event arrives once."""
    target = private_redis.target()

    async def scenario() -> None:
        hub = await started(target)
        live = Peer()
        key = Idempotency("k-stalled", "body-hash", 60.0)
        try:
            hub.subscribe(live.transport, "u1")
            warm = await publish(hub, "warm")  # leaves a connection in the pool: the next
            private_redis.pause()  # publish is sent on it (a new one could not even connect)
            with pytest.raises(OutcomeUnknown) as unknown:
                await publish(hub, "sent", idempotency=key)
            assert "retry it under the same Idempotency-Key" in str(unknown.value)
            await until(lambda: not hub.ready, 5, "unready while Redis is stalled")
            with pytest.raises(BrokerUnavailable) as refused:
                await publish(hub, "refused")
            assert not isinstance(refused.value, OutcomeUnknown)
            private_redis.resume()
            await until(lambda: data_of(live) == ["warm", "sent"], what="the unknown one, stored")
            await until(lambda: hub.ready, 10, "ready again")
            body = ujson.dumps([{"type": 5, "data": "sent"}]).encode()
            replay = await hub.publish(decode_json(body), key)
            assert replay.replayed
            again = replay.ids
            after = await publish(hub, "after")
            await until(lambda: data_of(live) == ["warm", "sent", "after"], what="the next one")
            assert [i for i, _ in live.events()] == [*warm, *again, *after]
        finally:
            private_redis.resume()
            live.shutdown()
            await hub.stop()

    run(scenario)


def test_a_call_redis_refuses_stores_none_of_its_batches(redis_url):
    """Three publishes share one script call; the third's idempotency key holds a list (a
    foreign writer): the script checks every key before its first write, so none of the three
    is stored and each is told "not published" (not two stored and all failed)."""

    async def scenario() -> None:
        async with watched(redis_url) as (hub, live):
            bad = Idempotency("a-list", "h", 60.0)
            async with aioredis.Redis.from_url(redis_url.url) as r:
                await r.rpush(f"{redis_url.prefix}:idempotency:a-list", "x")
                before = await r.xlen(f"{redis_url.prefix}:events")
            answers = await asyncio.gather(
                publish(hub, "a"),
                publish(hub, "b"),
                publish(hub, "c", idempotency=bad),
                return_exceptions=True,
            )
            assert all(isinstance(a, BrokerUnavailable) for a in answers), answers
            assert not any(isinstance(a, OutcomeUnknown) for a in answers), answers
            async with aioredis.Redis.from_url(redis_url.url) as r:
                assert await r.xlen(f"{redis_url.prefix}:events") == before
            after = await publish(hub, "d")
            await until(lambda: data_of(live) == ["d"], what="the next publish")
            assert [i for i, _ in live.events()] == after

    run(scenario)


# -- What the feed reads ---------------------------------------------------------------------


async def append_entry(target: RedisTarget, hub: Hub, **fields: str) -> str:
    """An entry written as another writer would (the head kept with it): the next id after
    the head, chained to it."""
    async with aioredis.Redis.from_url(target.url) as r:
        head_key, stream = f"{target.prefix}:head", f"{target.prefix}:events"
        last, epoch, start = (await r.get(head_key)).decode().split(" ")
        ms, seq = last.split("-")
        eid = f"{ms}-{int(seq) + 1}"
        entry = {"v": "2", "x": epoch, "p": last, "o": "elsewhere:1", **fields}
        async with r.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, entry, id=eid)
            pipe.set(head_key, f"{eid} {epoch} {start}")
            await pipe.execute()
    return eid


@pytest.mark.parametrize(
    "blob",
    [
        b"not json",
        b"[[5]]",  # a row of another shape (a newer version that added a field, say)
        ujson.dumps([[5, "broadcast", None, 1, "{}", [], [], True, None, 0, "extra"]]).encode(),
    ],
)
def test_an_entry_the_node_cannot_read_resets_its_streams_and_the_feed_goes_on(
    redis_url, blob: bytes
):
    async def scenario() -> None:
        async with watched(redis_url) as (hub, live):
            await publish(hub, 1)
            await until(lambda: data_of(live) == [1], what="1 delivered")
            bad = await append_entry(redis_url, hub, e=blob.decode())
            after = await publish(hub, 2)
            await until(lambda: data_of(live) == [1, 2], what="2 after the bad entry")
            assert names(live) == ["broadcast", "reset", "broadcast"]
            assert live.events()[1][0] == f"{bad}-{broker(hub).epoch}"
            assert live.events()[2][0] == after[0]
            assert broker(hub).feed_errors == 1
            assert broker(hub).resets["unreadable"] == 1
            assert hub.ready
            text = hub.metrics.exposition().decode()
            assert "hub_broker_feed_errors_total 1.0" in text
            assert 'hub_broker_resets_total{cause="unreadable"} 1.0' in text

    run(scenario)


def test_an_entry_of_an_epoch_the_head_does_not_name_is_read_past_with_a_reset(redis_url):
    """A foreign entry in another epoch than the head's: the node looks at the head, finds its
    own epoch still current, and reads past the entry as one it cannot read (rather than look
    at it again for ever)."""

    async def scenario() -> None:
        async with watched(redis_url) as (hub, live):
            await publish(hub, 1)
            await until(lambda: data_of(live) == [1], what="1 delivered")
            blob = ujson.dumps([[5, "broadcast", None, 1, '{"data":"x"}', [], [], True, None, 0]])
            await append_entry(redis_url, hub, x="zz99", e=blob)
            await publish(hub, 2)
            await until(lambda: data_of(live) == [1, 2], what="2 after the foreign entry")
            assert names(live) == ["broadcast", "reset", "broadcast"]
            assert broker(hub).resets["unreadable"] == 1 and hub.ready

    run(scenario)


def test_an_entry_of_another_format_version_makes_the_node_unready_and_deliver_nothing_past(
    redis_url, caplog
):
    async def scenario() -> None:
        async with watched(redis_url) as (hub, live):
            await publish(hub, 1)
            await until(lambda: data_of(live) == [1], what="1 delivered")
            await append_entry(redis_url, hub, v="3", e="[]")
            await until(lambda: not hub.ready, 5, "unready at the entry it cannot read")
            stuck = broker(hub).stuck
            assert stuck is not None and "format version b'3'" in stuck
            with pytest.raises(BrokerUnavailable):
                await publish(hub, 2)  # refused before it is sent: not delivered around it
            assert data_of(live) == [1] and "reset" not in names(live)
            assert any("format version" in r.getMessage() for r in caplog.records)

    run(scenario)


# -- Redis settings --------------------------------------------------------------------------


def test_an_eviction_policy_set_while_running_makes_the_node_unready_until_fixed(
    private_redis: PrivateRedis,
):
    target = private_redis.target()

    async def scenario() -> None:
        hub = await started(target)
        client = private_redis.client()
        try:
            client.config_set("maxmemory-policy", "volatile-lru")
            client.client_kill_filter(_type="normal", skipme=True)  # the hub reconnects
            await until(lambda: not hub.ready, 10, "unready with an evicting Redis")
            why = broker(hub).misconfigured
            assert why is not None and "noeviction" in why and "volatile-lru" in why
            client.config_set("maxmemory-policy", "noeviction")
            await until(lambda: hub.ready, 15, "ready again once it is noeviction")
        finally:
            client.close()
            await hub.stop()

    run(scenario)


# -- Bounds ----------------------------------------------------------------------------------


def test_logouts_kept_in_redis_and_loaded_by_a_new_node_are_bounded_by_count(redis_url):
    async def scenario() -> None:
        def make() -> Hub:
            # a history of 2 entries: a late node learns the older logouts from the set only
            cfg = config(
                broker=redis_url.url, redis_prefix=redis_url.prefix, history=2, max_revocations=5
            )
            return Hub(cfg)

        hub = make()
        await until(lambda: hub.ready, 10, "ready")
        late: Hub | None = None
        try:
            for n in range(8):
                body = ujson.dumps({"type": 3, "user": f"user{n}"}).encode()
                await hub.publish(decode_json(body))
            async with aioredis.Redis.from_url(redis_url.url) as r:
                kept = await r.zrange(f"{redis_url.prefix}:revoked", 0, -1)
            assert [ujson.loads(m)[0] for m in kept] == [f"user{n}" for n in range(3, 8)]
            late = make()
            await until(lambda: late is not None and late.ready, 10, "the late node ready")
            issued_before = time.time() - 30
            assert [
                late.revocations.is_revoked(f"user{n}", None, issued_before) for n in range(8)
            ] == [False] * 3 + [True] * 5
        finally:
            await hub.stop()
            if late is not None:
                await late.stop()

    run(scenario)


# -- Over HTTP, against hub processes --------------------------------------------------------


def test_over_http_a_stalled_redis_answers_unknown_then_not_published_and_readyz_503(
    private_redis: PrivateRedis, hubs
):
    """The three answers on the wire: a publish sent to a stalled Redis is a 503 whose outcome
    is `unknown` (it is stored once Redis runs again); /readyz turns 503; a publish then is a
    503 `not_published` (refused before it was sent). The retry under the Idempotency-Key is
    answered with the first ids, and the stream takes the event once."""
    target = private_redis.target()
    hub = hubs(target)

    async def keyed_post(key: str, tag: str) -> tuple[int, Any, str | None]:
        answer = await http_request(
            hub.port,
            "POST",
            "/publish",
            {
                "Authorization": f"Bearer {PUBLISHER}",
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            },
            ujson.dumps({"type": 5, "data": tag}).encode(),
            timeout=15,  # an unknown outcome takes the broker's read timeout (5 s)
        )
        return answer.status, answer.json(), answer.headers.get("idempotent-replayed")

    async def scenario() -> None:
        async with Streams() as streams:
            client = await streams.open(hub, "u1")
            status, warm, _ = await keyed_post("warm", "warm")
            assert status == 202, warm
            private_redis.pause()
            try:
                status, unknown, _ = await keyed_post("k1", "sent")
                assert status == 503 and unknown["outcome"] == "unknown", unknown
                assert "Idempotency-Key" in unknown["error"]
                assert await wait_for(lambda: readyz(hub) == 503, 5), "readyz still 200"
                status, refused = await post(hub, {"type": 5, "data": "refused"})
                assert status == 503 and refused["outcome"] == "not_published", refused
                assert refused["error"].startswith("not published: ")
            finally:
                private_redis.resume()
            assert await wait_for(lambda: readyz(hub) == 200, 15), "not ready again"
            status, again, replayed = await keyed_post("k1", "sent")
            assert status == 202 and replayed == "true", again
            events = await client.events(2)
            assert [json.loads(e.data)["data"] for e in events] == ["warm", "sent"]
            assert ids_of(events) == [*warm["ids"], *again["ids"]]
            after = await http_publish(hub, {"type": 5, "data": "after"})
            assert ids_of(await client.events(1)) == after
            assert b"refused" not in client.raw
            assert ids_of(client.received) == [*warm["ids"], *again["ids"], *after]

    run(scenario)


def test_hub_client_retries_through_a_redis_stall_and_the_event_arrives_once(
    private_redis: PrivateRedis, hubs
):
    """hub.client.Publisher, its first attempt sent into a stalled Redis: it retries 503s
    (unknown, then not published) under one Idempotency-Key until Redis is back; the stream
    takes the event exactly once."""
    target = private_redis.target()
    hub = hubs(target)

    async def scenario() -> None:
        async with Streams() as streams:
            client = await streams.open(hub, "u1")
            publisher = Publisher(hub.url, PUBLISHER, attempts=40, backoff=0.1, max_backoff=0.5)
            assert publisher.publish("broadcast", data="warm")
            private_redis.pause()
            try:
                sent = asyncio.ensure_future(
                    asyncio.to_thread(publisher.publish, "broadcast", None, "once")
                )
                assert await wait_for(lambda: readyz(hub) == 503, 8), "readyz still 200"
                # resume once the hub has refused some attempt (a 503 counted)
                assert await wait_for(lambda: refused_503(hub) >= 2, 15), "no 503 answered"
            finally:
                private_redis.resume()
            event_id = await asyncio.wait_for(sent, 30)
            events = await client.events(2)
            assert [json.loads(e.data)["data"] for e in events] == ["warm", "once"]
            assert events[1].id == event_id
            last = await http_publish(hub, {"type": 5, "data": "last"})
            assert ids_of(await client.events(1)) == last
            assert [json.loads(e.data)["data"] for e in client.received] == ["warm", "once", "last"]
            publisher.close()

    run(scenario)


def refused_503(hub: HubProcess) -> float:
    """hub_publish_rejected_total{status="503"} of a hub process."""
    with urllib.request.urlopen(hub.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('hub_publish_rejected_total{status="503"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_hub_refuses_to_start_on_a_redis_that_may_evict(tmp_path):
    server = PrivateRedis(tmp_path / "redis", extra_args=["--maxmemory-policy", "allkeys-lru"])
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env["HUB_JWT_SECRET"] = SECRET
        proc = subprocess.run(
            [*HUB, "--port", "0", "--broker", server.url, "--redis-prefix", "evicting"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hub: error: "), out
    assert "maxmemory-policy allkeys-lru" in errors[0] and "noeviction" in errors[0], out
    assert "Traceback" not in out


@pytest.mark.gen_test(timeout=30)
async def test_a_client_ahead_of_the_node_it_reaches_waits_for_it_and_gets_nothing_twice(
    redis_url, hub_server
):
    """A client served by node A resumes on node B, whose feed has not read as far (here B's
    feed is stopped until the stream waits). B waits for its feed instead of resetting the
    client to where B is: that reset would send the client again what it took from A."""
    a = await hub_server(broker=redis_url.url, redis_prefix=redis_url.prefix)
    b = await hub_server(broker=redis_url.url, redis_prefix=redis_url.prefix)
    await until(lambda: a.hub.ready and b.hub.ready, 10, "both ready")
    on_a = await a.stream("u1")
    await stop_following(b.hub)
    first = await a.publish_ok([{"type": 5, "data": n} for n in range(3)])
    assert ids_of(await on_a.events(3)) == first
    assert b.hub.behind(first[-1])
    resuming = asyncio.ensure_future(b.stream("u1", last_event_id=first[-1], timeout=10))
    await until(lambda: b.hub._catching_up, 5, "the stream waits for B's feed")
    b.hub.broker.start(b.hub)  # B's feed reads again
    on_b = await resuming
    later = await a.publish_ok([{"type": 5, "data": "later"}])
    assert ids_of(await on_b.events(1)) == later
    assert [e.event for e in on_b.received] == ["broadcast"], on_b.received


def test_writes_a_node_made_to_an_old_master_after_a_failover_reset_every_node(tmp_path):
    """Split brain, as a Sentinel failover has it for a second: node B already follows the new
    master (it found Redis behind what it had read, started a new epoch and reset its
    streams), while node A still writes to the old master, which answers 202. When A reaches
    the new master, the epoch B started does not hold A's write, and B's streams were reset
    before it was accepted: A starts another epoch, and B's streams are reset again."""
    old, new = PrivateRedis(tmp_path / "old"), PrivateRedis(tmp_path / "new")
    old.start()
    new.start()

    async def scenario() -> None:
        to_a, to_b = await Blackhole(old.port).start(), await Blackhole(old.port).start()
        prefix = f"split-{time.monotonic_ns()}"
        a = await started(RedisTarget(f"redis://127.0.0.1:{to_a.port}/0", prefix))
        b = await started(RedisTarget(f"redis://127.0.0.1:{to_b.port}/0", prefix))
        on_a, on_b = Peer(), Peer()
        try:
            a.subscribe(on_a.transport, "u1")
            b.subscribe(on_b.transport, "u1")
            await publish(a, 1)
            await until(lambda: data_of(on_b) == [1], what="1 on B")
            # the replica is promoted with what it had: event 1
            await roll_back(
                RedisTarget(new.url, prefix), await snapshot(RedisTarget(old.url, prefix))
            )
            await publish(a, 2)  # on the old master only; B reads it there
            await until(lambda: data_of(on_b) == [1, 2], what="2 on B")
            to_b.switch(new.port)  # B follows the new master, which lacks 2: reset
            await until(lambda: names(on_b) == ["broadcast"] * 2 + ["reset"], what="B reset")
            await until(lambda: b.ready, 10, "B ready on the new master")
            lost = await publish(a, 3)  # A, on the old master: a 202 the new master lacks
            to_a.switch(new.port)
            await until(lambda: names(on_b).count("reset") == 2, what="B reset again")
            assert broker(b).epoch != lost[0].rpartition("-")[2]
            assert 3 not in data_of(on_b)
            after = await publish_when_ready(a, 4)
            await until(lambda: data_of(on_b)[-1:] == [4], what="4 on B")
            assert on_b.events()[-1][0] == after[0]
        finally:
            on_a.shutdown()
            on_b.shutdown()
            await a.stop()
            await b.stop()
            await to_a.close()
            await to_b.close()

    try:
        run(scenario)
    finally:
        old.close()
        new.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_client_ahead_of_a_node_that_does_not_catch_up_is_told_to_retry_not_reset(
    redis_url, hub_server
):
    """B's feed stays stopped: after the wait, the client that took events from A is answered
    503 with Retry-After, never a `reset` to B's older position (whence it would take again,
    from another node, what it already had)."""
    a = await hub_server(broker=redis_url.url, redis_prefix=redis_url.prefix)
    b = await hub_server(broker=redis_url.url, redis_prefix=redis_url.prefix)
    await until(lambda: a.hub.ready and b.hub.ready, 10, "both ready")
    await stop_following(b.hub)
    first = await a.publish_ok([{"type": 5, "data": 1}])
    refused = await b.stream("u1", last_event_id=first[0], timeout=10)
    assert refused.status == 503, (refused.status, bytes(refused.raw)[:200])
    assert refused.headers.get("retry-after") == "1"
    assert b"reset" not in bytes(refused.raw)


@pytest.mark.gen_test(timeout=40)
async def test_a_node_behind_a_paused_link_never_sends_its_client_back(redis_url, hub_server):
    """The lagging node a fault run found: B reads Redis through a link that stops forwarding
    (no error, no close). A client that took E1..E3 from A and resumes on B is never given B's
    older position (no reset, no opening id, nothing twice): it is told to retry. Once B's
    feed has been silent past the live bound, B admits no stream at all, and /readyz says so.
    When the link heals, the same resume on B is exact."""
    url = redis_url.url
    link = await Blackhole(int(url.rsplit(":", 1)[1].split("/")[0])).start()
    a = await hub_server(broker=url, redis_prefix=redis_url.prefix)
    b = await hub_server(
        broker=f"redis://127.0.0.1:{link.port}/{url.rsplit('/', 1)[1]}",
        redis_prefix=redis_url.prefix,
    )
    try:
        await until(lambda: a.hub.ready and b.hub.ready, 10, "both ready")
        on_b = await b.stream("u1")
        first = await a.publish_ok([{"type": 5, "data": 1}])
        assert ids_of(await on_b.events(1)) == first
        link.block()
        later = await a.publish_ok([{"type": 5, "data": n} for n in (2, 3)])
        refused = await b.stream("u1", last_event_id=later[-1], timeout=10)
        assert refused.status == 503, (refused.status, bytes(refused.raw)[:200])
        assert refused.headers.get("retry-after")
        assert b"reset" not in bytes(refused.raw) and b"id:" not in bytes(refused.raw)

        await until(lambda: not b.hub.ready, 5, "B unready")
        fresh = await b.stream("u2", timeout=10)
        assert fresh.status == 503 and fresh.headers.get("retry-after"), fresh.status
        assert "cannot serve streams now" in json.loads(fresh.raw_body)["error"]
        assert (await http_request(b.port, "GET", "/readyz")).status == 503

        link.heal()
        await until(lambda: b.hub.ready, 10, "B ready again")
        resumed = await b.stream("u1", last_event_id=later[-1], timeout=10)
        assert resumed.status == 200
        after = await a.publish_ok([{"type": 5, "data": 4}])
        assert ids_of(await resumed.events(1)) == after
        assert [e.event for e in resumed.received] == ["broadcast"], resumed.received
        assert ids_of(await on_b.events(3)) == later + after
        assert ids_of(on_b.received) == first + later + after  # B's own: in order, once
    finally:
        await link.close()


def test_a_loop_held_up_does_not_turn_a_node_with_a_live_redis_unready(redis_url):
    """A reconnect storm or a long flush pass can hold the event loop for over a second: Redis
    has answered the feed, which has not had its turn to take the answer. The node stays
    ready (it admits the clients reconnecting) rather than judging Redis by its own delay;
    a Redis that is really silent still turns it unready (the stalled-Redis tests)."""

    async def scenario() -> None:
        hub = await started(redis_url)
        try:
            loop = asyncio.get_running_loop()
            seen: list[bool] = []
            held: asyncio.Future[None] = loop.create_future()

            def hold_up() -> None:
                time.sleep(LIVE_FOR + 0.5)  # the fault: a loop busy for 2 s, not a wait
                seen.append(hub.ready)
                held.set_result(None)

            loop.call_soon(hold_up)
            await held
            seen.append(hub.ready)
            assert seen == [True, True]
            later = await publish(hub, "after")
            assert later and hub.ready
        finally:
            await hub.stop()

    run(scenario)


def test_with_redis_wait_replicas_a_publish_is_answered_only_once_a_replica_took_it(tmp_path):
    """--redis-wait-replicas 1: a 202 means a replica has the events (a failover to it loses
    nothing). A replica that does not take them in time makes the publish `unknown` (stored
    on the master); once it is back, the keyed retry is answered with the first ids, and
    only when the replica has them."""
    master = PrivateRedis(tmp_path / "master").start()
    replica = PrivateRedis(
        tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(master.port)]
    ).start()

    def replicated() -> bool:
        with master.client() as client:
            return int(client.execute_command("WAIT", 1, 100)) == 1

    async def scenario() -> None:
        await until(replicated, 15, "the replica in sync")
        target = master.target()
        hub = await started(target, redis_wait_replicas=1, redis_wait_timeout=0.5)
        try:
            (first,) = await publish(hub, "taken")
            with replica.client() as client:  # at once: the 202 waited for it
                assert client.xlen(f"{target.prefix}:events") >= 1
            replica.pause()
            key = Idempotency(f"waited-{time.monotonic_ns()}", "body", 60.0)
            with pytest.raises(OutcomeUnknown) as unknown:
                await publish(hub, "unsure", idempotency=key)
            assert "0 of 1 replicas took it" in str(unknown.value)
            replica.resume()
            body = ujson.dumps([{"type": 5, "data": "unsure"}]).encode()
            again = await hub.publish(decode_json(body), key)
            assert again.replayed and again.ids[0] > first
            with replica.client() as client:
                entries = client.xrange(f"{target.prefix}:events")
            assert len(entries) == 2
        finally:
            replica.resume()
            await hub.stop()

    try:
        run(scenario)
    finally:
        replica.close()
        master.close()
