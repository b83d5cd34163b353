"""POST /publish over real sockets: the body formats, binary frames, and every refusal, each
with its JSON error body; a refused batch delivers nothing."""

from __future__ import annotations

import json
import struct
import time

import pytest

KNOWN = {1: "login", 2: "payment", 3: "logout", 4: "log", 5: "broadcast"}


def frame(type_: int, ts: int, payload: dict | bytes) -> bytes:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return struct.pack(">IQI", type_, ts, len(raw)) + raw


def error_body(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = json.loads(response.body)
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


def assert_lists_known_types(body: dict) -> None:
    known = body.get("known_types")
    assert isinstance(known, list) and known, body
    text = json.dumps(known)
    for number, name in KNOWN.items():
        assert f'"{name}"' in text, (name, known)
        assert str(number) in text, (number, known)


def assert_ids_increase(ids: list[str]) -> None:
    keys = [tuple(int(part) for part in i.split("-")) for i in ids]
    assert all(len(k) == 2 for k in keys), ids
    assert keys == sorted(set(keys)), ids


async def assert_nothing_delivered(server, client, label: str) -> None:
    """A marker published now is the first event the stream gets."""
    before = await server.before_marker(client, label)
    assert before == [], [(e.event, e.data) for e in before]


# -- the body formats ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_json_object_with_type_number_answers_202_with_its_id_and_is_delivered(hub_server):
    server = await hub_server()
    client = await server.stream("u42", sid="s1")
    started = int(time.time() * 1000)

    response = await server.publish({"type": 2, "user": "u42", "data": {"amount": 5}})

    assert response.code == 202, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    ids = json.loads(response.body)["ids"]
    assert len(ids) == 1
    assert_ids_increase(ids)
    event = await client.next_event()
    assert (event.id, event.event) == (ids[0], "payment")
    body = event.json()
    assert {k: body[k] for k in ("type", "name", "user", "data")} == {
        "type": 2,
        "name": "payment",
        "user": "u42",
        "data": {"amount": 5},
    }
    assert isinstance(body["ts"], int) and started - 1000 <= body["ts"] <= time.time() * 1000 + 1000


@pytest.mark.gen_test(timeout=10)
async def test_json_object_with_type_name_and_ts_keeps_the_given_ts(hub_server):
    server = await hub_server()
    client = await server.stream("u1")

    ids = await server.publish_ok(
        {"type": "login", "user": "u1", "ts": 1700000000123, "data": {"ip": "x"}}
    )

    event = await client.next_event()
    assert (event.id, event.event) == (ids[0], "login")
    assert event.json()["type"] == 1
    assert event.json()["ts"] == 1700000000123


@pytest.mark.gen_test(timeout=10)
async def test_json_array_batch_answers_ids_in_order_and_events_arrive_in_that_order(hub_server):
    server = await hub_server()
    client = await server.stream("u1", ["presence"], sid="s1")
    batch = [
        {"type": "login", "user": "u1"},
        {"type": 2, "user": "u1", "data": {"n": 1}},
        {"type": "login", "user": "u9", "data": None},
        {"type": "broadcast", "data": {"n": 3}},
        {"type": 2, "user": "u1", "data": {"n": 4}},
    ]

    ids = await server.publish_ok(batch)

    assert len(ids) == len(batch)
    assert_ids_increase(ids)
    events = await client.events(len(batch))
    assert [(e.id, e.event) for e in events] == list(
        zip(ids, ["login", "payment", "login", "broadcast", "payment"], strict=True)
    )
    assert [e.json()["user"] for e in events] == ["u1", "u1", "u9", None, "u1"]


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/x-ndjson; a=b"])
@pytest.mark.gen_test(timeout=10)
async def test_ndjson_body_publishes_one_event_per_line_in_order(hub_server, content_type):
    server = await hub_server()
    client = await server.stream("u1")
    lines = [{"type": 2, "user": "u1", "data": {"n": n}} for n in range(4)]
    body = "\n".join(json.dumps(line) for line in lines).encode() + b"\n"

    ids = await server.publish_ok(body, content_type)

    assert len(ids) == 4
    assert_ids_increase(ids)
    events = await client.events(4)
    assert [e.id for e in events] == ids
    assert [e.json()["data"]["n"] for e in events] == [0, 1, 2, 3]


@pytest.mark.gen_test(timeout=10)
async def test_binary_frames_in_one_body_are_published_in_order_with_hub_stamped_ts_for_zero(
    hub_server,
):
    server = await hub_server()
    client = await server.stream("u5", ["logs", "presence"], sid="s1")
    started = int(time.time() * 1000)
    body = b"".join(
        [
            frame(2, 0, {"user": "u5", "data": {"amount": 12, "text": "caf\u00e9"}}),
            frame(1, 1600000000000, {"user": "u5", "data": {"ip": "127.0.0.1"}}),
            frame(4, 0, {"data": {"level": "info", "line": "started"}}),
            frame(5, 0, {"data": {"notice": "all"}}),
            frame(2, 0, {"user": "someone-else", "data": {"amount": 1}}),
            frame(5, 0, b""),
        ]
    )

    ids = await server.publish_ok(body, "application/octet-stream")
    finished = int(time.time() * 1000)

    assert len(ids) == 6
    assert_ids_increase(ids)
    events = await client.events(5)
    got = [(e.id, e.event, e.json()["type"], e.json()["user"], e.json()["data"]) for e in events]
    assert got == [
        (ids[0], "payment", 2, "u5", {"amount": 12, "text": "caf\u00e9"}),
        (ids[1], "login", 1, "u5", {"ip": "127.0.0.1"}),
        (ids[2], "log", 4, None, {"level": "info", "line": "started"}),
        (ids[3], "broadcast", 5, None, {"notice": "all"}),
        (ids[5], "broadcast", 5, None, None),
    ]
    assert events[1].json()["ts"] == 1600000000000
    for event in (events[0], events[2], events[3], events[4]):
        assert started - 1000 <= event.json()["ts"] <= finished + 1000, event.data


# -- refusals, each with its JSON body ------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": 2, "user": "u1" "data": {}}',
        b'{"type": 2, "user": "u1", "data": {',
        b'[{"type": 2, "user": "u1"}, {"type": 2,, "user": "u1"}]',
        b"not json",
        b'{"type": 2, "user": "\xc3\xa9\xc3\xa9", "data": tru}',
    ],
    ids=["missing-comma", "unterminated", "bad-second-element", "not-json", "after-multibyte"],
)
@pytest.mark.gen_test(timeout=10)
async def test_malformed_json_is_refused_400_with_the_byte_offset_of_the_error(hub_server, body):
    server = await hub_server()
    client = await server.stream("u1")
    try:
        json.loads(body.decode())
    except json.JSONDecodeError as exc:
        expected = len(body.decode()[: exc.pos].encode())

    response = await server.publish(body)

    assert response.code == 400, response.body
    assert error_body(response)["offset"] == expected
    await assert_nothing_delivered(server, client, "after-malformed")


