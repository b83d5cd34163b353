"""The write loop: one per process, never one per stream. It is the only writer of streams
and owns everything about a stream's writing (its `Outbox`): events, heartbeats, a `reset`
(queued in order like a broadcast, `interject`) and a stream's last frame (`finish`).

An event for many streams is queued ONCE: a broadcast into the everyone `Channel`, a topic's
event into that topic's channel, each a shared log that every reader reads at its own
position. An event for a user is appended, by reference, to the `private` list of each of that
user's streams (a user has a stream or two; measured, a channel per user cost a fifth of the
private-routing throughput in cache misses over its three extra objects). Nothing is copied:
what a stream owes is read from its channels and its private list as it drains, so a burst
costs a stream nothing until its socket can take it, and a thousand readers of a topic share
one log.

A pass visits the streams with something to read and gives each one write with what it owes
(at most `window` bytes): under load one send carries many events and the cost per delivery
falls as the load rises. When a stream owes from one source only (the common case) its write
is that source's frames as they are (a channel's tail is joined once and shared by every reader
at the same position); when it owes from several, their events are merged by `Event.seq` (the
order of delivery), an event that reached it twice is written once, and its filters are
applied, without copying any event. A stream whose socket still holds bytes is not written
again until they are out (the transport says when): what it holds is at most one write.

"Slow" means not draining: a stream whose socket takes nothing for `slow_after` seconds, or
that falls further behind than the hub keeps for it (`max_lag` bytes of frames), is cut, and
resumes from the history with Last-Event-ID. A stream that keeps reading is never cut for a
burst.

A pass is sliced (a few hundred streams, then back to the event loop) so that publishes and
new connections are served during a long pass. A pass begins `interval` after the previous one
ended, so under load each carries what accumulated meanwhile; after a quiet spell it begins at
once, so a lone event goes out without delay.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from operator import attrgetter

from hub.dispatch import Route
from hub.history import History
from hub.message import Event
from hub.registry import Registry, Subscriber
from hub.transport import SocketTransport

__all__ = ["LATENCY_BUCKETS", "PING", "WINDOW", "Channel", "Flusher", "LatencyTally", "Outbox"]

PING = b": ping\n\n"
WINDOW = 256 * 1024  # the most one write to a stream carries
TRIM_EVENTS = 256  # a channel is trimmed after a pass once it holds this many events
TRIM_BYTES = 64 * 1024  # or this many bytes of frames (and on every tick in any case)
_seq = attrgetter("seq")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyTally:
    """Publish-to-socket latency, counted in plain integers per bucket (read by the metrics
    collector): one observation per flush slice, weighted by the writes it made, so that a
    pass over 10,000 streams costs one bisect, not 10,000 histogram calls."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float, writes: int) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += writes
        self.total += seconds * writes


