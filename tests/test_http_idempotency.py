"""Idempotency-Key on POST /publish: a retried publish is answered with the first answer's
ids and not published again, per publisher, within --idempotency-window; on the Redis
broker, by any process."""

from __future__ import annotations

import json
import time
import uuid

import jwt
import pytest
import redis_support
from browser_support import free_port, wait_until
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_process import SECRET, get, healthy, post, start_hub  # noqa: F401  (a fixture)

from handlers.publish import idempotency_key_ok

redis_url = redis_support.redis_url


async def replayed(server) -> float:
    text = (await server.fetch("/metrics")).body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hub_publish_replayed_total":
                return sample.value
    raise AssertionError("hub_publish_replayed_total is missing")


@pytest.mark.gen_test(timeout=10)
async def test_a_repeated_key_gets_the_first_ids_and_publishes_nothing_again(hub_server):
    server = await hub_server()
    stream = await server.stream("u1")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = [{"type": 2, "user": "u1", "data": 1}, {"type": 2, "user": "u1", "data": 2}]
    first = await server.publish(body, headers=key)
    again = await server.publish(body, headers=key)
    assert first.code == again.code == 202
    assert json.loads(again.body) == json.loads(first.body)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    other = await server.publish({"type": 2, "user": "u1", "data": "next"})
    got = await stream.events(3)
    assert [e.json()["data"] for e in got] == [1, 2, "next"]  # no second copy before "next"
    assert len(server.hub.history) == 3
    assert await replayed(server) == 1
    assert json.loads(other.body)["ids"] != json.loads(first.body)["ids"]


@pytest.mark.gen_test(timeout=10)
async def test_a_key_reused_for_another_body_is_a_422_and_publishes_nothing(hub_server):
    server = await hub_server()
    key = {"Idempotency-Key": "order-42"}
    assert (await server.publish({"type": 5, "data": "a"}, headers=key)).code == 202
    conflict = await server.publish({"type": 5, "data": "b"}, headers=key)
    assert conflict.code == 422
    assert "different body" in json.loads(conflict.body)["error"]
    assert len(server.hub.history) == 1


@pytest.mark.gen_test(timeout=10)
async def test_keys_belong_to_their_publisher(hub_server):
    server = await hub_server()
    key = {"Idempotency-Key": "same-key"}
    a = await server.publish({"type": 5}, headers=key, token=server.token(sub="a", publish=True))
    b = await server.publish({"type": 5}, headers=key, token=server.token(sub="b", publish=True))
    assert json.loads(a.body)["ids"] != json.loads(b.body)["ids"]
    assert len(server.hub.history) == 2


@pytest.mark.gen_test(timeout=10)
async def test_a_key_is_forgotten_after_the_window(hub_server):
    server = await hub_server(idempotency_window=0.2)
    key = {"Idempotency-Key": "k"}
    first = json.loads((await server.publish({"type": 5}, headers=key)).body)["ids"]
    deadline = time.monotonic() + 5
    while True:  # a repeat publishes again once the window has passed
        again = json.loads((await server.publish({"type": 5}, headers=key)).body)["ids"]
        if again != first or time.monotonic() > deadline:
            break
    assert again != first


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("bad", ["", "x" * 256, "caf\u00e9", "tab\there"])
async def test_a_malformed_key_is_a_400_before_the_body_is_read(hub_server, bad):
    server = await hub_server()
    response = await server.publish({"type": 5}, headers={"Idempotency-Key": bad})
    assert response.code == 400
    assert "Idempotency-Key" in json.loads(response.body)["error"]
    assert len(server.hub.history) == 0


def test_on_redis_a_key_repeated_to_another_process_answers_the_same_ids(start_hub, redis_url):  # noqa: F811
    url, prefix = redis_url
    ports = [free_port(), free_port()]
    for port in ports:
        start_hub("--port", str(port), "--broker", url, "--redis-prefix", prefix)
    for port in ports:
        wait_until(
            lambda port=port: healthy(port) and get(f"http://127.0.0.1:{port}/readyz")[0] == 200,
            what="hub ready",
        )
    publisher = jwt.encode(
        {"sub": "svc", "exp": int(time.time()) + 60, "publish": True}, SECRET, algorithm="HS256"
    )
    headers = {
        "Authorization": f"Bearer {publisher}",
        "Content-Type": "application/json",
        "Idempotency-Key": uuid.uuid4().hex,
    }
    body = json.dumps([{"type": 5, "data": n} for n in range(3)]).encode()
    answers = [post(f"http://127.0.0.1:{port}/publish", body, **headers) for port in ports]
    assert answers[0] == answers[1] and answers[0][0] == 202
    conflict = post(f"http://127.0.0.1:{ports[1]}/publish", b'{"type": 5}', **headers)
    assert conflict[0] == 422
    client = redis_url.client()
    try:
        assert client.xlen(f"{prefix}:events") == 1  # one entry: the batch, stored once
    finally:
        client.close()


@given(st.text(max_size=300))
def test_an_idempotency_key_is_taken_exactly_when_it_is_1_to_255_printable_ascii(key):
    expected = 0 < len(key) <= 255 and all(" " <= c <= "~" for c in key)
    assert idempotency_key_ok(key) is expected
