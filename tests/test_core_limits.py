"""The publish rate's token buckets (hub.limits) on a clock the test moves, and the decoders'
batch and event-size limits (hub.decode); the HTTP answers are in test_http_publish_limits.py.
A property test (hypothesis) drives a bucket with any sequence of waits and publishes."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.decode import decode_frames, decode_json, decode_ndjson
from hub.limits import PublishLimiter, retry_after
from hub.message import TooLarge


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rate: float, burst: int, capacity: int = 100) -> tuple[PublishLimiter, Clock]:
    clock = Clock()
    return PublishLimiter(rate, burst, capacity=capacity, clock=clock), clock


# -- the bucket -----------------------------------------------------------------------------


def test_a_bucket_lets_a_burst_through_then_refills_at_the_rate():
    limits, clock = limiter(rate=10, burst=20)
    assert limits.delay("svc", 20) == 0
    wait = limits.delay("svc", 5)
    assert wait == pytest.approx(0.5) and limits.tokens("svc") == 0  # nothing taken
    clock.now += 0.5
    assert limits.delay("svc", 5) == 0
    clock.now += 100
    assert limits.tokens("svc") == 20  # never above the burst, however long it waits


def test_publishers_have_their_own_buckets_and_a_batch_over_the_burst_never_passes():
    limits, _ = limiter(rate=1, burst=3)
    assert limits.delay("a", 3) == 0 and limits.delay("a", 1) > 0
    assert limits.delay("b", 3) == 0
    assert limits.delay("c", 4) == math.inf and "c" not in limits.buckets


def test_no_rate_means_no_limit_and_nothing_held():
    limits, _ = limiter(rate=0, burst=1)
    assert not limits.enabled
    assert all(limits.delay(f"p{i}", 10**9) == 0 for i in range(100))
    assert len(limits) == 0


def test_asking_without_taking_holds_nothing_for_a_new_publisher():
    limits, _ = limiter(rate=1, burst=2)
    assert limits.delay("new", 1, take=False) == 0 and len(limits) == 0


def test_idle_full_buckets_are_dropped_as_new_publishers_come():
    limits, clock = limiter(rate=10, burst=10, capacity=1000)
    for i in range(500):
        limits.delay(f"p{i}", 5)
    assert len(limits) == 500
    clock.now += 1.0  # burst / rate: every bucket is full again, the same as none
    limits.delay("late", 1)
    assert len(limits) == 1 and limits.evicted == 0


def test_the_table_never_holds_more_than_its_capacity():
    limits, clock = limiter(rate=1, burst=100, capacity=50)
    for i in range(10_000):
        clock.now += 0.001
        limits.delay(f"p{i}", 100)
        assert len(limits) <= 50
    assert limits.evicted == 10_000 - 50
    # the most recent publishers kept their (empty) buckets
    assert limits.delay("p9999", 1) > 0


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one():
    assert [retry_after(w) for w in (0.001, 0.5, 1.0, 1.01, 2.9999, 3.0)] == [1, 1, 1, 2, 3, 3]


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.01, 1e6),
    burst=st.integers(1, 100_000),
    steps=st.lists(st.tuples(st.floats(0, 1000), st.integers(1, 100_000)), min_size=1, max_size=40),
)
def test_a_bucket_is_never_negative_nor_over_its_burst_and_retry_after_is_enough(
    rate, burst, steps
):
    limits, clock = limiter(rate, burst)
    for elapsed, n in steps:
        clock.now += elapsed
        before = limits.tokens("p")
        assert 0 <= before <= burst
        wait = limits.delay("p", n)
        after = limits.tokens("p")
        assert 0 <= after <= burst
        if n > burst:
            assert wait == math.inf and after == before
        elif wait == 0:
            assert after == pytest.approx(max(0.0, before - n), abs=1e-6 * burst)
        else:
            assert wait > 0 and after == before  # a refusal takes nothing
            assert retry_after(wait) >= max(1, wait - 1e-9)
            # coming back when told, it passes (and no earlier than it could have)
            clock.now += wait
            assert limits.delay("p", n) == 0


# -- the decoders' limits -------------------------------------------------------------------


def frame(type_: int, payload: dict) -> bytes:
    raw = json.dumps(payload).encode()
    return struct.pack(">IQI", type_, 0, len(raw)) + raw


BODIES = {
    "json": lambda objs: (decode_json, json.dumps(objs).encode()),
    "ndjson": lambda objs: (decode_ndjson, b"\n".join(json.dumps(o).encode() for o in objs)),
    "frames": lambda objs: (
        decode_frames,
        b"".join(frame(o["type"], {k: v for k, v in o.items() if k != "type"}) for o in objs),
    ),
}


@pytest.mark.parametrize("fmt", BODIES)
def test_a_batch_over_max_events_is_refused_naming_the_limit(fmt):
    decode, body = BODIES[fmt]([{"type": 5, "data": i} for i in range(4)])
    assert len(decode(body, max_events=4)) == 4
    with pytest.raises(TooLarge) as caught:
        decode(body, max_events=3)
    assert (caught.value.what, caught.value.limit, caught.value.index) == ("batch", 3, 3)


@pytest.mark.parametrize("fmt", BODIES)
def test_an_event_over_max_event_bytes_is_refused_with_its_index(fmt):
    objs = [{"type": 5, "data": "x"}, {"type": 5, "data": "x" * 300}, {"type": 5}]
    decode, body = BODIES[fmt](objs)
    sizes = [len(e.body) for e in decode(body)]
    assert len(decode(body, max_event_bytes=sizes[1])) == 3  # at the limit: in
    with pytest.raises(TooLarge) as caught:
        decode(body, max_event_bytes=sizes[1] - 1)
    assert (caught.value.what, caught.value.index) == ("event_bytes", 1)
    assert caught.value.limit == sizes[1] - 1 and str(sizes[1]) in caught.value.message


def test_ndjson_and_frames_stop_at_the_first_event_past_the_limit_before_reading_it():
    """The event past the limit is not even parsed: malformed, it still reads as too many."""
    body = b'{"type": 5}\n{"type": 5}\n{"type": 5, oops'
    with pytest.raises(TooLarge):
        decode_ndjson(body, max_events=2)
    frames = frame(5, {}) * 2 + struct.pack(">IQI", 5, 0, 10) + b"{oops"
    with pytest.raises(TooLarge):
        decode_frames(frames, max_events=2)
