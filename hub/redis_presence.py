"""Presence across every node on one Redis (README, Presence): each node writes its share,
and a query reads the others' shares and merges them with its own.

Keys (`P` is `<prefix>:presence`), each with a TTL (`--presence-ttl`, 30 s), so that nothing
outlives the nodes that wrote it:

    P:nodes                     ZSET  node id -> when its entry expires (epoch ms)
    P:node:<id>:users           HASH  user -> JSON [streams, since ms, streams without sid, [sids]]
    P:node:<id>:topic:<topic>   HASH  user -> that user's streams of the topic (on that node)

A node id is drawn per process. The registry's watcher only notes which users and (topic,
user) pairs changed (set adds; no Redis call on a connect); every FLUSH_EVERY seconds at most,
the changed ones are written from the registry as it is then (HSET or HDEL, then PEXPIRE),
with the node's ZADD, in one MULTI/EXEC (a node killed mid-write leaves no key without its
TTL). Every third of the TTL a heartbeat also renews the TTL of every key the node holds; a
key whose PEXPIRE finds it gone was lost by Redis (a restart, FLUSHALL, a node stalled past
its TTL) and is written again whole.

A node that dies stops renewing: Redis expires its keys within the TTL of its last write,
on Redis's own clock, so a query never counts a node dead for longer, whatever the nodes'
clocks say; the ZSET only lists whom to read (entries expired for a TTL are removed by the
next heartbeat of any node, and the ZSET itself expires with the last node). A node that
stops cleanly deletes its keys. Other nodes' shares are as fresh as their last write (about
FLUSH_EVERY); a query takes this node's own share from its registry, as it is now.

A Redis that does not answer is ordinary: a query raises PresenceUnavailable (the handler's
503), the writer keeps what changed and tries again with backoff, and nothing else waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import ujson
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from hub.presence import (
    NodeUser,
    Presence,
    PresenceUnavailable,
    TopicPresence,
    UserPresence,
    local_topic,
    local_user,
    merge_users,
    topic_page,
)
from hub.redis_connection import redis_client
from hub.registry import Registry
from hub.stream import Stream

__all__ = ["FLUSH_EVERY", "RedisPresence"]

log = logging.getLogger("hub.presence")

FLUSH_EVERY = 0.5  # seconds between two writes of what changed, at least
CLOSE_WAIT = 1.0  # seconds a clean stop waits for Redis to delete this node's keys
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
_FAILURES = (RedisError, OSError, TimeoutError)


def _encode(share: NodeUser) -> str:
    return ujson.dumps([share.streams, share.since, share.anonymous, sorted(share.sids)])


def _decode(raw: bytes) -> NodeUser | None:
    """A node's share of a user as stored; None for anything else (never an error: a node
    of another version must not break the answer)."""
    try:
        streams, since, anonymous, sids = ujson.loads(raw)
        if (
            type(streams) is int
            and type(since) is int
            and type(anonymous) is int
            and type(sids) is list
            and all(type(s) is str for s in sids)
            and streams > 0
        ):
            return NodeUser(streams, since, anonymous, frozenset(sids))
    except (ValueError, TypeError):
        pass
    return None


class RedisPresence(Presence):
    """This node's share in Redis, kept current by a writer task; queries merge every live
    node's. Its own client (a small pool with short timeouts): a presence query never waits
    behind publishes, nor they behind it."""

    def __init__(self, registry: Registry, url: str, prefix: str, ttl: float) -> None:
        super().__init__(registry)
        self.node = secrets.token_hex(8)
        self.ttl_ms = max(1, int(ttl * 1000))
        self.beat_every = ttl / 3
        base = f"{prefix}:presence"
        self.nodes_key = f"{base}:nodes"
        self.node_prefix = f"{base}:node:"
        self.users_key = self._users_key(self.node)
        # As the broker's client, and for its reasons (hub.redis_broker): no retries inside
        # redis-py, no maintenance notifications.
        self.client = redis_client(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        # What changed since the last write (the registry's watcher adds to them).
        self.dirty_users: set[str] = set()
        self.dirty_pairs: set[tuple[str, str]] = set()  # (topic, user)
        self.written_topics: set[str] = set()  # topics whose key this node may hold
        self.changed = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.failing: str | None = None  # why the last write failed, until one succeeds
        self.closed = False
        registry.watchers.append(self._watch)

    def _users_key(self, node: str) -> str:
        return f"{self.node_prefix}{node}:users"

    def _topic_key(self, node: str, topic: str) -> str:
        return f"{self.node_prefix}{node}:topic:{topic}"

    def _watch(self, stream: Stream, added: bool) -> None:
        """Told of every stream added and removed: notes what changed, nothing more."""
        user = stream.user
        self.dirty_users.add(user)
        for topic in stream.topics:
            self.dirty_pairs.add((topic, user))
        self.changed.set()

    # -- the writer -----------------------------------------------------------------------

    def start(self) -> None:
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()  # a heartbeat at once: the node is listed from its start
        failures = 0
        while not self.closed:
            beat = loop.time() >= next_beat
            if beat or self.dirty_users or self.dirty_pairs:
                try:
                    await self._write(beat)
                except _FAILURES as exc:
                    failures += 1
                    self._failed(exc)
                    delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2**failures)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    continue
                except Exception:  # a bug must not end the writer: said, and tried again
                    log.exception("presence: writing this node's share failed")
                    failures += 1
                    await asyncio.sleep(BACKOFF_CAP)
                    continue
                if self.failing is not None:
                    log.info("presence: Redis takes this node's share again")
                    self.failing = None
                failures = 0
                if beat:
                    next_beat = loop.time() + self.beat_every
            await asyncio.sleep(FLUSH_EVERY)  # what changes meanwhile goes in one write
            self.changed.clear()
            if not (self.dirty_users or self.dirty_pairs):
                wait = next_beat - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), wait)

    def _failed(self, exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {exc}"
        if self.failing is None:
            log.warning("presence: Redis does not take this node's share (%s): retrying", why)
        else:
            log.debug("presence: still failing (%s)", why)
        self.failing = why

    async def _write(self, beat: bool) -> None:
        """Write what changed (all of it, as the registry is now) in one transaction; with
        `beat`, renew the TTL of every key this node holds, and write again whole those
        Redis lost. What changed is kept for the next attempt if this one fails."""
        users, self.dirty_users = self.dirty_users, set()
        pairs, self.dirty_pairs = self.dirty_pairs, set()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                checked = self._queue(pipe, users, pairs, beat)
                results = await pipe.execute()
        except BaseException:
            self.dirty_users |= users
            self.dirty_pairs |= pairs
            raise
        if checked:
            self._rewrite_lost(checked, results[-len(checked) :])

    def _queue(
        self, pipe: Any, users: set[str], pairs: set[tuple[str, str]], beat: bool
    ) -> list[str | None]:
        """Queue the transaction's commands (from the registry as it is now: no await in
        here); the keys whose renewal comes last, in order (None: the users key)."""
        registry, ttl, node = self.registry, self.ttl_ms, self.node
        now = int(time.time() * 1000)
        pipe.zadd(self.nodes_key, {node: now + ttl})
        pipe.pexpire(self.nodes_key, ttl)
        if beat:  # entries of nodes gone for a TTL: nobody reads their (expired) keys
            pipe.zremrangebyscore(self.nodes_key, "-inf", now - ttl)
        if users:
            put: dict[str, str] = {}
            gone: list[str] = []
            for user in users:
                share = local_user(registry, user)
                if share is None:
                    gone.append(user)
                else:
                    put[user] = _encode(share)
            _set(pipe, self.users_key, put, gone, ttl)
        by_topic: dict[str, list[str]] = {}
        for topic, user in pairs:
            by_topic.setdefault(topic, []).append(user)
        by_user = registry.by_user
        for topic, names in by_topic.items():
            counts: dict[str, int] = {}
            gone = []
            for user in names:
                n = sum(1 for s in by_user.get(user, ()) if topic in s.topics)
                if n:
                    counts[user] = n
                else:
                    gone.append(user)
            _set(pipe, self._topic_key(node, topic), counts, gone, ttl)
            if counts:
                self.written_topics.add(topic)
            elif topic not in registry.by_topic:
                self.written_topics.discard(topic)
        checked: list[str | None] = []
        if beat:
            if registry.by_user:
                pipe.pexpire(self.users_key, ttl)
                checked.append(None)
            for topic in registry.by_topic:
                pipe.pexpire(self._topic_key(node, topic), ttl)
                checked.append(topic)
        return checked

    def _rewrite_lost(self, checked: list[str | None], renewed: Sequence[Any]) -> None:
        """Keys the heartbeat found gone (PEXPIRE answered 0): their whole content is
        written again in the next write."""
        registry = self.registry
        lost = 0
        for topic, ok in zip(checked, renewed, strict=True):
            if ok:
                continue
            lost += 1
            if topic is None:
                self.dirty_users.update(registry.by_user)
            else:
                self.dirty_pairs.update((topic, s.user) for s in registry.by_topic.get(topic, ()))
        if lost:
            log.info(
                "presence: %d key(s) of this node were gone from Redis: writing them again", lost
            )
            self.changed.set()

    async def close(self) -> None:
        """Stop writing, and delete this node's keys (within CLOSE_WAIT: what a Redis out of
        reach keeps expires within the TTL). Once: a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        writer, self.writer = self.writer, None
        if writer is not None:
            # Until it has ended: a cancellation that lands as redis-py's send completes can
            # be lost (asyncio.wait_for on Python 3.11), and the loop would go on; `closed`
            # ends it at its next turn.
            self.changed.set()
            for _ in range(50):
                writer.cancel()
                done, _ = await asyncio.wait({writer}, timeout=0.1)
                if done:
                    break
        with contextlib.suppress(ValueError):
            self.registry.watchers.remove(self._watch)
        topics = self.written_topics | set(self.registry.by_topic)
        keys = [self.users_key, *(self._topic_key(self.node, t) for t in topics)]
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(self.nodes_key, self.node)
                for start in range(0, len(keys), 1000):
                    pipe.delete(*keys[start : start + 1000])
                await asyncio.wait_for(pipe.execute(), CLOSE_WAIT)
        except _FAILURES as exc:
            log.debug("presence: this node's keys were not deleted (%s): they expire", exc)
        await self.client.aclose()

    # -- queries --------------------------------------------------------------------------

    async def _others(self) -> list[str]:
        """The other nodes that may be alive: listed, and not expired for a TTL (whether
        they are is for their keys' expiry to say)."""
        now = int(time.time() * 1000)
        found: list[Any] = await self.client.zrangebyscore(
            self.nodes_key, now - self.ttl_ms, "+inf"
        )
        nodes = [bytes(n).decode(errors="replace") for n in found]
        return [n for n in nodes if n != self.node]

    async def _read(self, command: Callable[[Any, str], None]) -> list[Any]:
        """`command(pipe, node)` for every other live node, in one round trip; the answers,
        by node. PresenceUnavailable when Redis does not answer."""
        try:
            nodes = await self._others()
            if not nodes:
                return []
            async with self.client.pipeline(transaction=False) as pipe:
                for node in nodes:
                    command(pipe, node)
                answers: list[Any] = await pipe.execute()
                return answers
        except _FAILURES as exc:
            raise PresenceUnavailable(
                f"presence across the hub's nodes is unavailable: Redis did not answer "
                f"({type(exc).__name__}): retry shortly"
            ) from None

    async def users(self, users: Sequence[str]) -> dict[str, UserPresence]:
        names = list(users)
        answers = await self._read(lambda pipe, node: pipe.hmget(self._users_key(node), names))
        shares: dict[str, list[NodeUser]] = {user: [] for user in names}
        for values in answers:
            for user, raw in zip(names, values, strict=True):
                share = None if raw is None else _decode(raw)
                if share is not None:
                    shares[user].append(share)
        for user in names:
            own = local_user(self.registry, user)
            if own is not None:
                shares[user].append(own)
        return {user: merge_users(found) for user, found in shares.items()}

    async def topic(self, topic: str, limit: int, after: str | None) -> TopicPresence:
        answers = await self._read(lambda pipe, node: pipe.hgetall(self._topic_key(node, topic)))
        counts = local_topic(self.registry, topic)
        for found in answers:
            for raw_user, raw_count in found.items():
                try:
                    user, n = raw_user.decode(), int(raw_count)
                except (UnicodeDecodeError, ValueError):
                    continue
                if n > 0:
                    counts[user] = counts.get(user, 0) + n
        return topic_page(topic, counts, limit, after)


def _set(pipe: Any, key: str, put: dict[str, Any], gone: list[str], ttl: int) -> None:
    """HSET the fields of `put`, HDEL those of `gone`, renew the key's TTL."""
    if put:
        pipe.hset(key, mapping=put)
    if gone:
        pipe.hdel(key, *gone)
    pipe.pexpire(key, ttl)
