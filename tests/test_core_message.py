"""The SSE encoder and the publish-body decoders, without any server."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from hub.decode import decode_frames, decode_json, decode_ndjson
from hub.dispatch import DEFAULT_TYPES, Route
from hub.message import Event, ParseError, Rejected, encode_frame


def parse_frame(frame: bytes) -> list[tuple[str, str]]:
    text = frame.decode()
    assert text.endswith("\n\n")
    return [tuple(line.split(": ", 1)) for line in text[:-2].split("\n")]  # type: ignore[misc]


def test_frame_with_newlines_in_data_becomes_several_data_lines_of_one_event():
    frame = encode_frame("1-1", "payment", "a\nb\r\nc\rd")
    assert parse_frame(frame) == [
        ("id", "1-1"),
        ("event", "payment"),
        ("data", "a"),
        ("data", "b"),
        ("data", "c"),
        ("data", "d"),
    ]
    assert frame.count(b"\n\n") == 1


def test_frame_id_and_event_fields_lose_cr_lf_and_nul():
    frame = encode_frame("1-1\n\nid: 9", "x\r\nevent: logout\x00", "{}")
    assert parse_frame(frame) == [("id", "1-1id: 9"), ("event", "xevent: logout"), ("data", "{}")]


def test_event_body_escapes_injection_so_the_frame_stays_one_event():
    event = Event(2, "payment", "u1", {"note": "\n\nid: 999\nevent: logout\ndata: x\n\n\r\x00"})
    event.assign_id(5, 1)
    assert event.frame.count(b"\n\n") == 1
    assert event.frame.startswith(b"id: 5-1\nevent: payment\ndata: {")


def test_json_object_and_array_decode_to_routed_events():
    [one] = decode_json(b'{"type": 2, "user": "u42", "data": {"amount": 3}}')
    assert (one.type, one.name, one.user, one.data) == (2, "payment", "u42", {"amount": 3})
    assert one.route == Route(users=("u42",), topics=("payments",))
    batch = decode_json(b'[{"type": "login", "user": "a"}, {"type": 5}]')
    assert [e.name for e in batch] == ["login", "broadcast"]
    assert batch[1].route == Route(everyone=True)


def test_logout_route_ends_the_named_session_or_all():
    [named] = decode_json(b'{"type": 3, "user": "u", "data": {"session": "s1"}}')
    [every] = decode_json(b'{"type": "logout", "user": "u"}')
    assert named.route is not None and named.route.ends == ("u", "s1")
    assert every.route is not None and every.route.ends == ("u", None)


def test_malformed_json_names_the_byte_offset():
    with pytest.raises(ParseError) as err:
        decode_json(b'{"type": 2, "user": }')
    assert err.value.offset == 20


def test_ndjson_error_offset_counts_from_the_start_of_the_body():
    body = b'{"type": 5}\n{"type": 5,}\n'
    with pytest.raises(ParseError) as err:
        decode_ndjson(body)
    assert err.value.index == 1
    assert body[err.value.offset - 1 : err.value.offset + 1] == b",}"


def test_nan_is_not_json():
    with pytest.raises(ParseError, match="NaN"):
        decode_json(b'{"type": 5, "data": NaN}')


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"type": 9}', "unknown event type 9"),
        (b'{"type": "refund"}', "unknown event type 'refund'"),
        (b'{"type": true}', "unknown event type True"),
        (b'{"type": 2, "data": {}}', "payment events need a user"),
        (b'{"type": 5, "usr": "x"}', "unknown field(s) usr"),
        (b'{"user": "x"}', "missing field type"),
        (b'{"type": 5, "ts": -1}', "ts must be"),
        (b'{"type": 1, "user": ""}', "user must be"),
        (b"[]", "empty batch"),
        (b"[1]", "must be a JSON object"),
    ],
)
def test_unacceptable_events_are_rejected_with_a_reason(body: bytes, message: str):
    with pytest.raises(Rejected) as err:
        decode_json(body)
    assert message in err.value.message


def test_a_bad_event_in_a_batch_names_its_index():
    with pytest.raises(Rejected) as err:
        decode_json(b'[{"type": 5}, {"type": 5}, {"type": 2}]')
    assert err.value.index == 2


def frame(type_: int, ts: int, payload: bytes) -> bytes:
    return struct.pack(">IQI", type_, ts, len(payload)) + payload


def test_binary_frames_decode_in_order_and_zero_ts_is_stamped():
    body = (
        frame(2, 1234, b'{"user": "u1", "data": 7}')
        + frame(5, 0, b"")
        + frame(1, 0, b'{"user":"x"}')
    )
    events = decode_frames(body)
    assert [(e.name, e.user) for e in events] == [
        ("payment", "u1"),
        ("broadcast", None),
        ("login", "x"),
    ]
    assert events[0].ts == 1234 and events[0].data == 7
    assert events[1].ts > 1_600_000_000_000


def test_truncated_frame_reports_where_it_starts():
    good = frame(5, 0, b"{}")
    with pytest.raises(ParseError) as err:
        decode_frames(good + frame(2, 0, b'{"user": "u"}')[:-3])
    assert err.value.offset == len(good)
    with pytest.raises(ParseError) as err:
        decode_frames(good + b"\x00\x00\x00")
    assert err.value.offset == len(good) and "header" in err.value.message


def test_frame_payload_may_not_carry_its_own_type():
    with pytest.raises(Rejected, match="unknown field"):
        decode_frames(frame(5, 0, b'{"type": 2}'))


def test_the_type_table_describes_every_type_with_its_filters():
    described = DEFAULT_TYPES.describe()
    assert [t["type"] for t in described] == sorted(DEFAULT_TYPES.kinds)
    assert {t["name"]: t["filters"] for t in described}["log"] == ["level", "service"]


DEEP = b"[" * 1100 + b"]" * 1100


@pytest.mark.parametrize(
    ("decode", "body"),
    [
        (decode_json, DEEP),
        (decode_json, b'{"type": 5, "data": ' + DEEP + b"}"),
        (decode_json, b'{"type": 5,\n"data": ' + DEEP + b"}"),
        (decode_ndjson, b'{"type": 5}\n{"type": 5, "data": ' + DEEP + b"}\n"),
        (decode_frames, frame(5, 0, b'{"data": ' + DEEP + b"}")),
    ],
    ids=["json", "json-data", "json-pretty", "ndjson", "frame"],
)
def test_json_nested_past_the_parsers_limit_is_a_parse_error_not_a_crash(decode, body):
    with pytest.raises(ParseError, match="nested too deeply"):
        decode(body)


@pytest.mark.parametrize(
    ("body", "offset"),
    [
        (b'{"type": 5, "data": "a\x01b"}', 22),
        (b'{"type": 5, "data": "a\x00"}', 22),
        (b'{"type": 5, "data": "a\nb"}', 22),  # raw LF inside a string (ujson takes it)
        (b'{"type": 5, "data": "a\tb"}', 22),
        (b'{"type": 5, "data": "\xed\xa0\x80"}', 21),  # CESU-8 surrogate: not UTF-8
        (b'{"type": 5, "data": "\xff"}', 21),
    ],
    ids=["soh", "nul", "raw-lf", "raw-tab", "cesu8-surrogate", "ff-byte"],
)
def test_raw_control_characters_and_invalid_utf8_are_refused_at_their_byte(body, offset):
    with pytest.raises(ParseError) as err:
        decode_json(body)
    assert err.value.offset == offset, err.value.message


def test_what_json_allows_still_decodes():
    pretty = b'{\r\n\t"type": 5,\n  "data": {"s": "tab\\there \\u2028 \\ud83d\\ude00 \x7f"}\n}'
    [event] = decode_json(pretty)
    assert event.data == {"s": "tab\there \u2028 \U0001f600 \x7f"}
    crlf = b'{"type": 5, "data": 1}\r\n{"type": 5, "data": 2}\r\n'
    assert [e.data for e in decode_ndjson(crlf)] == [1, 2]


@pytest.mark.parametrize("data", [[], "s1", 7, True])
def test_a_logout_whose_data_is_not_an_object_is_refused_not_taken_for_all_sessions(data):
    """It used to end every session of the user: a typo must not log everyone out."""
    with pytest.raises(Rejected, match="logout data must be an object"):
        decode_json(json.dumps({"type": "logout", "user": "u1", "data": data}).encode())


LONG_NUMBER = b"1" * 5000  # past Python's int digit limit (4,300): both parsers raise ValueError


@pytest.mark.parametrize(
    ("decode", "body", "offset"),
    [
        (decode_json, b'{"type": 5, "data": ' + LONG_NUMBER + b"}", 20),
        (decode_json, b'{"type": ' + LONG_NUMBER + b"}", 9),
        (decode_json, b'{"type": 5,\n"data": ' + LONG_NUMBER + b"}", 20),
        (decode_ndjson, b'{"type": 5}\n{"type": 5, "data": ' + LONG_NUMBER + b"}\n", 32),
        (decode_frames, frame(5, 0, b'{"data": ' + LONG_NUMBER + b"}"), 25),
    ],
    ids=["json", "json-type", "json-pretty", "ndjson", "frame"],
)
def test_a_number_too_long_to_convert_is_a_parse_error_at_its_byte_not_a_crash(
    decode, body, offset
):
    with pytest.raises(ParseError, match="digits") as err:
        decode(body)
    assert err.value.offset == offset, err.value.message


@pytest.mark.parametrize(
    "number",
    [b"-", b"01", b"-01", b"00", b"1.", b"1.e5", b"-.5", b"0."],
)
@pytest.mark.parametrize("where", ["object", "array", "spaced"])
def test_numbers_json_does_not_allow_are_refused_not_read_as_some_value(number, where):
    """ujson reads `-` as 0, `01` as 1 and `1.` as 1.0; browsers' JSON.parse and the RFC
    refuse them, and a publisher sending them has a bug worth hearing about."""
    data = {
        "object": b'{"n": ' + number + b"}",
        "array": b"[1, " + number + b"]",
        "spaced": b"[ " + number + b" ]",
    }[where]
    body = b'{"type": 5, "data": ' + data + b"}"
    with pytest.raises(ParseError, match="malformed JSON at byte") as err:
        decode_json(body)
    assert body.index(number) <= err.value.offset <= body.index(number) + len(number)


def test_numbers_and_strings_that_only_look_like_bad_numbers_still_decode():
    data = {
        "n": [0, -0, 10, -10, 0.5, -0.5, 1e5, 1.5e-5, -0.0],
        "s": ["10:05:01", "a - b", "v1.x", "2026. Then", "[01]", "x,-y", ":0.", "1,00,"],
    }
    [event] = decode_json(json.dumps({"type": 5, "data": data}).encode())
    assert event.data == data
    compact = json.dumps({"type": 5, "data": data}, separators=(",", ":")).encode()
    assert decode_json(compact)[0].data == data


def test_an_error_that_names_client_input_is_bounded():
    many = {f"field-{i}-" + "x" * 1000: 1 for i in range(1000)}
    with pytest.raises(Rejected, match="unknown field") as err:
        decode_json(json.dumps({"type": 5, **many}).encode())
    assert len(err.value.message) < 400


@pytest.mark.parametrize("ts", [2**53, 10**30])
def test_a_ts_past_what_a_browser_reads_exactly_is_refused(ts):
    with pytest.raises(Rejected, match="ts must be"):
        decode_json(json.dumps({"type": 5, "ts": ts}).encode())
    with pytest.raises(Rejected, match="ts must be"):
        decode_frames(frame(5, ts % 2**64 or 2**64 - 1, b""))
    [event] = decode_json(json.dumps({"type": 5, "ts": 2**53 - 1}).encode())
    assert event.ts == 2**53 - 1


def test_the_number_checks_cost_a_body_its_length_not_its_square():
    """A run of zeros inside a string once made the leading-zero scan look ahead from every
    zero: 40,000 zeros took 4.7 s, a 1 MiB body would take the better part of an hour. Run
    in a child process, so that the regression fails the test instead of hanging the suite
    (the limit is a hang detector, thousands of times what the check takes)."""
    script = (
        "from hub.decode import loads\n"
        "for body in (b'{\"d\": \"' + b'0' * 1_000_000 + b'\"}',\n"
        "             b'{\"d\": \": -' + b'0' * 1_000_000 + b'\"}'):\n"
        "    loads(body)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_finding_an_over_long_number_costs_the_body_its_length_not_its_square():
    """Runs of 4,000 digits before the one too long: the search for it once started from
    every digit (2.4 s for a 1 MiB body). A hang detector in a child process, as above."""
    script = (
        "from hub.decode import loads\n"
        "from hub.message import ParseError\n"
        "runs = b','.join([b'\"' + b'1' * 4000 + b'\"'] * 250)\n"
        "body = b'{\"type\": 5, \"data\": [' + runs + b', ' + b'2' * 4400 + b']}'\n"
        "for _ in range(5):\n"
        "    try:\n"
        "        loads(body)\n"
        "    except ParseError as exc:\n"
        "        assert body[exc.offset : exc.offset + 1] == b'2', exc.offset\n"
        "    else:\n"
        "        raise AssertionError('accepted')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=10)
