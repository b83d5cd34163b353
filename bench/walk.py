"""``python -m bench.walk``: the walk of one published event through the core, counted.

One broadcast is published over HTTP to a hub in this process (memory broker) with one stream
open, until the stream's socket has it; a profile hook records every call and return inside
the project's modules (hub/, handlers/). The report: how many times the walk crosses from one
module to another, how many of those crossings go back to a module already left, and the
path itself. A walk that is short and one way is cheap to read and to change (issue 16).

Every call returns to its caller, so the crossings count each helper twice; what says whether
the walk runs one way is the direction of its calls: each call from one module to another is
`down` (the caller imports the callee, at run time or for the type checker, directly or not),
`up` (the callee imports the caller: a call back into a layer already passed), `side`
(neither: an object of another module met through an argument or an inherited method) or
`circle` (each imports the other: no direction at all). One
`up` call is the design: the broker's feed into `Hub.deliver` (`hub.broker.Node`), the one way
every event, local or from Redis, reaches the node's streams; `ALLOWED_UP` names it.
"""

from __future__ import annotations

import ast
import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import ujson

ROOT = Path(__file__).resolve().parent.parent
# (caller module, callee): the broker's feed delivering to its node (hub.broker.Node)
ALLOWED_UP = frozenset({("hub.broker", "hub.core.Hub.deliver")})


def import_graph() -> dict[str, set[str]]:
    """Each module of hub/ and handlers/ -> the project modules it imports (those under
    TYPE_CHECKING included)."""
    graph: dict[str, set[str]] = {}
    for package in ("hub", "handlers"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem == "__init__":
                continue
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
            graph[f"{package}.{path.stem}"] = {
                m for m in found if m.split(".")[0] in ("hub", "handlers")
            }
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or not."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for module in graph.get(todo.pop(), ()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


@dataclass
class Walk:
    path: list[str] = field(default_factory=list)  # modules in the order the walk enters them
    # the same from the handler's post() on: the event's own walk, once its body is whole
    # (before it: Tornado's request lifecycle, the token, the body's deadlines)
    event_path: list[str] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (direction, caller, callee)

    @staticmethod
    def count(path: list[str]) -> tuple[int, int, int]:
        """(crossings, of them back to a module already left, modules)"""
        seen: set[str] = set()
        back = 0
        for module in path:
            back += module in seen
            seen.add(module)
        return len(path) - 1, back, len(seen)

    def against(self) -> list[tuple[str, str, str]]:
        """The calls that go up the import graph (other than the allowed one) or within a
        circle."""
        return [
            c
            for c in self.calls
            if c[0] == "circle"
            or (c[0] == "up" and (c[1].rpartition(":")[0], c[2]) not in ALLOWED_UP)
        ]


def _module(frame: FrameType) -> str | None:
    path = Path(frame.f_code.co_filename)
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] not in ("hub", "handlers"):
        return None
    return ".".join(rel.with_suffix("").parts)


async def walk() -> Walk:
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
    graph = import_graph()
    below = {module: reaches(graph, module) for module in graph}
    result = Walk()
    path = result.path

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        module = _module(frame)
        if module is None:
            return
        if not path or path[-1] != module:
            path.append(module)
        begins = event == "call" and frame.f_code.co_qualname == "PublishHandler.post"
        if begins or (result.event_path and result.event_path[-1] != module):
            result.event_path.append(module)
        caller = frame.f_back
        if event != "call" or caller is None:
            return
        source = _module(caller)
        if source is None or source == module:
            return
        down, up = module in below.get(source, ()), source in below.get(module, ())
        if down and up:
            direction = "circle"  # the two modules import each other: no direction
        elif down:
            direction = "down"
        elif up:
            direction = "up"
        else:
            direction = "side"
        result.calls.append(
            (
                direction,
                f"{source}:{caller.f_code.co_qualname}",
                f"{module}.{frame.f_code.co_qualname}",
            )
        )

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
    return result


def main() -> int:
    result = asyncio.run(walk())
    for what, path in (
        ("the request, from Tornado's first call", result.path),
        ("the event, from PublishHandler.post", result.event_path),
    ):
        crossings, back, modules = Walk.count(path)
        print(
            f"walk of one broadcast to a socket, {what}: {crossings} module crossings, "
            f"{back} of them back to a module already left, {modules} modules"
        )
        print("  " + " -> ".join(path))
    counts = {d: sum(c[0] == d for c in result.calls) for d in ("down", "up", "side", "circle")}
    print(
        f"calls between modules: {len(result.calls)}: {counts['down']} down the import graph, "
        f"{counts['up']} up, {counts['side']} sideways, {counts['circle']} within an import circle"
    )
    for direction, caller, callee in result.calls:
        print(f"  {direction:4} {caller} -> {callee}")
    against = result.against()
    if against:
        print(f"{len(against)} call(s) up or in a circle besides the broker's feed")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
