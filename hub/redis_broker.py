"""The Redis broker: every hub process, on one machine or many, behaves as one hub.

One Redis stream (`<prefix>:events`) is the order, the ids and the shared history at once
(../shared/DESIGN.md). A publish request is ONE stream entry holding its whole batch (all
or nothing); its events get consecutive ids `<ms>-<n>-<epoch>` and the entry's id is that of its
last event, so event ids are Redis stream ids plus the epoch, and compare as the history
compares them. Measured against one entry per event and against Pub/Sub plus a separate
history, one entry per batch published 3x faster and was read 4x faster at batches of 100
(README, Scale-out).

The promise, whatever Redis does: an event answered as stored reaches each entitled stream once, in
order, or the stream is told `reset`. Redis can lose data (a restart without persistence,
FLUSHALL) or go back (a failover to a replica that lagged, an AOF that lost its last second),
and the same ids then name other events. So positions carry an epoch (as centrifuge's do): the
head key `<prefix>:head` holds the last id, the epoch and where the epoch started, and
hub/redis_publish.lua starts a new epoch whenever the history is missing or behind what a node
knows was stored. A node resets its streams whenever the order it follows breaks (another
epoch, an entry whose predecessor it did not read, an entry it cannot read), and the history
(hub.history) resumes exactly only from an id it holds in its own epoch.

Each process follows the stream with one `XREAD BLOCK` loop and hands every event to its hub
(`Node.deliver`), its own publishes included, so every node delivers in the same order. The
loop is supervised: an error in it is logged, counted and retried; it is never the end of it.

A publish has three answers: stored, provably not stored ("not published": the request
never left, or Redis refused it before any write; BrokerUnavailable), or unknown (it was sent
and no answer came, OutcomeUnknown; a retry under the same Idempotency-Key settles it without
publishing twice).
Concurrent publishes are sent together: while one script call is in flight the next ones
queue, and go out in the next call (one round trip for many requests, each its own entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ujson
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from hub.broker import (
    BrokerMisconfigured,
    BrokerUnavailable,
    Idempotency,
    IdempotencyConflict,
    Node,
    OutcomeUnknown,
    PublishResult,
)
from hub.dispatch import Route
from hub.history import EventKey, format_id, parse_id
from hub.message import Event
from hub.redis_connection import redact, redis_client

__all__ = ["FORMAT", "RedisBroker"]

log = logging.getLogger("hub.broker")

SCRIPT = Path(__file__).with_name("redis_publish.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
# The version of the entries this hub writes and reads (field `v`). A node that meets another
# does not deliver around it: it says so and turns unready (README, Scale-out on Redis).
FORMAT = b"2"

READ_COUNT = 256  # entries per XREAD: each may hold a whole batch
READ_BLOCK_MS = 500
# The feed is live while Redis answered within this many seconds (an idle XREAD returns every
# READ_BLOCK_MS): past it, the node is not ready and publishes are refused before they are sent.
LIVE_FOR = 1.5
# How often that is judged, by a timer: a judgement that runs late is skipped. A loop held up
# (a reconnect storm, a long flush pass) has not let the feed take Redis's answer yet; "not
# heard for 1.5 s" then says nothing about Redis, and a node must not turn unready (and refuse
# every stream) exactly while its clients reconnect.
LIVE_CHECK = 0.25
CHECK_EVERY = 1.0  # seconds between looks at the head (lost or rolled-back data) and trims
# The most bytes of batches one script call carries; the rest go in the next call.
SEND_BYTES = 4 * 1024 * 1024
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0

OUTCOME_UNKNOWN = (
    "outcome unknown: the publish reached Redis but no answer came back ({why}); it may or "
    "may not be stored: retry it under the same Idempotency-Key (never published twice)"
)


class FeedStopped(Exception):
    """The feed cannot go on without breaking the order: it stays where it is, unready."""


def _encode(events: Sequence[Event]) -> str:
    """A batch as one JSON array: each event's number, name, user, ts, encoded body, route
    (computed once, by the node that took the publish) and when it was accepted."""
    rows = []
    for e in events:
        route = e.route if e.route is not None else Route()
        users, topics, everyone, ends = route
        rows.append(
            (e.type, e.name, e.user, e.ts, e.body, users, topics, everyone, ends, e.accepted)
        )
    return ujson.dumps(rows, escape_forward_slashes=False)


def _decode(blob: bytes) -> list[Event]:
    events = []
    for type_, name, user, ts, body, users, topics, everyone, ends, accepted in ujson.loads(blob):
        event = Event.restore(type_, name, user, ts, body, accepted)
        event.route = Route(
            tuple(users), tuple(topics), everyone, (ends[0], ends[1]) if ends else None
        )
        events.append(event)
    return events


def _number(eid: str, events: Sequence[Event], epoch: str) -> None:
    """Give a batch's events their ids: the entry's id is its last event's."""
    ms_text, _, last_text = eid.partition("-")
    ms = int(ms_text)
    seq = int(last_text) - len(events) + 1
    for event in events:
        event.assign_id(ms, seq, epoch)
        seq += 1


