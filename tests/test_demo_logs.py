"""Demo mode's log producer: the hub's own log records as `log` events on topic `logs`."""

from __future__ import annotations

import asyncio
import json
import logging

from core_support import Peer, config
from test_core_hub import until

from handlers.demo import LogPublisher
from hub.core import Hub


def log_events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_records_become_log_events_and_a_flood_is_capped_and_reported():
    async def scenario() -> None:
        hub = Hub(config())
        conn = Peer()
        hub.subscribe(conn.transport, "ops", topics=("logs",))
        producer = LogPublisher(hub, asyncio.get_running_loop(), rate=5.0, burst=10)
        logger = logging.getLogger("demo-test")
        logger.addHandler(producer)
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        try:
            logger.warning("disk %s full", "/var")
            got: list[dict] = []

            def seen(n: int):
                got.extend(log_events(conn.read()))
                return len(got) >= n

            await until(lambda: seen(1))
            assert got[0]["name"] == "log" and got[0]["data"] == {
                "level": "warning",
                "service": "demo-test",
                "message": "disk /var full",
            }
            for i in range(200):
                logger.info("flood %d", i)
            await until(lambda: seen(10))
            # the bucket had 9 tokens left: the rest were dropped, then reported in one record
            await until(
                lambda: seen(11) or any("not published" in e["data"]["message"] for e in got),
                timeout=5,
            )
            floods = [e for e in got if e["data"]["message"].startswith("flood")]
            assert len(floods) <= 10
            report = [e for e in got if "not published" in e["data"]["message"]]
            assert len(report) == 1 and report[0]["data"]["level"] == "warning"
            dropped = int(report[0]["data"]["message"].split()[0])
            assert dropped + len(floods) == 200
        finally:
            logger.removeHandler(producer)
            conn.shutdown()

    asyncio.run(scenario())
