"""A real transport for core tests: one end of a socketpair, non-blocking, as a stream's
socket is. The other end is the client; reading it gives the bytes the hub really sent."""

from __future__ import annotations

import socket

from hub.config import Config

SECRET = "core-tests-secret-0123456789-abcdefghijklmnop"


def config(**overrides: object) -> Config:
    return Config(jwt_secret=SECRET, **overrides)  # type: ignore[arg-type]


class SocketConnection:
    def __init__(self, sndbuf: int | None = None) -> None:
        self.server, self.client = socket.socketpair()
        if sndbuf is not None:
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        self.server.setblocking(False)
        self.client.setblocking(False)
        self.pending = bytearray()  # what the kernel did not take yet
        self.writes = 0
        self.most_held_before_a_write = 0
        self.closed = False
        self.flushed_on_close: bool | None = None

    def write(self, data: bytes) -> int:
        self.writes += 1
        self.most_held_before_a_write = max(self.most_held_before_a_write, len(self.pending))
        if self.closed:
            return 0
        if self.pending:
            self.pending += data
        else:
            try:
                sent = self.server.send(data)
            except BlockingIOError:
                sent = 0
            self.pending += data[sent:]
        return len(self.pending)

    def close(self, flush: bool) -> None:
        self.closed = True
        self.flushed_on_close = flush
        self.server.close()

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def events(self) -> list[tuple[str, str]]:
        """(id, event name) of each frame received so far; comments skipped."""
        out = []
        for block in self.read().decode().split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in block.split("\n") if line and ":" in line[1:]
            )
            if "id" in fields:
                out.append((fields["id"], fields.get("event", "")))
        return out

    def shutdown(self) -> None:
        self.client.close()
        if not self.closed:
            self.server.close()
