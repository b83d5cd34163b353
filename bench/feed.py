"""``python -m bench.feed``: how many events/s one hub process takes from the Redis feed.

With the Redis broker every process reads every event: the rate at which one process can
take them, with no subscriber at all, is where adding processes stops adding capacity
(README, Scale-out). Measured as a catch-up: the hub (pinned to core 0) is stopped
(SIGSTOP), `--events` events are published into Redis by this command (as another node
would: the hub decodes every one), the hub is let go (SIGCONT), and the time until its
`hub_events_received` counter has counted them all gives the rate. Redis and this command run
on core 1. Loopback only; every process started is ended by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import servers
from hub.decode import decode_json
from hub.redis_broker import RedisBroker

SECRET = "feed-bench-secret-0123456789-abcdefghijklm"


def received(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "hub_events_received":
            return float(family.samples[0].value)
    raise RuntimeError("hub_events_received is not in /metrics")


async def fill(url: str, prefix: str, events: int, batch: int, routing: str) -> float:
    """Publish `events` events in batches; seconds it took."""
    broker = RedisBroker(url, prefix=prefix, history=10_000_000, revoke_ttl=3600)
    if routing == "private":
        body = (
            b"["
            + b",".join(
                b'{"type":2,"user":"u%d","data":{"amount":42,"currency":"EUR"}}' % i
                for i in range(batch)
            )
            + b"]"
        )
    else:
        body = b"[" + b",".join([b'{"type":5,"data":{"text":"hello everyone"}}'] * batch) + b"]"
    started = time.monotonic()
    sent = 0
    while sent < events:
        group = [
            broker.publish(decode_json(body)) for _ in range(min(64, (events - sent) // batch))
        ]
        await asyncio.gather(*group)
        sent += len(group) * batch
    took = time.monotonic() - started
    await broker.client.aclose()
    await broker.feed.aclose()
    return took


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="hub-feed-") as tmpname:
        tmp = Path(tmpname)
        redis = servers.RedisServer(tmp, 1)
        os.sched_setaffinity(0, {1})
        lines = []
        try:
            for routing in args.routing.split(","):
                redis.command(b"FLUSHALL")
                hub = servers.HubServer(
                    tmp,
                    SECRET,
                    0,
                    None,
                    [
                        "--broker",
                        redis.url,
                        "--redis-prefix",
                        "feed",
                        "--history",
                        "1000000",
                        "--history-bytes",
                        str(4 << 30),
                    ],
                    "",
                )
                try:
                    before = received(hub.port)
                    os.kill(hub.pid, signal.SIGSTOP)
                    try:
                        fill_s = asyncio.run(
                            fill(redis.url, "feed", args.events, args.batch, routing)
                        )
                    finally:
                        os.kill(hub.pid, signal.SIGCONT)
                    started = time.monotonic()
                    deadline = started + args.timeout
                    got = before
                    while got < before + args.events and time.monotonic() < deadline:
                        time.sleep(0.02)
                        got = received(hub.port)
                    took = time.monotonic() - started
                    n = got - before
                    lines.append(
                        f"feed ({routing}, batches of {args.batch}): one process took "
                        f"{n:,.0f} events in {took:.2f} s = {n / took:,.0f} events/s "
                        f"(published into Redis at {args.events / fill_s:,.0f} events/s)"
                        + ("" if n >= args.events else "  [INCOMPLETE]")
                    )
                finally:
                    hub.stop()
        finally:
            servers.stop_all()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100, help="events per publish request")
    parser.add_argument("--routing", default="private,broadcast")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    print(run(args))


if __name__ == "__main__":
    main()
