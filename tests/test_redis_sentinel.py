"""`--broker redis+sentinel://...` against real processes: hub processes (as
tests/test_redis_processes.py starts them) on a SentinelGroup (a master, a replica and three
sentinels, tests/redis_support.py), raw SSE clients. A planned failover while publishing and
streaming, and a failover to a replica that lagged (what the old master acknowledged is gone):
every event answered 202 reaches every stream once and in order or the stream is told `reset`,
nothing answered "not published" arrives, and publishing resumes in the same processes.

Events are told apart by their data (`{"n": ...}`), not by their ids, so the checks hold
whatever a position looks like."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis_support
import test_redis_processes as processes
from browser_support import HubProcess, wait_until
from redis_support import PrivateRedis, RedisTarget, SentinelGroup, SentinelProcess, unique_prefix
from sse import SSEClient, SSEEvent, wait_for
from test_redis_processes import Streams, ids_of, post, publish, run, token

from hub.redis_connection import redis_client

sentinel_group = redis_support.sentinel_group
hubs = processes.hubs

# (publisher, n, HTTP status, answer): each publisher publishes one request at a time, so
# its own outcomes are in publish order; n is unique across publishers.
Outcome = tuple[int, int, int, Any]


def broadcast(n: int) -> list[dict[str, Any]]:
    return [{"type": 5, "data": {"n": n, "tag": tag(n).decode()}}]


def tag(n: int) -> bytes:
    """What finds event n in a stream entry, however the broker encodes it."""
    return b"event-%d-end" % n


def numbers(events: Sequence[SSEEvent]) -> list[int | None]:
    """The stream as the checks read it: each broadcast's n, None for each reset."""
    return [
        None if e.event == "reset" else int(e.json()["data"]["n"])
        for e in events
        if e.event in ("reset", "broadcast")
    ]


def not_published(answer: Any) -> bool:
    return isinstance(answer, dict) and "not published" in str(answer.get("error", ""))


def problems(received: Sequence[SSEEvent], outcomes: Sequence[Outcome]) -> list[str]:
    """What breaks the promise on one stream that was open before the first publish: an event
    twice; an event answered 503 "not published" at all; an accepted event after one its
    publisher published later (between two resets); an accepted event missing with no reset
    after the last event of its publisher that the stream got before it."""
    place: dict[int, tuple[int, int]] = {}  # n -> (publisher, its place among its 202s)
    for publisher, n, status, _ in outcomes:
        if status == 202:
            place[n] = (publisher, sum(1 for p, _ in place.values() if p == publisher))
    refused = {n for _, n, status, answer in outcomes if status == 503 and not_published(answer)}
    items = numbers(received)
    seen = Counter(n for n in items if n is not None)
    found = [f"{n} arrived {count} times" for n, count in seen.items() if count > 1]
    found += [f"{n} arrived though answered 'not published'" for n in seen if n in refused]
    highest: dict[int, int] = {}
    for n in items:
        if n is None:
            highest = {}
        elif n in place:
            publisher, index = place[n]
            if index < highest.get(publisher, -1):
                found.append(f"{n} arrived after an event its publisher published later")
            highest[publisher] = max(index, highest.get(publisher, -1))
    resets = [i for i, n in enumerate(items) if n is None]
    for n, (publisher, index) in place.items():
        if seen[n]:
            continue
        before = [
            i
            for i, m in enumerate(items)
            if m in place and place[m][0] == publisher and place[m][1] < index
        ]
        gap = before[-1] if before else -1
        if not any(i > gap for i in resets):
            found.append(f"{n} (answered 202) never arrived and no reset came after its place")
    return found


async def publish_when_back(hub: HubProcess, first_n: int, timeout: float = 20.0) -> list[str]:
    """Publish until one is answered 202 (each try its own n, from first_n up); its ids."""
    tries: list[tuple[int, Any]] = []

    async def attempt() -> bool:
        status, answer = await post(hub, broadcast(first_n + len(tries)))
        tries.append((status, answer))
        return status == 202

    assert await wait_for(attempt, timeout, interval=0.05), f"no 202 in {timeout}s: {tries[-3:]}"
    return list(tries[-1][1]["ids"])


def test_two_hubs_on_the_sentinel_url_are_one_hub_on_the_master(sentinel_group, hubs):
    target = RedisTarget(sentinel_group.url, unique_prefix())
    a = hubs(target)
    b = hubs(target)

    async def scenario() -> list[str]:
        async with Streams() as streams:
            on_b = await streams.open(b, "u1")
            ids = await publish(a, [{"type": 5, "data": {"n": n}} for n in range(3)])
            assert ids_of(await on_b.events(3)) == ids
            return ids

    run(scenario)
    # the entry is on the server the sentinels name as master
    client = sentinel_group.master().client()
    try:
        assert client.xlen(f"{target.prefix}:events") == 1
    finally:
        client.close()