@pytest.mark.gen_test(timeout=10)
async def test_malformed_ndjson_line_is_refused_400_with_the_offset_in_the_whole_body(hub_server):
    server = await hub_server()
    client = await server.stream("u1")
    good = json.dumps({"type": 2, "user": "u1", "data": {}}).encode()
    bad = b'{"type": 2, "user": "u1", "data": {]}'
    body = good + b"\n" + good + b"\n" + bad + b"\n"
    expected = 2 * (len(good) + 1) + bad.index(b"]")

    response = await server.publish(body, "application/x-ndjson")

    assert response.code == 400, response.body
    assert error_body(response)["offset"] == expected
    await assert_nothing_delivered(server, client, "after-bad-ndjson")


@pytest.mark.parametrize("cut", ["payload", "header"])
@pytest.mark.gen_test(timeout=10)
async def test_truncated_binary_frame_is_refused_400_with_offset_and_nothing_is_delivered(
    hub_server, cut
):
    server = await hub_server()
    client = await server.stream("u1")
    good = frame(2, 0, {"user": "u1", "data": {"n": 1}}) * 2
    last = frame(2, 0, {"user": "u1", "data": {"n": 3}})
    truncated = last[:-5] if cut == "payload" else last[:10]
    body = good + truncated

    response = await server.publish(body, "application/octet-stream")

    assert response.code == 400, response.body
    offset = error_body(response)["offset"]
    # the frame that is cut starts at len(good); its bytes run out at len(body)
    assert offset in (len(good), len(body)), (offset, len(good), len(body))
    await assert_nothing_delivered(server, client, "after-truncated")


