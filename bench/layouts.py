"""``python -m bench.layouts``: the Redis layouts the broker could use, measured side by side.

The broker (hub/redis_broker.py) stores one stream entry per publish request (a batch).
The alternatives: one entry per event (a Lua script XADDs each event of a batch, all or
nothing), and Pub/Sub for delivery plus a stream for the history (both in one MULTI). For each
layout and batch size: the events/s one asyncio client publishes (one request in flight), and
the events/s one client reads back and decodes (XREAD of 256 entries, or Pub/Sub messages).
Against a private redis-server on core 1, this command on core 0. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import ujson

from bench import servers

BODY = ujson.dumps(
    {"type": 2, "name": "payment", "user": "u123", "ts": 1700000000000, "data": {"amount": 42}}
)
ROW = ujson.dumps([2, "payment", "u123", 1700000000000, BODY, ["u123"], ["payments"], False, None])
PER_EVENT = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1000000, '*', 'e', ARGV[i])
end
return ids
"""


async def measure(url: str, events: int, batch: int) -> list[str]:
    r = aioredis.Redis.from_url(url)
    await r.flushall()
    out = []
    blob = "[" + ",".join([ROW] * batch) + "]"
    script = r.register_script(PER_EVENT)
    requests = events // batch

    async def timed(send: object) -> float:
        started = time.perf_counter()
        for _ in range(requests):
            await send()  # type: ignore[operator]
        return events / (time.perf_counter() - started)

    async def per_event() -> None:
        await script(keys=["l:event"], args=[ROW] * batch)

    async def per_batch() -> None:
        await r.xadd("l:batch", {"e": blob}, maxlen=1_000_000, approximate=True)

    sub = r.pubsub()
    await sub.subscribe("l:chan")
    await sub.get_message(timeout=1)

    async def pubsub() -> None:
        pipe = r.pipeline(transaction=True)
        pipe.xadd("l:history", {"e": blob}, maxlen=1_000_000, approximate=True)
        pipe.publish("l:chan", blob)
        await pipe.execute()

    rates = {name: await timed(f) for name, f in
             (("entry per event", per_event), ("entry per batch", per_batch),
              ("pubsub + history", pubsub))}  # fmt: skip

    async def read_stream(key: str, rows_per_entry: int) -> float:
        started = time.perf_counter()
        last, n = "0-0", 0
        while n < events:
            reply = await r.xread({key: last}, count=256)
            for eid, fields in reply[0][1]:
                last = eid
                rows = ujson.loads(fields[b"e"])
                n += rows_per_entry if rows_per_entry == 1 else len(rows)
        return n / (time.perf_counter() - started)

    async def read_pubsub() -> float:
        started = time.perf_counter()
        n = 0
        while n < events:
            message = await sub.get_message(timeout=5)
            if message is None:
                break
            n += len(ujson.loads(message["data"]))
        return n / (time.perf_counter() - started)

    reads = {
        "entry per event": await read_stream("l:event", 1),
        "entry per batch": await read_stream("l:batch", batch),
        "pubsub + history": await read_pubsub(),
    }
    for name in rates:
        out.append(
            f"  batch {batch:>3}  {name:<17} publish {rates[name]:>9,.0f} events/s   "
            f"read+decode {reads[name]:>9,.0f} events/s"
        )
    await sub.aclose()
    await r.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hub-layouts-") as tmp:
        redis = servers.RedisServer(Path(tmp), 1)
        os.sched_setaffinity(0, {0})
        try:
            lines = ["Redis layouts (one client, one request in flight):"]
            for batch in (1, 10, 100):
                lines += asyncio.run(measure(redis.url, args.events, batch))
        finally:
            servers.stop_all()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
