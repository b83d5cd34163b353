"""Tickets on Redis: the store's keys (the ticket's hash, never the ticket), its expiry and
single use, its failure as BrokerUnavailable; and two real `hub` processes on one Redis (a
prefix of the test's own): a ticket issued by one is redeemed by the other, once; a ticket
raced to both opens exactly one stream; neither process logs a ticket."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
import redis_support
from browser_support import SECRET, HubProcess, free_port, http_json, wait_until
from redis_support import RedisTarget

from hub.auth import Claims
from hub.broker import BrokerUnavailable
from hub.redis_broker import RedisBroker
from hub.tickets import encode_claims, ticket_key
from hub.topics import Grants

redis_url = redis_support.redis_url


@pytest.fixture
def two_hubs(tmp_path: Path, redis_url: RedisTarget) -> Iterator[tuple[HubProcess, HubProcess]]:
    args = ("--broker", redis_url.url, "--redis-prefix", redis_url.prefix, "--log-level", "debug")
    hubs: list[HubProcess] = []
    try:
        for name in "ab":
            hubs.append(HubProcess(tmp_path / f"hub-{name}.log", *args, demo=False))
        for hub in hubs:
            wait_until(lambda h=hub: http_json(h.url + "/readyz")[0] == 200, 20, "hub ready")
        yield hubs[0], hubs[1]
    finally:
        for hub in hubs:
            hub.stop()


def token(user: str, sid: str | None = None) -> str:
    now = time.time()
    claims = {"sub": user, "iat": now, "exp": int(now + 300)}
    if sid:
        claims["sid"] = sid
    return jwt.encode(claims, SECRET, algorithm="HS256")


def ticket_from(hub: HubProcess, user: str, sid: str | None = None) -> str:
    status, body = post_ticket(hub, token(user, sid))
    assert status == 201, body
    return str(body["ticket"])


def post_ticket(hub: HubProcess, bearer: str) -> tuple[int, dict]:
    """POST /tickets with no body (a body is a 413: the route takes none)."""
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    with sock:
        sock.sendall(
            (
                f"POST /tickets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )
        status, body = answer(sock)
    return status, json.loads(body)


def read_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """What the socket gives until `done(what came)`, the peer closes, or the deadline."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data) and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _complete(raw: bytes) -> bool:
    """A whole answer: a head, then its Content-Length of body, or a stream's opening."""
    head, found, body = raw.partition(b"\r\n\r\n")
    if not found:
        return False
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return len(body) >= int(match.group(1)) if match else b"\n\n" in body


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status of a request and its body (an error's JSON, or a stream's opening)."""
    raw = read_until(sock, _complete)
    assert raw.startswith(b"HTTP/1.1 ") and _complete(raw), raw
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def open_with_ticket(hub: HubProcess, ticket: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    sock.sendall(f"GET /events?ticket={ticket} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_a_ticket_issued_by_one_process_is_redeemed_by_another_once(two_hubs, redis_url):
    a, b = two_hubs
    ticket = ticket_from(a, "alice", sid="s1")
    plain = redis_url.client()
    try:
        [key] = plain.scan_iter(match=f"{redis_url.prefix}:ticket:*")
        assert key.decode().endswith(hashlib.sha256(ticket.encode()).hexdigest())

        stream = open_with_ticket(b, ticket)
        with stream:
            status, opening = answer(stream)
            assert status == 200, opening
            assert not list(plain.scan_iter(match=f"{redis_url.prefix}:ticket:*"))
            # published on A, delivered on B to the ticket's user only
            a.publish(
                [
                    {"type": "payment", "user": "bob", "data": {"n": 1}},
                    {"type": "payment", "user": "alice", "data": {"n": 2}},
                ]
            )
            got = read_until(stream, lambda got: b'"n":2' in got, 10)
            assert b'"user":"alice"' in got and b'"user":"bob"' not in got

            replay = open_with_ticket(a, ticket)
            with replay:
                status, refused = answer(replay)
            assert status == 401, refused
            assert b"used" in refused
    finally:
        plain.close()
    for hub in (a, b):
        assert ticket not in hub.log(), "a ticket in a hub's log"


def test_a_ticket_raced_to_two_processes_opens_exactly_one_stream(two_hubs):
    a, b = two_hubs
    for n in range(5):
        ticket = ticket_from(a if n % 2 else b, "alice")
        socks = [open_with_ticket(a, ticket), open_with_ticket(b, ticket)]
        try:
            statuses = sorted(answer(s)[0] for s in socks)
        finally:
            for s in socks:
                s.close()
        assert statuses == [200, 401], (n, statuses)


# -- the store, in this process ----------------------------------------------------------


def test_the_redis_store_keeps_the_tickets_hash_for_its_life_and_hands_it_out_once(
    redis_url: RedisTarget,
):
    async def scenario() -> None:
        broker = RedisBroker(redis_url.url, prefix=redis_url.prefix, history=100, revoke_ttl=60)
        plain = redis_url.client()
        try:
            ticket = secrets.token_urlsafe(32)
            key = ticket_key(ticket)
            claims = Claims("alice", time.time() + 60, time.time(), "s1", Grants.of([]), False)
            await broker.put_ticket(key, encode_claims(claims), 7.5)
            stored = [k.decode() for k in plain.scan_iter(match=f"{redis_url.prefix}:*")]
            assert stored == [f"{redis_url.prefix}:ticket:{key}"]
            assert ticket.encode() not in plain.get(stored[0])
            assert 7000 < plain.pttl(stored[0]) <= 7500
            got = await asyncio.gather(*(broker.take_ticket(key) for _ in range(5)))
            assert [g is not None for g in got].count(True) == 1
            assert not plain.exists(stored[0])
        finally:
            plain.close()
            await broker.close()

    asyncio.run(scenario())


def test_a_redis_store_that_cannot_be_reached_raises_broker_unavailable():
    async def scenario() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        broker = RedisBroker(url, prefix="nowhere", history=100, revoke_ttl=60)
        try:
            with pytest.raises(BrokerUnavailable):
                await broker.put_ticket("k", b"x", 30)
            with pytest.raises(BrokerUnavailable):
                await broker.take_ticket("k")
        finally:
            await broker.close()

    asyncio.run(scenario())
