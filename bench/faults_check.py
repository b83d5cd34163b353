"""The fault checker's history and its verdict (``python -m bench.faults``).

The history is what the clients saw, nothing more: every publish attempt (when it started and
ended, what it was told), every event each subscriber received (its tag, when), every `reset`
it received, when it first opened. Event ids are never parsed (their format is the hub's own
business), only compared for equality: each event's data carries a unique tag,
``<publisher>/<seq>/<k>``, the k-th event of its publisher's seq-th request. A publisher has
one request in flight, so its sequence is an order the hub must keep.

What the hub promises, checked per subscriber over the whole history:

- every event answered 202 that the subscriber was entitled to arrived exactly once, or a
  `reset` covered it. Entitled: the publish started after the subscriber's first opening
  (so it was stored after it) and its 202 came before the subscriber stopped. A `reset`
  covers an event when the subscriber received it after that publish began and had received,
  before it, no event published after that event's 202 (a reset tells the client it may have
  missed what lies between its position and the reset: an event it had already passed is not
  covered);
- nothing answered "not published" ever arrived anywhere, and no 202 replayed under an
  Idempotency-Key whose every earlier attempt was answered "not published" (the replay proves
  one of them stored it);
- no event arrived twice, whatever its outcome (one whose outcome is unknown may arrive once
  or not at all), unless the second copy has another id (it was stored again: a retry under
  its Idempotency-Key after Redis lost the first copy and the key) and a `reset` came between
  the two. The same id twice is one entry sent twice (a position moved back): never told;
- order: an event arrives after every event whose publish began after its 202 (and after the
  earlier events of its own batch), unless a `reset` came between them.

Times are the checker's own monotonic clock, stamped by the clients: a publish's start before
its request is written, its end after the answer is read, a receipt when the event is parsed.
Receipts can only be stamped late, which makes "entitled" narrower and "covered" looser by the
client's own latency (milliseconds), never the other way.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

__all__ = [
    "NOT_PUBLISHED",
    "OUTCOMES",
    "STORED",
    "UNKNOWN",
    "UNSENT",
    "Attempt",
    "History",
    "Phase",
    "Publish",
    "Received",
    "Row",
    "SubscriberLog",
    "Verdict",
    "Violation",
    "add",
    "check",
    "load",
    "table",
    "tag",
]

STORED = "stored"  # 202
NOT_PUBLISHED = "not_published"  # 503 that says it was not published
UNKNOWN = "unknown"  # any other failure after the request was sent: it may be stored
UNSENT = "unsent"  # the connection was refused: the hub never saw the request
OUTCOMES = (STORED, NOT_PUBLISHED, UNKNOWN, UNSENT)


def tag(publisher: str, seq: int, k: int) -> str:
    return f"{publisher}/{seq}/{k}"


@dataclass(frozen=True)
class Attempt:
    """One request of a publish, and what it was told."""

    start: float
    end: float
    outcome: str
    node: int = -1
    status: int = 0  # the HTTP status; 0 when no answer came
    detail: str = ""  # the error, or the ids of a 202
    replayed: bool = False  # a 202 with Idempotent-Replayed: true


@dataclass
class Publish:
    """One publish request (a batch of `size` events) and its attempts: one without an
    Idempotency-Key; with one, every retry under that key."""

    publisher: str
    seq: int
    size: int
    keyed: bool
    attempts: list[Attempt] = field(default_factory=list)

    def tags(self) -> list[str]:
        return [tag(self.publisher, self.seq, k) for k in range(self.size)]

    @property
    def start(self) -> float:
        return self.attempts[0].start

    def stored_attempt(self) -> Attempt | None:
        return next((a for a in self.attempts if a.outcome == STORED), None)

    @property
    def outcome(self) -> str:
        """Stored if any attempt was; else unknown if any may have been; else not published."""
        outcomes = {a.outcome for a in self.attempts}
        if STORED in outcomes:
            return STORED
        if UNKNOWN in outcomes or not self.attempts:
            return UNKNOWN
        return NOT_PUBLISHED

    def replay_proves_not_published_wrong(self) -> bool:
        """A 202 replayed under the key while every attempt before it was 'not published' (or
        never sent): one of those was stored after all."""
        stored = self.stored_attempt()
        if stored is None or not stored.replayed:
            return False
        before = self.attempts[: self.attempts.index(stored)]
        return all(a.outcome in (NOT_PUBLISHED, UNSENT) for a in before)


@dataclass(frozen=True)
class Received:
    tag: str
    t: float
    id: str = ""
    node: int = -1


@dataclass
class SubscriberLog:
    """What one subscriber (one client, across all its connections) saw."""

    name: str
    first_open: float | None  # its first stream's opening, received
    stopped: float  # when it stopped listening for good
    received: list[Received] = field(default_factory=list)  # tagged events, in arrival order
    resets: list[Received] = field(default_factory=list)  # reset events (tag "")
    # (time, node, status or 0 for a failed connect, Last-Event-ID sent): for the report
    connects: list[tuple[float, int, int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Phase:
    """A stretch of the run, from `start` to the next phase's start: its events are those
    whose publish began in it; its resets those received in it."""

    name: str
    start: float
    note: str = ""


@dataclass
class History:
    t0: float
    phases: list[Phase]
    publishes: list[Publish]
    subscribers: list[SubscriberLog]


@dataclass
class Row:
    fault: str
    accepted: int = 0  # events answered 202
    not_published: int = 0  # events answered "not published" (or never sent)
    unknown: int = 0  # events whose outcome is unknown
    delivered: int = 0  # receipts, every subscriber
    lost: int = 0  # owed receipts that never came, with no reset to cover them
    # owed receipts that never came, and second copies stored again by a retry after Redis
    # lost the first: the client was told by a reset (see `_covered`, `_retold`)
    covered: int = 0
    doubled: int = 0  # receipts past the first of one event by one subscriber
    disordered: int = 0  # receipts that came after an event published after them
    resets: int = 0  # reset events received
    np_delivered: int = 0  # receipts of not-published events, and replays that prove one
    run: bool = True  # False: the system could not run here (the table says so)

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.doubled or self.disordered or self.np_delivered)


@dataclass(frozen=True)
class Violation:
    kind: str  # lost, doubled, disordered, np-delivered, np-replayed, stray
    subscriber: str
    tag: str
    detail: str


@dataclass
class Verdict:
    rows: list[Row]
    total: Row
    violations: list[Violation]
    notes: list[str]

    @property
    def ok(self) -> bool:
        """No violation, and not vacuous: something was accepted and delivered."""
        t = self.total
        return not t.failed and t.accepted > 0 and t.delivered > 0 and not self.notes


@dataclass
class _Event:
    publish: Publish
    k: int
    phase: int

    @property
    def start(self) -> float:
        return self.publish.start

    @property
    def end(self) -> float | None:
        stored = self.publish.stored_attempt()
        return stored.end if stored is not None else None


def load(data: dict[str, Any]) -> History:
    """A History from its JSON form (`dataclasses.asdict`, as bench.faults writes it)."""
    return History(
        data["t0"],
        [Phase(**p) for p in data["phases"]],
        [
            Publish(
                p["publisher"],
                p["seq"],
                p["size"],
                p["keyed"],
                [Attempt(**a) for a in p["attempts"]],
            )
            for p in data["publishes"]
        ],
        [
            SubscriberLog(
                s["name"],
                s["first_open"],
                s["stopped"],
                [Received(**r) for r in s["received"]],
                [Received(**r) for r in s["resets"]],
                [tuple(c) for c in s["connects"]],
            )
            for s in data["subscribers"]
        ],
    )


def _phase_of(starts: list[float], t: float) -> int:
    return max(0, bisect.bisect_right(starts, t) - 1)


def check(history: History) -> Verdict:
    phases = history.phases or [Phase("run", history.t0)]
    starts = [p.start for p in phases]
    rows = [Row(p.name) for p in phases]
    violations: list[Violation] = []
    notes: list[str] = []
    events: dict[str, _Event] = {}
    for pub in history.publishes:
        if not pub.attempts:
            continue
        phase = _phase_of(starts, pub.start)
        outcome = pub.outcome
        row = rows[phase]
        if outcome == STORED:
            row.accepted += pub.size
        elif outcome == UNKNOWN:
            row.unknown += pub.size
        else:
            row.not_published += pub.size
        if pub.replay_proves_not_published_wrong():
            row.np_delivered += 1
            violations.append(
                Violation(
                    "np-replayed",
                    "-",
                    tag(pub.publisher, pub.seq, 0),
                    "a 202 replayed under its Idempotency-Key after every earlier attempt was "
                    "answered not published: " + _attempts(pub, history.t0),
                )
            )
        for k, t in enumerate(pub.tags()):
            events[t] = _Event(pub, k, phase)

    for sub in history.subscribers:
        _check_subscriber(sub, events, rows, starts, violations, history.t0)
        if sub.first_open is None:
            notes.append(f"subscriber {sub.name} never opened a stream")
    return Verdict(rows, add(rows), violations, notes)


def add(rows: Iterable[Row]) -> Row:
    """The total of the counters of `rows`."""
    total = Row("total")
    for row in rows:
        for name in COUNTERS:
            setattr(total, name, getattr(total, name) + getattr(row, name))
    return total


def _check_subscriber(
    sub: SubscriberLog,
    events: dict[str, _Event],
    rows: list[Row],
    starts: list[float],
    violations: list[Violation],
    t0: float,
) -> None:
    for reset in sub.resets:
        rows[_phase_of(starts, reset.t)].resets += 1
    counts = Counter(r.tag for r in sub.received)
    # Arrival order: the first receipt of each tag; the latest start among what came before.
    seen: set[str] = set()
    times: list[float] = []  # receipt times of first arrivals
    max_start: list[float] = []  # the latest publish start among first arrivals up to here
    latest = float("-inf")
    # Order holds between resets: after one the stream goes on from a position (an epoch,
    # after a failover) of its own, and the client refetches its state.
    resets = sorted(x.t for x in sub.resets)
    next_reset = 0
    segment_latest = float("-inf")
    last_of: dict[str, tuple[int, int]] = {}  # publisher -> (seq, k) of its last stored event
    for r in sub.received:
        if next_reset < len(resets) and resets[next_reset] <= r.t:
            while next_reset < len(resets) and resets[next_reset] <= r.t:
                next_reset += 1
            segment_latest = float("-inf")
            last_of = {}
        event = events.get(r.tag)
        if event is None:
            rows[_phase_of(starts, r.t)].np_delivered += 1
            violations.append(Violation("stray", sub.name, r.tag, "nobody published it"))
            continue
        row = rows[event.phase]
        row.delivered += 1
        if r.tag in seen:
            continue
        seen.add(r.tag)
        outcome = event.publish.outcome
        if outcome == NOT_PUBLISHED:
            row.np_delivered += counts[r.tag]
            violations.append(
                Violation(
                    "np-delivered",
                    sub.name,
                    r.tag,
                    f"received at {r.t - t0:.2f} s from node {r.node}; "
                    + _attempts(event.publish, t0),
                )
            )
        if counts[r.tag] > 1:
            copies = [x for x in sub.received if x.tag == r.tag]
            told = sum(_retold(sub, a, b) for a, b in pairwise(copies))
            row.covered += told
            if told < len(copies) - 1:
                row.doubled += len(copies) - 1 - told
                violations.append(
                    Violation(
                        "doubled",
                        sub.name,
                        r.tag,
                        f"received {len(copies)} times ({outcome}): "
                        + ", ".join(f"{x.t - t0:.2f} s node {x.node} id {x.id}" for x in copies)
                        + _between(sub, copies)
                        + "; "
                        + _around(sub, r.t, t0),
                    )
                )
        end = event.end
        pub = event.publish
        disorder = ""
        if end is not None and end < segment_latest:
            disorder = (
                f"an event published {segment_latest - end:.3f} s after its 202 came before it"
            )
        elif end is not None:
            previous = last_of.get(pub.publisher)
            if previous is not None and previous > (pub.seq, event.k):
                disorder = f"came after {tag(pub.publisher, *previous)}"
        if disorder:
            row.disordered += 1
            violations.append(Violation("disordered", sub.name, r.tag, disorder))
        if end is not None:
            last_of[pub.publisher] = max(last_of.get(pub.publisher, (-1, -1)), (pub.seq, event.k))
        latest = max(latest, event.start)
        segment_latest = max(segment_latest, event.start)
        times.append(r.t)
        max_start.append(latest)

    if sub.first_open is None:
        return
    for name, event in events.items():
        end = event.end
        if end is None or name in counts:
            continue
        if event.start < sub.first_open or end > sub.stopped:
            continue  # not entitled: it may have been stored before the stream opened
        if _covered(event, end, sub.resets, times, max_start):
            rows[event.phase].covered += 1
            continue
        rows[event.phase].lost += 1
        violations.append(
            Violation(
                "lost",
                sub.name,
                name,
                f"published {event.start - t0:.2f}-{end - t0:.2f} s"
                + _stored_by(event.publish)
                + "; "
                + _around(sub, event.start, t0),
            )
        )


def _covered(
    event: _Event, end: float, resets: list[Received], times: list[float], max_start: list[float]
) -> bool:
    for reset in resets:
        if reset.t < event.start:
            continue
        before = bisect.bisect_left(times, reset.t)  # first arrivals strictly before the reset
        if before == 0 or max_start[before - 1] <= end:
            return True
    return False


def _stored_by(pub: Publish) -> str:
    stored = pub.stored_attempt()
    if stored is None:
        return ""
    return f" (202 from node {stored.node}, ids {stored.detail[:120]})"


def _retold(sub: SubscriberLog, first: Received, again: Received) -> bool:
    """A second copy the client was told of: stored again under another id (a retry under
    its Idempotency-Key after Redis lost the first copy and the key), with a reset received
    between the two. The same id twice is the same entry sent twice: never told."""
    return first.id != again.id and any(first.t < r.t <= again.t for r in sub.resets)


def _between(sub: SubscriberLog, copies: list[Received]) -> str:
    """Whether a reset came between the first and the last copy."""
    if any(copies[0].t < reset.t <= copies[-1].t for reset in sub.resets):
        return " (a reset came between)"
    return ""


def _attempts(pub: Publish, t0: float) -> str:
    return "attempts " + "; ".join(
        f"{a.start - t0:.2f}-{a.end - t0:.2f} s node {a.node} {a.outcome}"
        + (f" {a.status}" if a.status else "")
        + (" replayed" if a.replayed else "")
        + (f" ({a.detail[:80]})" if a.detail and a.outcome != STORED else "")
        for a in pub.attempts
    )


def _around(sub: SubscriberLog, t: float, t0: float) -> str:
    """The subscriber's connections and resets near `t`, for the report."""
    near = [c for c in sub.connects if t - 10 <= c[0] <= t + 10][-6:]
    conns = ", ".join(
        f"{c[0] - t0:.2f} s node {c[1]} -> {c[2] or 'failed'}"
        + (f" (Last-Event-ID {c[3]})" if c[3] else "")
        for c in near
    )
    resets = ", ".join(f"{r.t - t0:.2f} s" for r in sub.resets if t - 10 <= r.t <= t + 30)
    return f"connects: {conns or 'none near'}; resets: {resets or 'none near'}"