@pytest.mark.gen_test(timeout=10)
async def test_binary_frame_whose_payload_is_not_json_is_refused_400_with_offset(hub_server):
    server = await hub_server()
    client = await server.stream("u1")
    first = frame(2, 0, {"user": "u1", "data": {}})
    body = first + frame(2, 0, b'{"user": "u1", "data": ]')

    response = await server.publish(body, "application/octet-stream")

    assert response.code == 400, response.body
    offset = error_body(response)["offset"]
    assert len(first) <= offset < len(body), offset
    await assert_nothing_delivered(server, client, "after-bad-frame-payload")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.gen_test(timeout=10)
async def test_body_over_max_body_is_refused_413_json(hub_server, declared):
    server = await hub_server(max_body=1024)
    client = await server.stream("u1")
    body = json.dumps({"type": 2, "user": "u1", "data": {"pad": "x" * 2000}}).encode()
    headers = {
        "Authorization": f"Bearer {server.publisher_token()}",
        "Content-Type": "application/json",
    }

    if declared:
        response = await server.raw("POST", "/publish", headers, body)
    else:
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 500]), body[i : i + 500])
            for i in range(0, len(body), 500)
        )
        headers["Transfer-Encoding"] = "chunked"
        response = await server.raw("POST", "/publish", headers, chunked + b"0\r\n\r\n")

    assert response.status == 413, response.body
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    await assert_nothing_delivered(server, client, "after-413")


@pytest.mark.gen_test(timeout=10)
async def test_body_exactly_at_max_body_is_accepted(hub_server):
    server = await hub_server(max_body=1024)
    template = json.dumps({"type": 2, "user": "u1", "data": {"pad": ""}})
    body = json.dumps({"type": 2, "user": "u1", "data": {"pad": "x" * (1024 - len(template))}})
    assert len(body) == 1024

    response = await server.publish(body.encode())

    assert response.code == 202, response.body


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data"])
@pytest.mark.gen_test(timeout=10)
async def test_unsupported_content_type_is_refused_415_json(hub_server, content_type):
    server = await hub_server()

    response = await server.publish({"type": 2, "user": "u1", "data": {}}, content_type)

    assert response.code == 415, response.body
    error_body(response)


@pytest.mark.gen_test(timeout=10)
async def test_missing_content_type_is_refused_415_json(hub_server):
    server = await hub_server()
    headers = {"Authorization": f"Bearer {server.publisher_token()}"}

    response = await server.raw("POST", "/publish", headers, b'{"type": 2, "user": "u1"}')

    assert response.status == 415, response.body
    assert response.json()["error"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": 99, "user": "u1", "data": {}},
        {"type": "refund", "user": "u1", "data": {}},
        {"type": 0, "user": "u1"},
        {"type": True, "user": "u1"},
        {"user": "u1", "data": {}},
    ],
    ids=["unknown-number", "unknown-name", "zero", "boolean", "no-type"],
)
@pytest.mark.gen_test(timeout=10)
async def test_unknown_type_is_refused_422_listing_the_known_types(hub_server, event):
    server = await hub_server()
    client = await server.stream("u1")

    response = await server.publish(event)

    assert response.code == 422, response.body
    assert_lists_known_types(error_body(response))
    await assert_nothing_delivered(server, client, "after-unknown-type")


