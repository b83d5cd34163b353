"""The fault checker (bench.faults): its checker catches each violation on hand-made histories,
and the short schedule of faults keeps the promise against real processes (three hub nodes on
a private redis-server, `python -m bench.faults --short`, under a minute)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from redis_support import require_redis_server

from bench.faults_check import (
    NOT_PUBLISHED,
    STORED,
    UNKNOWN,
    UNSENT,
    Attempt,
    History,
    Phase,
    Publish,
    Received,
    SubscriberLog,
    Verdict,
    check,
    table,
)
from bench.faults_clients import classify

ROOT = Path(__file__).resolve().parent.parent


def publish(
    seq: int, start: float, end: float, outcome: str = STORED, *, size: int = 1, pub: str = "p"
) -> Publish:
    """One publish of `size` events by `pub`, with one attempt from `start` to `end`."""
    return Publish(pub, seq, size, keyed=False, attempts=[Attempt(start, end, outcome)])


def subscriber(
    received: list[tuple[str, float]], resets: tuple[float, ...] = (), first_open: float = 0.5
) -> SubscriberLog:
    return SubscriberLog(
        "s",
        first_open,
        100.0,
        [Received(tag, t) for tag, t in received],
        [Received("", t) for t in resets],
    )


def verdict(pubs: list[Publish], *subs: SubscriberLog) -> Verdict:
    return check(History(0.0, [Phase("run", 0.0)], pubs, list(subs)))


TWO = [publish(0, 1.0, 1.1), publish(1, 2.0, 2.1)]


def test_a_history_that_keeps_the_promise_passes() -> None:
    v = verdict(TWO, subscriber([("p/0/0", 1.05), ("p/1/0", 2.05)]))
    assert v.ok, v.violations
    assert (v.total.accepted, v.total.delivered, v.total.lost) == (2, 2, 0)
    assert "total" in table(v) and "FAIL" not in table(v)


def test_a_loss_is_caught() -> None:
    v = verdict(TWO, subscriber([("p/1/0", 2.05)]))
    assert not v.ok and v.total.lost == 1
    assert [(x.kind, x.tag) for x in v.violations] == [("lost", "p/0/0")]
    assert "FAIL" in table(v)


def test_an_event_published_before_the_first_opening_is_not_owed() -> None:
    v = verdict(TWO, subscriber([("p/1/0", 2.05)], first_open=1.5))
    assert v.ok and v.total.lost == 0


def test_a_double_is_caught() -> None:
    v = verdict(TWO, subscriber([("p/0/0", 1.05), ("p/0/0", 1.5), ("p/1/0", 2.05)]))
    assert not v.ok and v.total.doubled == 1
    assert [(x.kind, x.tag) for x in v.violations] == [("doubled", "p/0/0")]


def test_a_second_copy_stored_again_after_redis_lost_the_first_is_told_by_a_reset() -> None:
    """A keyed retry stored the event again (another id) after Redis lost it and its key; a
    reset between the copies told the client. The same id twice is never told."""
    pub = Publish(
        "k",
        0,
        1,
        keyed=True,
        attempts=[Attempt(1.0, 2.0, UNKNOWN), Attempt(3.0, 3.1, STORED)],
    )
    copies = [Received("k/0/0", 1.5, "1-0-a"), Received("k/0/0", 3.05, "9-0-b")]
    sub = SubscriberLog("s", 0.5, 100.0, copies, [Received("", 2.5)])
    told = verdict([pub], sub)
    assert told.ok, told.violations
    assert (told.total.doubled, told.total.covered) == (0, 1)
    same = [Received("k/0/0", 1.5, "1-0-a"), Received("k/0/0", 3.05, "1-0-a")]
    resent = verdict([pub], SubscriberLog("s", 0.5, 100.0, same, [Received("", 2.5)]))
    assert not resent.ok and resent.total.doubled == 1
    untold = verdict([pub], SubscriberLog("s", 0.5, 100.0, copies, []))
    assert not untold.ok and untold.total.doubled == 1


def test_a_reset_received_after_the_publish_began_covers_it() -> None:
    v = verdict(TWO, subscriber([("p/1/0", 3.05)], resets=(3.0,)))
    assert v.ok, v.violations
    assert (v.total.lost, v.total.covered, v.total.resets) == (0, 1, 1)


def test_a_reset_before_the_publish_covers_nothing() -> None:
    v = verdict(TWO, subscriber([("p/1/0", 2.05)], resets=(0.8,)))
    assert not v.ok and v.total.lost == 1


def test_a_reset_does_not_cover_an_event_the_stream_had_already_skipped() -> None:
    """p/1 (published after p/0's 202) came before the reset: the stream had passed p/0."""
    v = verdict(TWO, subscriber([("p/1/0", 2.05)], resets=(3.0,)))
    assert not v.ok and v.total.lost == 1 and v.total.covered == 0


def test_a_not_published_event_that_arrived_is_caught() -> None:
    pubs = [publish(0, 1.0, 6.0, NOT_PUBLISHED), publish(1, 6.5, 6.6)]
    v = verdict(pubs, subscriber([("p/0/0", 7.0), ("p/1/0", 6.55)]))
    assert not v.ok and v.total.np_delivered == 1 and v.total.not_published == 1
    assert [x.kind for x in v.violations] == ["np-delivered"]


def test_a_replay_after_not_published_answers_is_caught() -> None:
    """A keyed retry answered 202 replayed: an attempt answered "not published" stored it."""
    pub = Publish(
        "k",
        0,
        1,
        keyed=True,
        attempts=[
            Attempt(1.0, 6.0, NOT_PUBLISHED, status=503),
            Attempt(6.2, 6.3, UNSENT),
            Attempt(6.5, 6.6, STORED, status=202, replayed=True),
        ],
    )
    v = verdict([pub], subscriber([("k/0/0", 6.1)]))
    assert not v.ok and v.total.np_delivered == 1
    assert [x.kind for x in v.violations] == ["np-replayed"]


def test_a_replay_after_an_unknown_outcome_is_fine() -> None:
    pub = Publish(
        "k",
        0,
        1,
        keyed=True,
        attempts=[Attempt(1.0, 6.0, UNKNOWN), Attempt(6.5, 6.6, STORED, replayed=True)],
    )
    v = verdict([pub], subscriber([("k/0/0", 6.1)]))
    assert v.ok, v.violations
    assert v.total.accepted == 1 and v.total.unknown == 0


def test_an_unknown_outcome_may_arrive_once_or_not_at_all_but_not_twice() -> None:
    pubs = [publish(0, 1.0, 6.0, UNKNOWN), publish(1, 6.5, 6.6)]
    assert verdict(pubs, subscriber([("p/1/0", 6.55)])).ok
    assert verdict(pubs, subscriber([("p/0/0", 6.2), ("p/1/0", 6.55)])).ok
    twice = verdict(pubs, subscriber([("p/0/0", 6.2), ("p/0/0", 6.3), ("p/1/0", 6.55)]))
    assert not twice.ok and twice.total.doubled == 1 and twice.total.unknown == 1


def test_an_event_that_arrives_after_a_later_one_is_out_of_order() -> None:
    v = verdict(TWO, subscriber([("p/1/0", 2.05), ("p/0/0", 2.06)]))
    assert not v.ok and v.total.disordered == 1 and v.total.lost == 0


def test_order_starts_again_after_a_reset() -> None:
    """After a failover the stream goes on in another epoch: what came before the reset is
    not compared with what comes after."""
    v = verdict(TWO, subscriber([("p/1/0", 2.05), ("p/0/0", 2.5)], resets=(2.2,)))
    assert v.ok, v.violations


def test_the_events_of_one_batch_must_arrive_in_their_order() -> None:
    pubs = [publish(0, 1.0, 1.1, size=2)]
    v = verdict(pubs, subscriber([("p/0/1", 1.05), ("p/0/0", 1.06)]))
    assert not v.ok and v.total.disordered == 1


def test_an_event_nobody_published_is_caught() -> None:
    v = verdict(TWO, subscriber([("p/0/0", 1.05), ("x/9/0", 1.5), ("p/1/0", 2.05)]))
    assert not v.ok and [x.kind for x in v.violations] == ["stray"]


def test_a_run_that_accepted_or_delivered_nothing_proves_nothing() -> None:
    assert not verdict([], subscriber([])).ok
    assert not verdict(TWO, subscriber([], first_open=5.0)).ok  # nothing owed, none delivered


def test_rows_follow_the_phase_in_which_each_publish_began() -> None:
    history = History(
        0.0,
        [Phase("calm", 0.0), Phase("fault", 1.5)],
        TWO,
        [subscriber([("p/0/0", 1.05)], resets=(1.8,))],
    )
    v = check(history)
    calm, fault = v.rows
    assert (calm.accepted, calm.delivered, calm.lost) == (1, 1, 0)
    assert (fault.accepted, fault.lost, fault.resets) == (1, 1, 1)


def test_what_a_publish_answer_says() -> None:
    assert classify(202, {"ids": ["1-0"]}) == STORED
    assert classify(503, {"error": "x", "outcome": "not_published"}) == NOT_PUBLISHED
    assert classify(503, {"error": "not published: x", "outcome": "unknown"}) == UNKNOWN
    assert classify(503, {"error": "not published: Redis did not take it"}) == NOT_PUBLISHED
    assert classify(503, {"error": "the hub stopped before Redis answered"}) == UNKNOWN
    assert classify(500, {"error": "x"}) == UNKNOWN
    assert classify(503, None) == UNKNOWN


def run_bench(*args: str, timeout: float, module: str = "bench.faults") -> tuple[int, str]:
    """`python -m <module>` as a child; SIGTERM at the deadline (it ends every process it
    started, by PID, on the way out), SIGKILL only if it does not go."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"{module} did not finish in {timeout} s:\n{out}") from None
    return proc.returncode, out


def test_the_short_fault_schedule_keeps_the_promise() -> None:
    """Five faults (FLUSHALL, Redis kill -9 without persistence, Redis SIGSTOP, a hub node
    kill -9, a node cut off from Redis) with publishers and resuming subscribers: no event
    lost without a reset, none doubled or out of order, no "not published" event delivered."""
    require_redis_server()
    code, out = run_bench("--short", timeout=150)
    total = re.search(r"^total\s+([\d,]+)\s+[\d,]+\s+[\d,]+\s+([\d,]+)\s", out, re.MULTILINE)
    assert total, out
    accepted, delivered = (int(g.replace(",", "")) for g in total.groups())
    assert accepted > 0 and delivered > 0, out  # not vacuous
    assert code == 0, out
