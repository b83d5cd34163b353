"""The broker: how a published event reaches every hub process that may hold its recipients.

The interface is small on purpose (centrifuge's Broker, Mercure's Transport): publish gives
events their ids and makes them reach every node's feed; each node's feed hands them to
its own Hub.deliver. MemoryBroker is the default and serves ONE process: a publish reaches
only the streams of the process that took it. Past one process, a shared broker (Redis) is
the second implementation of the same interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from hub.message import Event

__all__ = ["Broker", "BrokerUnavailable", "MemoryBroker", "Node"]


class BrokerUnavailable(Exception):
    """The broker cannot take events now (stopped, or its server is unreachable): the publish
    is refused whole (503), never half done."""


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
    # synced: the node has the shared history (it can serve streams and resumes);
    # ready: events published now reach this node (the readiness probe's answer).
    synced: bool
    ready: bool

    def start(self, node: Node) -> None:
        """Begin feeding every published event (from any node) to `node`, in id order."""
        ...

    async def publish(self, events: Sequence[Event]) -> list[str]:
        """Give the events ids, in order, and send them to every node; return the ids.
        All or nothing: BrokerUnavailable means none of them was stored."""
        ...

    async def close(self) -> None: ...


class MemoryBroker:
    """One process, no network: ids are `<boot ms>-<seq>`, so they stay unique and
    increasing across restarts of the hub (as long as the clock does not go back)."""

    def __init__(self) -> None:
        self.boot = int(time.time() * 1000)
        self.seq = 0
        self.floor = (self.boot, 0)
        self.synced = self.ready = True
        self._deliver: Callable[[Event], None] | None = None

    def start(self, node: Node) -> None:
        self._deliver = node.deliver

    async def publish(self, events: Sequence[Event]) -> list[str]:
        deliver = self._deliver
        if deliver is None:
            raise BrokerUnavailable("the hub is not running (starting or shutting down)")
        boot = self.boot
        ids = []
        for event in events:
            self.seq += 1
            event.assign_id(boot, self.seq)
            ids.append(event.id)
            deliver(event)
        return ids

    async def close(self) -> None:
        self._deliver = None
        self.ready = False
