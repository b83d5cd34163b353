"""The write loop: one per process, never one per stream. It is the only writer of streams
and owns everything about a stream's writing (its `Outbox`).

An event is queued ONCE, however many streams receive it: into the `Channel` of its audience
(everyone, a topic, a user), a shared log that each reader reads at its own position. A
stream's outbox is a list of channels and a position in each, nothing more: what a stream owes
is read from the channels as it drains, never copied into it up front, so a burst costs a
stream nothing until its socket can take it, and a thousand readers of a topic share one log.

A pass visits the streams with something to read and gives each one write with what it owes
(at most `window` bytes): under load one send carries many events and the cost per delivery
falls as the load rises. When a stream reads from one channel (the common case) its write is
the channel's tail, joined once and shared by every reader at the same position; when it reads
from several, their events are merged by `Event.seq` (the order of delivery), an event that
reached it twice is written once, and its filters are applied, without copying any event.
A stream whose socket still holds bytes is not written again until they are out (the transport
says when): what it holds is at most one write.

"Slow" means not draining: a stream whose socket takes nothing for `slow_after` seconds, or
that falls further behind than its channels keep (`max_lag` bytes), is cut, and resumes from
the history with Last-Event-ID. A stream that keeps reading is never cut for a burst.

A pass is sliced (a few hundred streams, then back to the event loop) so that publishes and
new connections are served during a long pass. A pass begins `interval` after the previous one
ended, so under load each carries what accumulated meanwhile; after a quiet spell it begins at
once, so a lone event goes out without delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from operator import attrgetter

from hub.history import History
from hub.message import Event
from hub.registry import Registry, Subscriber
from hub.transport import SocketTransport

__all__ = ["PING", "WINDOW", "Channel", "Flusher", "Outbox"]

PING = b": ping\n\n"
WINDOW = 256 * 1024  # the most one write to a stream carries
_seq = attrgetter("seq")


class Channel:
    """The events of one audience, in delivery order, at absolute positions base .. end - 1,
    kept until every reader has taken them (or the slowest is cut)."""

    __slots__ = ("_tail", "_tail_key", "base", "dirty", "end", "events", "name", "readers", "size")

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[Event] = []
        self.base = 0
        self.end = 0
        self.size = 0  # frame bytes held
        # reader -> the index of this channel in the reader's channels and cursors
        self.readers: dict[Outbox, int] = {}
        self.dirty = False  # in the flusher's list of channels with unread events
        self._tail_key = (-1, -1)
        self._tail: tuple[bytes, int, int] = (b"", 0, 0)

    def tail(self, pos: int, window: int) -> tuple[bytes, int, int]:
        """(frames from `pos` joined, up to `window` bytes; position after them; how many).
        Most readers ask for the same tail in a pass, so the last answer is kept."""
        key = (pos, self.end)
        if key == self._tail_key:
            return self._tail
        events = self.events
        start = pos - self.base
        if self.end - pos == 1:
            answer = (events[start].frame, pos + 1, 1)
        else:
            parts = []
            size = 0
            for event in events[start:]:
                parts.append(event.frame)
                size += len(event.frame)
                if size >= window:
                    break
            answer = (b"".join(parts), pos + len(parts), len(parts))
        self._tail_key = key
        self._tail = answer
        return answer


class Outbox:
    """A stream's write state: its transport, the channels it reads and where it is in each,
    and a resume's replay still to read from the history."""

    __slots__ = (
        "channels",
        "closed",
        "cursors",
        "dirty",
        "progress_at",
        "replay",
        "replay_end",
        "sent_seen",
        "sub",
        "transport",
        "written_at",
    )

    def __init__(self, sub: Subscriber, transport: SocketTransport, now: float) -> None:
        self.sub = sub
        self.transport = transport
        self.channels: list[Channel] = []
        self.cursors: list[int] = []
        self.replay: int | None = None  # next history seq to replay, while replaying
        self.replay_end = 0  # the first seq that comes through the channels instead
        self.dirty = False  # in the flusher's list of streams to write
        self.closed = False
        self.written_at = now  # loop time of the last write (heartbeats go to quiet streams)
        self.progress_at = now  # loop time the socket was last seen taking bytes
        self.sent_seen = 0

    def owes(self) -> bool:
        if self.replay is not None:
            return True
        cursors = self.cursors
        return any(ch.end != cursors[i] for i, ch in enumerate(self.channels))


