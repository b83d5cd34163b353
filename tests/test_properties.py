"""Property-based tests (hypothesis) of every parser of client input: publish bodies in all
three formats, event ids, topics and filter values, token claims; and the encoder, read back
by a WHATWG parser. The HTTP-level property (never a 5xx, never a partial batch) is in
test_http_hostile.py."""

from __future__ import annotations

import contextlib
import json
import re
import struct
import time

import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse import SSEEvent, _EventParser

from hub.auth import AuthError, Verifier
from hub.decode import decode_frames, decode_json, decode_ndjson
from hub.dispatch import DEFAULT_TYPES
from hub.history import format_id, parse_id, parse_position
from hub.message import ParseError, Rejected
from hub.query import MAX_TOPIC_LENGTH, MAX_TOPICS, QueryError, parse_topics
from hub.refusal import RefusalKind

SECRET = "property-tests-secret-0123456789-abcdef"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
users = st.text(min_size=1, max_size=20)
events = st.one_of(
    st.builds(lambda d: {"type": 5, "data": d}, json_values),
    st.builds(lambda u, d: {"type": "payment", "user": u, "data": d}, users, json_values),
    st.builds(lambda d: {"type": 4, "data": d}, json_values),
    st.builds(lambda u: {"type": 1, "user": u}, users),
)


# -- bodies ---------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_are_decoded_or_refused_as_parse_error_or_rejected(body):
    for decode in (decode_json, decode_ndjson, decode_frames):
        with contextlib.suppress(ParseError, Rejected):
            decode(body)


@FAST
@given(st.lists(events, min_size=1, max_size=8), st.booleans())
def test_valid_events_decode_to_what_was_sent_in_every_format(batch, ascii_only):
    as_json = json.dumps(batch, ensure_ascii=ascii_only).encode()
    as_ndjson = b"\n".join(json.dumps(e, ensure_ascii=ascii_only).encode() for e in batch)
    frames = b""
    for e in batch:
        payload = json.dumps({k: v for k, v in e.items() if k != "type"}).encode()
        number = DEFAULT_TYPES.lookup(e["type"]).number
        frames += struct.pack(">IQI", number, 0, len(payload)) + payload
    for decoded in (decode_json(as_json), decode_ndjson(as_ndjson), decode_frames(frames)):
        assert [(ev.data, ev.user) for ev in decoded] == [
            (e.get("data"), e.get("user")) for e in batch
        ]
        assert [ev.type for ev in decoded] == [
            DEFAULT_TYPES.lookup(e["type"]).number for e in batch
        ]


@FAST
@given(events, st.text(alphabet="\x00\x01\x08\x0b\x0c\x0e\x1f", min_size=1, max_size=3))
def test_raw_control_characters_anywhere_in_a_string_are_refused(event, controls):
    body = json.dumps({**event, "data": "x"}).replace('"x"', '"x' + controls + '"').encode()
    try:
        decode_json(body)
    except ParseError as exc:
        assert exc.offset == body.index(controls[0].encode())
    else:
        raise AssertionError(f"accepted {body!r}")


@FAST
@given(st.lists(events, min_size=1, max_size=5), st.integers(0, 4))
def test_one_bad_event_rejects_the_whole_batch(batch, where):
    bad = [*batch]
    bad.insert(min(where, len(bad)), {"type": "no-such-type"})
    try:
        decode_json(json.dumps(bad).encode())
    except Rejected as exc:
        assert exc.index == min(where, len(batch))
    else:
        raise AssertionError("a batch with an unknown type was accepted")


# -- what a browser reads back -----------------------------------------------------------------


@FAST
@given(json_values, st.text(max_size=30))
def test_a_frame_reads_back_through_a_whatwg_parser_as_exactly_one_event(data, user):
    [event] = decode_json(json.dumps({"type": 5, "data": {"v": data, "u": user}}).encode())
    event.assign_id(1795746847277, 42)
    got: list[SSEEvent] = []
    parser = _EventParser(got.append, lambda comment: None)
    for i in range(0, len(event.frame), 7):  # arbitrary chunking
        parser.feed(event.frame[i : i + 7])
    assert len(got) == 1
    assert (got[0].id, got[0].event) == ("1795746847277-42", "broadcast")
    assert json.loads(got[0].data)["data"] == {"v": data, "u": user}


