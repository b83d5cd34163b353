"""The broker: how a published event reaches every hub process that may hold its recipients.

The interface is small on purpose (centrifuge's Broker, Mercure's Transport): publish gives
events their ids and makes them reach every node's feed; each node's feed hands them to
its own Hub.deliver. MemoryBroker is the default and serves ONE process: a publish reaches
only the streams of the process that took it. Past one process, a shared broker (Redis) is
the second implementation of the same interface.

A broker also holds the one-time stream tickets (hub.tickets): where the events are shared,
so are the tickets, and a ticket issued by one node is redeemed on any node, once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hub.message import Event

__all__ = [
    "MAX_MEMORY_KEYS",
    "MAX_MEMORY_TICKETS",
    "Broker",
    "BrokerMisconfigured",
    "BrokerUnavailable",
    "Idempotency",
    "IdempotencyConflict",
    "MemoryBroker",
    "Node",
    "OutcomeUnknown",
    "PublishResult",
]

# Live tickets the memory broker holds at most: past it, a new ticket pushes out the oldest
# (~400 bytes each: at most ~26 MB). A flood of POST /tickets then costs the tickets older
# than cap / flood rate, never memory nor a refusal; a page redeems its ticket at once.
MAX_MEMORY_TICKETS = 65_536


# Idempotency keys the memory broker remembers at most (~200 bytes each): past it the oldest
# is forgotten (a retry that comes later than cap / key rate publishes again).
MAX_MEMORY_KEYS = 65_536


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A publish's `Idempotency-Key`: `key` names it (a hash of the publisher and its key),
    `body` hashes what was published under it, `window` is how long a repeat is answered with
    the first answer instead of being published again."""

    key: str
    body: str
    window: float


class IdempotencyConflict(Exception):
    """An Idempotency-Key already used, within its window, for a different body."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What a publish came to: its events' ids, in order, and whether they are those of a
    batch published before under the same Idempotency-Key (then nothing was published this
    time: a client's retry)."""

    ids: list[str]
    replayed: bool = False


class BrokerUnavailable(Exception):
    """The broker cannot take events now (stopped, or its server is unreachable): the publish
    is refused whole, never half done."""


class OutcomeUnknown(BrokerUnavailable):
    """The publish was sent and no answer came (the broker's server stalled or the connection
    broke after the request left, or the hub stopped first): it may or may not be stored (a
    retry under the same Idempotency-Key tells, and never publishes twice)."""


class BrokerMisconfigured(Exception):
    """The broker's server is set up so that the promise cannot hold (Redis: a
    maxmemory-policy that may evict the hub's keys)."""


class Node(Protocol):
    """What a broker feeds: the hub of this process (hub.core.Hub)."""

    def deliver(self, event: Event) -> None:
        """One event, with its id and route, in the order every node agrees on."""
        ...

    def resync(self, floor: str) -> None:
        """This node cannot know the events up to `floor` that it has not seen (it just
        started, or fell behind what the broker keeps): its history starts after `floor`,
        and its open streams are told to refetch their state."""
        ...

    def revoke(self, user: str, sid: str | None, at_ms: float) -> None:
        """A logout at `at_ms`, from before this node started."""
        ...

    def history_floor(self) -> tuple[int, int]:
        """The newest id this node's history no longer holds: a shared broker need keep
        nothing at or before it."""
        ...


class Broker(Protocol):
    # Ids at or before `floor` predate this broker's history: a client that resumes from
    # one of them is told it missed events.
    floor: tuple[int, int]

    @property
    def ready(self) -> bool:
        """Events published now are taken and reach this node (the readiness probe's
        answer)."""
        ...

    def unready_reason(self) -> str:
        """Why `ready` is false, for /readyz and refusals."""
        ...

    async def check(self) -> None:
        """Raise BrokerMisconfigured if the broker's server breaks the promise as it is set
        up (the hub refuses to start). A server that does not answer is no error here."""
        ...

    def start(self, node: Node) -> None:
        """Begin feeding every published event (from any node) to `node`, in id order."""
        ...

    async def publish(
        self, events: Sequence[Event], idempotency: Idempotency | None = None
    ) -> PublishResult:
        """Give the events ids, in order, and send them to every node; return the ids.
        All or nothing: BrokerUnavailable means none of them was stored; OutcomeUnknown (a
        BrokerUnavailable) means the broker may or may not have stored them. With `idempotency`,
        a batch already stored under its key is not stored again: its ids come back, marked
        replayed (IdempotencyConflict if that batch had another body)."""
        ...

    async def put_ticket(self, key: str, claims: bytes, ttl: float) -> None:
        """Keep a one-time ticket's claims for `ttl` seconds under `key` (the ticket's
        SHA-256: never the ticket itself). BrokerUnavailable if it cannot be stored."""
        ...

    async def take_ticket(self, key: str) -> bytes | None:
        """The claims stored under `key`, removed in the same step (every node together
        hands them out once); None when there are none (never stored, taken, expired).
        BrokerUnavailable if the store cannot answer."""
        ...

    async def close(self) -> None: ...


