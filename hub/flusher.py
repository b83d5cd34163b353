"""The write loop: one per process, never one per stream.

Every stream has an outbox of frames (shared bytes objects, encoded once per event). A pass
visits the streams with something to write and hands each one write with everything it
owes, so under load one send carries many events and the cost per delivery falls as the
load rises. Broadcast frames are not copied into every outbox: they go into one shared log
and each stream takes, in its write, the part of the log it has not had yet; a stream's
private frames are ordered before any log frames that came after them by catching the stream
up on the log before a private frame is queued.

A pass is sliced (a few hundred streams, then back to the event loop) so that publishes and
new connections are served during a long pass. A pass begins `interval` after the previous
one ended, so under load each carries what accumulated meanwhile; after a quiet spell it begins
at once, so a lone event goes out without delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hub.registry import Registry, Subscriber

__all__ = ["PING", "Flusher"]

PING = b": ping\n\n"


class Flusher:
    def __init__(
        self,
        registry: Registry,
        interval: float,
        max_pending: int,
        on_slow: Callable[[Subscriber], None],
        slice_size: int = 512,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self.max_pending = max_pending
        self.on_slow = on_slow
        self.slice_size = slice_size
        self.dirty: list[Subscriber] = []
        # The broadcast log: frames at absolute positions log_base .. log_end - 1.
        self.log: list[bytes] = []
        self.log_base = 0
        self.log_end = 0
        self._passed_end = 0  # log_end when the last full pass began
        self._tail_key = (-1, -1)
        self._tail = b""
        self._handle: asyncio.Handle | None = None
        self._pass: list[Subscriber] | None = None
        self._pass_pos = 0
        self._pass_full = False
        self._last_end = float("-inf")
        self.writes = 0  # counters read by the metrics collector
        self.bytes_written = 0

    def push(self, sub: Subscriber, frame: bytes) -> None:
        """Queue one frame for one stream."""
        if sub.closed or sub.queued < 0:
            return
        if sub.bcast_pos != self.log_end:
            tail = self._tail_from(sub.bcast_pos)
            sub.bcast_pos = self.log_end
            sub.outbox.append(tail)
            sub.queued += len(tail)
        sub.outbox.append(frame)
        sub.queued += len(frame)
        if sub.queued + sub.backlog > self.max_pending + sub.allowance:
            # Bounded memory: the frames are dropped here and the stream is cut as slow at
            # its next write; the client resumes from history with Last-Event-ID.
            sub.outbox.clear()
            sub.queued = -1
        if not sub.dirty:
            sub.dirty = True
            self.dirty.append(sub)
            if self._handle is None and self._pass is None:
                self._schedule()

    def broadcast(self, frame: bytes) -> None:
        """Queue one frame for every stream, at the cost of one list append."""
        self.log.append(frame)
        self.log_end += 1
        if self._handle is None and self._pass is None:
            self._schedule()

    def write(self, sub: Subscriber) -> None:
        """Write everything the stream owes, in one write."""
        sub.dirty = False
        if sub.closed:
            return
        if sub.queued < 0:
            self.on_slow(sub)
            return
        outbox = sub.outbox
        if sub.bcast_pos != self.log_end:
            tail = self._tail_from(sub.bcast_pos)
            sub.bcast_pos = self.log_end
            if outbox:
                outbox.append(tail)
                data = b"".join(outbox)
                outbox.clear()
            else:
                data = tail
        elif outbox:
            data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
            outbox.clear()
        else:
            return
        sub.queued = 0
        if data is not PING:  # a heartbeat alone does not make a stream active
            sub.active = True
        self.writes += 1
        self.bytes_written += len(data)
        sub.backlog = backlog = sub.conn.write(data)
        if backlog > self.max_pending:
            if backlog > self.max_pending + sub.allowance:
                self.on_slow(sub)
            else:
                sub.allowance = backlog - self.max_pending
        elif sub.allowance:
            sub.allowance = 0

    def _tail_from(self, pos: int) -> bytes:
        """The log from `pos` to its end as one bytes object; most streams ask for the same
        one in a pass, so the last answer is kept."""
        key = (pos, self.log_end)
        if key != self._tail_key:
            parts = self.log[pos - self.log_base :]
            self._tail = parts[0] if len(parts) == 1 else b"".join(parts)
            self._tail_key = key
        return self._tail

    def _schedule(self) -> None:
        """A pass starts `interval` after the previous one ended, or at once when the hub has
        been quiet that long: light load gets no added latency, heavy load gets coalescing
        (measured: starting at once whenever `interval` had passed since the last pass began
        sent most events in a write of their own under load, and halved throughput)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_end >= self.interval:
            self._handle = loop.call_soon(self._begin)
        else:
            self._handle = loop.call_later(self.interval, self._begin)

    def _begin(self) -> None:
        self._handle = None
        if self.log_end != self._passed_end:
            self._passed_end = self.log_end
            self._pass = list(self.registry.all)
            self._pass_full = True
            # Every open stream is in this pass; the dirty ones are written with the rest.
            self.dirty = []
        else:
            self._pass = self.dirty
            self._pass_full = False
            self.dirty = []
        self._pass_pos = 0
        self._step()

    def _step(self) -> None:
        targets = self._pass
        assert targets is not None
        start = self._pass_pos
        stop = min(start + self.slice_size, len(targets))
        write = self.write
        for i in range(start, stop):
            write(targets[i])
        if stop < len(targets):
            self._pass_pos = stop
            self._handle = asyncio.get_running_loop().call_soon(self._step)
            return
        self._handle = None
        self._pass = None
        self._last_end = asyncio.get_running_loop().time()
        if self._pass_full:
            self._trim()
        if self.dirty or self.log_end != self._passed_end:
            self._schedule()

    def _trim(self) -> None:
        """Drop the log frames that every open stream has taken."""
        if not self.log:
            return
        low = min((s.bcast_pos for s in self.registry.all), default=self.log_end)
        if low > self.log_base:
            del self.log[: low - self.log_base]
            self.log_base = low

    def flush_all(self) -> None:
        """Write every stream now, unsliced: for shutdown."""
        for sub in list(self.registry.all):
            self.write(sub)
        for sub in self.dirty:
            self.write(sub)
        self.dirty = []

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pass = None
