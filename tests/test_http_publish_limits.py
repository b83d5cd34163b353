"""Publisher limits against a real hub: the publish rate per publisher (429 with Retry-After),
events per batch and bytes per event (413), each a JSON error naming the limit and counted in
/metrics (prometheus-client's parser); a throttled publisher costs other publishers and the
streams nothing. The bucket's arithmetic is in test_core_limits.py."""

from __future__ import annotations

import asyncio
import json
import struct
import time

import pytest
import tornado.httpserver
import tornado.testing

from handlers.app import build_internal_app
from hub.message import Event
from hub.metrics import PUBLISH_LIMITS


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await server.metrics()


def limited(samples, limit: str) -> float:
    return samples[("hub_publish_limited_total", (("limit", limit),))]


def rejected(samples, status: int) -> float:
    return samples[("hub_publish_rejected_total", (("status", str(status)),))]


def error_of(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = json.loads(response.body)
    assert isinstance(body["error"], str) and body["error"]
    return body


def frame(type_: int, payload: dict) -> bytes:
    raw = json.dumps(payload).encode()
    return struct.pack(">IQI", type_, 0, len(raw)) + raw


def encode(objs: list[dict], content_type: str) -> bytes:
    if content_type == "application/json":
        return json.dumps(objs).encode()
    if content_type == "application/x-ndjson":
        return b"\n".join(json.dumps(o).encode() for o in objs)
    return b"".join(frame(o["type"], {k: v for k, v in o.items() if k != "type"}) for o in objs)


CONTENT_TYPES = ["application/json", "application/x-ndjson", "application/octet-stream"]


async def assert_nothing_delivered(server, client, label: str) -> None:
    before = await server.before_marker(client, label)
    assert before == [], [(e.event, e.data) for e in before]


# -- the defaults ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_the_defaults_never_throttle_one_busy_publisher_like_the_benchmarks(hub_server):
    """The benchmark publishes with one token, batches of up to 1,000, ~200,000 events/s: no
    default limit may refuse that (README, Operations: why the rate is off by default)."""
    server = await hub_server()
    assert not server.hub.publishers.enabled
    body = [{"type": 5, "data": {"text": "hello everyone"}}] * 1_000
    answers = await asyncio.gather(*(server.publish(body) for _ in range(30)))
    assert [a.code for a in answers] == [202] * 30
    samples = await scrape(server)
    assert all(limited(samples, limit) == 0 for limit in PUBLISH_LIMITS)
    assert samples[("hub_publish_buckets", ())] == 0  # nothing held without a rate


@pytest.mark.gen_test(timeout=10)
async def test_every_limit_series_is_present_at_zero_from_the_start(hub_server):
    server = await hub_server(publish_rate=5)
    samples = await scrape(server)
    for limit in PUBLISH_LIMITS:
        assert limited(samples, limit) == 0
    assert rejected(samples, 429) == 0 and rejected(samples, 413) == 0
    assert not [name for name, _ in samples if name.endswith("_created")]


# -- the rate -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_publisher_past_its_rate_gets_429_with_retry_after_and_may_publish_after_it(
    hub_server,
):
    server = await hub_server(publish_rate=2, publish_burst=4)
    reader = await server.stream("u1")
    ids = await server.publish_ok([{"type": 5, "data": i} for i in range(4)])  # the burst

    refused = await server.publish({"type": 5, "data": "one too many"})
    assert refused.code == 429
    body = error_of(refused)
    assert "2 events/s" in body["error"] and "4" in body["error"]
    assert body["rate"] == 2 and body["burst"] == 4
    retry = refused.headers["Retry-After"]
    assert retry.isdigit() and int(retry) == 1  # 0.5 s, in whole seconds, rounded up

    # Told when to come back, it comes back then and passes: waiting the Retry-After the hub
    # gave is what is tested here, so this sleep is the publisher's, not a synchronisation.
    await asyncio.sleep(int(retry))
    ids += await server.publish_ok({"type": 5, "data": "on time"})
    got = await reader.events(5, timeout=5)
    assert [e.id for e in got] == ids  # nothing of the refused publish, all of the rest

    samples = await scrape(server)
    assert limited(samples, "rate") == 1 and rejected(samples, 429) == 1
    assert samples[("hub_publish_buckets", ())] == 1


@pytest.mark.gen_test(timeout=20)
async def test_a_throttled_publisher_costs_other_publishers_and_the_streams_nothing(hub_server):
    server = await hub_server(publish_rate=0.01, publish_burst=10)  # no refill meanwhile
    readers = [await server.stream(f"u{i}") for i in range(3)]
    noisy = server.token(sub="noisy", publish=True)
    quiet = server.token(sub="quiet", publish=True)
    answers = [await server.publish([{"type": 5, "data": "noisy"}] * 5, token=noisy)]
    answers += await asyncio.gather(
        *(server.publish({"type": 5, "data": "noisy"}, token=noisy) for _ in range(20))
    )
    codes = [a.code for a in answers]
    assert codes.count(202) == 6 and codes.count(429) == 15, codes  # 5 + 5 of 10, then none
    # The quiet publisher's bucket is its own; every stream is open and receives it.
    response = await server.publish({"type": 5, "data": "quiet"}, token=quiet)
    assert response.code == 202, response.body
    for reader in readers:
        got = await reader.events(11, timeout=5)
        assert [e.json()["data"] for e in got] == ["noisy"] * 10 + ["quiet"]
        assert not reader.closed
    assert server.hub.metrics.disconnects.labels("slow")._value.get() == 0
    samples = await scrape(server)
    assert limited(samples, "rate") == 15
    assert samples[("hub_publish_buckets", ())] == 2


