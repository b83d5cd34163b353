"""Publish rate per publisher: a token bucket for each publisher identity, in a bounded table.

A publisher is the `sub` of its token (the unauthenticated internal listener's publishers
share one identity, INTERNAL). Its bucket holds at most `burst` events and refills at `rate`
events a second; a publish of n events takes n at once or nothing (a batch is all or
nothing, like its delivery). A refused publish is told how long until n are there.

The table is bounded: a bucket that has been idle long enough to be full again is the same
as no bucket, and is dropped when a new publisher comes; past `capacity` publishers the one
idle longest is dropped even if it was not full yet (it then starts again from a full bucket:
the cost of a bound, with more publishers than `capacity` active within burst/rate seconds).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["INTERNAL", "MAX_PUBLISHERS", "Bucket", "PublishLimiter", "Throttled", "retry_after"]

INTERNAL = "(internal listener)"  # the one identity of --internal-port's publishers
MAX_PUBLISHERS = 10_000  # buckets held at most (~250 bytes each with its key)
# A take that comes when the bucket said it would be ready must pass, whatever the clock's
# float resolution and the refill's arithmetic round to: within a microsecond is on time.
_SLACK = 1e-6


class Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens  # events it may publish now, as of `stamp`
        self.stamp = stamp  # monotonic seconds of the last refill


class Throttled(Exception):
    """A publisher over its rate: it may publish again in `wait` seconds (its bucket holds
    `burst` events and refills at `rate` a second)."""

    def __init__(self, wait: float, rate: float, burst: int) -> None:
        super().__init__(f"over the publish rate of {rate:g} events/s")
        self.wait = wait
        self.rate = rate
        self.burst = burst


def retry_after(wait: float) -> int:
    """A wait in seconds as Retry-After has it: whole seconds, rounded up, at least 1 (a
    client that comes back when told is never refused again for want of a fraction)."""
    return max(1, math.ceil(wait - _SLACK))


class PublishLimiter:
    """Token buckets by publisher identity. `rate` 0 = no limit (nothing is held)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        capacity: int = MAX_PUBLISHERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self.clock = clock
        # least recently used first: the front is the idlest bucket
        self.buckets: OrderedDict[str, Bucket] = OrderedDict()
        self.evicted = 0  # buckets dropped at `capacity` before they were full again

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def delay(self, identity: str, n: int, take: bool = True) -> float:
        """Seconds until `identity` may publish `n` events: 0.0 if it may now (and, with
        `take`, they are taken), else how long until its bucket holds n (nothing is taken).
        math.inf if n is over the burst: such a batch can never pass."""
        if not self.enabled:
            return 0.0
        if n > self.burst:
            return math.inf
        now = self.clock()
        bucket = self.buckets.get(identity)
        if bucket is None:
            tokens = float(self.burst)
            if not take:
                return 0.0
            bucket = self._add(identity, now)
        else:
            self.buckets.move_to_end(identity)
            elapsed = now - bucket.stamp
            tokens = bucket.tokens
            if elapsed > 0:  # (a clock never goes back; a test's may stand still)
                tokens = min(float(self.burst), tokens + elapsed * self.rate)
        if tokens + self.rate * _SLACK >= n:
            if take:
                bucket.tokens = max(0.0, tokens - n)
                bucket.stamp = now
            return 0.0
        return (n - tokens) / self.rate

    def tokens(self, identity: str) -> float:
        """What `identity`'s bucket holds now (burst for one not in the table)."""
        bucket = self.buckets.get(identity)
        if bucket is None:
            return float(self.burst)
        elapsed = max(0.0, self.clock() - bucket.stamp)
        return min(float(self.burst), bucket.tokens + elapsed * self.rate)

    def __len__(self) -> int:
        return len(self.buckets)

    def _add(self, identity: str, now: float) -> Bucket:
        """A new, full bucket, after dropping the idle ones that are full again (from the
        front: the idlest first) and, at capacity, the idlest one whatever it holds."""
        buckets = self.buckets
        refill = self.burst / self.rate  # seconds an empty bucket takes to be full
        while buckets:
            oldest = next(iter(buckets.values()))
            full = now - oldest.stamp >= refill
            if not full and len(buckets) < self.capacity:
                break
            if not full:
                self.evicted += 1
            buckets.popitem(last=False)
        bucket = buckets[identity] = Bucket(float(self.burst), now)
        return bucket
