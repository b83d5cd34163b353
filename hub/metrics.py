"""Prometheus collectors, behind one small class.

Hot-path counts (deliveries, writes, bytes) are plain integers on the hub and the flusher,
read at scrape time by a custom collector: an `inc()` per delivery would take a lock per
stream per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hub.disconnect import ENDS
from hub.flusher import LATENCY_BUCKETS
from hub.tickets import REJECTIONS

if TYPE_CHECKING:
    from hub.broker import Broker
    from hub.dispatch import TypeTable
    from hub.flusher import Flusher
    from hub.history import History
    from hub.limits import PublishLimiter
    from hub.registry import Registry
    from hub.revocations import Revocations

__all__ = ["PUBLISH_LIMITS", "SHED", "Metrics", "Observed"]

# Every label value of a fixed set is exported from the start, at 0: a dashboard's rate() and
# an alert on a series that appears only after its first event are both wrong until then.
# Publisher limits (hub.limits, hub.decode): rate is --publish-rate, batch --max-batch or a
# batch over --publish-burst, event_bytes --max-event-bytes.
PUBLISH_LIMITS = ("rate", "batch", "event_bytes")
# Connections closed at the connection limit (handlers.server): still in their first request
# head, or idle between two requests of a keep-alive connection.
SHED = ("head", "idle")

# `_created` series double the exposition and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Observed(Protocol):
    """What the metrics read of the hub (hub.core.Hub), at scrape time."""

    @property
    def registry(self) -> Registry: ...
    @property
    def flusher(self) -> Flusher: ...
    @property
    def history(self) -> History: ...
    @property
    def types(self) -> TypeTable: ...
    @property
    def broker(self) -> Broker: ...
    @property
    def publishers(self) -> PublishLimiter: ...
    @property
    def revocations(self) -> Revocations: ...
    @property
    def published(self) -> Mapping[str, int]: ...
    @property
    def replayed(self) -> int: ...


class Metrics:
    """The hub's collectors. The core reports what it decides (publishes, limits, caps,
    opens, ends, tickets). The refusals counted by HTTP status (hub_publish_rejected,
    hub_streams_refused, hub_ticket_requests_refused) are the HTTP layer's: it declares
    their statuses (`declare_refusals`, each exported at 0) and reports each answer once
    (`refused`), from the one hook that logs every request (handlers.base.access_logger)."""

    def __init__(self, hub: Observed) -> None:
        self.registry = CollectorRegistry()
        self.streams = Gauge("hub_streams_open", "Open SSE streams.", registry=self.registry)
        self.streams.set_function(lambda: len(hub.registry))
        self.rejected = Counter(
            "hub_publish_rejected",
            "Publish requests refused, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.streams_refused = Counter(
            "hub_streams_refused",
            "Stream requests refused, by HTTP status (README, Operations).",
            ["status"],
            registry=self.registry,
        )
        self.connects = Counter("hub_stream_connects", "Streams opened.", registry=self.registry)
        self.membership = Counter(
            "hub_membership_events",
            "Users joining or leaving a topic of --join-leave (hub.joins), by what became of "
            "the change (join, leave: published in such an event; dropped: over the bound of "
            "changes waiting; failed: lost with a publish that failed).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("join", "leave", "dropped", "failed"):
            self.membership.labels(kind)
        self.streams_capped = Counter(
            "hub_streams_capped",
            "Streams refused by a cap, by which (per_user: --max-streams-per-user; total: "
            "--max-streams). Also counted in hub_streams_refused.",
            ["limit"],
            registry=self.registry,
        )
        for limit in ("per_user", "total"):
            self.streams_capped.labels(limit)
        # The indexes, so that a leak shows (bench.churn checks them at 0 after its churn).
        users = Gauge("hub_stream_users", "Users with open streams.", registry=self.registry)
        users.set_function(lambda: len(hub.registry.by_user))
        topics = Gauge("hub_stream_topics", "Topics with open streams.", registry=self.registry)
        topics.set_function(lambda: len(hub.registry.by_topic))
        channels = Gauge(
            "hub_topic_channels", "Topic channels the flusher keeps.", registry=self.registry
        )
        channels.set_function(lambda: len(hub.flusher.topics))
        # Set by the server (handlers.app.serve): the core does not see HTTP connections.
        self.connections = Gauge(
            "hub_connections_open",
            "Open connections: HTTP requests in progress, idle keep-alive ones, and streams.",
            registry=self.registry,
        )
        self.accept_paused = Counter(
            "hub_accept_paused",
            "Times the hub stopped accepting connections for a while, by why (limit: "
            "--max-connections reached; descriptors: the process ran out of them).",
            ["why"],
            registry=self.registry,
        )
        for why in ("limit", "descriptors"):
            self.accept_paused.labels(why)
        self.shed = Counter(
            "hub_connections_shed",
            "Connections closed at --max-connections to let a new one in, the longest waiting "
            "first, by why (head: its request head not in after 1 s or more; idle: a keep-alive "
            "connection between requests). Streams and requests in progress are never closed.",
            ["why"],
            registry=self.registry,
        )
        for why in SHED:
            self.shed.labels(why)
        self.body_bytes = Gauge(
            "hub_publish_body_bytes",
            "Bytes held for publish bodies still arriving (at most --max-body-memory).",
            registry=self.registry,
        )
        self.disconnects = Counter(
            "hub_disconnects", "Streams ended, by reason.", ["reason"], registry=self.registry
        )
        self._limit_metrics(hub)
        for end in ENDS:
            self.disconnects.labels(end.reason)
        self._ticket_metrics(hub)
        history = Gauge(
            "hub_history_events", "Events the history holds for resume.", registry=self.registry
        )
        history.set_function(lambda: len(hub.history))
        history_bytes = Gauge(
            "hub_history_bytes",
            "What the history holds, as --history-bytes counts it.",
            registry=self.registry,
        )
        history_bytes.set_function(lambda: hub.history.size)
        revocations = Gauge(
            "hub_revocations",
            "Logouts remembered, refusing the tokens issued before them (at most "
            "--max-revocations).",
            registry=self.registry,
        )
        revocations.set_function(lambda: len(hub.revocations))
        self.registry.register(_RevocationsDropped(hub))
        Info("hub_broker", "The broker in use.", registry=self.registry).info(
            {"broker": type(hub.broker).__name__.removesuffix("Broker").lower()}
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_HotPath(hub))
        self.registry.register(_Sources(hub))
        self._refusals = {
            "publish": self.rejected,
            "stream": self.streams_refused,
            "ticket": self.ticket_requests_refused,
        }
        self._counted: dict[str, set[str]] = {}

    def _ticket_metrics(self, hub: Observed) -> None:
        """One-time stream tickets (hub.tickets): issued, redeemed, refused, pushed out."""
        self.tickets_issued = Counter(
            "hub_tickets_issued",
            "One-time stream tickets issued (POST /tickets).",
            registry=self.registry,
        )
        self.ticket_requests_refused = Counter(
            "hub_ticket_requests_refused",
            "POST /tickets refused, by HTTP status (README, Operations).",
            ["status"],
            registry=self.registry,
        )
        self.tickets_redeemed = Counter(
            "hub_tickets_redeemed",
            "Tickets taken from the store by a stream request (each at most once).",
            registry=self.registry,
        )
        self.tickets_rejected = Counter(
            "hub_tickets_rejected",
            "Stream requests whose ticket was refused, by why (malformed: not a ticket's "
            "shape; unknown: never issued, already used or expired; revoked: its session "
            "logged out since its token was issued).",
            ["reason"],
            registry=self.registry,
        )
        for reason in REJECTIONS:
            self.tickets_rejected.labels(reason)
        broker = hub.broker
        self.registry.register(_Evicted(lambda: getattr(broker, "tickets_evicted", 0)))
        self.registry.register(_Feed(broker))

    def _limit_metrics(self, hub: Observed) -> None:
        """Publishes refused by a publisher limit, and the rate buckets held."""
        self.limited = Counter(
            "hub_publish_limited",
            "Publish requests refused by a publisher limit, by which (rate: --publish-rate; "
            "batch: --max-batch or a batch over --publish-burst; event_bytes: "
            "--max-event-bytes). Also counted in hub_publish_rejected.",
            ["limit"],
            registry=self.registry,
        )
        for limit in PUBLISH_LIMITS:
            self.limited.labels(limit)
        buckets = Gauge(
            "hub_publish_buckets",
            "Publishers with a rate bucket held (--publish-rate; at most 10,000, idle full "
            "ones dropped).",
            registry=self.registry,
        )
        buckets.set_function(lambda: len(hub.publishers))

    def name_worker(self, worker: int, workers: int) -> None:
        """hub_worker_info{worker, workers}: which of --workers' processes these figures are
        ("0" of "1" for a single process): each worker is its own scrape target."""
        Info(
            "hub_worker",
            "The worker these figures are of (worker i of --workers serves its own /metrics).",
            registry=self.registry,
        ).info({"worker": str(worker), "workers": str(workers)})

    def watch_connections(self, count: Callable[[], int]) -> None:
        """hub_connections_open, as the server counts them (the core sees no connection)."""
        self.connections.set_function(count)

    def watch_bodies(self, held: Callable[[], int]) -> None:
        """hub_publish_body_bytes, as the server's body budget holds them."""
        self.body_bytes.set_function(held)

    def accept_paused_for(self, why: str) -> None:
        """The server stopped accepting connections for a while ("limit", "descriptors")."""
        self.accept_paused.labels(why).inc()

    def connection_shed_for(self, why: str) -> None:
        """The server closed a connection at the limit to let a new one in ("head", "idle")."""
        self.shed.labels(why).inc()

    def declare_refusals(self, route: str, statuses: Iterable[str]) -> None:
        """The statuses `route` ("publish", "stream", "ticket") refuses with: their series
        exist at 0 from the start, and only they are counted (a 404 or 405 is not a refusal
        of the route's work)."""
        counter = self._refusals[route]
        counted = self._counted.setdefault(route, set())
        for status in statuses:
            counter.labels(status)
            counted.add(status)

    def refused(self, route: str, status: int) -> None:
        """One refusal answered by `route` with `status` (counted if declared)."""
        label = str(status)
        if label in self._counted.get(route, ()):
            self._refusals[route].labels(label).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RevocationsDropped(Collector):
    def __init__(self, hub: Observed) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "hub_revocations_dropped",
            "Logouts forgotten before --revoke-ttl because --max-revocations were remembered "
            "(the oldest first): tokens issued before them work again until their exp.",
            value=self.hub.revocations.dropped,
        )


