"""One-time stream tickets over real sockets: POST /tickets trades a subscriber token for a
ticket, GET /events?ticket= opens one stream with it, bound to the token's user, session,
topics and expiry. Replays, expiry, logouts, garbage, CORS, metrics and logs. Where Redis
must count lookups, fail or hang, the hub runs on the Redis broker against a private
`redis-server` that the test stops or freezes (SIGSTOP)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import pytest
import redis_support
from redis_support import PrivateRedis
from sse import SSEClient, wait_for

from handlers.base import TICKET_REFUSALS
from hub.tickets import REJECTIONS, TICKET_LENGTH, ticket_key

private_redis = redis_support.private_redis


def error_of(client_or_response: Any) -> str:
    raw = getattr(client_or_response, "raw_body", None)
    if raw is None:
        raw = client_or_response.body
    body = json.loads(raw)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return str(body["error"])


async def post_ticket(server, token: str | None, headers: dict[str, str] | None = None):
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    return await server.fetch("/tickets", "POST", b"", hdrs)


async def ticket_of(server, token: str) -> str:
    response = await post_ticket(server, token)
    assert response.code == 201, (response.code, response.body)
    ticket = json.loads(response.body)["ticket"]
    assert isinstance(ticket, str)
    return ticket


async def with_ticket(
    server,
    ticket: str,
    topics: Iterable[str] = (),
    query: Iterable[tuple[str, str]] = (),
    headers: dict[str, str] | None = None,
) -> SSEClient:
    """GET /events?ticket=... with no token at all."""
    return await server.stream(
        topics=topics,
        token="unused",
        transport="none",
        query=[*query, ("ticket", ticket)],
        headers=headers,
    )


async def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await server.metrics()


async def hub_on_redis(hub_server, redis: PrivateRedis, **config: Any):
    """A hub on the Redis broker, on `redis` under a prefix of its own, once it has loaded the
    shared history: from then on its ticket routes depend on that Redis alone."""
    url, prefix = redis.target()
    server = await hub_server(broker=url, redis_prefix=prefix, **config)
    assert await wait_for(lambda: server.hub.broker.synced, 10), "the hub never synced"
    return server


def getdel_calls(redis: PrivateRedis) -> int:
    """GETDEL commands (ticket lookups) the server has run since its stats were last reset."""
    client = redis.client()
    try:
        stats: Any = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_getdel", {}).get("calls", 0))


def client_ports(redis: PrivateRedis, last_command: str | None = None) -> set[int]:
    """The client ports of the server's connections (those whose last command was
    `last_command`, if given), this query's own included."""
    client = redis.client()
    try:
        clients: Any = client.client_list()
    finally:
        client.close()
    return {
        int(c["addr"].rpartition(":")[2])
        for c in clients
        if last_command is None or c["cmd"] == last_command
    }


ESTABLISHED, TIME_WAIT = "01", "06"


def tcp_sockets() -> list[tuple[int, int, str, int]]:
    """This host's IPv4 TCP sockets, as the kernel lists them (Linux's /proc/net/tcp): local
    port, remote port, state, and the bytes received that the owner has not read yet."""
    with open("/proc/net/tcp") as table:
        rows = [line.split()[1:5] for line in table.readlines()[1:]]
    return [
        (int(local[-4:], 16), int(remote[-4:], 16), state, int(queues.split(":")[1], 16))
        for local, remote, state, queues in rows
    ]


def unread_by_redis(port: int, besides: set[int]) -> int:
    """Bytes clients have sent to the Redis on `port` that it has not read yet (a paused one
    reads none), on its connections but those from the client ports `besides`."""
    return sum(
        unread
        for local, remote, state, unread in tcp_sockets()
        if local == port and state == ESTABLISHED and remote not in besides
    )


# -- issuing --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_post_tickets_answers_201_a_fresh_ticket_its_life_and_no_store(hub_server):
    server = await hub_server()
    token = server.token("alice", sid="s1")
    response = await post_ticket(server, token)
    assert response.code == 201, response.body
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = json.loads(response.body)
    assert set(body) == {"ticket", "expires_in"}
    assert len(body["ticket"]) == TICKET_LENGTH
    assert body["expires_in"] == 30
    again = json.loads((await post_ticket(server, token)).body)["ticket"]
    assert again != body["ticket"]  # one per request


