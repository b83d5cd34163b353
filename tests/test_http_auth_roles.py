"""Who may do what, over real sockets.

- Roles: a token with `publish: true` is a publisher's and opens no stream and buys no ticket
  (403); a subscriber's token publishes nothing (403, as before).
- The hub_token cookie on a state-changing request (POST /tickets, POST /publish) counts only
  from a page of the hub's own origin or of --cors-origins: a browser attaches it to a POST
  that any site makes. Bearer tokens are unaffected.
- A refused token is answered with one of the hub's own messages, whatever the token: never
  Python's exception text ("maximum recursion depth exceeded while decoding ..."), never a 500.
"""

from __future__ import annotations

import base64
import json
import logging
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.auth import PUBLISHER_MAY_NOT_SUBSCRIBE, AuthError, Verifier, token_messages

MESSAGES = token_messages("HS256")


def error_of(response: Any) -> str:
    raw = getattr(response, "raw_body", None)
    body = json.loads(response.body if raw is None else raw)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return str(body["error"])


async def post_ticket(server, headers: dict[str, str]):
    return await server.fetch("/tickets", "POST", b"", headers)


# -- roles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["header", "query", "cookie"])
@pytest.mark.gen_test(timeout=10)
async def test_a_publisher_token_opens_no_stream(hub_server, transport):
    server = await hub_server()
    publisher = server.token("alice", topics=["*"], publish=True)  # even with a user's sub
    client = await server.stream(token=publisher, transport=transport)
    assert client.status == 403, client.raw_body
    assert error_of(client) == PUBLISHER_MAY_NOT_SUBSCRIBE
    assert not server.hub.registry.all
    samples = await server.metrics()
    assert samples[("hub_streams_refused_total", (("status", "403"),))] == 1


@pytest.mark.gen_test(timeout=10)
async def test_a_publisher_token_gets_no_ticket_and_a_subscriber_token_no_publish(hub_server):
    server = await hub_server()
    publisher = server.token("svc", publish=True)
    refused = await post_ticket(server, {"Authorization": f"Bearer {publisher}"})
    assert refused.code == 403
    assert error_of(refused) == PUBLISHER_MAY_NOT_SUBSCRIBE
    samples = await server.metrics()
    assert samples[("hub_ticket_requests_refused_total", (("status", "403"),))] == 1
    assert (await server.publish({"type": 5}, token=publisher)).code == 202

    subscriber = server.token("alice")
    assert (await server.publish({"type": 5}, token=subscriber)).code == 403
    assert (await post_ticket(server, {"Authorization": f"Bearer {subscriber}"})).code == 201
    assert (await server.stream(token=subscriber)).status == 200


# -- the hub_token cookie on state-changing requests ----------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_a_cookie_alone_buys_a_ticket_only_from_the_hubs_own_or_a_listed_origin(hub_server):
    server = await hub_server(cors_origins="https://app.example,*")
    cookie = {"Cookie": f"hub_token={server.token('alice')}"}
    refused = {
        "no Origin": {},
        "another site": {"Origin": "https://evil.example"},
        "null (a sandboxed page)": {"Origin": "null"},
        "another port": {"Origin": f"http://127.0.0.1:{server.port + 1}"},
        "a look-alike host": {"Origin": f"http://127.0.0.1.evil.example:{server.port}"},
    }
    for what, origin in refused.items():
        response = await post_ticket(server, {**cookie, **origin})
        assert response.code == 403, (what, response.code, response.body)
        assert "hub_token cookie" in error_of(response), what
    allowed = {
        "the hub's own": {"Origin": f"http://127.0.0.1:{server.port}"},
        "the hub's own behind TLS": {"Origin": f"https://127.0.0.1:{server.port}"},
        "listed": {"Origin": "https://app.example"},
    }
    for what, origin in allowed.items():
        response = await post_ticket(server, {**cookie, **origin})
        assert response.code == 201, (what, response.code, response.body)
    samples = await server.metrics()
    assert samples[("hub_ticket_requests_refused_total", (("status", "403"),))] == len(refused)
    assert samples[("hub_tickets_issued_total", ())] == len(allowed)


