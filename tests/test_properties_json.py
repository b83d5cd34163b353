"""hub.decode.loads against the standard library's strict parser (hypothesis): on any
JSON-like text, both accept it with the same value or both refuse it. ujson, the fast path,
is lenient where JSON is not (numbers like `-`, `01`, `1.`; raw control characters; invalid
UTF-8); what it lets through must still be refused, and nothing else."""

from __future__ import annotations

import json
import math
import sys

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hub.decode import loads
from hub.message import ParseError

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Numbers, structure and strings, in pieces that combine into almost-JSON more often than not.
pieces = st.sampled_from(
    [
        "0", "1", "9", "-", "+", ".", "e", "E", "00", "01", "-0", "1.", "1.5", "-.5", ".5", "1e5",
        "[", "]", "{", "}", ",", ":", " ", '"', '"a"', '"k":', "\\", "\\n", "\n", "\t", "\r",
        "true", "null", "10:05", "a - b",
    ]
)  # fmt: skip
json_like = st.lists(pieces, max_size=24).map("".join)


def both_parse(text: str) -> tuple[bool, object, bool, object]:
    try:
        ours: object = loads(text.encode())
        ours_ok = True
    except ParseError as exc:
        ours, ours_ok = exc, False
    try:
        theirs: object = json.loads(text)
        theirs_ok = True
    except ValueError as exc:
        theirs, theirs_ok = exc, False
    return ours_ok, ours, theirs_ok, theirs


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@FAST
@given(json_like)
@example('{"a": -}')
@example("[01]")
@example('[1., "10:05"]')
@example('["a - b", -0.5, 0]')
def test_loads_accepts_exactly_what_the_strict_parser_accepts_with_the_same_value(text):
    ours_ok, ours, theirs_ok, theirs = both_parse(text)
    assert ours_ok == theirs_ok, (text, ours, theirs)
    if ours_ok:
        assert same(ours, theirs), (text, ours, theirs)


@FAST
@given(st.integers(-3, 3), st.sampled_from(["[%s]", '{"n": %s}', "[1, %s]"]))
def test_numbers_at_the_int_conversion_limit_are_read_or_refused_never_crash(delta, shape):
    digits = "7" * (sys.get_int_max_str_digits() + delta)
    text = shape % digits
    ours_ok, ours, theirs_ok, _ = both_parse(text)
    assert ours_ok == theirs_ok
    if not ours_ok:
        assert isinstance(ours, ParseError) and "digits" in ours.message
        assert text.encode()[ours.offset : ours.offset + 1] == b"7"