# -- ids, topics, filters ------------------------------------------------------------------


@FAST
@given(st.text(max_size=60))
def test_parse_id_takes_only_ascii_digit_pairs_and_an_epoch_and_never_raises(text):
    position = parse_position(text)
    assert parse_id(text) == (None if position is None else position[0])
    if position is not None:
        assert re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}(-[0-9a-z]{1,16})?", text.strip(" \t"))
        parts = text.strip(" \t").split("-")
        assert position == ((int(parts[0]), int(parts[1])), parts[2] if len(parts) == 3 else "")


@FAST
@given(
    st.integers(0, 10**20 - 1),
    st.integers(0, 10**20 - 1),
    st.text("0123456789abcdefghijklmnopqrstuvwxyz", max_size=16),
)
def test_every_position_the_hub_writes_parses_back(ms, seq, epoch):
    assert parse_position(format_id((ms, seq), epoch)) == ((ms, seq), epoch)


@FAST
@given(st.integers(0, 2**63), st.integers(0, 2**63))
def test_parse_id_reads_every_id_the_hub_writes(ms, seq):
    assert parse_id(f"{ms}-{seq}") == (ms, seq)


@FAST
@given(st.lists(st.text(max_size=40), max_size=80))
def test_topics_are_parsed_within_their_rules_or_refused(args):
    try:
        topics = parse_topics(args)
    except QueryError:
        return
    assert len(topics) <= MAX_TOPICS and len(set(topics)) == len(topics)
    for topic in topics:
        assert topic and topic == topic.strip() and topic.isprintable()
        assert len(topic) <= MAX_TOPIC_LENGTH and "," not in topic
    wanted = [t.strip() for arg in args for t in arg.split(",") if t.strip()]
    assert list(topics) == list(dict.fromkeys(wanted))


def test_a_query_with_thousands_of_topics_is_refused_before_any_per_topic_work():
    names = [f"t{i}" for i in range(16_000)]
    for args in ([",".join(names)], names, [",".join(["a"] * 16_000)]):
        try:
            parse_topics(args)
        except QueryError as exc:
            assert exc.message == f"too many topics: at most {MAX_TOPICS}"
        else:
            raise AssertionError("accepted 16,000 topic names")


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["level", "service", "other"]), st.lists(st.text(max_size=20), max_size=5)
    )
)
def test_filter_queries_build_a_filter_or_refuse_with_filter_error(query):
    try:
        filters = DEFAULT_TYPES.stream_filters(query)
    except QueryError:
        return
    assert set(filters) <= {4}


@FAST
@given(
    st.sampled_from(["debug", "warning", "critical"]),
    st.lists(st.sampled_from(["api", "db", "x"]), max_size=2),
    json_values | st.dictionaries(st.sampled_from(["level", "service"]), json_values),
)
def test_a_log_filter_takes_or_drops_any_published_data_and_never_raises(level, services, data):
    """A filter runs in the flusher, on whatever a publisher sent: raising there once stopped
    every stream."""
    accepts = DEFAULT_TYPES.stream_filters({"level": [level], "service": services})[4]
    [event] = decode_json(json.dumps({"type": "log", "data": data}).encode())
    assert accepts(event) in (True, False)


# -- tokens --------------------------------------------------------------------------------

claim_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.lists(st.text(max_size=5), max_size=3)
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "sub": claim_values,
            # (made at collection: a future far enough that no run outlives it)
            "exp": claim_values | st.integers(4_102_444_800, 4_102_450_800),
            "iat": claim_values,
            "sid": claim_values,
            "topics": claim_values,
            "publish": claim_values,
        },
    )
)
def test_any_signed_claims_verify_to_sane_claims_or_refuse_with_auth_error(claims):
    verifier = Verifier("HS256", SECRET, None)
    try:
        verified = verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    except AuthError as exc:
        assert exc.refusal.kind in (RefusalKind.TOKEN_INVALID, RefusalKind.TOKEN_EXPIRED)
        return
    assert type(verified.user) is str and verified.user
    assert verified.exp > time.time()
    assert verified.sid is None or type(verified.sid) is str
    assert all(type(t) is str for t in verified.topics)
    assert verified.publish is (claims.get("publish") is True)
