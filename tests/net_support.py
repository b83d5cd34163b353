"""A TCP proxy on 127.0.0.1 that the tests can break on purpose: a network between a client
and a real hub that cuts connections or loses an answer after the hub has acted on its
request. It runs its own asyncio loop in a thread, so blocking clients can go through it too."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.connections: set[asyncio.StreamWriter] = set()
        self.lose_answers = 0  # answers still to lose (the connection is cut instead)
        self.answers_lost = 0
        self.accepted = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(5):
            raise RuntimeError("the proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.connections.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if answers and self.lose_answers > 0:
                        # the hub has answered, so it has acted: the client never hears it
                        self.lose_answers -= 1
                        self.answers_lost += 1
                        break
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                for w in (writer, up_writer):
                    w.close()
                    self.connections.discard(w)

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    def cut(self) -> None:
        """Close every connection through the proxy now (both sides)."""

        def close_all() -> None:
            for w in list(self.connections):
                w.transport.abort()
            self.connections.clear()

        self.loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        self.cut()

        async def stop() -> None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def proxy(upstream_port: int) -> Iterator[Proxy]:
    p = Proxy(upstream_port)
    try:
        yield p
    finally:
        p.close()