class _Evicted(Collector):
    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "hub_tickets_evicted",
            "Live tickets the memory broker pushed out to stay within its cap (65,536): a "
            "flood of POST /tickets. Always 0 with Redis, which expires them itself.",
            value=self.read(),
        )


# Why a node told its streams to reset (hub.redis_broker): its feed skipped entries Redis no
# longer kept; Redis lost the history; Redis went back behind what the node knew was stored;
# another node started a new epoch; an entry could not be read.
RESET_CAUSES = ("trimmed", "lost", "rollback", "epoch", "unreadable")


class _Feed(Collector):
    """What the broker's feed reports: 0 for the memory broker, which has no feed."""

    def __init__(self, broker: object) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        resets = getattr(self.broker, "resets", {})
        family = CounterMetricFamily(
            "hub_broker_resets",
            "Times this node told all its streams to reset because the shared order broke, "
            "by cause (trimmed: behind what Redis keeps; lost: Redis lost the history; "
            "rollback: Redis went back behind what this node knew was stored; epoch: another "
            "node started a new epoch; unreadable: an entry this node could not read).",
            labels=["cause"],
        )
        for cause in RESET_CAUSES:
            family.add_metric([cause], resets.get(cause, 0))
        yield family
        yield CounterMetricFamily(
            "hub_broker_feed_errors",
            "Entries of the shared stream this node could not read or deliver, and failures "
            "of its feed that it recovered from (each logged).",
            value=getattr(self.broker, "feed_errors", 0),
        )


