"""Join and leave events (--join-leave, hub.joins) in the core, without Tornado: a real hub with
the memory broker, streams over socketpairs. Which streams make a join or a leave, the batching,
and what a subscriber of the topic reads."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from core_support import Peer, config, parse_blocks
from sse import wait_for

from hub.config import ConfigError, parse_config
from hub.core import Hub
from hub.disconnect import GONE
from hub.dispatch import Route
from hub.joins import MAX_EVENT_USERS
from hub.stream import Stream

Change = tuple[str, str, list[str]]  # (join or leave, topic, users)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    assert await wait_for(cond, timeout), "condition not met before the deadline"


def changes(hub: Hub) -> list[Change]:
    """The join and leave events the hub published, as its history holds them."""
    history = hub.history
    return [
        (e.name, e.data["topic"], e.data["users"])
        for e in history.read(history.first_seq)
        if e.name in ("join", "leave")
    ]


class Streams:
    """Streams opened on a hub over socketpairs, each closed at the end."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.peers: list[Peer] = []

    def open(self, user: str, *topics: str) -> Stream:
        peer = Peer()
        self.peers.append(peer)
        return self.hub.subscribe(peer.transport, user, topics=topics)

    async def mark(self, label: str, topic: str = "room:1") -> list[Change]:
        """A user `label` joins `topic` (and stays): the changes once its join is published
        (with whatever else its batch held)."""
        self.open(label, topic)
        await until(lambda: any(label in users for _, _, users in changes(self.hub)))
        return changes(self.hub)

    async def close(self) -> None:
        await self.hub.stop()
        for peer in self.peers:
            peer.shutdown()


def test_a_users_first_stream_joins_a_second_does_not_and_the_last_to_end_leaves():
    async def scenario() -> None:
        hub = Hub(config(join_leave="room:*"))
        streams = Streams(hub)
        first = streams.open("alice", "room:1")
        await until(lambda: changes(hub) == [("join", "room:1", ["alice"])])
        second = streams.open("alice", "room:1", "lobby")
        assert await streams.mark("m1") == [
            ("join", "room:1", ["alice"]),
            ("join", "room:1", ["m1"]),
        ]
        first.end(GONE)  # alice still has a stream on room:1
        assert changes(hub)[-1] == ("join", "room:1", ["m1"])
        assert (await streams.mark("m2"))[2:] == [("join", "room:1", ["m2"])]
        second.end(GONE)
        await until(lambda: changes(hub)[-1] == ("leave", "room:1", ["alice"]))
        assert len(changes(hub)) == 4
        await streams.close()

    run(scenario)


def test_a_reconnect_within_a_batch_shows_nothing_nor_a_visit_within_one():
    async def scenario() -> None:
        hub = Hub(config(join_leave="room:*"))
        streams = Streams(hub)
        gone = streams.open("alice", "room:1")
        await until(lambda: changes(hub) == [("join", "room:1", ["alice"])])
        gone.end(GONE)  # the connection drops ...
        streams.open("alice", "room:1")  # ... and the client is back in the same batch
        streams.open("bob", "room:1").end(GONE)  # bob comes and goes within one batch
        assert await streams.mark("m1") == [
            ("join", "room:1", ["alice"]),
            ("join", "room:1", ["m1"]),
        ]
        await streams.close()

    run(scenario)


def test_only_the_topics_configured_show_joins_and_only_on_their_presence_topic():
    async def scenario() -> None:
        hub = Hub(config(join_leave="room:1,team:*"))
        streams = Streams(hub)
        watcher, member, outsider = Peer(), Peer(), Peer()
        streams.peers += [watcher, member, outsider]
        # the watcher asks for room:1's joins; the member is in room:1 and is told nothing
        hub.subscribe(watcher.transport, "dash", topics=("presence:room:1",))
        hub.subscribe(member.transport, "bob", topics=("room:1",))
        hub.subscribe(outsider.transport, "eve", topics=("lobby", "room:2", "presence:room:2"))
        streams.open("alice", "lobby", "room:1", "room:2", "team:a")
        # in one turn of the loop: one batch, a join event per topic
        await until(lambda: len(changes(hub)) == 2)
        assert changes(hub) == [
            ("join", "room:1", ["bob", "alice"]),
            ("join", "team:a", ["alice"]),
        ]
        assert [e.route for e in hub.history.read(hub.history.first_seq)] == [
            Route(topics=("presence:room:1",)),
            Route(topics=("presence:team:a",)),
        ]

        def seen(peer: Peer) -> list[dict[str, Any]]:
            peer.read()
            return [
                json.loads(b["data"])
                for b in parse_blocks(bytes(peer.received))
                if b.get("event") in ("join", "leave")
            ]

        await until(lambda: seen(watcher) != [])
        [event] = seen(watcher)
        assert event["user"] is None
        assert event["data"] == {"topic": "room:1", "users": ["bob", "alice"]}
        await until(lambda: hub.flusher.idle)
        assert seen(member) == [] and seen(outsider) == []
        await streams.close()

    run(scenario)