@pytest.mark.parametrize("type_", [1, 2, 3, "login", "payment", "logout"])
@pytest.mark.gen_test(timeout=10)
async def test_event_type_that_needs_a_user_without_one_is_refused_422_listing_known_types(
    hub_server, type_
):
    server = await hub_server()

    response = await server.publish({"type": type_, "data": {}})

    assert response.code == 422, response.body
    body = error_body(response)
    assert "user" in body["error"], body
    assert_lists_known_types(body)


@pytest.mark.parametrize("type_", [4, 5])
@pytest.mark.gen_test(timeout=10)
async def test_log_and_broadcast_need_no_user(hub_server, type_):
    server = await hub_server()
    ids = await server.publish_ok({"type": type_, "data": {"line": "x"}})
    assert len(ids) == 1


@pytest.mark.parametrize(
    "event",
    [
        {"type": 2, "user": "u1", "data": {}, "channel": "payments"},
        {"type": 2, "user": "u1", "dat": {}},
        {"type": 2, "user": "u1", "id": "1-1"},
    ],
    ids=["channel", "typo", "id"],
)
@pytest.mark.gen_test(timeout=10)
async def test_unknown_field_is_refused_422_naming_it(hub_server, event):
    server = await hub_server()

    response = await server.publish(event)

    assert response.code == 422, response.body
    body = error_body(response)
    extra = (set(event) - {"type", "user", "data", "ts", "topics", "topic"}).pop()
    assert extra in body["error"], body


@pytest.mark.gen_test(timeout=10)
async def test_unknown_field_in_a_binary_frame_payload_is_refused_422(hub_server):
    server = await hub_server()
    body = frame(2, 0, {"user": "u1", "data": {}, "extra": 1})

    response = await server.publish(body, "application/octet-stream")

    assert response.code == 422, response.body
    assert "extra" in error_body(response)["error"]


@pytest.mark.parametrize(
    "content_type,body",
    [
        (
            "application/json",
            json.dumps(
                [
                    {"type": 2, "user": "u1", "data": {"n": 1}},
                    {"type": 1, "user": "u1"},
                    {"type": 2, "data": {"n": 3}},
                ]
            ).encode(),
        ),
        (
            "application/json",
            json.dumps(
                [{"type": 2, "user": "u1", "data": {"n": 1}}, {"type": 77, "user": "u1"}]
            ).encode(),
        ),
        (
            "application/x-ndjson",
            b'{"type": 2, "user": "u1", "data": {"n": 1}}\n{"type": 2, "user": "u1", "x": 1}\n',
        ),
        (
            "application/octet-stream",
            frame(2, 0, {"user": "u1", "data": {"n": 1}}) + frame(9, 0, {"user": "u1"}),
        ),
    ],
    ids=["json-missing-user", "json-unknown-type", "ndjson-unknown-field", "frame-unknown-type"],
)
@pytest.mark.gen_test(timeout=10)
async def test_one_bad_event_in_a_batch_rejects_the_whole_batch_and_nothing_is_delivered(
    hub_server, content_type, body
):
    server = await hub_server()
    client = await server.stream("u1", ["payments", "presence"], sid="s1")
    watcher = await server.stream("u2", ["payments", "presence"])

    response = await server.publish(body, content_type)

    assert response.code == 422, response.body
    assert_lists_known_types(error_body(response))
    label = "after-bad-batch"
    await server.marker(label)
    for stream in (client, watcher):
        before = await stream.events_until(server.is_marker(label))
        assert before == [], [(e.event, e.data) for e in before]


@pytest.mark.gen_test(timeout=10)
async def test_empty_bodies_are_refused_with_json_errors(hub_server):
    server = await hub_server()
    for content_type in ("application/json", "application/x-ndjson", "application/octet-stream"):
        response = await server.publish(b"", content_type)
        assert response.code in (400, 422), (content_type, response.code, response.body)
        error_body(response)
    response = await server.publish([])
    assert response.code in (400, 422), response.body
    error_body(response)