COLUMNS = (
    ("accepted", "accepted"),
    ("not_published", "not-publ"),
    ("unknown", "unknown"),
    ("delivered", "delivered"),
    ("lost", "lost"),
    ("covered", "covered"),
    ("doubled", "doubled"),
    ("disordered", "disorder"),
    ("resets", "resets"),
    ("np_delivered", "np-deliv"),
)


COUNTERS = tuple(name for name, _ in COLUMNS)


def table(verdict: Verdict, width: int = 40) -> str:
    """One row per fault, and the total: the report's table."""
    head = f"{'fault':<{width}}" + "".join(f"{title:>10}" for _, title in COLUMNS) + "  verdict"
    lines = [head, "-" * len(head)]
    for row in [*verdict.rows, verdict.total]:
        if row is verdict.total:
            lines.append("-" * len(head))
        cells = "".join(f"{getattr(row, name):>10,}" for name, _ in COLUMNS)
        mark = "FAIL" if row.failed else "ok" if row.run else "NOT RUN"
        lines.append(f"{row.fault[:width]:<{width}}{cells}  {mark}")
    return "\n".join(lines)


def examples(violations: Iterable[Violation], per_kind: int = 5) -> list[str]:
    """The first few violations of each kind, one line each."""
    shown: Counter[str] = Counter()
    totals = Counter(v.kind for v in violations)
    out = []
    for v in violations:
        if shown[v.kind] < per_kind:
            shown[v.kind] += 1
            out.append(f"  {v.kind}: {v.subscriber} {v.tag}: {v.detail}")
    for kind, n in totals.items():
        if n > per_kind:
            out.append(f"  ... and {n - per_kind} more {kind}")
    return out
