"""Prometheus collectors, behind one small class.

Hot-path counts (deliveries, writes, bytes) are plain integers on the hub and the flusher,
read at scrape time by a custom collector: an `inc()` per delivery would take a lock per
stream per event.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from hub.message import Event

if TYPE_CHECKING:
    from hub.core import Hub

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        self.streams = Gauge("hub_streams_open", "Open SSE streams.", registry=self.registry)
        self.streams.set_function(lambda: len(hub.registry))
        self.published = Counter(
            "hub_events_published",
            "Events published, by type name.",
            ["type"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "hub_publish_rejected",
            "Publish requests refused, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.streams_refused = Counter(
            "hub_streams_refused",
            "Streams refused for a limit, by HTTP status (429 per user, 503 in all).",
            ["status"],
            registry=self.registry,
        )
        for status in ("429", "503"):
            self.streams_refused.labels(status)
        self.disconnects = Counter(
            "hub_disconnects", "Streams ended, by reason.", ["reason"], registry=self.registry
        )
        self.registry.register(_HotPath(hub))

    def count_published(self, events: Iterable[Event]) -> None:
        for name, n in Tally(e.name for e in events).items():
            self.published.labels(name).inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _HotPath(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "hub_events_delivered",
            "Events written to streams (one per stream per event).",
            value=self.hub.flusher.delivered,
        )
        yield CounterMetricFamily(
            "hub_stream_writes",
            "Writes to stream sockets (each carries one or more frames).",
            value=self.hub.flusher.writes,
        )
        yield CounterMetricFamily(
            "hub_stream_bytes", "Bytes written to streams.", value=self.hub.flusher.bytes_written
        )
