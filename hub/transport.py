"""A stream's socket, driven directly: the one transport under every SSE stream.

Once the HTTP handler has sent the response head, nothing of Tornado's IOStream is needed, and
it costs per stream what a stream does not use (two deques, a read buffer, a Future per write).
So the handler hands the bare socket over: a write is a plain `send()`; only what the kernel
does not take is kept, by reference, and sent when the loop says the socket is writable. The
loop watches the socket for reads only to learn that the client went away.

The flusher is the only writer and never queues a second write behind unsent bytes (it waits
for `on_drained`), so what a stream holds here is at most one write's worth; except at a
stream's end, when it writes what the stream is owed and the end frame at once (bounded by
--max-pending), and the transport closes after sending them, or after CLOSE_GRACE.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from hub.disconnect import GONE, Disconnect

__all__ = ["CLOSE_GRACE", "SEND_BUFFER", "SocketTransport"]

CLOSE_GRACE = 5.0  # seconds a closing stream has to take what it is still owed
# The kernel's send buffer per stream. Left to autotuning, a client that stops reading can
# make the kernel hold up to tcp_wmem's maximum (4 MiB here) for it before the hub sees any
# backpressure: with thousands of streams that is memory nothing else bounds.
SEND_BUFFER = 128 * 1024
MAX_RECEIVED = 8 * 1024  # bytes a client may send on its stream before it is cut


class SocketTransport:
    """Non-blocking writes to one socket; `on_close(owner, reason)` once when it ends, for any
    reason; `on_drained(owner)` when the bytes it held have all reached the kernel. (The
    callbacks are shared by every stream and take the stream's owner: a closure per stream
    would cost ~240 bytes of each one's footprint.)"""

    __slots__ = (
        "closing",
        "fd",
        "loop",
        "on_close",
        "on_drained",
        "owner",
        "pending",
        "pending_size",
        "reason",
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
        self.closing = False
        self.reason = GONE
        self.owner: Any = None
        self.on_close: Callable[[Any, Disconnect], None] | None = None
        self.on_drained: Callable[[Any], None] | None = None

    def watch(
        self,
        owner: Any,
        on_close: Callable[[Any, Disconnect], None],
        on_drained: Callable[[Any], None] | None = None,
    ) -> None:
        """From now on, report the end of the connection and the draining of held bytes (at
        once, if it has ended already: nothing may stay registered for a gone client)."""
        if self.socket is None:
            on_close(owner, self.reason)
            return
        self.owner = owner
        self.on_close = on_close
        self.on_drained = on_drained
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
            self.reason = GONE
            self._shut()
            return
        self.sent += sent
        if sent == len(data):
            return
        self._keep(data, sent)
        self.loop.add_writer(self.fd, self._on_writable)

    def close(self, reason: Disconnect, flush: bool = False) -> None:
        """End the stream; with `flush`, once what it holds has been sent (the logout event,
        say), or after a grace period if the client does not read it."""
        if self.socket is None or self.closing:
            return
        self.reason = reason
        if flush and self.pending:
            self.closing = True
            self.loop.call_later(CLOSE_GRACE, self._shut)
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
        elif self.on_drained is not None:
            self.on_drained(self.owner)

    def _send(self, sock: socket.socket, data: bytes | memoryview) -> int:
        """What the kernel took of `data`; -1 when the connection is gone (it is shut)."""
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.reason = GONE
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
            self.reason = GONE
            self._shut()
        else:
            # A client has nothing to send on a stream; one that keeps sending would make the
            # hub spend a read on it for ever. A few bytes (a pipelined request) pass.
            self.received += len(data)
            if self.received > MAX_RECEIVED:
                self.reason = GONE
                self._shut()

    def _shut(self) -> None:
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
        on_close, owner = self.on_close, self.owner
        self.on_close = self.on_drained = self.owner = None
        if on_close is not None:
            on_close(owner, self.reason)