@pytest.mark.gen_test(timeout=10)
async def test_a_ticket_never_outlives_its_token(hub_server):
    server = await hub_server(ticket_ttl=30)
    token = server.sign(server.claims("alice", exp_in=5))
    body = json.loads((await post_ticket(server, token)).body)
    assert 3 < body["expires_in"] <= 5


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic dTpw"}],
    ids=["none", "garbage", "basic"],
)
@pytest.mark.gen_test(timeout=10)
async def test_post_tickets_without_a_valid_token_is_401_json(hub_server, headers):
    server = await hub_server()
    response = await post_ticket(server, None, headers)
    assert response.code == 401, response.body
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="hub"'
    error_of(response)
    expired = server.sign(server.claims("alice", exp_in=-10))
    response = await post_ticket(server, expired)
    assert response.code == 401 and "expired" in error_of(response)
    assert server.hub.metrics.tickets_issued._value.get() == 0


@pytest.mark.gen_test(timeout=10)
async def test_post_tickets_with_a_body_is_413_and_other_methods_405(hub_server):
    server = await hub_server()
    token = server.token("alice")
    response = await server.fetch(
        "/tickets", "POST", b"x" * 100, {"Authorization": f"Bearer {token}"}
    )
    assert response.code == 413, response.body
    response = await server.fetch("/tickets", headers={"Authorization": f"Bearer {token}"})
    assert response.code == 405, response.body
    error_of(response)


# -- redeeming ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_a_ticket_opens_one_stream_of_its_users_events_and_a_replay_is_401(hub_server):
    server = await hub_server()
    ticket = await ticket_of(server, server.token("alice", sid="s1"))
    stream = await with_ticket(server, ticket)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    bob = await server.stream("bob")

    await server.publish_ok(
        [
            {"type": "payment", "user": "bob", "data": {"n": 1}},
            {"type": "payment", "user": "alice", "data": {"n": 2}},
        ]
    )
    before = await server.before_marker(stream, "m1")
    assert [(e.event, e.json()["user"]) for e in before] == [("payment", "alice")]
    bobs = await server.before_marker(bob, "m2")
    assert [e.json()["user"] for e in bobs if e.event == "payment"] == ["bob"]
    assert [(s.user, s.sid) for s in server.hub.registry.all if s.user == "alice"] == [
        ("alice", "s1")
    ]

    replay = await with_ticket(server, ticket)
    assert replay.status == 401, replay.raw_body
    assert "used" in error_of(replay)
    assert not stream.closed


@pytest.mark.gen_test(timeout=10)
async def test_a_ticket_is_spent_by_the_request_that_presents_it_even_a_refused_one(hub_server):
    server = await hub_server()
    ticket = await ticket_of(server, server.token("alice", topics=["presence"]))
    forbidden = await with_ticket(server, ticket, topics=["payments"])
    assert forbidden.status == 403, forbidden.raw_body
    assert "payments" in error_of(forbidden)
    again = await with_ticket(server, ticket, topics=["presence"])
    assert again.status == 401


@pytest.mark.gen_test(timeout=10)
async def test_a_ticket_carries_the_tokens_topics(hub_server):
    server = await hub_server()
    ticket = await ticket_of(server, server.token("alice", topics=["presence", "payments"]))
    stream = await with_ticket(server, ticket, topics=["presence"])
    assert stream.status == 200
    (login_id,) = await server.publish_ok({"type": "login", "user": "carol"})
    event = await stream.next_event()
    assert (event.id, event.event) == (login_id, "login")

    none_allowed = await ticket_of(server, server.token("alice"))
    refused = await with_ticket(server, none_allowed, topics=["presence"])
    assert refused.status == 403