# -- publisher tokens ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_publish_without_token_is_refused_401_json(hub_server):
    server = await hub_server()
    headers = {"Content-Type": "application/json"}

    response = await server.raw("POST", "/publish", headers, b'{"type": 5}')

    assert response.status == 401, response.body
    assert response.json()["error"]


@pytest.mark.parametrize("case", ["garbage", "expired", "wrong-key", "alg-none", "missing-sub"])
@pytest.mark.gen_test(timeout=10)
async def test_publish_with_invalid_publisher_token_is_refused_401_json(hub_server, case):
    server = await hub_server()
    claims = server.claims("svc", publish=True)
    token = {
        "garbage": "x.y.z",
        "expired": server.sign(server.claims("svc", exp_in=-3600, publish=True)),
        "wrong-key": server.sign(claims, secret="another-secret-".ljust(40, "y")),
        "alg-none": server.unsigned(claims),
        "missing-sub": server.sign(server.claims(None, publish=True)),
    }[case]
    client = await server.stream("u1")

    response = await server.publish({"type": 2, "user": "u1", "data": {}}, token=token)

    assert response.code == 401, response.body
    error_body(response)
    await assert_nothing_delivered(server, client, "after-401")


@pytest.mark.parametrize("publish_claim", [None, False, "true"])
@pytest.mark.gen_test(timeout=10)
async def test_publish_with_token_lacking_publish_true_is_refused_403_json(
    hub_server, publish_claim
):
    server = await hub_server()
    extra = {} if publish_claim is None else {"publish": publish_claim}
    token = server.token("u1", topics=["*"], **extra)
    client = await server.stream("u1")

    response = await server.publish({"type": 2, "user": "u1", "data": {}}, token=token)

    assert response.code == 403, response.body
    error_body(response)
    await assert_nothing_delivered(server, client, "after-403")


@pytest.mark.gen_test(timeout=10)
async def test_publish_token_in_query_string_is_not_a_way_around_bearer(hub_server):
    """The contract names Bearer for publishers; whatever else is accepted must still be a
    valid publisher token."""
    server = await hub_server()
    subscriber = server.token("u1")

    response = await server.fetch(
        f"/publish?token={subscriber}",
        "POST",
        b'{"type": 5}',
        {"Content-Type": "application/json"},
    )

    assert response.code in (401, 403), response.body
    error_body(response)


@pytest.mark.gen_test(timeout=10)
async def test_internal_port_config_serves_publish_without_token_only_on_the_internal_app(
    hub_server,
):
    import tornado.httpserver
    import tornado.testing

    from handlers.app import build_internal_app

    server = await hub_server(internal_port=0)
    client = await server.stream("u1")
    sock, port = tornado.testing.bind_unused_port()
    internal = tornado.httpserver.HTTPServer(build_internal_app(server.hub))
    internal.add_sockets([sock])
    try:
        public = await server.publish({"type": 2, "user": "u1", "data": {"n": 0}})
        assert public.code in (403, 404, 405), public.body
        error_body(public)

        response = await server.client.fetch(
            f"http://127.0.0.1:{port}/publish",
            method="POST",
            body=json.dumps({"type": 2, "user": "u1", "data": {"n": 1}}),
            headers={"Content-Type": "application/json"},
            raise_error=False,
        )
        assert response.code == 202, response.body
        (event_id,) = json.loads(response.body)["ids"]
        event = await client.next_event()
        assert (event.id, event.json()["data"]) == (event_id, {"n": 1})
    finally:
        internal.stop()
        await internal.close_all_connections()


