"""Real sockets for core tests: a socketpair whose hub end is wrapped in the hub's own
SocketTransport (the transport every stream runs on), and whose other end is the client:
reading it gives the bytes the hub really sent."""

from __future__ import annotations

import asyncio
import socket

from hub.config import Config
from hub.transport import SocketTransport

SECRET = "core-tests-secret-0123456789-abcdefghijklmnop"


def config(**overrides: object) -> Config:
    return Config(jwt_secret=SECRET, **overrides)  # type: ignore[arg-type]


def parse_blocks(raw: bytes) -> list[dict[str, str]]:
    """The field blocks of an event stream (LF line ends, as the hub writes), comments and
    blocks without data dropped: what a WHATWG parser would dispatch, plus the opening's id."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = fields.get(name, "") + value.removeprefix(" ")
        if fields:
            out.append(fields)
    return out


class Peer:
    """A stream over a socketpair: `transport` is the hub's end, the client end is read here."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.server, self.client = socket.socketpair()
        self.transport = SocketTransport(self.server, asyncio.get_running_loop())
        if rcvbuf is not None:
            # small buffers on both ends: the kernel takes little, so sends go partial
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.client.setblocking(False)
        self.received = bytearray()
        self.eof = False

    @property
    def closed(self) -> bool:
        """The hub closed its end (or the transport was shut)."""
        return self.transport.socket is None

    def read(self) -> bytes:
        """What arrived since the last read (also kept in `received`)."""
        chunks = []
        while True:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        self.received += data
        return data

    def events(self) -> list[tuple[str, str]]:
        """(id, event name) of each event received so far (blocks with data)."""
        self.read()
        return [
            (b.get("id", ""), b.get("event", "message"))
            for b in parse_blocks(bytes(self.received))
            if "data" in b
        ]

    def opening_id(self) -> str | None:
        """The id the stream's opening block carries."""
        self.read()
        blocks = parse_blocks(bytes(self.received))
        return blocks[0].get("id") if blocks and "retry" in blocks[0] else None

    def shutdown(self) -> None:
        self.client.close()
        self.transport.close()
