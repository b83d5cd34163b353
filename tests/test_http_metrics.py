"""/metrics as Prometheus reads it (prometheus-client's own parser): no `_created` series,
every fixed label value present at 0 from the start, process figures, the broker in use, and
stream connects and refusals counted."""

from __future__ import annotations

import itertools

import pytest

from handlers.base import PUBLISH_REFUSALS, STREAM_REFUSALS
from hub.disconnect import ENDS


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await server.metrics()


@pytest.mark.gen_test(timeout=10)
async def test_a_fresh_hub_exports_every_fixed_series_at_zero_and_no_created_series(hub_server):
    server = await hub_server()
    samples = await scrape(server)
    names = {name for name, _ in samples}
    assert not [n for n in names if n.endswith("_created")]
    for kind in server.hub.types:
        assert samples[("hub_events_published_total", (("type", kind.name),))] == 0
    for status in PUBLISH_REFUSALS:
        assert samples[("hub_publish_rejected_total", (("status", status),))] == 0
    for status in STREAM_REFUSALS:
        assert samples[("hub_streams_refused_total", (("status", status),))] == 0
    for end in ENDS:
        assert samples[("hub_disconnects_total", (("reason", end.reason),))] == 0
    assert samples[("hub_stream_connects_total", ())] == 0
    assert samples[("hub_broker_info", (("broker", "memory"),))] == 1
    assert samples[("hub_history_events", ())] == 0
    assert {"process_resident_memory_bytes", "process_open_fds", "python_info"} <= names


@pytest.mark.gen_test(timeout=10)
async def test_stream_connects_refusals_and_history_are_counted(hub_server):
    server = await hub_server()
    await server.stream("u1")
    refused = await server.stream("u1", token="not-a-token")
    assert refused.status == 401
    forbidden = await server.stream("u1", topics=["payments"], claim_topics=["presence"])
    assert forbidden.status == 403
    await server.publish_ok([{"type": 5}, {"type": 5}])
    samples = await scrape(server)
    assert samples[("hub_stream_connects_total", ())] == 1
    assert samples[("hub_streams_refused_total", (("status", "401"),))] == 1
    assert samples[("hub_streams_refused_total", (("status", "403"),))] == 1
    assert samples[("hub_history_events", ())] == 2
    assert samples[("hub_history_bytes", ())] == server.hub.history.size > 0
    assert samples[("hub_events_published_total", (("type", "broadcast"),))] == 2


@pytest.mark.gen_test(timeout=10)
async def test_publish_to_socket_latency_is_a_histogram_counting_the_writes(hub_server):
    server = await hub_server()
    streams = [await server.stream(f"u{i}") for i in range(3)]
    before = await scrape(server)
    assert before[("hub_delivery_latency_seconds_count", ())] == 0
    for n in range(4):
        await server.publish_ok({"type": 5, "data": n})
        for stream in streams:  # one event at a time: each publish its own pass and writes
            await stream.events(1)
    samples = await scrape(server)
    count = samples[("hub_delivery_latency_seconds_count", ())]
    assert count == server.hub.flusher.writes == 12  # 4 events x 3 streams, a write each
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "hub_delivery_latency_seconds_bucket"
    )
    assert buckets[-1] == (float("inf"), count)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))  # cumulative
    # a write is no earlier than the publish it carries and, on loopback, well within 10 s
    assert 0 < samples[("hub_delivery_latency_seconds_sum", ())] < 10 * count
    assert buckets[-2][1] == count