@pytest.mark.gen_test(timeout=20)
async def test_an_empty_bucket_is_refused_at_the_request_head_before_the_body_is_read(hub_server):
    server = await hub_server(publish_rate=0.5, publish_burst=1)
    await server.publish_ok({"type": 5})
    token = server.publisher_token()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: 500000\r\n\r\n[{"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # no more body sent
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 429 "), head
    assert b"Retry-After: 2" in head  # one event at 0.5/s


@pytest.mark.gen_test(timeout=20)
async def test_a_batch_over_the_burst_is_413_not_429_for_ever(hub_server):
    server = await hub_server(publish_rate=100, publish_burst=5)
    reader = await server.stream("u1")
    response = await server.publish([{"type": 5}] * 6)
    assert response.code == 413
    body = error_of(response)
    assert body["limit"] == 5 and "burst" in body["error"] and "never" in body["error"]
    await assert_nothing_delivered(server, reader, "after-413")
    samples = await scrape(server)
    assert limited(samples, "batch") == 1 and limited(samples, "rate") == 0
    assert rejected(samples, 413) == 1


@pytest.mark.gen_test(timeout=20)
async def test_the_internal_listeners_publishers_share_one_bucket(hub_server):
    server = await hub_server(publish_rate=0.2, publish_burst=2)
    sock, port = tornado.testing.bind_unused_port()
    internal = tornado.httpserver.HTTPServer(build_internal_app(server.hub))
    internal.add_sockets([sock])
    try:

        async def post(data: str):
            return await server.client.fetch(
                f"http://127.0.0.1:{port}/publish",
                method="POST",
                body=json.dumps({"type": 5, "data": data}).encode(),
                headers={"Content-Type": "application/json"},
                raise_error=False,
            )

        codes = [(await post(f"from service {i}")).code for i in range(3)]
        assert codes == [202, 202, 429]
        # the public port's publishers have buckets of their own
        await server.publish_ok({"type": 5})
    finally:
        internal.stop()
        await internal.close_all_connections()


# -- events per batch and bytes per event ---------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.gen_test(timeout=20)
async def test_a_batch_over_max_batch_is_413_naming_the_limit_and_delivers_nothing(
    hub_server, content_type
):
    server = await hub_server(max_batch=3)
    reader = await server.stream("u1")
    ok = await server.publish(encode([{"type": 5}] * 3, content_type), content_type)
    assert ok.code == 202
    response = await server.publish(encode([{"type": 5}] * 4, content_type), content_type)
    assert response.code == 413
    body = error_of(response)
    assert body["limit"] == 3 and body["index"] == 3
    assert "--max-batch" in body["error"] and "3" in body["error"]
    assert len(await reader.events(3)) == 3
    await assert_nothing_delivered(server, reader, "after-413")
    samples = await scrape(server)
    assert limited(samples, "batch") == 1 and rejected(samples, 413) == 1


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.gen_test(timeout=20)
async def test_an_event_over_max_event_bytes_is_413_with_its_index(hub_server, content_type):
    # The size is the event's encoded body, what a stream's data: line carries.
    at_limit = Event(5, "broadcast", None, "x" * 200, ts=int(time.time() * 1000))
    limit = len(at_limit.body)
    server = await hub_server(max_event_bytes=limit)
    reader = await server.stream("u1")
    fits = [{"type": 5, "data": "x" * 200}]
    assert (await server.publish(encode(fits, content_type), content_type)).code == 202
    over = [{"type": 5, "data": "small"}, {"type": 5, "data": "x" * 201}, {"type": 5}]
    response = await server.publish(encode(over, content_type), content_type)
    assert response.code == 413
    body = error_of(response)
    assert body["index"] == 1 and body["limit"] == limit
    assert "--max-event-bytes" in body["error"] and f"event 1 is {limit + 1} bytes" in body["error"]
    assert len(await reader.events(1)) == 1
    await assert_nothing_delivered(server, reader, "after-413")
    samples = await scrape(server)
    assert limited(samples, "event_bytes") == 1 and rejected(samples, 413) == 1


@pytest.mark.gen_test(timeout=10)
async def test_non_ascii_data_counts_as_its_escaped_bytes(hub_server):
    """A stream carries `\\uXXXX` escapes (6 bytes a character): that is what is counted."""
    probe = Event(5, "broadcast", None, "", ts=int(time.time() * 1000))
    server = await hub_server(max_event_bytes=len(probe.body) + 60)
    assert (await server.publish({"type": 5, "data": "é" * 10})).code == 202
    assert (await server.publish({"type": 5, "data": "é" * 11})).code == 413
