"""The storm benches' client connection (bench.hold, bench.storm): a raw non-blocking socket
on loopback that the event loop watches, and the head of the answer it reads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Iterable
from typing import Protocol

READ_SIZE = 256 * 1024
HEAD_END = b"\r\n\r\n"


class Owner(Protocol):
    """The client a connection reads for, while it is that client's current one."""

    @property
    def conn(self) -> Conn | None: ...

    def request_sent(self) -> None: ...

    def failed(self, exc: OSError) -> None: ...

    def received(self, data: bytes) -> None: ...

    def lost(self) -> None: ...


class Attempting(Protocol):
    """A client between its attempts (`timer`) or in one (`conn`)."""

    @property
    def timer(self) -> asyncio.TimerHandle | None: ...

    @property
    def conn(self) -> Conn | None: ...


class Conn:
    """One attempt's connection: a non-blocking socket the loop watches (add_reader,
    add_writer), no transport: connecting and sending cost a few system calls, so the first
    requests leave while the last sockets are made. What it reads goes to its client while it
    is the client's current one."""

    __slots__ = ("client", "fd", "loop", "sending", "sock")

    def __init__(self, client: Owner, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.sock: socket.socket | None = None
        self.fd = -1
        self.sending = b""

    def open(self, port: int, request: bytes) -> None:
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        self.fd = sock.fileno()
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        self.sending = request
        self._send()  # on loopback the handshake is often done already

    def _send(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            sent = sock.send(self.sending)
        except (BlockingIOError, InterruptedError):
            self.loop.add_writer(self.fd, self._writable)
            return
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # (not connected yet: wait until it is)
                raise
            self.loop.add_writer(self.fd, self._writable)
            return
        self.sending = self.sending[sent:]
        if self.sending:
            self.loop.add_writer(self.fd, self._writable)
            return
        self.client.request_sent()
        self.loop.add_reader(self.fd, self._readable)

    def _writable(self) -> None:
        self.loop.remove_writer(self.fd)
        sock = self.sock
        if sock is None:
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            if err:
                raise OSError(err, os.strerror(err))
            self._send()
        except OSError as exc:
            if self.client.conn is self:
                self.client.failed(exc)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            if self.client.conn is self:
                self.client.lost()
            return
        if self.client.conn is self:
            self.client.received(data)

    def lowat(self, n: int) -> None:
        """SO_RCVLOWAT: readable once n bytes wait (fewer, larger reads); set back to 1 it
        wakes its reader at once (Linux >= 4.19)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            sock.close()


def events_request(port: int, tok: str) -> bytes:
    """A GET /events request up to its Last-Event-ID (that line, if any, and the blank line
    that ends it are the caller's)."""
    return (
        f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {tok}\r\n"
    ).encode()


def close_all(clients: Iterable[Attempting]) -> None:
    """Every client's timer cancelled and its connection closed."""
    for client in clients:
        if client.timer is not None:
            client.timer.cancel()
        if client.conn is not None:
            client.conn.close()


def answer_head(buf: bytes) -> tuple[int, list[str], bytes] | None:
    """An answer's status (0: unreadable), its header lines and the bytes after its head;
    None while the head is not all there."""
    end = buf.find(HEAD_END)
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return status, lines[1:], buf[end + len(HEAD_END) :]


def retry_after(headers: list[str], default: float = 1.0) -> float:
    """The seconds an answer's Retry-After says (`default` without one)."""
    seconds = default
    for line in headers:
        name, _, value = line.partition(":")
        if name.strip().lower() == "retry-after":
            with contextlib.suppress(ValueError):
                seconds = float(value.strip())
    return seconds
