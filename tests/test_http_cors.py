"""Pages on another origin: the stream and its refusals carry CORS headers for the origins the
operator listed, and for no other. Read with httpx and hub.client's parser (sse_httpx):
headers and events, not bytes."""

from __future__ import annotations

import pytest
from sse_httpx import open_stream


@pytest.mark.gen_test(timeout=10)
async def test_a_listed_origin_may_read_the_stream_and_its_refusals_with_credentials(hub_server):
    server = await hub_server(cors_origins="https://app.example, https://admin.example")
    origin = {"Origin": "https://admin.example"}
    stream = await open_stream(server, "u1", headers=origin)
    assert stream.status == 200
    assert stream.headers["access-control-allow-origin"] == "https://admin.example"
    assert stream.headers["access-control-allow-credentials"] == "true"
    [event_id] = await server.publish_ok({"type": "payment", "user": "u1"})
    assert (await stream.next_event()).id == event_id

    refused = await open_stream(server, "u1", token="not-a-token", headers=origin)
    assert refused.status == 401 and "error" in refused.body
    assert refused.headers["access-control-allow-origin"] == "https://admin.example"


@pytest.mark.gen_test(timeout=10)
async def test_an_unlisted_origin_gets_no_cors_headers(hub_server):
    server = await hub_server(cors_origins="https://app.example")
    stream = await open_stream(server, "u1", headers={"Origin": "https://evil.example"})
    assert stream.status == 200
    assert not any(name.startswith("access-control") for name in stream.headers)
    plain = await hub_server()
    stream = await open_stream(plain, "u1", headers={"Origin": "https://app.example"})
    assert not any(name.startswith("access-control") for name in stream.headers)


@pytest.mark.gen_test(timeout=10)
async def test_any_origin_is_allowed_without_credentials(hub_server):
    server = await hub_server(cors_origins="*")
    stream = await open_stream(server, "u1", headers={"Origin": "https://anywhere.example"})
    assert stream.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in stream.headers
