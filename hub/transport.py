"""A stream's socket, driven directly: the one transport under every SSE stream.

Once the HTTP handler has sent the response head, nothing of Tornado's IOStream is needed, and
it costs per stream what a stream does not use (two deques, a read buffer, a Future per write).
So the handler hands the bare socket over: a write is a plain `send()`; only what the kernel
does not take is kept, by reference, and sent when the loop says the socket is writable. The
loop watches the socket for reads only to learn that the client went away.

The flusher is the only writer and never queues a second write behind unsent bytes (it waits
for its owner's `drained`), so what a stream holds here is at most one write's worth (its end
frame is one too, the last); the transport closes once it has sent it, or at once when the
flusher's grace runs out.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from hub.disconnect import GONE, Disconnect

__all__ = ["SEND_BUFFER", "Owner", "SocketTransport"]

# The kernel's send buffer per stream. Left to autotuning, a client that stops reading can
# make the kernel hold up to tcp_wmem's maximum (4 MiB here) for it before the hub sees any
# backpressure: with thousands of streams that is memory nothing else bounds.
SEND_BUFFER = 128 * 1024
MAX_RECEIVED = 8 * 1024  # bytes a client may send on its stream before it is cut


class Owner(Protocol):
    """What the transport tells the one it carries (a hub.stream.Stream): the methods of one
    object, not callbacks (a closure per stream would cost ~240 bytes of each one's
    footprint)."""

    def end(self, why: Disconnect, retry_ms: int | None = None) -> None:
        """The connection ended (GONE): the client left, the socket failed, or it was
        closed (by the owner, which has ended already: its end does nothing twice)."""

    def drained(self) -> None:
        """The bytes the transport held have all reached the kernel."""


class SocketTransport:
    """Non-blocking writes to one socket; tells its owner (`watch`) once when the connection
    ends, for any reason, and each time what it held has drained."""

    __slots__ = (
        "closing",
        "fd",
        "loop",
        "owner",
        "pending",
        "pending_size",
        "received",
        "sent",
        "socket",
    )

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.socket: socket.socket | None = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.pending: list[bytes | memoryview] | None = None
        self.pending_size = 0  # bytes held: written, not yet taken by the kernel
        self.sent = 0  # bytes the kernel has taken, ever: progress, for stall detection
        self.received = 0  # bytes the client sent on the stream (dropped)
        self.closing = False  # closes once what it holds is sent (close(flush=True))
        self.owner: Owner | None = None

    def watch(self, owner: Owner) -> None:
        """From now on, tell `owner` of the connection's end and of held bytes drained (its
        end at once, if the connection has ended already: nothing may stay registered for a
        gone client)."""
        if self.socket is None:
            owner.end(GONE)
            return
        self.owner = owner
        self.loop.add_reader(self.fd, self._on_readable)

    @property
    def closed(self) -> bool:
        return self.socket is None or self.closing

    def write(self, data: bytes | memoryview) -> None:
        """Send what the kernel takes now; hold the rest, in order, by reference."""
        sock = self.socket
        if sock is None:
            return
        pending = self.pending
        if pending is not None:
            pending.append(data)
            self.pending_size += len(data)
            return
        try:  # _send, inline: this is every write of every stream
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._shut()
            return
        self.sent += sent
        if sent == len(data):
            return
        self._keep(data, sent)
        self.loop.add_writer(self.fd, self._on_writable)

    def close(self, flush: bool = False) -> None:
        """Close; with `flush`, once what the transport holds has been sent (the end frame,
        say). Without it, at once, even when a flush was under way (a grace ran out)."""
        if self.socket is None:
            return
        if flush and self.pending:
            self.closing = True
        else:
            self._shut()

    def _on_writable(self) -> None:
        pending, sock = self.pending, self.socket
        if pending is None or sock is None:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        sent = self._send(sock, data)
        if sent < 0:
            return
        if sent < len(data):
            self._keep(data, sent)
            return
        self.pending = None
        self.pending_size = 0
        self.loop.remove_writer(self.fd)
        if self.closing:
            self._shut()
        elif self.owner is not None:
            self.owner.drained()

    def _send(self, sock: socket.socket, data: bytes | memoryview) -> int:
        """What the kernel took of `data`; -1 when the connection is gone (it is shut)."""
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._shut()
            return -1
        self.sent += sent
        return sent

    def _keep(self, data: bytes | memoryview, sent: int) -> None:
        """Hold the unsent rest, by reference, to go out when the socket is writable."""
        self.pending = [memoryview(data)[sent:]]
        self.pending_size = len(data) - sent

    def _on_readable(self) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            data = sock.recv(4096)  # a client sends nothing on a stream: whatever comes is dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._shut()
        else:
            # A client has nothing to send on a stream; one that keeps sending would make the
            # hub spend a read on it for ever. A few bytes (a pipelined request) pass.
            self.received += len(data)
            if self.received > MAX_RECEIVED:
                self._shut()

    def _shut(self) -> None:
        """Close the socket and tell the owner (GONE)."""
        sock = self.socket
        if sock is None:
            return
        self.socket = None
        self.closing = False
        self.loop.remove_reader(self.fd)
        if self.pending is not None:
            self.loop.remove_writer(self.fd)
            self.pending = None
            self.pending_size = 0
        sock.close()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.end(GONE)