def test_a_failover_while_publishing_and_streaming_keeps_the_promise(
    sentinel_group: SentinelGroup, hubs
):
    """SENTINEL FAILOVER while four publishers (two on each of two hubs, one request in
    flight each) publish and a stream is open on each hub: every 202 arrives on both streams
    once and in its publisher's order, or a reset covers it; nothing answered "not published"
    arrives; the same processes publish again (202), to the new master, within a deadline of
    the failover. A client that left before the failover and resumes after it on the other
    hub gets, with what it had, the same: the events it missed, or a reset."""
    target = RedisTarget(sentinel_group.url, unique_prefix())
    a = hubs(target)
    b = hubs(target)
    pids = (a.proc.pid, b.proc.pid)
    outcomes: list[Outcome] = []
    publishers = [a, b, a, b]

    def on_server(server: Any, since: Sequence[Outcome], prefix: str) -> bool:
        """Each hub's publishers have an event answered 202 among `since` in the server's
        stream."""
        entries = server.xrevrange(f"{prefix}:events", count=1000)
        stored = b" ".join(value for _, fields in entries for value in fields.values())
        return all(
            any(
                publishers[p] is hub and tag(n) in stored
                for p, n, status, _ in since
                if status == 202
            )
            for hub in (a, b)
        )

    def accepted_since(start: int, hub: HubProcess) -> int:
        return sum(
            1 for p, _, status, _ in outcomes[start:] if status == 202 and publishers[p] is hub
        )

    async def publisher(number: int, stop: asyncio.Event) -> None:
        n = number * 1_000_000
        while not stop.is_set():
            status, answer = await post(publishers[number], broadcast(n))
            outcomes.append((number, n, status, answer))
            n += 1

    async def scenario() -> None:
        async with Streams() as streams:
            clients = [await streams.open(a, "u1"), await streams.open(b, "u2")]
            leaver = await streams.open(a, "u3")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(publisher(p, stop)) for p in range(len(publishers))]
            try:
                assert await wait_for(lambda: accepted_since(0, a) >= 50, 10), "too slow"
                assert await leaver.wait_until(lambda: len(leaver.received) >= 20)
                leaver.close()  # leaves before the failover
                old = sentinel_group.master()
                await asyncio.to_thread(sentinel_group.failover)
                new = sentinel_group.master()
                assert new is not old
                after = len(outcomes)
                # the hubs write to the new master (the old one still takes writes for ~10 s)
                new_master = new.client()
                try:
                    moved = await wait_for(
                        lambda: on_server(new_master, outcomes[after:], target.prefix), 15
                    )
                finally:
                    new_master.close()
                assert moved, f"the hubs still publish to the old master: {outcomes[-4:]}"
                after = len(outcomes)
                resumed = await wait_for(
                    lambda: accepted_since(after, a) >= 50 and accepted_since(after, b) >= 50, 15
                )
                assert resumed, f"publishing did not go on: {outcomes[-4:]}"
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
            # back after the failover, on the other hub, from the last event it had
            back = await streams.open(b, "u3", last_id=leaver.last_event_id)
            # one last event on each hub: once both arrived, nothing is still on its way
            last = len(publishers)
            markers = [last * 1_000_000, last * 1_000_000 + 1]
            # the markers may be published before a hub sees the failover: a reset that comes
            # after them covers them, as it covers whatever was accepted before it
            resets_before = {id(c): numbers(c.received).count(None) for c in [*clients, back]}
            for n, hub in zip(markers, (a, b), strict=True):
                status, answer = await post(hub, broadcast(n))
                assert status == 202, (status, answer)
                outcomes.append((last, n, status, answer))

            def markers_or_reset(c: Any) -> bool:
                got = numbers(c.received)
                return set(markers) <= set(got) or got.count(None) > resets_before[id(c)]

            for client in [*clients, back]:
                assert await client.wait_until(lambda c=client: markers_or_reset(c), 15), (
                    f"the last events did not arrive, nor a reset: {numbers(client.received)[-5:]}"
                )
            statuses = Counter(status for _, _, status, _ in outcomes)
            resets = [numbers(c.received).count(None) for c in clients]
            print(f"publishes: {dict(statuses)}; resets: {resets}")
            for client, name in zip(clients, ("A", "B"), strict=True):
                found = problems(client.received, outcomes)
                assert not found, f"stream on {name}: {len(found)} problems: {found[:8]}"
            found = problems([*leaver.received, *back.received], outcomes)
            assert not found, f"the resumed client: {len(found)} problems: {found[:8]}"

    run(scenario)
    assert (a.proc.pid, b.proc.pid) == pids and a.proc.poll() is b.proc.poll() is None


