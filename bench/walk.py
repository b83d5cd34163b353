"""``python -m bench.walk``: the walk of one published event through the core, counted.

One broadcast is published over HTTP to a hub in this process (memory broker) with one stream
open, until the stream's socket has it; a profile hook records every call and return inside
the project's modules (hub/, handlers/). The report: how many times the walk crosses from one
module to another, how many of those crossings go back to a module already left, and the
path itself. A walk that is short and one way is cheap to read and to change (issue 16).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import ujson

ROOT = Path(__file__).resolve().parent.parent


def _module(frame: FrameType) -> str | None:
    path = Path(frame.f_code.co_filename)
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in ("hub", "handlers"):
        return None
    return ".".join(rel.with_suffix("").parts)


async def walk() -> list[str]:
    """Publish one broadcast over HTTP to a hub in this process (memory broker) with one
    stream open, and record the modules from the publish handler to the stream's socket."""
    import jwt
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from handlers.app import build_app
    from hub.config import Config

    secret = "walk-secret-".ljust(40, "x")
    app = build_app(Config(jwt_secret=secret, flush_interval=0.001))
    [sock] = bind_sockets(0, "127.0.0.1")
    port = sock.getsockname()[1]
    server = HTTPServer(app)
    server.add_sockets([sock])
    token = jwt.encode({"sub": "u1", "exp": 2**31}, secret, algorithm="HS256")
    publisher = jwt.encode({"sub": "p", "exp": 2**31, "publish": True}, secret, algorithm="HS256")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await reader.readuntil(b": hub stream open\n\n")
    body = ujson.dumps({"type": 5, "data": {"n": 1}}).encode()
    request = (
        f"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {publisher}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    p_reader, p_writer = await asyncio.open_connection("127.0.0.1", port)
    path: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        module = _module(frame)
        if module is not None and (not path or path[-1] != module):
            path.append(module)

    sys.setprofile(profile)
    try:
        p_writer.write(request)
        received = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    finally:
        sys.setprofile(None)
    assert b'"n":1' in received, received
    await p_reader.readuntil(b"\r\n\r\n")
    for w in (writer, p_writer):
        w.close()
    server.stop()
    await app.settings["hub"].stop()
    return path


def main() -> int:
    path = asyncio.run(walk())
    seen: set[str] = set()
    returns = 0
    for module in path:
        if module in seen:
            returns += 1
        seen.add(module)
    print(f"walk of one broadcast, publish to socket: {len(path) - 1} module crossings, ")
    print(f"{returns} of them back to a module already left, {len(seen)} modules")
    print(" -> ".join(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