class _Sources(Collector):
    """Each --source's numbers (hub.sources.SourceStats), labelled by its URL without a
    password; nothing without sources."""

    def __init__(self, hub: object) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        sources = getattr(self.hub, "sources", ())
        records = CounterMetricFamily(
            "hub_source_records",
            "Records taken from a source, by outcome (published: stored by this node; "
            "replayed: stored before, by this node or another, and let go of now; dead: "
            "refused and dead-lettered).",
            labels=["source", "outcome"],
        )
        up = GaugeMetricFamily(
            "hub_source_up", "1 while this node is connected to the source.", labels=["source"]
        )
        leading = GaugeMetricFamily(
            "hub_source_leading",
            "1 while this node reads the source (an outbox has one reader among the hubs; "
            "the others stand by).",
            labels=["source"],
        )
        lag = GaugeMetricFamily(
            "hub_source_lag",
            "Records waiting in the source (an outbox counts up to 100,000), as this node "
            "last saw them while reading it.",
            labels=["source"],
        )
        lag_seconds = GaugeMetricFamily(
            "hub_source_lag_seconds",
            "How long the oldest waiting record has waited (outbox), in seconds.",
            labels=["source"],
        )
        held = GaugeMetricFamily(
            "hub_source_held",
            "Records read and not let go of yet (at most one batch: the backpressure bound).",
            labels=["source"],
        )
        restarts = CounterMetricFamily(
            "hub_source_restarts",
            "Connections to the source lost and made again.",
            labels=["source"],
        )
        for source in sources:
            name, stats = [source.name], source.stats
            records.add_metric([*name, "published"], stats.published)
            records.add_metric([*name, "replayed"], stats.replayed)
            records.add_metric([*name, "dead"], stats.dead)
            up.add_metric(name, int(stats.up))
            leading.add_metric(name, int(stats.leading))
            lag.add_metric(name, stats.lag)
            lag_seconds.add_metric(name, stats.lag_seconds)
            held.add_metric(name, stats.held)
            restarts.add_metric(name, stats.restarts)
        yield from (records, up, leading, lag, lag_seconds, held, restarts)


class _HotPath(Collector):
    def __init__(self, hub: Observed) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        published = CounterMetricFamily(
            "hub_events_published", "Events published, by type name.", labels=["type"]
        )
        counts = self.hub.published
        for kind in self.hub.types:
            published.add_metric([kind.name], counts.get(kind.name, 0))
        yield published
        yield CounterMetricFamily(
            "hub_publish_replayed",
            "Publishes answered with the ids of an earlier one under the same Idempotency-Key "
            "(a client's retry): nothing was published again.",
            value=self.hub.replayed,
        )
        yield CounterMetricFamily(
            "hub_events_received",
            "Events this process took from the broker (from every node, its own included).",
            value=self.hub.history.end_seq,
        )
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
        tally = self.hub.flusher.latency
        cumulative = 0
        buckets = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), tally.counts, strict=True):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "hub_delivery_latency_seconds",
            "Seconds from a publish being accepted to the write that hands its frame to a "
            "stream's socket (with Redis: across nodes, by the wall clocks). One count per write, "
            "of the oldest event new in that flush pass: an upper bound for what it carries.",
            buckets=buckets,
            sum_value=tally.total,
        )