@pytest.mark.gen_test(timeout=15)
async def test_a_ticket_expires_after_ticket_ttl(hub_server):
    server = await hub_server(ticket_ttl=0.3)
    response = await post_ticket(server, server.token("alice"))
    issued = time.monotonic()
    body = json.loads(response.body)
    assert body["expires_in"] == 0.3
    assert await wait_for(lambda: time.monotonic() - issued > 0.4, 5)  # its life has passed
    late = await with_ticket(server, body["ticket"])
    assert late.status == 401, late.raw_body
    error_of(late)
    # one used in time works
    fresh = await ticket_of(server, server.token("alice"))
    assert (await with_ticket(server, fresh)).status == 200


@pytest.mark.gen_test(timeout=15)
async def test_a_ticket_stream_ends_at_its_tokens_exp(hub_server):
    server = await hub_server(heartbeat=0.2)
    claims = server.claims("alice", exp_in=2)
    stream = await with_ticket(server, await ticket_of(server, server.sign(claims)))
    assert stream.status == 200
    assert await stream.wait_closed(10), "the ticket's stream outlived its token"
    assert time.time() >= claims["exp"] - 1
    assert b"event: end" in bytes(stream.raw)


@pytest.mark.gen_test(timeout=15)
async def test_a_logout_refuses_the_tickets_of_its_session_and_ends_their_streams(hub_server):
    server = await hub_server()
    iat = time.time() - 10
    s1 = server.token("alice", sid="s1", iat=iat)
    s2 = server.token("alice", sid="s2", iat=iat)
    open_s1 = await with_ticket(server, await ticket_of(server, s1))
    open_s2 = await with_ticket(server, await ticket_of(server, s2))
    waiting_s1 = await ticket_of(server, s1)  # issued before the logout, redeemed after

    (logout_id,) = await server.publish_ok(
        {"type": "logout", "user": "alice", "data": {"session": "s1"}}
    )
    event = await open_s1.next_event()
    assert (event.id, event.event) == (logout_id, "logout")
    assert await open_s1.wait_closed(5), "the logged-out session's ticket stream stayed open"
    assert (await open_s2.next_event()).id == logout_id
    assert not open_s2.closed

    refused = await with_ticket(server, waiting_s1)
    assert refused.status == 401 and "logged out" in error_of(refused)
    issue = await post_ticket(server, s1)
    assert issue.code == 401 and "logged out" in error_of(issue)
    assert (await with_ticket(server, await ticket_of(server, s2))).status == 200
    samples = await scrape(server)
    assert samples[("hub_tickets_rejected_total", (("reason", "revoked"),))] == 1
    assert samples[("hub_ticket_requests_refused_total", (("status", "401"),))] == 1


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "abc", "!" * TICKET_LENGTH, "a" * (TICKET_LENGTH + 1), "a" * 60_000, "é" * 43],
    ids=["empty", "short", "bad-chars", "one-too-long", "60k", "non-ascii"],
)
@pytest.mark.gen_test(timeout=10)
async def test_a_malformed_ticket_is_401_without_a_lookup(hub_server, private_redis, value):
    """Redis counts the lookups (GETDEL) it runs: none for a malformed ticket, then one for
    a ticket of the right shape (so the count would have seen one)."""
    server = await hub_on_redis(hub_server, private_redis)
    client = private_redis.client()
    try:
        client.config_resetstat()
    finally:
        client.close()
    started = time.monotonic()
    refused = await with_ticket(server, value)
    assert refused.status == 401, refused.raw_body
    assert "ticket invalid" in error_of(refused)
    assert time.monotonic() - started < 2
    assert getdel_calls(private_redis) == 0, "a malformed ticket was looked up"
    samples = await scrape(server)
    assert samples[("hub_tickets_rejected_total", (("reason", "malformed"),))] == 1
    assert samples[("hub_tickets_rejected_total", (("reason", "unknown"),))] == 0
    assert samples[("hub_tickets_redeemed_total", ())] == 0

    unknown = await with_ticket(server, "A" * TICKET_LENGTH)
    assert unknown.status == 401, unknown.raw_body
    assert getdel_calls(private_redis) == 1


