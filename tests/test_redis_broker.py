"""The Redis broker under the real hub core (hub.core.Hub), against a real Redis: the shared
server under a prefix of each test's own, or a private server a test stops and restarts.
Streams are socketpairs under the hub's own transport (core_support.Peer)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis_support
import ujson
from core_support import Peer, config
from redis_support import PrivateRedis, RedisTarget
from sse import wait_for

from hub.broker import BrokerUnavailable
from hub.core import Hub
from hub.decode import decode_json
from hub.history import parse_id

redis_url = redis_support.redis_url
private_redis = redis_support.private_redis


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    assert await wait_for(cond, timeout), f"not met before the deadline: {what}"


def make_hub(target: RedisTarget, **overrides: Any) -> Hub:
    return Hub(config(broker=target.url, redis_prefix=target.prefix, **overrides))


async def started(target: RedisTarget, **overrides: Any) -> Hub:
    """A hub on `target` that has loaded the shared history (it follows the stream from
    there; `ready` turns true when its first read returns, up to a block period later)."""
    hub = make_hub(target, **overrides)
    await until(lambda: hub.broker.synced, 10, "hub synced")
    return hub


async def publish(hub: Hub, body: object) -> list[str]:
    return (await hub.publish(decode_json(ujson.dumps(body).encode()))).ids


def broadcasts(*tags: object) -> list[dict[str, Any]]:
    return [{"type": 5, "data": tag} for tag in tags]


async def stop_following(hub: Hub) -> None:
    """End the feed task of the hub's broker (it stops reading the stream). A cancellation
    can be lost: on Python 3.11, asyncio.wait_for (redis-py's send timeout) swallows one that
    lands just as the send completes, and the task reads on; so cancel until it has ended."""
    task = hub.broker.follower  # type: ignore[attr-defined]
    for _ in range(50):
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.1)
        if done:
            return
    raise AssertionError(f"the feed task did not end: {task!r}")


def key(event_id: str) -> tuple[int, int]:
    parsed = parse_id(event_id)
    assert parsed is not None, event_id
    return parsed


def sid(event_id: str) -> str:
    """The stream entry id in an event id (`<ms>-<seq>-<epoch>`)."""
    ms, seq = key(event_id)
    return f"{ms}-{seq}"


class Redis:
    """The test's own async client on the target (closed by `async with`)."""

    def __init__(self, target: RedisTarget) -> None:
        self.client = aioredis.Redis.from_url(target.url, socket_timeout=5)
        self.stream = f"{target.prefix}:events"

    async def __aenter__(self) -> Redis:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def entries(self) -> list[tuple[str, str]]:
        """(entry id, previous entry id) of every entry the stream holds, oldest first."""
        raw: Any = await self.client.xrange(self.stream)
        return [(eid.decode(), fields[b"p"].decode()) for eid, fields in raw]


def test_ids_are_consecutive_in_a_batch_one_entry_each_and_increase_across_batches(redis_url):
    async def scenario() -> None:
        hub = await started(redis_url)
        peer = Peer()
        try:
            hub.subscribe(peer.transport, "u1")
            first = await publish(hub, broadcasts(1, 2, 3))
            second = await publish(hub, broadcasts(4, 5))
            third = await publish(hub, broadcasts(6))
            for batch in (first, second, third):
                keys = [key(i) for i in batch]
                assert [k[0] for k in keys] == [keys[0][0]] * len(keys)  # one ms
                assert [k[1] for k in keys] == list(range(keys[0][1], keys[0][1] + len(keys)))
            ids = first + second + third
            assert [key(i) for i in ids] == sorted(key(i) for i in ids)
            assert len(set(ids)) == 6
            async with Redis(redis_url) as r:
                # one entry per batch, named by its last event, each naming the one before
                assert await r.entries() == [
                    (sid(first[-1]), "0-0"),
                    (sid(second[-1]), sid(first[-1])),
                    (sid(third[-1]), sid(second[-1])),
                ]
            # the publishing node delivers its own events through the feed, with those ids
            await until(lambda: len(peer.events()) == 6, what="6 events on the stream")
            assert peer.events() == [(i, "broadcast") for i in ids]
        finally:
            peer.shutdown()
            await hub.stop()

    run(scenario)


def test_two_hubs_on_one_prefix_deliver_every_event_in_the_same_order(redis_url):
    async def scenario() -> None:
        hubs = [await started(redis_url), await started(redis_url)]
        peers = [Peer(), Peer()]
        try:
            for hub, peer in zip(hubs, peers, strict=True):
                hub.subscribe(peer.transport, "u1")
            # concurrent publishes from both nodes: 40 batches of 1 to 3 events
            results = await asyncio.gather(
                *(
                    publish(hubs[n % 2], broadcasts(*(f"{n}.{k}" for k in range(n % 3 + 1))))
                    for n in range(40)
                )
            )
            ids = sorted((i for batch in results for i in batch), key=key)
            assert len(set(ids)) == len(ids) == sum(n % 3 + 1 for n in range(40))
            await until(
                lambda: [len(p.events()) for p in peers] == [len(ids)] * 2,
                what="every event on both nodes' streams",
            )
            assert peers[0].events() == peers[1].events() == [(i, "broadcast") for i in ids]
            assert [e.id for e in hubs[0].history.events] == [e.id for e in hubs[1].history.events]
        finally:
            for peer in peers:
                peer.shutdown()
            for hub in hubs:
                await hub.stop()

    run(scenario)


def test_a_publish_redis_cannot_take_is_refused_whole_and_the_hub_recovers(
    private_redis: PrivateRedis,
):
    target = private_redis.target()

    async def scenario() -> None:
        hub = await started(target)
        peer = Peer()
        try:
            hub.subscribe(peer.transport, "u1")
            before = await publish(hub, broadcasts("a", "b"))
            await until(lambda: len(peer.events()) == 2, what="the first batch delivered")
            private_redis.stop()
            await until(lambda: not hub.ready, what="hub not ready once Redis is gone")
            with pytest.raises(BrokerUnavailable):
                await publish(hub, broadcasts("lost-1", "lost-2", "lost-3"))
            private_redis.start()
            await until(lambda: hub.ready, 10, "hub ready again, without a restart")
            after = await publish(hub, broadcasts("c"))
            assert key(after[0]) > key(before[-1])
            await until(lambda: len(peer.events()) >= 3, what="delivery resumed")
            assert peer.events() == [(i, "broadcast") for i in before + after]
            assert b"lost-" not in bytes(peer.received)
            async with Redis(target) as r:
                # nothing of the refused batch is stored: two entries, and they follow on
                assert await r.entries() == [
                    (sid(before[-1]), "0-0"),
                    (sid(after[-1]), sid(before[-1])),
                ]
        finally:
            peer.shutdown()
            await hub.stop()

    run(scenario)


def test_a_hub_started_later_loads_the_history_and_the_logouts(redis_url):
    async def scenario() -> None:
        first = await started(redis_url)
        late = None
        peer = Peer()
        try:
            ids = await publish(first, broadcasts(1, 2, 3))
            ids += await publish(first, [{"type": 3, "user": "gone"}, *broadcasts(4)])
            issued_before = time.time() - 30
            late = await started(redis_url)
            assert [e.id for e in late.history.events] == ids
            assert late.revocations.is_revoked("gone", None, issued_before)
            assert late.revocations.is_revoked("gone", "any-session", issued_before)
            assert not late.revocations.is_revoked("stayed", None, issued_before)
            signed_in_again = time.time() + 30
            assert not late.revocations.is_revoked("gone", None, signed_in_again)
            # it serves resumes at once: replay after ids[1], then live events
            late.subscribe(peer.transport, "u1", last_event_id=ids[1])
            live = await publish(first, broadcasts(5))
            expected = [ids[2], ids[4], live[0]]  # the logout goes to "gone" only
            await until(lambda: len(peer.events()) >= 3, what="replay, then live")
            assert [i for i, _ in peer.events()] == expected
        finally:
            peer.shutdown()
            await first.stop()
            if late is not None:
                await late.stop()

    run(scenario)


@pytest.mark.parametrize("gap", ["trimmed", "deleted"])
def test_a_follower_that_missed_entries_resyncs_and_its_streams_get_reset(redis_url, gap):
    """The follower is stopped (its feed task cancelled) while the other node publishes; the
    entries it has not read are trimmed away (or the whole stream is deleted), then it starts
    following again from its last id."""

    async def scenario() -> None:
        publisher = await started(redis_url)
        follower = await started(redis_url)
        peer = Peer()
        try:
            follower.subscribe(peer.transport, "u1")
            seen = await publish(publisher, broadcasts("seen"))
            await until(lambda: len(peer.events()) == 1, what="the first event on the follower")
            await stop_following(follower)
            missed = await publish(publisher, broadcasts("m1", "m2"))
            missed += await publish(publisher, broadcasts("m3"))
            async with Redis(redis_url) as r:
                if gap == "trimmed":
                    # keep the last entry only: exactly, not to a macro node's bound
                    kept = await publish(publisher, broadcasts("k1", "k2"))
                    await r.client.xtrim(r.stream, minid=sid(kept[-1]), approximate=False)
                    assert [e for e, _ in await r.entries()] == [sid(kept[-1])]
                else:
                    await r.client.delete(r.stream)
                    kept = await publish(publisher, broadcasts("k1", "k2"))
            floor = missed[-1]  # the newest id the follower cannot have
            follower.broker.start(follower)  # follows again from where it stopped
            await until(lambda: len(peer.events()) == 4, what="reset, then the kept events")
            assert peer.events() == [
                (seen[0], "broadcast"),
                (floor, "reset"),
                (kept[0], "broadcast"),
                (kept[1], "broadcast"),
            ]
            assert b"m1" not in bytes(peer.received) and b"m3" not in bytes(peer.received)
            assert follower.history.floor == key(floor)
            assert [e.id for e in follower.history.events] == kept
            # a client that resumes from the reset's id gets what came after it
            again = Peer()
            follower.subscribe(again.transport, "u1", last_event_id=floor)
            await until(lambda: len(again.events()) == 2, what="resume from the reset's id")
            assert [i for i, _ in again.events()] == kept
            again.shutdown()
        finally:
            peer.shutdown()
            await publisher.stop()
            await follower.stop()

    run(scenario)


def test_a_burst_of_more_batches_than_the_history_between_two_reads_resets_no_one(redis_url):
    # The stream's MAXLEN counts entries (batches): at --history it trimmed a burst that
    # arrived between two reads of a node's feed, and that node told its streams to reset
    # for events it was about to read. 300 batches in one script call, history 20.
    async def scenario() -> None:
        hub = await started(redis_url, history=20)
        peer = Peer()
        hub.subscribe(peer.transport, "u1")
        ids = await asyncio.gather(*(publish(hub, broadcasts(n)) for n in range(300)))
        assert len({i for batch in ids for i in batch}) == 300
        await until(lambda: len(peer.events()) >= 300, 10, "every event on the stream")
        try:
            assert [name for _, name in peer.events()] == ["broadcast"] * 300  # no reset
        finally:
            await hub.stop()
            peer.client.close()

    run(scenario)
