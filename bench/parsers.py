"""``python -m bench.parsers``: redis-py's reply parsers, hiredis (C) and its own (Python),
reading the broker's feed (XREAD of 256 entries) from a private redis-server on core 1: entries
of a 100-event batch (~25 KB each, the broker's layout) and single-event entries, in entries/s.
The broker depends on redis[hiredis] because of these figures (README, Scale-out)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import ujson
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

from bench import servers

BODY = ujson.dumps({"type": 2, "name": "payment", "user": "u1", "ts": 1, "data": {"a": 1}})
ROW = ujson.dumps([2, "payment", "u1", 1, BODY, ["u1"], ["payments"], False, None, 0.0])


async def fill(url: str) -> None:
    r = aioredis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for _ in range(2000):
        pipe.xadd("p:batch", {"p": "0-0", "e": "[" + ",".join([ROW] * 100) + "]", "o": "x:1"})
    for _ in range(50_000):
        pipe.xadd("p:event", {"p": "0-0", "e": ROW})
    await pipe.execute()
    await r.aclose()


async def read(port: int, parser: type, key: str) -> float:
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=port, parser_class=parser)
    r = aioredis.Redis(connection_pool=pool)
    started, last, n = time.perf_counter(), "0-0", 0
    while True:
        reply = await r.xread({key: last}, count=256)
        if not reply:
            break
        last = reply[0][1][-1][0]
        n += len(reply[0][1])
    took = time.perf_counter() - started
    await r.aclose()
    return n / took


async def measure(url: str, port: int) -> list[str]:
    await fill(url)
    lines = []
    for _ in range(2):
        for name, parser in (("hiredis", _AsyncHiredisParser), ("python", _AsyncRESP2Parser)):
            batch = await read(port, parser, "p:batch")
            single = await read(port, parser, "p:event")
            lines.append(
                f"  {name:8} batch entries {batch:>9,.0f}/s   single-event entries "
                f"{single:>9,.0f}/s"
            )
    return lines


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hub-parsers-") as tmp:
        redis = servers.RedisServer(Path(tmp), 1)
        os.sched_setaffinity(0, {0})
        try:
            lines = asyncio.run(measure(redis.url, redis.port))
        finally:
            servers.stop_all()
    print("redis-py reply parsers, reading the feed (XREAD 256 entries):\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