@pytest.mark.gen_test(timeout=10)
async def test_an_unknown_ticket_of_the_right_shape_is_401(hub_server):
    server = await hub_server()
    refused = await with_ticket(server, "A" * TICKET_LENGTH)
    assert refused.status == 401
    assert refused.headers["www-authenticate"] == 'Bearer realm="hub"'
    assert (await scrape(server))[("hub_tickets_rejected_total", (("reason", "unknown"),))] == 1


@pytest.mark.gen_test(timeout=10)
async def test_a_ticket_with_a_token_or_two_tickets_is_400_and_spends_nothing(hub_server):
    server = await hub_server()
    token = server.token("alice")
    ticket = await ticket_of(server, token)
    both = [
        await with_ticket(server, ticket, headers={"Authorization": f"Bearer {token}"}),
        await with_ticket(server, ticket, query=[("token", token)]),
        await with_ticket(server, ticket, query=[("ticket", ticket)]),
    ]
    for refused in both:
        assert refused.status == 400, refused.raw_body
        error_of(refused)
    # the hub_token cookie is ambient (a page cannot leave it out): the ticket wins
    stream = await with_ticket(
        server, ticket, headers={"Cookie": f"hub_token={server.token('mallory')}"}
    )
    assert stream.status == 200
    assert [s.user for s in server.hub.registry.all] == ["alice"]


@pytest.mark.gen_test(timeout=10)
async def test_a_broker_that_cannot_answer_is_a_503_for_both_routes(hub_server, private_redis):
    """The hub's Redis is stopped once the hub has synced and issued a ticket."""
    server = await hub_on_redis(hub_server, private_redis)
    token = server.token("alice")
    ticket = await ticket_of(server, token)
    private_redis.stop()  # returns once it refuses connections

    issue = await post_ticket(server, token)
    assert issue.code == 503, issue.body
    assert "Retry-After" in issue.headers
    error_of(issue)
    redeem = await with_ticket(server, ticket)
    assert redeem.status == 503, redeem.raw_body
    error_of(redeem)
    samples = await scrape(server)
    assert samples[("hub_ticket_requests_refused_total", (("status", "503"),))] == 1
    assert samples[("hub_streams_refused_total", (("status", "503"),))] == 1


