"""The scenarios of issue 3 and the publisher settings each server gets.

Publisher settings (see ``bench/loadgen.py``, ``Publisher``):

- ``mode``: ``rate`` (a 2 ms timer sends what is owed at the offered rate) or ``closed`` (the
  next request leaves when the previous answer arrives: as fast as the server answers);
- ``conns`` keep-alive connections, each with up to ``inflight`` requests outstanding
  (pipelined when more than one);
- ``batch_max`` events per request (the hub takes a JSON array; nchan has no batch, so it gets
  one request per event, pipelined); ``single``: a lone event goes as a JSON object;
  ``batch_exact``: only full batches (private routing: batches of exactly 100).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _rate_broadcast(kind: str, rate: float) -> dict[str, Any]:
    if kind == "hub":
        # one request in flight; what is owed when it returns goes as one batch
        return {"mode": "rate", "rate": rate, "conns": 1, "inflight": 1, "batch_max": 1000}
    # nchan: one request per event, a few pipelined on one connection
    return {"mode": "rate", "rate": rate, "conns": 1, "inflight": 8, "batch_max": 1}


def _private(kind: str, rate: float) -> dict[str, Any]:
    if kind == "hub":
        return {
            "mode": "rate",
            "rate": rate,
            "conns": 4,
            "inflight": 4,
            "batch_max": 100,
            "batch_exact": True,
            "single": False,
        }
    # nchan: one request per event, 16 connections with one request in flight each (a client
    # pool; 4 connections x 64 pipelined measured the same ~55-60k/s here, at higher latency)
    return {"mode": "rate", "rate": rate, "conns": 16, "inflight": 1, "batch_max": 1}


def _closed_single(kind: str) -> dict[str, Any]:
    return {"mode": "closed", "conns": 1, "inflight": 1, "batch_max": 1, "single": True}


def _closed_batch(kind: str) -> dict[str, Any] | None:
    if kind != "hub":
        return None  # nchan has no batch publish
    return {"mode": "closed", "conns": 1, "inflight": 1, "batch_max": 100, "single": False}


@dataclass
class Scenario:
    name: str
    title: str
    streams: int
    routing: str = "broadcast"  # or "private", or "topic" (type 4 to topic `logs`)
    publish: Any = None  # kind -> publisher spec (None: idle / not applicable)
    offered: float | None = None  # offered events/s (None: closed loop / idle)
    probes: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    def publisher(self, kind: str) -> dict[str, Any] | None:
        return self.publish(kind) if self.publish else None

    @property
    def module(self) -> str | None:
        """A scenario run by a module of its own (a command with its own report), not by the
        load generator."""
        module: str | None = self.extra.get("module")
        return module

    def applies_to(self, kind: str) -> bool:
        if self.module is not None:
            return kind == "hub"
        return self.publish is None or self.publisher(kind) is not None


def all_scenarios() -> list[Scenario]:
    s = [
        Scenario("idle-10k", "10,000 idle streams", 10_000, probes=0),
        # the connect rate the hub sustains: clients arriving twice as fast as idle-10k's
        Scenario(
            "idle-10k-ramp10k",
            "10,000 idle streams arriving at 10,000/s",
            10_000,
            probes=0,
            extra={"connect_rate": 10_000},
        ),
    ]
    for streams, rates in ((2_000, (200, 500, 1000)), (10_000, (100, 200))):
        for r in rates:
            s.append(
                Scenario(
                    f"bcast-{streams // 1000}k-{r}",
                    f"broadcast {streams:,} streams at {r}/s",
                    streams,
                    publish=lambda kind, r=r: _rate_broadcast(kind, r),
                    offered=r,
                )
            )
    # A topic every stream subscribes to costs what a broadcast costs (issue 7): same rates.
    for r in (200, 500, 1000):
        s.append(
            Scenario(
                f"topic-2k-{r}",
                f"topic `logs` on 2,000 streams at {r}/s",
                2_000,
                routing="topic",
                publish=lambda kind, r=r: _rate_broadcast(kind, r) if kind == "hub" else None,
                offered=r,
            )
        )
    s.append(
        Scenario(
            "closed-topic-2k",
            "closed-loop publisher (1 in flight), topic `logs` on 2,000 streams",
            2_000,
            routing="topic",
            publish=lambda kind: _closed_single(kind) if kind == "hub" else None,
        )
    )
    s.append(
        Scenario(
            "private-10k",
            "private routing, 10,000 users, 100,000 events/s",
            10_000,
            routing="private",
            publish=lambda kind: _private(kind, 100_000),
            offered=100_000,
            probes=200,
        )
    )
    s.append(
        Scenario(
            "closed-2k",
            "closed-loop publisher (1 in flight), 2,000 streams",
            2_000,
            publish=_closed_single,
        )
    )
    s.append(
        Scenario(
            "light-2k",
            "light load: 10 events/s, 2,000 streams",
            2_000,
            publish=lambda kind: _rate_broadcast(kind, 10),
            offered=10,
        )
    )
    s.append(
        Scenario(
            "nosub-single",
            "no subscribers, 1 event per request, 1 in flight",
            0,
            publish=_closed_single,
        )
    )
    s.append(
        Scenario(
            "nosub-batch", "no subscribers, batches of 100, 1 in flight", 0, publish=_closed_batch
        )
    )
    # Each a command of its own, with its own report (after the table): reliability
    # (bench/churn.py, bench/flood.py) and the Redis broker's figures (feed, layouts, parsers).
    for name, title in (
        ("churn", "10,000 connect/disconnect cycles, then a soak: cuts with resume, joins, leaves"),
        ("flood", "2,000 half-open connections under 256 descriptors"),
        ("feed", "events/s one process takes from the Redis feed, no subscribers"),
        ("layouts", "Redis layouts: entry per event, entry per batch, Pub/Sub plus a history"),
        ("parsers", "redis-py's reply parsers (hiredis, Python) reading the Redis feed"),
        ("storm", "reconnect storm: 10,000 streams cut at once, hub restarts; Last-Event-ID"),
    ):
        s.append(Scenario(name, title, 0, extra={"module": f"bench.{name}"}))
    return s


def select(scenarios: list[Scenario], only: list[str]) -> list[Scenario]:
    """--only takes names or prefixes (``bcast`` = every broadcast scenario)."""
    if not only:
        return scenarios
    wanted = [w.strip() for part in only for w in part.split(",") if w.strip()]
    picked = [sc for sc in scenarios if any(sc.name == w or sc.name.startswith(w) for w in wanted)]
    if not picked:
        names = ", ".join(sc.name for sc in scenarios)
        raise SystemExit(f"--only {','.join(wanted)}: no such scenario (have: {names})")
    return picked
