"""GET /events over real sockets: the response head, the token transports and their refusals,
heartbeats, injection through payloads, logout, disconnect cleanup, logs, /healthz, /metrics."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from sse import StreamEnded, wait_for

PAYMENT = 2


def error_body(client_or_response) -> dict:
    """The JSON error body of a refused request, checked for its shape."""
    raw = getattr(client_or_response, "raw_body", None)
    if raw is None:
        raw = client_or_response.body
    body = json.loads(raw)
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


# -- the response head and first bytes ----------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_stream_answers_200_event_stream_close_delimited_and_sends_retry_and_comment_first(
    hub_server,
):
    server = await hub_server(retry=2.5)
    client = await server.stream("u1", ready=False)

    assert client.status == 200
    assert client.version == "HTTP/1.1"
    assert client.headers["content-type"].split(";")[0].strip() == "text/event-stream"
    assert "no-cache" in client.headers["cache-control"].lower()
    assert client.headers["x-accel-buffering"].lower() == "no"
    assert "content-length" not in client.headers
    assert "transfer-encoding" not in client.headers
    assert client.headers["connection"].lower() == "close"
    assert await client.wait_until(lambda: client.retry is not None and client.comments, 5), bytes(
        client.raw
    )
    assert client.retry == 2500
    assert bytes(client.raw).startswith(b"retry: 2500\n"), bytes(client.raw)
    assert client.pending() == 0
    assert not client.closed


@pytest.mark.parametrize("transport", ["header", "query", "cookie"])
@pytest.mark.gen_test(timeout=10)
async def test_each_token_transport_opens_a_stream_that_receives_the_users_events(
    hub_server, transport
):
    server = await hub_server()
    client = await server.stream("u7", transport=transport)
    assert client.status == 200, client.raw_body

    (event_id,) = await server.publish_ok({"type": "payment", "user": "u7", "data": {"n": 1}})

    event = await client.next_event()
    assert (event.id, event.event) == (event_id, "payment")
    assert event.json()["user"] == "u7"


# -- refusals -----------------------------------------------------------------------------


def _bad_tokens(server):
    """(case, token or None) for every way a stream token is refused with 401."""
    claims = server.claims
    return {
        "missing": None,
        "garbage": "not-a-jwt",
        "expired": server.sign(claims("u1", exp_in=-3600)),
        "wrong-key": server.sign(claims("u1"), secret="another-secret-".ljust(40, "y")),
        "alg-none": server.unsigned(claims("u1")),
        "alg-none-publisher": server.unsigned(claims("svc", publish=True)),
        "missing-sub": server.sign(claims(None)),
        "missing-exp": server.sign(claims("u1", exp_in=None)),
        "hs512-not-configured": server.sign(claims("u1"), algorithm="HS512"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "garbage",
        "expired",
        "wrong-key",
        "alg-none",
        "alg-none-publisher",
        "missing-sub",
        "missing-exp",
        "hs512-not-configured",
    ],
)
@pytest.mark.parametrize("transport", ["header", "query", "cookie"])
@pytest.mark.gen_test(timeout=10)
async def test_stream_with_bad_token_is_refused_401_with_json_error(hub_server, case, transport):
    server = await hub_server()
    token = _bad_tokens(server)[case]

    client = await server.stream(
        "u1", token=token or "", transport="none" if token is None else transport
    )

    assert client.status == 401, (case, client.raw_body)
    assert client.headers["content-type"].startswith("application/json")
    error_body(client)
    assert not server.hub.registry.all


@pytest.mark.gen_test(timeout=10)
async def test_subscribing_to_a_topic_outside_the_tokens_topics_claim_is_refused_403_naming_it(
    hub_server,
):
    server = await hub_server()

    client = await server.stream("u1", ["payments", "logs"], claim_topics=["payments"])

    assert client.status == 403, client.raw_body
    assert client.headers["content-type"].startswith("application/json")
    body = error_body(client)
    assert "logs" in json.dumps(body), body
    assert "payments" not in body["error"], body
    assert not server.hub.registry.all


@pytest.mark.gen_test(timeout=10)
async def test_token_without_topics_claim_may_not_subscribe_to_any_topic(hub_server):
    server = await hub_server()

    client = await server.stream("u1", ["presence"], claim_topics=[])

    assert client.status == 403, client.raw_body
    assert "presence" in json.dumps(error_body(client))


@pytest.mark.gen_test(timeout=10)
async def test_wildcard_topics_claim_allows_any_topic_and_the_stream_gets_its_events(hub_server):
    server = await hub_server()

    client = await server.stream("u1", ["logs", "anything-else"], claim_topics=["*"])
    assert client.status == 200, client.raw_body
    (event_id,) = await server.publish_ok({"type": "log", "data": {"line": "hello"}})

    event = await client.next_event()
    assert (event.id, event.event) == (event_id, "log")


# -- token expiry -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_stream_ends_once_its_token_expires(hub_server):
    server = await hub_server(heartbeat=0.2)
    claims = server.claims("u1", sid="s1", exp_in=2)
    client = await server.stream("u1", token=server.sign(claims))
    keeper = await server.stream("u2")
    assert client.status == 200

    assert await client.wait_closed(10), "the stream outlived its token"
    assert time.time() >= claims["exp"] - 1  # it ended because of exp, not before
    assert not keeper.closed
    assert await wait_for(lambda: set(server.hub.registry.by_user) == {"u2"}, 5)


@pytest.mark.gen_test(timeout=15)
async def test_token_accepted_before_it_expires_is_refused_after_for_streams_and_publish(
    hub_server,
):
    server = await hub_server()
    exp = int(time.time() + 2)
    publisher = server.sign({"sub": "svc", "exp": exp, "publish": True})
    subscriber = server.sign({"sub": "u1", "exp": exp})
    assert (await server.publish({"type": 5}, token=publisher)).code == 202
    first = await server.stream("u1", token=subscriber)
    assert first.status == 200

    assert await wait_for(lambda: time.time() > exp + 1, 10)  # the clock passes exp

    response = await server.publish({"type": 5}, token=publisher)
    assert response.code == 401, response.body
    error_body(response)
    again = await server.stream("u1", token=subscriber)
    assert again.status == 401, again.raw_body
    error_body(again)


# -- heartbeat ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_quiet_stream_receives_ping_comments_and_stays_open(hub_server):
    server = await hub_server(heartbeat=0.2)
    client = await server.stream("u1")
    opening = len(client.comments)

    assert await client.wait_until(lambda: client.comments[opening:].count("ping") >= 2, 5), (
        client.comments,
        bytes(client.raw),
    )
    assert not client.closed
    assert client.pending() == 0  # pings are comments, never events
    await server.publish_ok({"type": "payment", "user": "u1", "data": {}})
    assert (await client.next_event()).event == "payment"


# -- injection through the payload --------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_payload_with_sse_control_sequences_arrives_as_one_event_with_the_same_data(
    hub_server,
):
    server = await hub_server()
    client = await server.stream("u1", sid="s1")
    attack = "\n\nid: 999\nevent: logout\ndata: x\n\n"
    data = {
        "text": attack,
        "cr": "a\rb\r\nc\r\rid: 998\r",
        "nul": "x\x00y",
        attack: ["\r\n\r\nevent: logout\r\n", "\x00\n"],
        "unicode": "\u2028\u2029\u0085 line separators",
    }

    (event_id,) = await server.publish_ok({"type": "payment", "user": "u1", "data": data})
    before = await server.before_marker(client, "after-attack")

    assert len(before) == 1, before
    event = before[0]
    assert (event.id, event.event) == (event_id, "payment")
    assert event.json()["data"] == data
    assert event.json()["user"] == "u1"
    assert not client.closed
    raw_lines = re.split(rb"\r\n|\r|\n", bytes(client.raw))
    assert b"id: 999" not in raw_lines and b"event: logout" not in raw_lines


@pytest.mark.gen_test(timeout=10)
async def test_user_name_with_line_breaks_cannot_inject_fields(hub_server):
    server = await hub_server()
    user = "u1\n\nid: 999\nevent: logout\ndata: x"
    client = await server.stream(user, sid="s1")
    assert client.status == 200, client.raw_body

    (event_id,) = await server.publish_ok({"type": "payment", "user": user, "data": {"n": 1}})
    before = await server.before_marker(client, "after-user-attack")

    assert [(e.id, e.event) for e in before] == [(event_id, "payment")]
    assert before[0].json()["user"] == user
    assert not client.closed


# -- logout -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_logout_with_session_ends_only_that_sessions_stream_after_delivering_the_logout(
    hub_server,
):
    server = await hub_server()
    s1 = await server.stream("u1", sid="s1")
    s2 = await server.stream("u1", sid="s2")
    watcher = await server.stream("u2", ["presence"])

    (logout_id,) = await server.publish_ok(
        {"type": "logout", "user": "u1", "data": {"session": "s1"}}
    )

    event = await s1.next_event()
    assert (event.id, event.event) == (logout_id, "logout")
    assert event.json()["data"] == {"session": "s1"}
    assert await s1.wait_closed(5), "the logged-out session's stream stayed open"
    end = await s1.next_event()  # then the end frame: stop, do not reconnect
    assert end.event == "end"
    assert end.json() == {
        "code": 4003,
        "reason": "logout",
        "reconnect": False,
        "detail": "this session logged out",
    }
    assert s1.pending() == 0
    event = await s2.next_event()
    assert (event.id, event.event) == (logout_id, "logout")
    event = await watcher.next_event()
    assert (event.id, event.event) == (logout_id, "logout")

    (payment_id,) = await server.publish_ok({"type": "payment", "user": "u1", "data": {"n": 2}})
    event = await s2.next_event()
    assert (event.id, event.event) == (payment_id, "payment")
    assert not s2.closed and not watcher.closed
    assert await wait_for(lambda: len(server.hub.registry.all) == 2, 5)


@pytest.mark.gen_test(timeout=10)
async def test_logout_without_session_ends_every_stream_of_that_user_and_no_other(hub_server):
    server = await hub_server()
    sessions = [await server.stream("u1", sid=f"s{i}") for i in range(3)]
    no_sid = await server.stream("u1")
    other = await server.stream("u2", sid="s1")

    (logout_id,) = await server.publish_ok({"type": "logout", "user": "u1"})

    for client in [*sessions, no_sid]:
        event = await client.next_event()
        assert (event.id, event.event) == (logout_id, "logout")
        assert await client.wait_closed(5), "a stream of the logged-out user stayed open"
    marker = await server.marker("after-logout")
    event = await other.next_event()
    assert (event.id, event.event) == (marker, "broadcast")
    assert not other.closed
    assert await wait_for(lambda: set(server.hub.registry.by_user) == {"u2"}, 5)


@pytest.mark.gen_test(timeout=10)
async def test_logout_of_a_session_does_not_end_the_same_sid_of_another_user(hub_server):
    server = await hub_server()
    mine = await server.stream("u1", sid="shared")
    theirs = await server.stream("u2", sid="shared")

    await server.publish_ok({"type": "logout", "user": "u1", "data": {"session": "shared"}})

    assert await mine.wait_closed(5)
    before = await server.before_marker(theirs, "still-open")
    assert before == []
    assert not theirs.closed


# -- disconnects --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_many_connects_and_disconnects_leave_no_stream_user_or_topic_behind(hub_server):
    server = await hub_server()
    registry = server.hub.registry
    batch = 20
    for round_ in range(10):
        clients = [
            await server.stream(
                f"user{(round_ * batch + i) % 7}",
                ["payments", f"t{i % 3}"][: 1 + i % 2] if i % 4 else [],
                sid=f"s{i}",
            )
            for i in range(batch)
        ]
        assert all(c.status == 200 for c in clients)
        assert await wait_for(lambda: len(registry.all) == batch, 5), len(registry.all)
        for client in clients:
            client.close()
        assert await wait_for(lambda: not registry.all, 5), len(registry.all)

    assert registry.by_user == {}
    assert registry.by_topic == {}
    assert (await server.get_json("/healthz"))["streams"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_disconnected_stream_is_gone_from_healthz_and_a_publish_to_it_still_succeeds(
    hub_server,
):
    server = await hub_server()
    leaving = await server.stream("u1", ["payments"], sid="s1")
    staying = await server.stream("u2", ["payments"])
    assert (await server.get_json("/healthz"))["streams"] == 2

    leaving.close()
    assert await wait_for(lambda: len(server.hub.registry.all) == 1, 5)
    (event_id,) = await server.publish_ok({"type": "payment", "user": "u1", "data": {}})

    event = await staying.next_event()
    assert event.id == event_id
    assert (await server.get_json("/healthz"))["streams"] == 1
    assert server.hub.registry.by_user.keys() == {"u2"}


# -- tokens never reach the logs ----------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_token_given_in_the_query_string_never_appears_in_any_log_record(hub_server, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("tornado.access", "tornado.application", "tornado.general", "hub"):
        caplog.set_level(logging.DEBUG, logger=name)
    server = await hub_server()
    good = server.token("u1", sid="s1")
    expired = server.sign(server.claims("u1", exp_in=-3600))
    wrong_key = server.token("u1", secret="another-secret-".ljust(40, "y"))

    client = await server.stream("u1", token=good, transport="query")
    assert client.status == 200
    await server.publish_ok({"type": "payment", "user": "u1", "data": {}})
    await client.next_event()
    for bad in (expired, wrong_key, "garbage-token-value-xyz"):
        refused = await server.stream("u1", token=bad, transport="query")
        assert refused.status == 401
    refused = await server.stream("u1", ["secret-topic"], token=good, transport="query")
    assert refused.status == 403
    client.close()
    assert await wait_for(lambda: not server.hub.registry.all, 5)

    assert caplog.records, "nothing was logged at all: the access log is expected"
    secrets = [good, expired, wrong_key, "garbage-token-value-xyz"]
    secrets += [t.rsplit(".", 1)[1] for t in (good, expired, wrong_key)]  # signatures alone
    for record in caplog.records:
        text = " ".join(
            [record.getMessage(), repr(record.args), record.exc_text or "", repr(record.__dict__)]
        )
        for secret in secrets:
            assert secret not in text, f"token in log record {record.name}: {record.getMessage()}"


# -- operations ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_healthz_reports_the_number_of_open_streams(hub_server):
    server = await hub_server()
    response = await server.fetch("/healthz")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(response.body)["streams"] == 0

    clients = [await server.stream(f"u{i}") for i in range(3)]
    assert (await server.get_json("/healthz"))["streams"] == 3

    for client in clients:
        client.close()

    async def none_open() -> bool:
        return (await server.get_json("/healthz"))["streams"] == 0

    assert await wait_for(none_open, 5)


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


@pytest.mark.gen_test(timeout=10)
async def test_metrics_expose_open_streams_and_count_published_and_delivered_events(hub_server):
    server = await hub_server()

    async def scrape() -> dict[str, float]:
        response = await server.fetch("/metrics")
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return _samples(response.body.decode())

    before = await scrape()
    assert before["hub_streams_open"] == 0
    assert any(name.startswith("hub_events_delivered") for name in before), sorted(before)
    clients = [await server.stream("u1", sid=f"s{i}") for i in range(2)]
    await server.publish_ok(
        [
            {"type": "payment", "user": "u1", "data": {}},
            {"type": "payment", "user": "u1", "data": {}},
            {"type": "login", "user": "u1"},
        ]
    )
    for client in clients:
        await client.events(3)

    after = await scrape()

    assert after["hub_streams_open"] == 2
    published = 'hub_events_published_total{type="payment"}'
    assert after[published] - before.get(published, 0) == 2, sorted(after)
    assert (
        after['hub_events_published_total{type="login"}']
        - before.get('hub_events_published_total{type="login"}', 0)
        == 1
    )
    delivered = "hub_events_delivered_total"
    assert after[delivered] - before[delivered] == 6


@pytest.mark.gen_test(timeout=10)
async def test_unknown_path_answers_404_json(hub_server):
    server = await hub_server()
    response = await server.fetch("/nope")
    assert response.code == 404
    error_body(response)


@pytest.mark.gen_test(timeout=10)
async def test_stream_ended_by_logout_raises_stream_ended_for_further_reads(hub_server):
    """The SSE client's own contract: a read after the server closed does not hang."""
    server = await hub_server()
    client = await server.stream("u1", sid="s1")
    await server.publish_ok({"type": "logout", "user": "u1", "data": {"session": "s1"}})
    assert (await client.next_event()).event == "logout"
    assert (await client.next_event()).event == "end"
    with pytest.raises(StreamEnded):
        await client.next_event(5)