# -- CORS, metrics, logs --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_a_listed_origin_gets_a_preflight_and_may_read_tickets_and_their_refusals(
    hub_server,
):
    server = await hub_server(cors_origins="https://app.example")
    origin = {"Origin": "https://app.example"}
    preflight = await server.fetch(
        "/tickets",
        "OPTIONS",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST"
    assert preflight.headers["Access-Control-Allow-Headers"].lower() == "authorization"
    issued = await post_ticket(server, server.token("alice"), origin)
    assert issued.code == 201
    assert issued.headers["Access-Control-Allow-Origin"] == "https://app.example"
    refused = await post_ticket(server, "garbage", origin)
    assert refused.code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == "https://app.example"
    stream = await with_ticket(server, json.loads(issued.body)["ticket"], headers=origin)
    assert stream.headers["access-control-allow-origin"] == "https://app.example"

    stranger = await server.fetch("/tickets", "OPTIONS", headers={"Origin": "https://evil.example"})
    assert stranger.code == 204
    assert not [h for h in stranger.headers if h.lower().startswith("access-control")]


@pytest.mark.gen_test(timeout=10)
async def test_ticket_metrics_start_at_zero_and_count_issues_redeems_and_refusals(hub_server):
    server = await hub_server()
    samples = await scrape(server)
    assert not [name for name, _ in samples if name.endswith("_created")]
    for name in ("issued", "redeemed", "evicted"):
        assert samples[(f"hub_tickets_{name}_total", ())] == 0
    for reason in REJECTIONS:
        assert samples[("hub_tickets_rejected_total", (("reason", reason),))] == 0
    for status in TICKET_REFUSALS:
        assert samples[("hub_ticket_requests_refused_total", (("status", status),))] == 0

    ticket = await ticket_of(server, server.token("alice"))
    await ticket_of(server, server.token("bob"))
    await post_ticket(server, None)
    await with_ticket(server, ticket)
    await with_ticket(server, ticket)
    samples = await scrape(server)
    assert samples[("hub_tickets_issued_total", ())] == 2
    assert samples[("hub_tickets_redeemed_total", ())] == 1
    assert samples[("hub_tickets_rejected_total", (("reason", "unknown"),))] == 1
    assert samples[("hub_ticket_requests_refused_total", (("status", "401"),))] == 1
    assert samples[("hub_stream_connects_total", ())] == 1
    assert samples[("hub_streams_refused_total", (("status", "401"),))] == 1


@pytest.mark.gen_test(timeout=20)
async def test_no_ticket_ever_appears_in_a_log_record(hub_server, private_redis, caplog):
    """Issues, a ticket stream, a replay, a malformed ticket, and a lookup refused (503)
    because the hub's Redis was stopped: no record holds a ticket or its hash."""
    caplog.set_level(logging.DEBUG)
    for name in ("tornado.access", "tornado.application", "tornado.general", "hub", "redis"):
        caplog.set_level(logging.DEBUG, logger=name)
    # demo mode logs successful requests at INFO
    server = await hub_on_redis(hub_server, private_redis, demo=True)
    token = server.sign(server.claims("alice"), secret=server.config.jwt_secret)
    tickets = [await ticket_of(server, token) for _ in range(3)]

    stream = await with_ticket(server, tickets[0])  # the access line of a ticket stream
    assert stream.status == 200
    assert (await with_ticket(server, tickets[0])).status == 401  # a replay
    assert (await with_ticket(server, tickets[1] + "x")).status == 401  # malformed

    private_redis.stop()
    # the broker has seen its Redis go (and logged it) before the lookup fails
    assert await wait_for(lambda: not server.hub.broker.ready, 10), "the broker missed it"
    assert (await with_ticket(server, tickets[2])).status == 503
    stream.close()
    assert await wait_for(lambda: not server.hub.registry.all, 5)

    records = caplog.records
    assert any("stream open" in r.getMessage() for r in records)
    refusals = [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING and r.name == "tornado.access"
    ]
    assert len([m for m in refusals if m.startswith("401 GET /events")]) == 2, refusals
    assert len([m for m in refusals if m.startswith("503 GET /events")]) == 1, refusals
    secrets = [*tickets, tickets[1] + "x", *(ticket_key(t) for t in tickets)]
    for record in records:
        text = " ".join(
            [record.getMessage(), repr(record.args), record.exc_text or "", repr(record.__dict__)]
        )
        for secret in secrets:
            assert secret not in text, f"ticket in log record {record.name}: {text}"


@pytest.mark.gen_test(timeout=15)
async def test_a_client_gone_while_its_ticket_is_looked_up_leaves_no_stream(
    hub_server, private_redis, caplog
):
    """The lookup hangs on the hub's Redis, frozen by SIGSTOP; the client leaves meanwhile;
    Redis resumes and hands the ticket over (spent); the hub opens no stream for the gone
    client, and does not fail on its closed socket."""
    server = await hub_on_redis(hub_server, private_redis)
    ticket = await ticket_of(server, server.token("alice"))
    # the connections but the one that stored the ticket (the feed's, these queries' own):
    # the lookup goes out on that one (or on a new one)
    others = client_ports(private_redis) - client_ports(private_redis, "set")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    private_redis.pause()
    try:
        writer.write(f"GET /events?ticket={ticket} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        asked = await wait_for(lambda: unread_by_redis(private_redis.port, others) > 0, 3)
        assert asked, "the hub sent no lookup to Redis"
        assert server.hub.metrics.tickets_redeemed._value.get() == 0
        port = writer.get_extra_info("sockname")[1]
        writer.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # the hub has seen the client go, and closed its end, before the lookup returns
        hub_closed = (port, server.port, TIME_WAIT)
        closed = await wait_for(lambda: hub_closed in [s[:3] for s in tcp_sockets()], 5)
        assert closed, "the hub kept its end of the gone client's connection open"
    finally:
        private_redis.resume()
    assert await wait_for(lambda: server.hub.metrics.tickets_redeemed._value.get() == 1, 5)
    assert not server.hub.registry.all
    assert (await server.get_json("/healthz"))["streams"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