@pytest.mark.gen_test(timeout=10)
async def test_publishing_while_the_hub_shuts_down_is_503_json_not_500(hub_server):
    server = await hub_server()
    await server.hub.stop()
    response = await server.publish({"type": 5})
    assert response.code == 503, response.body
    assert "shutting down" in json.loads(response.body)["error"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"[" * 2000 + b"]" * 2000),
        ("application/json", b'{"type": 5, "data": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
        ("application/x-ndjson", b'{"type": 5, "data": ' + b"[" * 2000 + b"]" * 2000 + b"}\n"),
        (
            "application/octet-stream",
            struct.pack(">IQI", 5, 0, 4009) + b'{"data":' + b"[" * 2000 + b"]" * 2000 + b"}",
        ),
    ],
    ids=["json", "json-data", "ndjson", "frame"],
)
@pytest.mark.gen_test(timeout=10)
async def test_bodies_nested_past_the_parsers_limit_are_400_in_every_format(
    hub_server, content_type, body
):
    server = await hub_server()
    response = await server.publish(body, content_type)
    assert response.code == 400, response.body
    assert "nested too deeply" in json.loads(response.body)["error"]


LONG_NUMBER = b"9" * 5000  # past Python's 4,300-digit int conversion limit


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"type": 5, "data": ' + LONG_NUMBER + b"}"),
        ("application/json", b'{"type": ' + LONG_NUMBER + b"}"),
        ("application/x-ndjson", b'{"type": 5, "data": [' + LONG_NUMBER + b"]}\n"),
        ("application/octet-stream", frame(5, 0, b'{"data": ' + LONG_NUMBER + b"}")),
    ],
    ids=["json", "json-type", "ndjson", "frame"],
)
@pytest.mark.gen_test(timeout=10)
async def test_a_number_of_thousands_of_digits_is_400_not_500(hub_server, content_type, body):
    server = await hub_server()
    response = await server.publish(body, content_type)
    assert response.code == 400, response.body
    answer = error_body(response)
    assert "digits" in answer["error"] and body[answer["offset"] : answer["offset"] + 1] == b"9"


@pytest.mark.parametrize("number", [b"-", b"01", b"1.", b"-.5"])
@pytest.mark.gen_test(timeout=10)
async def test_a_number_json_does_not_allow_is_400_not_read_as_another_value(hub_server, number):
    server = await hub_server()
    client = await server.stream("u1")
    body = b'{"type": 2, "user": "u1", "data": {"amount": ' + number + b"}}"
    response = await server.publish(body)
    assert response.code == 400, response.body
    answer = error_body(response)
    at = body.index(number + b"}")
    assert "malformed JSON" in answer["error"] and at <= answer["offset"] <= at + len(number)
    await assert_nothing_delivered(server, client, "bad number")


@pytest.mark.gen_test(timeout=10)
async def test_errors_that_name_client_input_stay_short_however_long_the_input(hub_server):
    server = await hub_server()
    fields = {f"f{i}-" + "x" * 5000: 1 for i in range(50)}
    response = await server.publish(json.dumps({"type": 5, **fields}).encode())
    assert response.code == 422 and len(error_body(response)["error"]) < 400
    response = await server.publish(b"{}", "x" * 20_000)
    assert response.code == 415 and len(error_body(response)["error"]) < 200
    response = await server.publish(json.dumps({"type": "t" * 50_000}).encode())
    assert response.code == 422 and len(error_body(response)["error"]) < 200


@pytest.mark.gen_test(timeout=10)
async def test_a_publish_whose_body_ends_after_shutdown_began_is_503_json(hub_server):
    """Its head passed the shutdown check; the broker refuses it when the body is complete."""
    from tornado.tcpclient import TCPClient

    server = await hub_server()
    body = json.dumps({"type": 5, "data": "late"}).encode()
    stream = await TCPClient().connect("127.0.0.1", server.port)
    head = (
        f"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.publisher_token()}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    await stream.write(head.encode())
    # Tornado says "continue" once the handler's prepare() has passed the request
    assert (await stream.read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    await server.hub.stop()
    await stream.write(body)
    head_in = (await stream.read_until(b"\r\n\r\n")).decode()
    length = int(head_in.lower().split("content-length: ")[1].split("\r\n")[0])
    answer = json.loads(await stream.read_bytes(length))
    stream.close()
    assert head_in.startswith("HTTP/1.1 503"), head_in
    assert "not published" in answer["error"] or "shutting down" in answer["error"]