def test_a_failover_to_a_lagging_replica_resets_and_never_skips(
    sentinel_group: SentinelGroup, hubs
):
    """The replica stops taking the master's writes; three events are answered 202 and
    delivered; the master dies and the lagging replica is promoted: those three are gone
    from Redis. Streams that were open get `reset`, and a client that had taken only the
    first event and resumes from it, on either hub, gets `reset` first: never the events
    after the loss as if nothing were missing. Publishing resumes in the same processes."""
    target = RedisTarget(sentinel_group.url, unique_prefix())
    a = hubs(target)
    b = hubs(target)

    async def scenario() -> None:
        async with Streams() as streams:
            open_streams = [await streams.open(a, "u1"), await streams.open(b, "u2")]
            leaver = await streams.open(a, "u3")
            first = await publish(a, broadcast(1))
            assert ids_of(await leaver.events(1)) == first
            leaver.close()  # took event 1 and went away
            for client in open_streams:
                assert ids_of(await client.events(1)) == first
            await asyncio.to_thread(sentinel_group.wait_replica_in_sync)  # event 1 is on both

            await asyncio.to_thread(sentinel_group.pause_replica)
            lost = await publish(b, broadcast(2))
            lost += await publish(a, broadcast(3))
            lost += await publish(b, broadcast(4))
            for client in open_streams:
                assert ids_of(await client.events(3)) == lost  # from the master about to die
            await asyncio.to_thread(sentinel_group.kill_master_promote_replica)
            replica = sentinel_group.master().client()  # the promoted replica: 2-4 are gone
            try:
                assert replica.xlen(f"{target.prefix}:events") == 1
            finally:
                replica.close()

            later = await publish_when_back(a, 100)
            later += await publish_when_back(b, 200)
            for client, name in zip(open_streams, ("A", "B"), strict=True):
                assert await client.wait_until(lambda c=client: None in numbers(c.received), 15), (
                    f"the open stream on {name} got no reset: {client.received[-4:]}"
                )
            for hub, name in ((a, "A"), (b, "B")):
                resumed: SSEClient = await streams.connect(hub, token("u3"), last_id=first[0])
                assert resumed.status == 200, (resumed.status, resumed.body)
                event = await resumed.next_event(timeout=10)
                assert event.event == "reset", (
                    f"resumed on {name} from before the loss without a reset: {event}"
                )
            assert later  # publishing resumed on both hubs

    run(scenario)


def test_the_master_of_the_newest_sentinel_view_is_taken(tmp_path):
    """Two sentinels name two masters: one as of configuration epoch 1 (a sentinel not yet
    told of a failover), the other as of epoch 5. The hub's client writes to the newest
    view's master, whichever sentinel it asks first (redis-py alone takes the first answer:
    during a failover, a node went back to the old master and its acknowledged writes were
    lost when that master was demoted)."""
    old = PrivateRedis(tmp_path / "old").start()
    new = PrivateRedis(tmp_path / "new").start()
    stale, fresh = SentinelProcess(tmp_path / "stale"), SentinelProcess(tmp_path / "fresh")
    try:
        for sentinel, server, epoch in ((stale, old, 1), (fresh, new, 5)):
            sentinel.conf.write_text(
                f'port {sentinel.port}\nbind 127.0.0.1\ndaemonize no\nlogfile ""\n'
                f"dir {sentinel.dir}\nsentinel myid {sentinel.myid}\n"
                f"sentinel monitor hubmaster 127.0.0.1 {server.port} 1\n"
                f"sentinel config-epoch hubmaster {epoch}\n"
            )
            sentinel.start()

        def named(sentinel: SentinelProcess, port: int) -> bool:
            sentinel.check_alive()
            answer = sentinel.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "hubmaster")
            return isinstance(answer, list) and int(answer[1]) == port

        wait_until(lambda: named(stale, old.port), 10, "the stale sentinel up")
        wait_until(lambda: named(fresh, new.port), 10, "the fresh sentinel up")

        async def scenario() -> None:
            client = redis_client(
                f"redis+sentinel://127.0.0.1:{stale.port},127.0.0.1:{fresh.port}/hubmaster/0"
            )
            try:
                await client.set("written", "here")
            finally:
                await client.aclose()

        asyncio.run(scenario())
        with new.client() as on_new, old.client() as on_old:
            assert on_new.get("written") == b"here"
            assert on_old.get("written") is None
    finally:
        for process in (stale, fresh, old, new):
            process.close()