@pytest.mark.gen_test(timeout=10)
async def test_a_token_the_request_carries_itself_is_unaffected_by_origin(hub_server):
    server = await hub_server()
    token = server.token("alice")
    evil = {"Origin": "https://evil.example", "Cookie": f"hub_token={server.token('bob')}"}
    by_header = await post_ticket(server, {**evil, "Authorization": f"Bearer {token}"})
    assert by_header.code == 201, by_header.body
    by_query = await server.fetch(f"/tickets?token={token}", "POST", b"", evil)
    assert by_query.code == 201, by_query.body
    assert "Access-Control-Allow-Origin" not in by_header.headers  # CORS still says no
    # reading with the cookie changes nothing: a stream opens whatever the Origin
    stream = await server.stream("alice", transport="cookie", headers={"Origin": "https://x.y"})
    assert stream.status == 200


@pytest.mark.gen_test(timeout=10)
async def test_a_cookie_alone_publishes_only_from_the_hubs_own_origin(hub_server):
    server = await hub_server()
    cookie = {"Cookie": f"hub_token={server.publisher_token()}"}
    before = len(server.hub.history)
    for origin in ({}, {"Origin": "https://evil.example"}):
        response = await server.fetch(
            "/publish",
            "POST",
            b'{"type": 5, "data": "forged"}',
            {**cookie, **origin, "Content-Type": "application/json"},
        )
        assert response.code == 403, response.body
        assert "hub_token cookie" in error_of(response)
    assert len(server.hub.history) == before
    own = await server.fetch(
        "/publish",
        "POST",
        b'{"type": 5}',
        {**cookie, "Origin": f"http://127.0.0.1:{server.port}", "Content-Type": "application/json"},
    )
    assert own.code == 202, own.body


# -- refused tokens: the hub's own words ----------------------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def nested(depth: int) -> bytes:
    return b'{"alg":"HS256","x":' + b"[" * depth + b"]" * depth + b"}"


HOSTILE = {
    "deep header": b64url(nested(10_000)) + "." + b64url(b"{}") + ".c2ln",
    "header not utf-8": b64url(b"\xff\xfe") + "." + b64url(b"{}") + ".c2ln",
    "header a list": b64url(b"[]") + "." + b64url(b"{}") + ".c2ln",
    "kid a number": b64url(b'{"alg":"HS256","kid":1}') + "." + b64url(b"{}") + ".c2ln",
    "one segment": "abc",
    "bad padding": "a.b.c",
    "non-ascii": "\u00e9.\u00e9.\u00e9",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.gen_test(timeout=10)
async def test_a_hostile_token_is_a_401_in_the_hubs_own_words(hub_server, case):
    server = await hub_server()
    token = HOSTILE[case]
    headers = {"Authorization": f"Bearer {token}"} if token.isascii() else {}
    query = {} if token.isascii() else {"token": token}
    client = await server.stream(token="", transport="none", headers=headers, query=query)
    assert client.status == 401, client.raw_body
    message = error_of(client)
    assert message in MESSAGES, message
    assert "recursion" not in message and "codec" not in message


@pytest.fixture
def server(io_loop, hub_server):
    return io_loop.run_sync(lambda: hub_server())


header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=300,
)
json_pieces = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
segments = st.one_of(
    st.binary(max_size=40).map(b64url),
    json_pieces.map(lambda v: b64url(json.dumps(v).encode())),
    st.integers(1, 5000).map(lambda depth: b64url(nested(depth))),
    st.sampled_from([b64url(b'{"alg":"HS256"}'), b64url(b'{"alg":"none"}'), "", "=", "%"]),
)
structured = st.lists(segments, min_size=1, max_size=4).map(".".join)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(token=header_text | structured, where=st.sampled_from(["header", "query", "cookie"]))
def test_any_token_is_refused_with_a_known_message_never_a_500(
    io_loop, server, caplog, token, where
):
    token = token.strip()
    if where == "cookie" and not all(c in string.printable and c not in ';," \\' for c in token):
        where = "header"  # (a cookie value has a narrower alphabet)
    with caplog.at_level(logging.ERROR):
        client = io_loop.run_sync(
            lambda: server.stream(token=token, transport=where if token else "none"), timeout=10
        )
    if client.status == 200:  # (a token string hypothesis cannot sign: never)
        raise AssertionError(f"a stream for {token!r}")
    assert client.status == 401, (client.status, client.raw_body)
    assert error_of(client) in MESSAGES, error_of(client)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | structured)
def test_the_verifier_refuses_any_string_with_a_known_message(token):
    verifier = Verifier("HS256", "auth-roles-secret-0123456789-abcdefghij", None)
    try:
        verifier.verify(token)
    except AuthError as exc:
        assert exc.message in MESSAGES, exc.message
    else:
        raise AssertionError(f"verified {token!r}")