def _head(raw: bytes) -> tuple[str, str, str]:
    """(last id, epoch, start) from the head key's value."""
    last, epoch, start = raw.decode().split(" ")
    return last, epoch, start


def _key(stream_id: str) -> EventKey:
    key = parse_id(stream_id)
    if key is None:
        raise ValueError(f"not a stream id: {stream_id[:64]!r}")
    return key


async def _round_trip(conn: Any, commands: list[tuple[Any, ...]]) -> tuple[Any, Any]:
    """The script's reply, and WAIT's when it was sent too (else None). Both replies are read
    even when the script's is an error, so the connection stays in step."""
    await conn.send_packed_command(conn.pack_commands(commands))
    try:
        reply = await conn.read_response()
    except ResponseError:
        if len(commands) > 1:
            await conn.read_response()
        raise
    acked = await conn.read_response() if len(commands) > 1 else None
    return reply, acked


def _fresh_epoch() -> str:
    return secrets.token_hex(4)


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        history: int,
        revoke_ttl: float,
        max_revocations: int = 100_000,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.url = url
        # Each script call is followed by WAIT on its connection (in the same write): its
        # publishes are answered 202 only once this many replicas took them.
        self.wait = ("WAIT", wait_replicas, max(1, int(wait_timeout * 1000)))
        self.stream = f"{prefix}:events"
        self.keys = [self.stream, f"{prefix}:head", f"{prefix}:revoked"]
        self.idempotency_prefix = f"{prefix}:idempotency:"  # + the key's SHA-256
        self.ticket_prefix = f"{prefix}:ticket:"  # + the ticket's SHA-256 (hub.tickets)
        self.history = history
        # MAXLEN bounds the stream between the nodes' trims to their history floors (each
        # second): it must also hold a burst that a healthy node has not read yet, or that
        # node would be told to reset for events it was about to read.
        self.maxlen = 2 * max(history, 1000)
        self.revoke_ttl = revoke_ttl
        self.max_revocations = max_revocations
        self.floor: EventKey = (0, 0)
        self.synced = False
        self.closing = False
        # Where this node is in the shared order: the epoch it follows, the last entry it read
        # (its XREAD position), and its witness: the newest entry it knows Redis stored in
        # this epoch (read, or acknowledged to its own publish). Redis found behind the
        # witness has lost writes: a new epoch.
        self.epoch = ""
        self.last_id = "0-0"
        self.witness: EventKey = (0, 0)
        self.live_at = float("-inf")  # monotonic time of Redis's last answer to the feed
        self.quiet = True  # Redis has not answered for LIVE_FOR (judged by _judge_live)
        self.judging: asyncio.TimerHandle | None = None
        self.misconfigured: str | None = None  # a Redis setting that breaks the promise
        self.check_reported = False  # check() (at start) reports a misconfiguration itself
        self.stuck: str | None = None  # an entry this node cannot read without skipping it
        self.resets: Counter[str] = Counter()  # times this node reset its streams, by cause
        self.feed_errors = 0  # entries that could not be read or delivered
        self.failing: str | None = None  # why the feed last failed, until it reads again
        self.node: Node | None = None
        # No retries inside redis-py: a publish retried after an ambiguous failure could be
        # stored twice; the feed retries with its own backoff. Maintenance notifications off:
        # while they are on ("auto", redis-py 8's default) the pool hands out connections
        # without checking them, so after a Redis restart the first publish went out on a
        # connection the server had closed and was refused with Redis up again.
        options: dict[str, Any] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "retry": Retry(NoBackoff(), 0),
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        self.client = redis_client(url, **options)
        self.feed = redis_client(url, **options)
        self.feed_script = self.feed.register_script(SCRIPT)
        self.queue: list[
            tuple[Sequence[Event], str, list[str], Idempotency | None, asyncio.Future[str]]
        ] = []
        self.sender: asyncio.Task[None] | None = None
        self.sending: list[
            tuple[Sequence[Event], str, list[str], Idempotency | None, asyncio.Future[str]]
        ] = []  # the group whose script call is in flight
        self.follower: asyncio.Task[None] | None = None
        # This node's own batches, by number, until the feed brings them back: they are
        # delivered as they are, not decoded again (half the feed's work on a lone node).
        self.origin = secrets.token_hex(8)
        self.sent = 0
        self.own: dict[int, Sequence[Event]] = {}

    def start(self, node: Node) -> None:
        self.node = node
        loop = asyncio.get_running_loop()
        self.follower = loop.create_task(self._follow())
        if self.judging is not None:
            self.judging.cancel()
        self.judging = loop.call_later(LIVE_CHECK, self._judge_live, loop.time() + LIVE_CHECK)

    def _heard(self) -> None:
        self.live_at = time.monotonic()
        self.quiet = False

    def _judge_live(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - due < LIVE_CHECK:  # on time: the feed had its chances to hear
            self.quiet = time.monotonic() - self.live_at >= LIVE_FOR
        if not self.closing:
            self.judging = loop.call_later(LIVE_CHECK, self._judge_live, now + LIVE_CHECK)

    @property
    def ready(self) -> bool:
        return (
            self.synced
            and not self.closing
            and self.misconfigured is None
            and self.stuck is None
            and not self.quiet
        )

    def unready_reason(self) -> str:
        """Why `ready` is false (for logs and refusals)."""
        if self.closing:
            return "the hub is shutting down"
        if self.misconfigured is not None:
            return self.misconfigured
        if self.stuck is not None:
            return self.stuck
        if not self.synced:
            return "the shared history is not loaded yet (is Redis up?)"
        return f"Redis has not answered for over {LIVE_FOR:g} s"

    async def check(self) -> None:
        """Raise BrokerMisconfigured if Redis is set up so that the promise cannot hold. A
        Redis that does not answer is not an error here: the feed keeps trying. (The caller
        reports the refusal: the feed does not log it too.)"""
        self.check_reported = True
        with contextlib.suppress(RedisError, OSError):
            await self._check_server()

    async def _check_server(self) -> None:
        """Redis must never evict: an evicted idempotency key publishes a retry twice; an
        evicted stream, head or logout loses events or revocations without a reset."""
        try:
            info: Any = await self.feed.info("memory")
        except ResponseError as exc:  # INFO renamed or denied: nothing says it cannot evict
            info = {"maxmemory_policy": f"unknown (INFO memory: {exc})"}
        policy = info.get("maxmemory_policy", "unknown")
        if policy != "noeviction":
            why = (
                f"Redis at {redact(self.url)} has maxmemory-policy {policy}: the hub needs "
                "noeviction (an evicted idempotency key publishes a retry twice, an evicted "
                "stream, head or logout loses events or revocations without a reset); set "
                "maxmemory-policy noeviction"
            )
            self.misconfigured = why
            raise BrokerMisconfigured(why)
        self.misconfigured = None

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self, events: Sequence[Event], idempotency: Idempotency | None = None
    ) -> PublishResult:
        if self.closing:
            raise BrokerUnavailable("the hub is shutting down")
        if not self.ready:  # refused before it is sent: provably not published
            raise BrokerUnavailable(self.unready_reason())
        revoked = [
            ujson.dumps(e.route.ends) for e in events if e.route is not None and e.route.ends
        ]
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.queue.append((events, _encode(events), revoked, idempotency, done))
        if self.sender is None:
            self.sender = asyncio.get_running_loop().create_task(self._send())
        answer = await done
        kind, rest = answer[0], answer[1:]
        if kind == "!":
            raise BrokerUnavailable(f"Redis refused it: {rest}")
        parts = rest.split(" ")
        if kind == "=":
            # "<body hash> <first id> <epoch>"; keys stored by hubs before epochs have none
            body, first, epoch = (*parts, "")[:3]
            assert idempotency is not None
            if body != idempotency.body:
                raise IdempotencyConflict()
        else:
            first, epoch = parts
        ms, seq = _key(first)
        ids = [format_id((ms, n), epoch) for n in range(seq, seq + len(events))]
        return PublishResult(ids, replayed=kind == "=")

    async def _send(self) -> None:
        """Send what is queued, in as few script calls as its size allows, one at a time:
        publishes that arrive meanwhile go in the next call (one entry each, in order). No
        failure leaves a publish without an answer."""
        try:
            while self.queue:
                size = 0
                count = 0
                for _, blob, *_ in self.queue:
                    if count and size + len(blob) > SEND_BYTES:
                        break
                    size += len(blob)
                    count += 1
                group, self.queue = self.queue[:count], self.queue[count:]
                first = self.sent
                self.sent += len(group)
                window = max((i.window for *_, i, _ in group if i is not None), default=0.0)
                keys = list(self.keys)
                args: list[Any] = [
                    self.maxlen,
                    int(self.revoke_ttl * 1000),
                    f"{self.origin}:{first}",
                    max(1, int(window * 1000)),
                    self.epoch,
                    format_id(self.witness, ""),
                    _fresh_epoch(),
                    self.max_revocations,
                    "0",
                ]
                for n, (events, blob, revoked, idempotency, _) in enumerate(group, first):
                    has_key, body = "0", ""
                    if idempotency is not None:
                        keys.append(self.idempotency_prefix + idempotency.key)
                        has_key, body = "1", idempotency.body
                    args += [len(events), blob, has_key, body, len(revoked), *revoked]
                    self.own[n] = events
                self.sending = group  # until each has its answer
                try:
                    reply = await self._call(keys, args)
                except BrokerUnavailable as exc:  # OutcomeUnknown included
                    self.sending = []
                    for n in range(first, first + len(group)):
                        self.own.pop(n, None)
                    for *_, done in group:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                self._answer(first, group, reply)
                self.sending = []
        except Exception:
            # A bug, not Redis: still, no publish may wait for ever.
            log.exception("Redis broker: the publish sender failed")
            why = "the hub's sender failed"
            for *_, done in self.sending:
                if not done.done():
                    done.set_exception(OutcomeUnknown(OUTCOME_UNKNOWN.format(why=why)))
            for *_, done in self.queue:
                if not done.done():
                    done.set_exception(BrokerUnavailable(why))
            self.sending = []
            self.queue = []
        finally:
            self.sender = None

    def _answer(self, first: int, group: list[Any], reply: list[bytes]) -> None:
        for n, (events, *_, done), raw in zip(
            range(first, first + len(group)), group, reply[1:], strict=True
        ):
            text = raw.decode()
            if text[0] != "+":
                self.own.pop(n, None)  # nothing comes back for it
            elif text.endswith(" " + self.epoch):
                ms, seq = _key(text[1:].partition(" ")[0])
                stored = (ms, seq + len(events) - 1)
                if stored > self.witness:
                    self.witness = stored
            if not done.done():
                done.set_result(text)

    async def _call(self, keys: list[str], args: list[Any]) -> list[bytes]:
        """One script call on a connection of its own, so that where it failed says what the
        answer is: before it was sent (no connection), BrokerUnavailable; refused by Redis
        before any write (an error reply), BrokerUnavailable; anything after it was sent
        and before its answer, OutcomeUnknown."""
        pool = self.client.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis did not take it: {exc}") from None
        command = ("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        commands = [command, self.wait] if self.wait[1] else [command]
        try:
            try:
                reply, acked = await _round_trip(conn, commands)
            except NoScriptError:  # an answer: it did not run. Load it, then send again.
                await conn.send_command("SCRIPT", "LOAD", SCRIPT)
                await conn.read_response()
                reply, acked = await _round_trip(conn, commands)
        except ResponseError as exc:
            raise BrokerUnavailable(f"Redis refused it: {exc}") from None
        except (RedisError, OSError) as exc:
            await conn.disconnect()
            raise OutcomeUnknown(OUTCOME_UNKNOWN.format(why=exc or type(exc).__name__)) from None
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        if acked is not None and int(acked) < self.wait[1]:
            raise OutcomeUnknown(
                f"outcome unknown: stored on the Redis master, but {acked} of {self.wait[1]} "
                f"replicas took it within {self.wait[2]} ms (--redis-wait-replicas), so a "
                "failover may lose it: retry it under the same Idempotency-Key (never "
                "published twice)"
            )
        return list(reply)

    # -- the feed ---------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Check Redis, load the shared history, then follow the stream. Whatever fails (Redis,
        an entry, a bug) is logged, counted and retried with capped, jittered backoff, from
        the last entry read: nothing ends the feed but close()."""
        backoff = BACKOFF_FIRST
        while self._following():
            try:
                await self._check_server()
                if not self.synced:
                    await self._load()
                await self._read()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                why = f"Redis broker unreachable ({exc or type(exc).__name__}): retrying"
                if self.failing is None:
                    log.warning("%s", why)
                self.failing = why
            except (BrokerMisconfigured, FeedStopped) as exc:
                first = isinstance(exc, BrokerMisconfigured) and self.check_reported
                self.check_reported = False  # check() says it once, at start; the feed after
                if self.failing != str(exc) and not first:
                    log.error("Redis broker: %s; this node is not ready until then", exc)
                self.failing = str(exc)
                backoff = BACKOFF_CAP
            except Exception:
                self.feed_errors += 1
                log.exception("Redis broker: feed failed; following again from %s", self.last_id)
                self.failing = "feed failed"
            else:
                continue
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(BACKOFF_CAP, backoff * 2)
            if self.live_at > time.monotonic() - LIVE_FOR:
                backoff = BACKOFF_FIRST  # it had been reading again: the next failure is new

    def _following(self) -> bool:
        """Whether the feed goes on. A cancellation can be lost on Python 3.11 (asyncio.wait_for,
        inside redis-py, swallows one that lands as its wait completes): the task then asks
        whether it was cancelled, or it would read for ever and hang the loop's shutdown."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError()
        return not self.closing

    async def _head_call(self, epoch: str, bump: bool) -> tuple[str, str, str, bool]:
        """The publish script with no batch: the head (last, epoch, start) after it, and
        whether this call started that epoch."""
        fresh = _fresh_epoch()
        reply: Any = await self.feed_script(
            keys=self.keys,
            args=[
                self.maxlen,
                int(self.revoke_ttl * 1000),
                f"{self.origin}:0",
                1,
                epoch,
                format_id(self.witness, ""),
                fresh,
                self.max_revocations,
                "1" if bump else "0",
            ],
        )
        self._heard()
        last, new_epoch, start = _head(reply[0])
        return last, new_epoch, start, new_epoch == fresh

    async def _follow_head(self, bump: bool = False) -> None:
        """Look at the head (creating it, or starting a new epoch, as the script decides) and
        follow its epoch if it is not this node's. `bump`: this node read the order go back."""
        _, epoch, start, ours = await self._head_call(self.epoch, bump)
        if epoch == self.epoch:
            return
        if self.synced and not ours and start != "0-0" and self.witness > _key(start):
            # Another node started this epoch after its start, and this node read or stored
            # entries past it that the epoch does not hold (two masters took writes for a
            # while: a failover). Streams of the nodes already in it were reset before those
            # were accepted: a new epoch resets them again.
            _, epoch, start, _ = await self._head_call(epoch, True)
            bump = True
        if self.synced:
            if start == "0-0":
                cause, why = "lost", "Redis lost the shared history (a restart without "
                why += "persistence, FLUSHALL, or a new server): a new epoch"
            elif bump or _key(start) < self.witness:
                cause, why = "rollback", f"Redis went back to {start}, behind {self.witness[0]}-"
                why += f"{self.witness[1]} that it had stored (a failover to a replica that "
                why += "lagged, or an append-only file that lost its last writes): a new epoch"
            else:
                cause, why = "epoch", "another node started a new epoch (it saw Redis lose "
                why += "or roll back data)"
            self._reset(cause, f"{start}-{epoch}", why)
        self.epoch = epoch
        self.last_id = start
        self.witness = _key(start)

    async def _load(self) -> None:
        """What the stream holds of the current epoch and the logouts still in force: a node
        that just started serves resumes and refuses revoked tokens like the others."""
        node = self.node
        assert node is not None
        await self._follow_head()
        now_ms = time.time() * 1000
        async with self.feed.pipeline(transaction=True) as pipe:
            pipe.get(self.keys[1])
            pipe.xrevrange(self.stream, count=self.history)
            pipe.zrevrangebyscore(
                self.keys[2],
                "+inf",
                now_ms - self.revoke_ttl * 1000,
                start=0,
                num=self.max_revocations,
                withscores=True,
            )
            raw_head, entries, logouts = await pipe.execute()
        if raw_head is None:
            raise FeedStopped("the head vanished while loading; loading again")
        last, epoch, _ = _head(raw_head)
        keep: list[Any] = []
        for entry in entries:  # newest first: this epoch's entries are the newest
            self._check_format(entry)
            if entry[1].get(b"x", b"").decode() != epoch:
                break
            keep.append(entry)
        keep.reverse()
        floor = keep[0][1][b"p"].decode() if keep else last
        self.epoch = epoch
        self.last_id = floor
        self.witness = _key(floor)
        self.floor = self.witness
        node.resync(format_id(self.floor, epoch))
        for member, at in logouts:
            user, sid = ujson.loads(member)
            node.revoke(user, sid, at)
        self._hand_over(keep)
        self._heard()
        self.synced = True

    async def _read(self) -> None:
        await self.feed.ping()  # ready now, not when the first blocking read returns
        self._heard()
        if self.failing is not None:
            log.info("Redis broker reachable again: following from %s", self.last_id)
            self.failing = None  # the next failure is logged again
        checked = time.monotonic()
        while self._following():
            reply: Any = await self.feed.xread(
                {self.stream: self.last_id}, count=READ_COUNT, block=READ_BLOCK_MS
            )
            self._heard()
            broke = self._hand_over(reply[0][1]) if reply else None
            self.stuck = None
            if broke or not reply or time.monotonic() - checked >= CHECK_EVERY:
                checked = time.monotonic()
                epoch = self.epoch
                await self._follow_head(bump=broke is not None and broke[0] == "rollback")
                if broke is not None and broke[0] == "epoch" and self.epoch == epoch:
                    # an entry of an epoch the head does not name: read past it, as any
                    # entry that cannot be read (or the feed would read it for ever)
                    self._unreadable(broke[1], ValueError("an entry of another epoch"))
                await self._trim()

    def _check_format(self, entry: tuple[bytes, dict[bytes, bytes]]) -> None:
        version = entry[1].get(b"v")
        if version != FORMAT:
            what = "no format version" if version is None else f"format version {version!r}"
            self.stuck = (
                f"entry {entry[0].decode(errors='replace')} of {self.stream} has {what}, which "
                f"this hub (format {FORMAT.decode()}) cannot read: it delivers nothing past it "
                "(a node of another version writes to this prefix; run one version per prefix)"
            )
            raise FeedStopped(self.stuck)

    def _hand_over(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> tuple[str, str] | None:
        """Deliver entries in order. Where the order breaks in a way only the head can settle
        (an entry of another epoch, or Redis gone back), stop and return why ("epoch" or
        "rollback") and the entry's id: the caller looks at the head. None when all were
        handled."""
        node = self.node
        assert node is not None
        for entry in entries:
            self._check_format(entry)
            raw_id, fields = entry
            try:
                eid = raw_id.decode()
                key = _key(eid)
                epoch = fields[b"x"].decode()
                prev = fields[b"p"].decode()
                prev_key = _key(prev)
            except (KeyError, UnicodeDecodeError, ValueError) as exc:
                self._unreadable(raw_id.decode(errors="replace"), exc)
                continue
            if epoch != self.epoch:
                return "epoch", eid
            if prev != self.last_id:
                if prev_key < _key(self.last_id):
                    return "rollback", eid
                self._reset(
                    "trimmed",
                    f"{prev}-{epoch}",
                    f"missed the entries from {self.last_id} to {prev} (behind what Redis keeps)",
                )
            elif prev_key < self.witness < key:
                return "rollback", eid  # an entry Redis acknowledged to this node is gone
            try:
                events = self._own(fields.get(b"o"))
                if events is None:
                    events = _decode(fields[b"e"])
                _number(eid, events, epoch)
                for event in events:
                    node.deliver(event)
            except Exception as exc:
                self._unreadable(eid, exc)
                continue
            self.last_id = eid
            if key > self.witness:
                self.witness = key
        return None

    def _unreadable(self, eid: str, exc: Exception) -> None:
        """An entry that cannot be read or delivered: a gap like any other (its events may
        have been owed to any stream here), never the end of the feed."""
        self.feed_errors += 1
        key = parse_id(eid)
        if key is None or key <= _key(self.last_id):
            log.error("Redis broker: skipped an entry with a bad id %r (%s)", eid[:64], exc)
            return
        why = f"entry {eid} unreadable ({type(exc).__name__}: {exc})"
        self._reset("unreadable", f"{eid}-{self.epoch}", why)
        self.last_id = eid
        if key > self.witness:
            self.witness = key

    def _reset(self, cause: str, floor: str, why: str) -> None:
        node = self.node
        assert node is not None
        self.resets[cause] += 1
        log.warning("Redis broker: %s; streams here are told to reset (from %s)", why, floor)
        node.resync(floor)
        self.floor = parse_id(floor) or self.floor

    def _own(self, origin: bytes | None) -> Sequence[Event] | None:
        """The events of a batch this node sent (None for another node's): those of earlier
        batches that never came back (lost in a gap) are forgotten with them."""
        if origin is None:
            return None
        node, _, number = origin.decode().rpartition(":")
        if node != self.origin:
            return None
        n = int(number)
        own = self.own
        while own:
            oldest = next(iter(own))
            if oldest >= n:
                break
            del own[oldest]
        return own.pop(n, None)

    async def _trim(self) -> None:
        """Keep in Redis what the history holds (it is bounded by bytes too, which MAXLEN is
        not): entries whose events are all at or before the floor go, and with them every
        entry of the epochs before."""
        assert self.node is not None
        ms, seq = self.node.history_floor()
        if ms:
            await self.feed.xtrim(self.stream, minid=f"{ms}-{seq + 1}", approximate=True)

    # -- one-time stream tickets (hub.tickets) ----------------------------------------------

    async def put_ticket(self, key: str, claims: bytes, ttl: float) -> None:
        """SET NX PX: Redis expires it; NX never overwrites one (a 256-bit collision)."""
        if self.closing:
            raise BrokerUnavailable("the hub is shutting down")
        try:
            await self.client.set(
                self.ticket_prefix + key, claims, px=max(1, int(ttl * 1000)), nx=True
            )
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis did not take the ticket: {exc}") from None

    async def take_ticket(self, key: str) -> bytes | None:
        """GETDEL (Redis 6.2+): one atomic step, so of all the nodes one gets it, once."""
        if self.closing:
            raise BrokerUnavailable("the hub is shutting down")
        try:
            found: Any = await self.client.getdel(self.ticket_prefix + key)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis did not answer for the ticket: {exc}") from None
        return bytes(found) if found is not None else None

    async def close(self) -> None:
        """Stop following and sending. The hub calls this after waiting for its publishes: one
        still waiting on Redis now is answered OutcomeUnknown, rather than cut without an
        answer at the shutdown's deadline."""
        self.closing = True
        if self.judging is not None:
            self.judging.cancel()
        if self.follower is not None:
            self.follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self.follower
        unknown = OutcomeUnknown(
            "the hub stopped before Redis answered: this publish may or may not be stored; "
            "retry it (under the same Idempotency-Key, it is not published twice)"
        )
        for *_, done in self.sending:
            if not done.done():
                done.set_exception(unknown)
        for *_, done in self.queue:
            if not done.done():
                done.set_exception(BrokerUnavailable("the hub is shutting down"))
        self.queue = []
        if self.sender is not None:
            self.sender.cancel()
            await asyncio.wait({self.sender}, timeout=1.0)
        await self.client.aclose()
        await self.feed.aclose()
