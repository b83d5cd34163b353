"""The write loop: one per process, never one per stream. It is the only writer of streams
(hub.stream.Stream) and does all of a stream's writing: its opening, events, heartbeats, a
`reset` (queued in order like a broadcast, `interject`), and its end (`end`): what it is owed,
a window at a time like everything else, then its end frame, then the close.

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

A stream that ends keeps what it was owed then (by reference: the events, not their bytes),
reads no channel any more, and is written like the others until it has taken it; then its end
frame goes out and the transport closes once it has sent it. A client that does not take all
that within `grace` seconds of the end is cut. There is one timer for all of them.

A pass is sliced (a few hundred streams, then back to the event loop) so that publishes and
new connections are served during a long pass. A pass begins `interval` after the previous one
ended, so under load each carries what accumulated meanwhile; after a quiet spell it begins at
once, so a lone event goes out without delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from operator import attrgetter

from hub.disconnect import GONE, SLOW, Disconnect
from hub.dispatch import Route
from hub.history import History
from hub.message import Event
from hub.registry import Registry, shrink
from hub.stream import Channel, Stream
from hub.transport import SocketTransport

__all__ = [
    "CLOSE_GRACE",
    "LATENCY_BUCKETS",
    "PING",
    "REPLAY_BUDGET",
    "WINDOW",
    "Flusher",
    "LatencyTally",
]

log = logging.getLogger("hub")

PING = b": ping\n\n"
WINDOW = 256 * 1024  # the most one write to a stream carries
# The most a pass replays from the history, over all resuming streams, past the window each
# resume is written when it opens: one long resume goes at full speed (a window a pass), past
# four at once they share it; a client resuming from the oldest id in a loop gets its share,
# and the live streams keep theirs (issue 18). The first window is not counted: a reconnect
# storm's resumes (each owed the few events it missed) are written as they open, as before
# (counting them held 10,000 reconnects back for tens of seconds: python -m bench.storm).
REPLAY_BUDGET = 4 * WINDOW
CLOSE_GRACE = 5.0  # seconds an ending stream has to take what it is owed and its end frame
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


class Flusher:
    """The write loop (see the module). It satisfies hub.stream.Writer: the streams it opens
    ask it to visit them (`mark`) and to end them (`end`). `on_end(stream, why)` is told of
    every end, once (the hub counts and logs them)."""

    def __init__(
        self,
        registry: Registry,
        history: History,
        *,
        interval: float,
        max_lag: int,
        slow_after: float,
        heartbeat: float,
        on_end: Callable[[Stream, Disconnect], None],
        slice_size: int = 512,
        window: int = WINDOW,
        grace: float = CLOSE_GRACE,
        replay_budget: int = REPLAY_BUDGET,
    ) -> None:
        self.registry = registry
        self.history = history
        self.interval = interval
        self.max_lag = max_lag
        self.slow_after = slow_after
        self.heartbeat = heartbeat
        self.on_end = on_end
        self.slice_size = slice_size
        self.window = window
        self.grace = grace
        self.replay_budget = replay_budget
        self._replay_left = replay_budget  # of this pass's
        # Resuming streams the budget left out of a pass: the next one visits them first.
        self._replay_waiting: list[Stream] = []
        self._deferred = False  # the last _take_replay took nothing: the budget was spent
        self._opening = False  # open() writes a resume's first window (outside the budget)
        self.everyone = Channel("everyone")
        self.topics: dict[str, Channel] = {}
        self._topics_peak = 0  # its peak size (hub.registry.shrink)
        self.dirty: list[Stream] = []
        self.dirty_channels: list[Channel] = []
        self.finishing: list[Stream] = []  # ending streams to visit (they read no channel)
        self._handle: asyncio.Handle | None = None
        self._pass: list[Stream] | None = None
        self._pass_channels: list[Channel] = []
        self._pass_pos = 0
        self._last_end = float("-inf")
        self._now = 0.0
        self._cut_short = False  # the last _take left something owed (the window was full)
        # Ending streams by the loop time their grace runs out (in order: the grace is one
        # for all), and the one timer that cuts them.
        self._ending: deque[tuple[float, Stream]] = deque()
        self._grace_handle: asyncio.TimerHandle | None = None
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
        out: Stream,
        transport: SocketTransport,
        opening: bytes,
        replay_from: int | None = None,
    ) -> None:
        """Start a stream (already in the registry) on `transport`: write its opening, read
        from now on, and (on a resume) replay the history from seq `replay_from` first. A
        transport whose client has left ends the stream at once (GONE)."""
        out.transport = transport
        out.writer = self
        out.written_at = out.progress_at = asyncio.get_running_loop().time()
        everyone = self.everyone
        everyone.readers[out] = -1
        out.pos = everyone.end
        if out.topics:
            channels: list[Channel] = []
            positions: list[int] = []
            for topic in out.topics:
                channel = self.topics.get(topic)
                if channel is None:
                    channel = self.topics[topic] = Channel(topic)
                channel.readers[out] = len(channels)
                channels.append(channel)
                positions.append(channel.end)
            out.channels = channels
            out.topic_pos = positions
        transport.write(opening)
        if replay_from is not None and replay_from < self.history.end_seq:
            out.replay = replay_from
            out.replay_end = self.history.end_seq
            self._opening = True  # its first window: not counted in the replay budget
            try:
                self.write(out)
            finally:
                self._opening = False
        transport.watch(out)

    def end(self, out: Stream, why: Disconnect, retry_ms: int | None) -> None:
        """End a stream (Stream.end, once): out of the registry and of every channel. Unless
        the client is gone (nothing written) or the stream is slow (`_cut_off`), it keeps what it
        is owed now, and is visited until it has taken it; then its end frame, then the
        close (`_write_ending`). `grace` seconds from now, what is still open is cut."""
        self.registry.remove(out)
        self.on_end(out, why)
        transport = out.transport
        if why is GONE or transport.socket is None:
            self._detach(out, owed=False)
            transport.close()
            return
        if why is SLOW:
            self._detach(out, owed=False)
            self._cut_off(out, why)
            return
        self._detach(out, owed=True)
        out.final = why.frame(retry_ms)
        loop = asyncio.get_running_loop()
        self._ending.append((loop.time() + self.grace, out))
        if self._grace_handle is None:
            self._grace_handle = loop.call_at(self._ending[0][0], self._cut_overdue)
        out.dirty = False  # (an entry in `dirty` may remain: a visit more does no harm)
        self.mark(out)

    def _detach(self, out: Stream, owed: bool) -> None:
        """Take the stream off every channel (a topic's channel left without readers is
        dropped). With `owed`, what it has not taken of them becomes its private list, by
        reference and in order: what an ending stream is still written."""
        everyone = self.everyone
        kept: list[Event] = []
        if owed:
            sources = 0
            if out.pos != everyone.end:
                kept += everyone.events[out.pos - everyone.base :]
                sources += 1
            if out.channels is not None:
                assert out.topic_pos is not None
                for channel, pos in zip(out.channels, out.topic_pos, strict=True):
                    if pos != channel.end:
                        kept += channel.events[pos - channel.base :]
                        sources += 1
            if out.private:
                kept += out.private
                sources += 1
            if sources > 1:
                kept.sort(key=_seq)  # an event it reads twice: side by side, written once
        everyone.readers.pop(out, None)
        if out.channels is not None:
            topics = self.topics
            size = len(topics)
            for channel in out.channels:
                channel.readers.pop(out, None)
                if not channel.readers and topics.get(channel.name) is channel:
                    del topics[channel.name]
            if len(topics) < size:
                self._topics_peak = shrink(topics, max(self._topics_peak, size))
        out.channels = out.topic_pos = None
        out.private = kept or None
        out.private_size = 0
        if not owed:
            out.replay = None

    def _cut_off(self, out: Stream, why: Disconnect) -> None:
        """Close a stream at once, owed nothing more: its socket takes nothing, so its end
        frame goes out only if the socket holds nothing."""
        out.final = out.private = out.replay = None
        transport = out.transport
        if transport.pending is None:
            transport.write(why.frame())
        transport.close()

    def _cut_slow(self, out: Stream, reason: str) -> None:
        log.info("stream of %r cut as slow: %s", out.user, reason)
        if out.closed:  # ending: its end frame would say it took all it was owed
            self._cut_off(out, SLOW)
        else:
            out.end(SLOW)

    def _cut_overdue(self) -> None:
        """Cut the ending streams whose grace ran out: their clients did not take what they
        were owed and the end frame in time."""
        self._grace_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        ending = self._ending
        while ending and ending[0][0] <= now:
            out = ending.popleft()[1]
            out.final = out.private = out.replay = None
            out.transport.close()
        if ending:
            self._grace_handle = loop.call_at(ending[0][0], self._cut_overdue)

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
        over: list[Stream] = []
        for user in route.users:
            streams = by_user.get(user)
            if not streams:
                continue
            for out in streams:  # (the registry holds open streams only)
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
            self._cut_slow(out, f"owes more than {self.max_lag} bytes")

    def _append(self, channel: Channel, event: Event) -> None:
        channel.events.append(event)
        channel.end += 1
        channel.size += len(event.frame)
        if not channel.dirty:
            channel.dirty = True
            self.dirty_channels.append(channel)
            if self._handle is None and self._pass is None:
                self._schedule()

    def mark(self, out: Stream) -> None:
        """The stream may have something to write (its socket drained, say): visit it."""
        if out.dirty:
            return
        if not out.closed:
            self.dirty.append(out)
        elif out.final is not None:  # ending: it reads no channel, so a pass must be told
            self.finishing.append(out)
        else:
            return
        out.dirty = True
        if self._handle is None and self._pass is None:
            self._schedule()

    # -- writing --------------------------------------------------------------------------

    def write(self, out: Stream) -> None:
        """One write with what the stream owes, up to the window, unless its socket still
        holds the previous one."""
        out.dirty = False
        if out.closed:
            if out.final is not None:
                self._write_ending(out)
            return
        transport = out.transport
        if transport.pending is not None:
            return
        self._cut_short = False
        data = self._take(out, self.window)
        if data:
            self.writes += 1
            self.bytes_written += len(data)
            out.written_at = self._now
            transport.write(data)
        if self._deferred:  # the pass's replay budget is spent: first in the next pass
            self._deferred = False
            out.dirty = True
            self._replay_waiting.append(out)
            if self._handle is None and self._pass is None:
                self._schedule()
        elif self._cut_short and transport.pending is None:
            self.mark(out)  # more than a window's worth: the rest in the next pass

    def _write_ending(self, out: Stream) -> None:
        """An ending stream's next write, as any other's (up to the window, only when its
        socket holds nothing): what it was owed when it ended; once it has taken that, its
        end frame, and the transport closes when it has sent it."""
        transport = out.transport
        if transport.socket is None:  # the client left meanwhile
            out.final = out.private = out.replay = None
            return
        if transport.pending is not None:
            return  # drained() marks it again
        if out.replay is not None or out.private:
            data = self._take_owed(out, self.window)
            self._deferred = False  # (a budget spent: mark() below visits it again)
            if out.final is None:
                return  # cut: its replay fell out of the history
            if data:
                self.writes += 1
                self.bytes_written += len(data)
                transport.write(data)
            if out.replay is not None or out.private:
                if transport.pending is None:
                    self.mark(out)
                return
            if transport.pending is not None:
                return
        final, out.final = out.final, None
        if final is not None:
            transport.write(final)
            transport.close(flush=True)

    def _take_owed(self, out: Stream, window: int) -> bytes:
        """An ending stream's next window of what it was owed: a resume's replay still to
        read, then the events kept for it at its end (by seq, each once, its filters
        applied)."""
        if out.replay is not None:
            return self._take_replay(out, window)
        private = out.private
        assert private is not None
        stop = _cut(private, 0, window)
        while stop < len(private) and private[stop].seq == private[stop - 1].seq:
            stop += 1  # the second copy of the window's last event goes with it
        accepts = out.accepts if out.filters is not None else None
        parts = []
        last_seq = -1
        for event in private[:stop]:
            if event.seq == last_seq:
                continue
            last_seq = event.seq
            if accepts is None or accepts(event):
                parts.append(event.frame)
        del private[:stop]
        if not private:
            out.private = None
        self.delivered += len(parts)
        return b"".join(parts)

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

    def ping(self, out: Stream) -> None:
        if out.transport.pending is None:
            out.transport.write(PING)
            out.written_at = self._now

    def owes(self, out: Stream) -> bool:
        """Whether the stream has anything left to take."""
        if out.replay is not None or out.private or out.pos != self.everyone.end:
            return True
        channels = out.channels
        if channels is not None:
            positions = out.topic_pos
            assert positions is not None
            return any(ch.end != positions[i] for i, ch in enumerate(channels))
        return False

    def _take(self, out: Stream, window: int) -> bytes | None:
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
        data, out.pos, count = tail(everyone, out.pos, window)
        if out.pos != everyone.end:
            self._cut_short = True
        self.delivered += count
        return data

    def _take_sources(self, out: Stream, window: int) -> bytes | None:
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
        if out.channels is not None:
            assert positions is not None
            for i, topic in enumerate(out.channels):
                if topic.end != positions[i]:
                    owing += 1
                    channel = topic
                    index = i
        if owing == 0:
            return None
        if owing > 1 or out.filters is not None:
            return self._take_merged(out, window)
        if index < 0:
            data, out.pos, count = tail(channel, out.pos, window)
            pos = out.pos
        else:
            assert positions is not None
            data, pos, count = tail(channel, positions[index], window)
            positions[index] = pos
        if pos != channel.end:
            self._cut_short = True
        self.delivered += count
        return data

    def _take_merged(self, out: Stream, window: int) -> bytes:
        """Several sources owe (or filters apply): merge their events by seq, once each."""
        horizon = -1  # the last seq that every source cut short by the window has given
        taken: list[Event] = []
        sources: list[tuple[Channel, int]] = [(self.everyone, out.pos)]
        if out.channels is not None:
            assert out.topic_pos is not None
            sources += zip(out.channels, out.topic_pos, strict=True)
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
        accepts = out.accepts if out.filters is not None else None
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
        if out.channels is not None:
            positions = out.topic_pos
            assert positions is not None
            for i, channel in enumerate(out.channels):
                positions[i] = _past(channel, positions[i], last_seq)
        if private:
            k = 0
            while k < len(private) and private[k].seq <= last_seq:
                out.private_size -= len(private[k].frame)
                k += 1
            del private[:k]
        self.delivered += len(parts)
        return b"".join(parts)

    def _take_replay(self, out: Stream, window: int) -> bytes:
        """A resume's replay, read from the history in place, as the stream drains."""
        history = self.history
        seq = out.replay
        assert seq is not None
        if seq < history.first_seq:
            out.replay = None
            self._cut_slow(out, "its replay fell out of the history")
            return b""
        if not self._opening:
            window = min(window, self._replay_left)
            if window <= 0:
                self._deferred = True
                return b""
        end = out.replay_end
        parts = []
        size = 0
        for event in history.read(seq):
            if seq >= end or size >= window:
                break
            seq += 1
            if out.entitled(event):
                parts.append(event.frame)
                size += len(event.frame)
        if not self._opening:
            self._replay_left -= size
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
        if self.finishing:  # ending streams read no channel
            targets += self.finishing
            self.finishing = []
        if self._replay_waiting:
            targets = self._replay_waiting + targets
            self._replay_waiting = []
        self._replay_left = self.replay_budget
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
                shared = tail(everyone, pos, self.window)
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
        if self.dirty or self.dirty_channels or self.finishing or self._replay_waiting:
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
                self._cut_slow(reader, f"fell more than {self.max_lag} bytes behind")

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
                    self._cut_slow(out, f"its socket took nothing for {self.slow_after:g} s")
                continue
            out.sent_seen = transport.sent
            out.progress_at = now
            if out.written_at <= quiet and transport.pending is None:
                self.ping(out)

    @property
    def idle(self) -> bool:
        """No pass running or scheduled: every stream has been written what it could take."""
        return self._pass is None and self._handle is None

    def closing(self) -> int:
        """Ended streams whose sockets are still open: owed bytes, or the end frame, their
        clients have not taken yet."""
        return sum(out.transport.socket is not None for _, out in self._ending)

    def cancel(self) -> None:
        """Stop every pass and timer, and cut the streams still ending (at shutdown, once
        the grace has had its chance)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._grace_handle is not None:
            self._grace_handle.cancel()
            self._grace_handle = None
        self._pass = None
        self._replay_waiting = []
        while self._ending:
            out = self._ending.popleft()[1]
            out.final = out.private = out.replay = None
            out.transport.close()


def tail(channel: Channel, pos: int, window: int) -> tuple[bytes, int, int]:
    """(frames of `channel` from `pos` joined, up to `window` bytes; position after them; how
    many). Most readers ask for the same tail in a pass, so the last answer is kept."""
    key = (pos, channel.end)
    if key == channel.tail_key:
        return channel.tail
    events = channel.events
    start = pos - channel.base
    if channel.end - pos == 1:
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
    channel.tail_key = key
    channel.tail = answer
    return answer


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