class Flusher:
    def __init__(
        self,
        registry: Registry,
        history: History,
        *,
        interval: float,
        max_lag: int,
        slow_after: float,
        heartbeat: float,
        on_slow: Callable[[Subscriber, str], None],
        slice_size: int = 512,
        window: int = WINDOW,
    ) -> None:
        self.registry = registry
        self.history = history
        self.interval = interval
        self.max_lag = max_lag
        self.slow_after = slow_after
        self.heartbeat = heartbeat
        self.on_slow = on_slow
        self.slice_size = slice_size
        self.window = window
        self.everyone = Channel("everyone")
        self.users: dict[str, Channel] = {}
        self.topics: dict[str, Channel] = {}
        self.dirty: list[Outbox] = []
        self.dirty_channels: list[Channel] = []
        self._handle: asyncio.Handle | None = None
        self._pass: list[Outbox] | None = None
        self._pass_channels: list[Channel] = []
        self._pass_pos = 0
        self._last_end = float("-inf")
        self._now = 0.0
        self.writes = 0  # counters read by the metrics collector
        self.bytes_written = 0
        self.delivered = 0  # events written to streams, one per stream per event

    # -- streams --------------------------------------------------------------------------

    def open(
        self,
        sub: Subscriber,
        transport: SocketTransport,
        opening: bytes,
        replay_from: int | None = None,
    ) -> Outbox:
        """Start a stream: write its opening, read its channels from their ends on, and (on a
        resume) replay the history from seq `replay_from` first."""
        loop_time = asyncio.get_running_loop().time()
        out = Outbox(sub, transport, loop_time)
        sub.outbox = out
        self._join(out, self.everyone)
        for topic in sub.topics:
            channel = self.topics.get(topic)
            if channel is None:
                channel = self.topics[topic] = Channel("topic:" + topic)
            self._join(out, channel)
        user_channel = self.users.get(sub.user)
        if user_channel is not None:
            self._join(out, user_channel)
        transport.write(opening)
        if replay_from is not None and replay_from < self.history.end_seq:
            out.replay = replay_from
            out.replay_end = self.history.end_seq
            self.write(out)
        return out

    def close(self, out: Outbox) -> None:
        """Forget a stream: it reads no channel any more, and a channel left without readers
        is dropped."""
        if out.closed:
            return
        out.closed = True
        for channel in out.channels:
            channel.readers.pop(out, None)
            if not channel.readers and channel is not self.everyone:
                name = channel.name
                index = self.users if name.startswith("user:") else self.topics
                key = name.partition(":")[2]
                if index.get(key) is channel:
                    del index[key]
        out.replay = None

    @staticmethod
    def _join(out: Outbox, channel: Channel) -> None:
        channel.readers[out] = len(out.channels)
        out.channels.append(channel)
        out.cursors.append(channel.end)

    # -- events ---------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        """Queue an event (already in the history) once for each audience its route names
        that has a stream here."""
        route = event.route
        if route is None:
            return
        if route.everyone:
            self._append(self.everyone, event)
            return
        users = self.users
        for user in route.users:
            channel = users.get(user)
            if channel is None:
                subs = self.registry.by_user.get(user)
                if not subs:
                    continue
                channel = users[user] = Channel("user:" + user)
                for sub in subs:
                    if sub.outbox is not None and not sub.outbox.closed:
                        self._join(sub.outbox, channel)
            self._append(channel, event)
        topics = self.topics
        for topic in route.topics:
            channel = topics.get(topic)
            if channel is not None:
                self._append(channel, event)

    def _append(self, channel: Channel, event: Event) -> None:
        channel.events.append(event)
        channel.end += 1
        channel.size += len(event.frame)
        if not channel.dirty:
            channel.dirty = True
            self.dirty_channels.append(channel)
            if self._handle is None and self._pass is None:
                self._schedule()

    def mark(self, out: Outbox) -> None:
        """The stream may have something to write (its socket drained, say): visit it."""
        if not out.dirty and not out.closed:
            out.dirty = True
            self.dirty.append(out)
            if self._handle is None and self._pass is None:
                self._schedule()

    # -- writing --------------------------------------------------------------------------

    def write(self, out: Outbox) -> None:
        """One write with what the stream owes, up to the window, unless its socket still
        holds the previous one."""
        out.dirty = False
        transport = out.transport
        if out.closed or transport.pending is not None:
            return
        data = self._take(out, self.window)
        if data:
            self._send(out, data)
        if data is not None and transport.pending is None and out.owes():
            self.mark(out)  # more than a window's worth: the rest in the next pass

    def finish(self, out: Outbox) -> None:
        """Write everything the stream owes, at once, whatever its socket holds: before it
        ends (logout, expiry, shutdown)."""
        while not out.closed:
            data = self._take(out, 1 << 62)
            if data is None:
                return
            if data:
                self._send(out, data)

    def ping(self, out: Outbox) -> None:
        if out.transport.pending is None:
            out.transport.write(PING)
            out.written_at = self._now

    def _send(self, out: Outbox, data: bytes) -> None:
        self.writes += 1
        self.bytes_written += len(data)
        out.written_at = self._now
        out.transport.write(data)

    def _take(self, out: Outbox, window: int) -> bytes | None:
        """What the stream owes next, up to `window` bytes (at least one event), its cursors
        moved past it; b"" if everything owed was filtered out; None if it owes nothing."""
        if out.replay is not None:
            return self._take_replay(out, window)
        channels = out.channels
        cursors = out.cursors
        owing = -1
        for i in range(len(channels)):
            if channels[i].end != cursors[i]:
                if owing >= 0:
                    return self._take_merged(out, window)
                owing = i
        if owing < 0:
            return None
        if out.sub.filters is not None:
            return self._take_merged(out, window)
        data, cursors[owing], count = channels[owing].tail(cursors[owing], window)
        self.delivered += count
        return data

    def _take_merged(self, out: Outbox, window: int) -> bytes:
        """Several channels owe (or filters apply): merge their events by seq, once each."""
        channels = out.channels
        cursors = out.cursors
        taken: list[Event] = []
        horizon = None  # the last seq that every channel cut short by the window has given
        for i, channel in enumerate(channels):
            pos = cursors[i]
            if channel.end == pos:
                continue
            size = 0
            start = pos - channel.base
            events = channel.events
            stop = start
            while stop < len(events) and size < window:
                size += len(events[stop].frame)
                stop += 1
            taken.extend(events[start:stop])
            if stop < len(events):
                last = events[stop - 1].seq
                horizon = last if horizon is None else min(horizon, last)
        taken.sort(key=_seq)
        sub = out.sub
        parts = []
        size = 0
        last_seq = -1
        for event in taken:
            seq = event.seq
            if seq == last_seq:
                continue  # reached the stream through two channels
            if (horizon is not None and seq > horizon) or size >= window:
                break
            last_seq = seq
            if sub.accepts(event):
                parts.append(event.frame)
                size += len(event.frame)
        for i, channel in enumerate(channels):
            pos = cursors[i]
            events, base, end = channel.events, channel.base, channel.end
            while pos < end and events[pos - base].seq <= last_seq:
                pos += 1
            cursors[i] = pos
        self.delivered += len(parts)
        return b"".join(parts)

    def _take_replay(self, out: Outbox, window: int) -> bytes:
        """A resume's replay, read from the history in place, as the stream drains."""
        history = self.history
        seq = out.replay
        assert seq is not None
        if seq < history.first_seq:
            out.replay = None
            self.on_slow(out.sub, "its replay fell out of the history")
            return b""
        end = out.replay_end
        sub = out.sub
        parts = []
        size = 0
        while seq < end and size < window:
            event = history.at(seq)
            seq += 1
            if sub.entitled(event):
                parts.append(event.frame)
                size += len(event.frame)
        out.replay = seq if seq < end else None
        self.delivered += len(parts)
        return b"".join(parts)

    # -- passes ---------------------------------------------------------------------------

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
        self._now = asyncio.get_running_loop().time()
        channels = self.dirty_channels
        self.dirty_channels = []
        for channel in channels:
            channel.dirty = False
        if self.everyone in channels:
            # Every open stream reads the everyone channel: the dirty ones are among them.
            targets = list(self.everyone.readers)
        else:
            targets = self.dirty
            for channel in channels:
                targets.extend(channel.readers)
        self.dirty = []
        self._pass = targets
        self._pass_channels = channels
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
        for channel in self._pass_channels:
            self._trim(channel)
        self._pass_channels = []
        if self.dirty or self.dirty_channels:
            self._schedule()

    def _trim(self, channel: Channel) -> None:
        """Drop the events every reader has taken; if the slowest is still more than
        `max_lag` bytes behind, drop down to the bound and cut the readers that fall off."""
        readers = channel.readers
        events = channel.events
        low = min((r.cursors[i] for r, i in readers.items()), default=channel.end)
        drop = low - channel.base
        if drop > 0:
            channel.size -= sum(len(e.frame) for e in events[:drop])
            del events[:drop]
            channel.base = low
        if channel.size <= self.max_lag:
            return
        size = channel.size
        drop = 0
        while size > self.max_lag and drop < len(events):
            size -= len(events[drop].frame)
            drop += 1
        del events[:drop]
        channel.base += drop
        channel.size = size
        for reader, i in list(readers.items()):
            if reader.cursors[i] < channel.base:
                self.on_slow(reader.sub, f"fell more than {self.max_lag} bytes behind")

    # -- the tick -------------------------------------------------------------------------

    def tick(self) -> None:
        """Once a tick for the whole process: ping the streams quiet for a heartbeat, cut
        those whose socket has taken nothing for `slow_after` seconds."""
        now = asyncio.get_running_loop().time()
        self._now = now
        quiet = now - self.heartbeat
        stalled = now - self.slow_after
        for out in list(self.everyone.readers):
            transport = out.transport
            if transport.pending is not None and transport.sent == out.sent_seen:
                if out.progress_at <= stalled:
                    self.on_slow(out.sub, f"its socket took nothing for {self.slow_after:g} s")
                continue
            out.sent_seen = transport.sent
            out.progress_at = now
            if out.written_at <= quiet and transport.pending is None:
                self.ping(out)

    @property
    def idle(self) -> bool:
        """No pass running or scheduled: every stream has been written what it could take."""
        return self._pass is None and self._handle is None

    def flush_all(self) -> None:
        """Write every stream everything it owes, now: for shutdown."""
        for out in list(self.everyone.readers):
            self.finish(out)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pass = None