class Channel:
    """The events of one audience (everyone, or a topic), in delivery order, at absolute
    positions base .. end - 1, kept until every reader has taken them (or the slowest is cut)."""

    __slots__ = ("_tail", "_tail_key", "base", "dirty", "end", "events", "name", "readers", "size")

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[Event] = []
        self.base = 0
        self.end = 0
        self.size = 0  # frame bytes held
        # reader -> the index of this channel in the reader's topic lists (-1: everyone)
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
    """A stream's write state: its transport, where it is in the everyone channel and in its
    topics' channels, the private events it has not taken yet, and a resume's replay still to
    read from the history."""

    __slots__ = (
        "closed",
        "dirty",
        "plain",
        "pos",
        "private",
        "private_size",
        "progress_at",
        "replay",
        "replay_end",
        "sent_seen",
        "sub",
        "topic_pos",
        "topics",
        "transport",
        "written_at",
    )

    def __init__(self, sub: Subscriber, transport: SocketTransport, now: float) -> None:
        self.sub = sub
        self.transport = transport
        self.pos = 0  # position in the everyone channel
        # no topics, no filters: its writes take the fast paths (and need not look at `sub`)
        self.plain = not sub.topics and sub.filters is None
        self.topics: list[Channel] | None = None  # its topics' channels, if any
        self.topic_pos: list[int] | None = None  # and its position in each
        self.private: list[Event] | None = None  # events for its user, not taken yet
        self.private_size = 0  # their frames' bytes
        self.replay: int | None = None  # next history seq to replay, while replaying
        self.replay_end = 0  # the first seq that comes live instead
        self.dirty = False  # in the flusher's list of streams to write
        self.closed = False
        self.written_at = now  # loop time of the last write (heartbeats go to quiet streams)
        self.progress_at = now  # loop time the socket was last seen taking bytes
        self.sent_seen = 0


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
        self.topics: dict[str, Channel] = {}
        self.dirty: list[Outbox] = []
        self.dirty_channels: list[Channel] = []
        self._handle: asyncio.Handle | None = None
        self._pass: list[Outbox] | None = None
        self._pass_channels: list[Channel] = []
        self._pass_pos = 0
        self._last_end = float("-inf")
        self._now = 0.0
        self._cut_short = False  # the last _take left something owed (the window was full)
        self.writes = 0  # counters read by the metrics collector
        self.bytes_written = 0
        self.delivered = 0  # events written to streams, one per stream per event
        # When the oldest event queued since the last pass began was accepted, and that of
        # the pass under way: a pass's writes carry events no older than it (a stream behind
        # on its socket catches up in later passes, counted as theirs).
        self.latency = LatencyTally()
        self._oldest = 0.0
        self._pass_oldest = 0.0

    # -- streams --------------------------------------------------------------------------

    def open(
        self,
        sub: Subscriber,
        transport: SocketTransport,
        opening: bytes,
        replay_from: int | None = None,
    ) -> Outbox:
        """Start a stream: write its opening, read from now on, and (on a resume) replay the
        history from seq `replay_from` first."""
        out = Outbox(sub, transport, asyncio.get_running_loop().time())
        sub.outbox = out
        everyone = self.everyone
        everyone.readers[out] = -1
        out.pos = everyone.end
        if sub.topics:
            out.topics = []
            out.topic_pos = []
            for topic in sub.topics:
                channel = self.topics.get(topic)
                if channel is None:
                    channel = self.topics[topic] = Channel(topic)
                channel.readers[out] = len(out.topics)
                out.topics.append(channel)
                out.topic_pos.append(channel.end)
        transport.write(opening)
        if replay_from is not None and replay_from < self.history.end_seq:
            out.replay = replay_from
            out.replay_end = self.history.end_seq
            self.write(out)
        return out

    def close(self, out: Outbox) -> None:
        """Forget a stream: it reads no channel any more, and a topic's channel left without
        readers is dropped."""
        if out.closed:
            return
        out.closed = True
        self.everyone.readers.pop(out, None)
        for channel in out.topics or ():
            channel.readers.pop(out, None)
            if not channel.readers and self.topics.get(channel.name) is channel:
                del self.topics[channel.name]
        out.private = None
        out.replay = None

    # -- events ---------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        """Queue an event (already in the history) for the streams here its route reaches:
        once per channel, by reference in each private list."""
        route = event.route
        if route is None:
            return
        if not self._oldest:
            self._oldest = event.accepted
        if route.everyone:
            self._append(self.everyone, event)
            return
        by_user = self.registry.by_user
        frame_size = len(event.frame)
        over: list[Outbox] = []
        for user in route.users:
            subs = by_user.get(user)
            if not subs:
                continue
            for sub in subs:
                out = sub.outbox
                if out is None or out.closed:
                    continue
                private = out.private
                if private is None:
                    out.private = [event]
                else:
                    private.append(event)
                out.private_size += frame_size
                if out.private_size > self.max_lag:
                    over.append(out)
                if not out.dirty:
                    out.dirty = True
                    self.dirty.append(out)
        if self._handle is None and self._pass is None and self.dirty:
            self._schedule()
        topics = self.topics
        for topic in route.topics:
            channel = topics.get(topic)
            if channel is not None:
                self._append(channel, event)
        for out in over:
            self.on_slow(out.sub, f"owes more than {self.max_lag} bytes")

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
        self._cut_short = False
        data = self._take(out, self.window)
        if data:
            self.writes += 1
            self.bytes_written += len(data)
            out.written_at = self._now
            transport.write(data)
        if self._cut_short and transport.pending is None:
            self.mark(out)  # more than a window's worth: the rest in the next pass

    def finish(self, out: Outbox, final: bytes = b"", owed: bool = True) -> None:
        """The stream's last writes before it ends: everything it owes (unless `owed` is
        false: a slow stream's socket takes nothing more), at once, then `final` (the end
        frame). The transport keeps what the socket does not take, and closes after it."""
        while owed and not out.closed:
            data = self._take(out, 1 << 62)
            if data is None:
                break
            if data:
                self.writes += 1
                self.bytes_written += len(data)
                out.transport.write(data)
        if final and not out.closed:
            out.transport.write(final)

    def interject(self, frame: bytes) -> None:
        """Queue `frame` (a `reset`) for every stream, in order: after what each is owed now,
        before what comes next, written by the passes within the window like any broadcast.
        A resume's replay still to read is dropped: the frame covers it. Call it with the
        history empty (Hub.resync clears it first): the frame takes a seq of its own."""
        now = time.time()
        event = Event.restore(0, "reset", None, int(now * 1000), "", now)
        event.frame = frame
        event.route = Route(everyone=True)
        event.seq = self.history.reserve_seq()
        for out in self.everyone.readers:
            out.replay = None
        self.deliver(event)

    def ping(self, out: Outbox) -> None:
        if out.transport.pending is None:
            out.transport.write(PING)
            out.written_at = self._now

    def owes(self, out: Outbox) -> bool:
        """Whether the stream has anything left to take."""
        if out.replay is not None or out.private or out.pos != self.everyone.end:
            return True
        channels = out.topics
        if channels is not None:
            positions = out.topic_pos
            assert positions is not None
            return any(ch.end != positions[i] for i, ch in enumerate(channels))
        return False

    def _take(self, out: Outbox, window: int) -> bytes | None:
        """What the stream owes next, up to `window` bytes (at least one event), moved past;
        b"" if everything owed was filtered out; None if it owes nothing."""
        if out.replay is not None:
            return self._take_replay(out, window)
        if not out.plain:
            return self._take_sources(out, window)
        everyone = self.everyone
        private = out.private
        if out.pos == everyone.end:
            if not private:
                return None
            if len(private) == 1:  # one event for its user: its frame as it is
                out.private = None
                out.private_size = 0
                self.delivered += 1
                return private[0].frame
            return self._take_merged(out, window)
        if private:
            return self._take_merged(out, window)
        data, out.pos, count = everyone.tail(out.pos, window)
        if out.pos != everyone.end:
            self._cut_short = True
        self.delivered += count
        return data

    def _take_sources(self, out: Outbox, window: int) -> bytes | None:
        """_take for a stream with topics or filters: one channel owing and no filters is a
        shared tail, as for a plain stream; anything else is merged."""
        everyone = self.everyone
        owing = 0
        channel = everyone
        index = -1
        positions = out.topic_pos
        if out.pos != everyone.end:
            owing = 1
        if out.private:
            owing += 2  # never a single channel
        if out.topics is not None:
            assert positions is not None
            for i, topic in enumerate(out.topics):
                if topic.end != positions[i]:
                    owing += 1
                    channel = topic
                    index = i
        if owing == 0:
            return None
        if owing > 1 or out.sub.filters is not None:
            return self._take_merged(out, window)
        if index < 0:
            data, out.pos, count = channel.tail(out.pos, window)
            pos = out.pos
        else:
            assert positions is not None
            data, pos, count = channel.tail(positions[index], window)
            positions[index] = pos
        if pos != channel.end:
            self._cut_short = True
        self.delivered += count
        return data

    def _take_merged(self, out: Outbox, window: int) -> bytes:
        """Several sources owe (or filters apply): merge their events by seq, once each."""
        horizon = -1  # the last seq that every source cut short by the window has given
        taken: list[Event] = []
        sources: list[tuple[Channel, int]] = [(self.everyone, out.pos)]
        if out.topics is not None:
            assert out.topic_pos is not None
            sources += zip(out.topics, out.topic_pos, strict=True)
        for channel, pos in sources:
            if channel.end == pos:
                continue
            events = channel.events
            start = pos - channel.base
            stop = _cut(events, start, window)
            taken += events[start:stop]
            if stop < len(events):
                last = events[stop - 1].seq
                horizon = last if horizon < 0 else min(horizon, last)
        private = out.private
        if private:
            stop = _cut(private, 0, window)
            taken += private[:stop]
            if stop < len(private):
                last = private[stop - 1].seq
                horizon = last if horizon < 0 else min(horizon, last)
        taken.sort(key=_seq)
        accepts = out.sub.accepts if out.sub.filters is not None else None
        parts = []
        size = 0
        last_seq = -1
        for event in taken:
            seq = event.seq
            if seq == last_seq:
                continue  # reached the stream twice (its user's and a topic's)
            if (horizon >= 0 and seq > horizon) or size >= window:
                self._cut_short = True
                break
            last_seq = seq
            if accepts is None or accepts(event):
                parts.append(event.frame)
                size += len(event.frame)
        out.pos = _past(self.everyone, out.pos, last_seq)
        if out.topics is not None:
            positions = out.topic_pos
            assert positions is not None
            for i, channel in enumerate(out.topics):
                positions[i] = _past(channel, positions[i], last_seq)
        if private:
            k = 0
            while k < len(private) and private[k].seq <= last_seq:
                out.private_size -= len(private[k].frame)
                k += 1
            del private[:k]
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
        for event in history.read(seq):
            if seq >= end or size >= window:
                break
            seq += 1
            if sub.entitled(event):
                parts.append(event.frame)
                size += len(event.frame)
        if seq < end:
            out.replay = seq
            self._cut_short = True
        else:
            out.replay = None
            self._cut_short = self.owes(out)
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
        self._pass_oldest = self._oldest
        self._oldest = 0.0
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
        # A broadcast pass gives most streams the same tail of the everyone channel: those are
        # written here without the general path (measured: that path's checks cost a tenth of
        # the core at 10,000 streams). A stream that owes anything else goes through write().
        everyone = self.everyone
        end = everyone.end
        shared_pos = -1
        shared: tuple[bytes, int, int] = (b"", 0, 0)
        now = self._now
        taken = written = delivered = 0
        writes_before = self.writes
        for i in range(start, stop):
            out = targets[i]
            pos = out.pos
            if (
                pos == end
                or not out.plain
                or out.private
                or out.replay is not None
                or out.closed
                or out.transport.pending is not None
            ):
                write(out)
                continue
            if pos != shared_pos:
                shared_pos = pos
                shared = everyone.tail(pos, self.window)
                if shared[1] != end:  # more than a window behind: the general path
                    shared_pos = -1
                    write(out)
                    continue
            out.dirty = False
            out.pos = end
            out.written_at = now
            out.transport.write(shared[0])
            taken += 1
            written += len(shared[0])
            delivered += shared[2]
        self.writes += taken
        self.bytes_written += written
        self.delivered += delivered
        if self._pass_oldest and self.writes != writes_before:
            self.latency.observe(time.time() - self._pass_oldest, self.writes - writes_before)
        if stop < len(targets):
            self._pass_pos = stop
            self._handle = asyncio.get_running_loop().call_soon(self._step)
            return
        self._handle = None
        self._pass = None
        self._last_end = asyncio.get_running_loop().time()
        for channel in self._pass_channels:
            # Finding what every reader has taken is a scan of the readers: done once the
            # channel holds enough to matter (and every tick), not after every pass (measured:
            # a scan per pass cost a fifth of a closed-loop publisher's rate at 2,000 readers).
            if len(channel.events) >= TRIM_EVENTS or channel.size >= TRIM_BYTES:
                self._trim(channel)
        self._pass_channels = []
        if self.dirty or self.dirty_channels:
            self._schedule()

    def _trim(self, channel: Channel) -> None:
        """Drop the events every reader has taken; if the slowest is still more than
        `max_lag` bytes behind, drop down to the bound and cut the readers that fall off."""
        readers = channel.readers
        events = channel.events
        if channel is self.everyone:
            low = min((r.pos for r in readers), default=channel.end)
        else:
            low = min((r.topic_pos[i] for r, i in readers.items()), default=channel.end)  # type: ignore[index]
        if low == channel.end:  # everything taken (the common case): nothing to count
            events.clear()
            channel.base = low
            channel.size = 0
            return
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
            pos = reader.pos if i < 0 else reader.topic_pos[i]  # type: ignore[index]
            if pos < channel.base:
                self.on_slow(reader.sub, f"fell more than {self.max_lag} bytes behind")

    # -- the tick -------------------------------------------------------------------------

    def tick(self) -> None:
        """Once a tick for the whole process: trim the channels, ping the streams quiet for a
        heartbeat, cut those whose socket has taken nothing for `slow_after` seconds."""
        now = asyncio.get_running_loop().time()
        self._now = now
        quiet = now - self.heartbeat
        stalled = now - self.slow_after
        for channel in [self.everyone, *self.topics.values()]:
            if channel.events:
                self._trim(channel)
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


def _cut(events: list[Event], start: int, window: int) -> int:
    """The index after the events from `start` that fill `window` bytes (at least one)."""
    size = 0
    stop = start
    end = len(events)
    while stop < end and size < window:
        size += len(events[stop].frame)
        stop += 1
    return stop


def _past(channel: Channel, pos: int, last_seq: int) -> int:
    """The position in `channel` after every event up to seq `last_seq`."""
    events, base, end = channel.events, channel.base, channel.end
    while pos < end and events[pos - base].seq <= last_seq:
        pos += 1
    return pos