def test_every_topic_is_followed_with_a_star_but_never_a_presence_topic():
    async def scenario() -> None:
        hub = Hub(config(join_leave="*"))
        streams = Streams(hub)
        streams.open("dash", "presence:room:1", "presence:presence:room:1")
        streams.open("alice", "room:1", "x" * 120)  # its presence topic would be too long
        await until(lambda: len(changes(hub)) == 1)
        assert changes(hub) == [("join", "room:1", ["alice"])]
        assert await streams.mark("m1", "lobby") == [
            ("join", "room:1", ["alice"]),
            ("join", "lobby", ["m1"]),
        ]
        await streams.close()

    run(scenario)


def test_without_the_setting_no_watcher_is_registered():
    async def scenario() -> None:
        hub = Hub(config())
        assert hub.joins is None and hub.registry.watchers == []
        await hub.stop()
        hub = Hub(config(join_leave=" , "))  # nothing but separators: off too
        assert hub.joins is None and hub.registry.watchers == []
        await hub.stop()

    run(scenario)


def test_a_storm_of_joins_is_one_event_per_topic_per_batch():
    async def scenario() -> None:
        hub = Hub(config(join_leave="*"))
        streams = Streams(hub)
        users = [f"u{i}" for i in range(MAX_EVENT_USERS + 5)]
        for user in users:  # in one turn of the loop: one batch
            streams.open(user, "room:1", "room:2")
        await until(lambda: len(changes(hub)) == 4)
        for topic in ("room:1", "room:2"):
            listed = [u for name, t, us in changes(hub) if t == topic for u in us]
            assert listed == users  # in the order they joined, each once
        assert [len(us) for _, t, us in changes(hub) if t == "room:1"] == [MAX_EVENT_USERS, 5]
        await streams.close()

    run(scenario)


def test_a_broker_that_is_down_costs_a_connect_nothing_and_the_batch_is_bounded():
    """Redis unreachable (nothing listens on port 1): subscribing still works, the changes of
    the batch are counted as failed, and those past the bound as dropped."""

    async def scenario() -> None:
        hub = Hub(config(join_leave="room:*", broker="redis://127.0.0.1:1/0"))
        assert hub.joins is not None
        hub.joins.max_pending = 5
        streams = Streams(hub)
        for i in range(20):
            streams.open(f"u{i}", "room:1")
        assert len(hub.registry) == 20

        def outcomes() -> dict[str, float]:
            samples = hub.metrics.registry.collect()
            return {
                s.labels["kind"]: s.value
                for family in samples
                if family.name == "hub_membership_events"
                for s in family.samples
                if s.name.endswith("_total")
            }

        await until(lambda: outcomes()["failed"] == 5)
        assert outcomes() == {"join": 0, "leave": 0, "dropped": 15, "failed": 5}
        assert hub.joins.pending == 0
        await hub.stop(publish_wait=1.0)
        for peer in streams.peers:
            peer.shutdown()

    run(scenario)


def test_a_bad_topic_or_pattern_in_the_setting_stops_the_hub_at_start_saying_which():
    env = {"HUB_JWT_SECRET": "x" * 40}
    for bad, said in (
        ("room:1,ro om", "'ro om': a topic name is made of"),
        ("room:*:x", "'room:*:x': a topic name is made of"),
        ("r*x*", "pattern 'r*x*': a pattern is a topic name's beginning then one `*`"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"--join-leave: {said}")):
            parse_config(["--join-leave", bad], env)
    with pytest.raises(ConfigError, match="--join-leave: 'a b'"):
        parse_config([], {**env, "HUB_JOIN_LEAVE": "a b"})
    taken = parse_config([], {**env, "HUB_JOIN_LEAVE": "room:*, lobby"}).join_leave_topics()
    assert "room:7" in taken and "lobby" in taken and "lobby:2" not in taken