class MemoryBroker:
    """One process, no network: ids are `<boot ms>-<seq>`, so they stay unique and
    increasing across restarts of the hub (as long as the clock does not go back)."""

    def __init__(self) -> None:
        self.boot = int(time.time() * 1000)
        self.seq = 0
        self.floor = (self.boot, 0)
        self.running = True
        self._deliver: Callable[[Event], None] | None = None
        # key -> (monotonic expiry, claims), oldest first: expired ones are purged from the
        # front as new ones come (an OrderedDict pops its front in O(1); a dict would scan
        # the holes its deletions leave).
        self.tickets: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.tickets_evicted = 0  # live tickets pushed out at MAX_MEMORY_TICKETS
        # idempotency key -> (monotonic expiry, body hash, first seq, count), oldest first
        self.keys: OrderedDict[str, tuple[float, str, int, int]] = OrderedDict()

    def start(self, node: Node) -> None:
        self._deliver = node.deliver

    @property
    def ready(self) -> bool:
        return self.running

    def unready_reason(self) -> str:
        return "the broker is closed"

    async def check(self) -> None:
        return None

    async def publish(
        self, events: Sequence[Event], idempotency: Idempotency | None = None
    ) -> PublishResult:
        deliver = self._deliver
        if deliver is None:
            raise BrokerUnavailable("the hub is not running (starting or shutting down)")
        boot = self.boot
        if idempotency is not None:
            seen = self._seen(idempotency)
            if seen is not None:
                return seen
        first = self.seq + 1
        ids = []
        for event in events:
            self.seq += 1
            event.assign_id(boot, self.seq)
            ids.append(event.id)
            deliver(event)
        if idempotency is not None:
            expires = time.monotonic() + idempotency.window
            self.keys[idempotency.key] = (expires, idempotency.body, first, len(ids))
        return PublishResult(ids)

    def _seen(self, idempotency: Idempotency) -> PublishResult | None:
        """The ids published under this key within its window (forgetting expired keys, and
        the oldest past MAX_MEMORY_KEYS)."""
        keys = self.keys
        now = time.monotonic()
        while keys:
            expires = next(iter(keys.values()))[0]
            if expires > now and len(keys) < MAX_MEMORY_KEYS:
                break
            keys.popitem(last=False)
        seen = keys.get(idempotency.key)
        if seen is None or seen[0] <= now:
            return None
        if seen[1] != idempotency.body:
            raise IdempotencyConflict()
        ids = [f"{self.boot}-{n}" for n in range(seen[2], seen[2] + seen[3])]
        return PublishResult(ids, replayed=True)

    async def put_ticket(self, key: str, claims: bytes, ttl: float) -> None:
        tickets = self.tickets
        now = time.monotonic()
        # Lives differ (a ticket never outlives its token), so an expired one may wait behind
        # a live one: all are gone within --ticket-ttl, and the cap bounds them meanwhile.
        while tickets:
            oldest = next(iter(tickets.values()))
            if oldest[0] > now and len(tickets) < MAX_MEMORY_TICKETS:
                break
            if oldest[0] > now:
                self.tickets_evicted += 1
            tickets.popitem(last=False)
        tickets[key] = (now + ttl, claims)

    async def take_ticket(self, key: str) -> bytes | None:
        found = self.tickets.pop(key, None)
        if found is None or found[0] <= time.monotonic():
            return None
        return found[1]

    async def close(self) -> None:
        self._deliver = None
        self.running = False
