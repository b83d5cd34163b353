"""/metrics as Prometheus reads it (prometheus-client's own parser): no `_created` series,
every fixed label value present at 0 from the start, process figures, the broker in use, and
stream connects and refusals counted."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.metrics import PUBLISH_REFUSALS, STREAM_REFUSALS
from hub.registry import Reason


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await server.fetch("/metrics")
    assert response.code == 200
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


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
    for reason in Reason:
        assert samples[("hub_disconnects_total", (("reason", reason.value),))] == 0
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
