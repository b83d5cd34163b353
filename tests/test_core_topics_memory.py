"""The per-topic and per-user tables give their memory back (issue 19: a topic with no
subscribers left costs nothing): the registry's indexes and the flusher's topic channels, once
far below their peak, are rebuilt in place, and are empty dicts again once empty."""

from __future__ import annotations

import asyncio
import sys

from core_support import Peer, config

from hub.core import Hub
from hub.disconnect import GONE
from hub.registry import SHRINK_FLOOR, Registry, shrink
from hub.stream import Stream

EMPTY = sys.getsizeof({})
TOPICS = 5_000


def test_registry_tables_shrink_back_to_empty_after_5000_topics_and_users_leave():
    reg = Registry()
    by_user, by_topic = reg.by_user, reg.by_topic
    streams = [Stream(f"u{i}", topics=(f"t{i}",)) for i in range(TOPICS)]
    for s in streams:
        reg.add(s)
    peak = sys.getsizeof(by_topic)
    assert len(by_topic) == len(by_user) == TOPICS and peak > 50 * EMPTY
    for s in streams[:2_000]:
        reg.remove(s)
    # 3,000 left of 5,000: above a quarter of the peak, not rebuilt
    assert sys.getsizeof(by_topic) == peak and sys.getsizeof(by_user) == peak
    for s in streams[2_000:4_000]:
        reg.remove(s)
    # 1,000 left: rebuilt, the size of a table made for them
    assert sys.getsizeof(by_topic) <= sys.getsizeof(dict(by_topic)) < peak / 3
    assert sys.getsizeof(by_user) <= sys.getsizeof(dict(by_user)) < peak / 3
    for s in streams[4_000:]:
        reg.remove(s)
    assert (len(reg.all), len(by_user), len(by_topic)) == (0, 0, 0)
    assert sys.getsizeof(by_topic) == sys.getsizeof(by_user) == EMPTY
    # in place: a reference taken before sees the same tables
    assert reg.by_user is by_user and reg.by_topic is by_topic


def test_flusher_topic_channels_shrink_back_to_empty_after_5000_topics_are_left():
    async def scenario() -> None:
        hub = Hub(config())
        per = 50  # topics per stream: 100 streams hold 5,000 topics (200 descriptors)
        peers = [Peer() for _ in range(TOPICS // per)]
        subs = [
            hub.subscribe(p.transport, f"u{i}", topics=tuple(f"t{i}-{k}" for k in range(per)))
            for i, p in enumerate(peers)
        ]
        flusher, registry = hub.flusher, hub.registry
        channels, by_topic = flusher.topics, registry.by_topic
        assert len(channels) == len(by_topic) == TOPICS
        peak = sys.getsizeof(channels)
        for s in subs[: len(subs) // 2]:
            s.end(GONE)
        assert len(channels) == TOPICS // 2 and sys.getsizeof(channels) == peak
        for s in subs[len(subs) // 2 :]:
            s.end(GONE)
        assert (len(channels), len(by_topic), len(registry.by_user)) == (0, 0, 0)
        assert sys.getsizeof(channels) == sys.getsizeof(by_topic) == EMPTY
        assert sys.getsizeof(registry.by_user) == EMPTY
        assert flusher.topics is channels and registry.by_topic is by_topic
        # the tables still work: a topic comes back with its next subscriber
        again = Peer()
        hub.subscribe(again.transport, "u0", topics=("t0-0",))
        assert list(flusher.topics) == list(registry.by_topic) == ["t0-0"]
        await hub.stop()
        for p in [*peers, again]:
            p.shutdown()

    asyncio.run(scenario())


def test_shrink_keeps_small_tables_and_every_entry():
    small = {f"k{i}": i for i in range(SHRINK_FLOOR)}
    for i in range(SHRINK_FLOOR - 10):
        del small[f"k{i}"]
    size = sys.getsizeof(small)
    # a peak of SHRINK_FLOOR is not worth a rebuild while entries remain
    assert shrink(small, SHRINK_FLOOR) == SHRINK_FLOOR and sys.getsizeof(small) == size
    big = {f"k{i}": i for i in range(4 * SHRINK_FLOOR)}
    for i in range(3 * SHRINK_FLOOR + 1):
        del big[f"k{i}"]
    kept = dict(big)
    assert shrink(big, 4 * SHRINK_FLOOR) == len(kept) == SHRINK_FLOOR - 1
    assert big == kept and list(big) == list(kept)  # the same entries, in the same order
    tiny = {"a": 1, "b": 2, "c": 3}
    del tiny["a"], tiny["b"], tiny["c"]
    assert shrink(tiny, 3) == 3  # a peak of 3: not worth clearing
