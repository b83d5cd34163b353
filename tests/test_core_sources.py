"""The sources' shared core without a server (hub.sources, hub.outbox's settings, --source in
hub.config): URL parsing and its refusals, the password never shown, the intake's contract
(a record's body gives events or Refused, nothing else; a record taken twice is stored once),
on a real hub core (memory broker) on a real asyncio loop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from core_support import config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.config import ConfigError, parse_config
from hub.core import Hub
from hub.dispatch import DEFAULT_TYPES
from hub.message import Event
from hub.outbox import OutboxSettings, PostgresOutbox, outbox_ddl
from hub.sources import Intake, Refused, SourceError, SourceStats, shown_url

HUB = [sys.executable, "-m", "handlers.app"]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


class Limited:
    """The least a hub is to an Intake that only decodes: its settings and its type table."""

    def __init__(self, **overrides: Any) -> None:
        self.config = config(**overrides)
        self.types = DEFAULT_TYPES


# -- OutboxSettings.parse -------------------------------------------------------------------


def test_an_outbox_url_without_options_takes_the_defaults():
    parsed = OutboxSettings.parse("postgres://app@db.example:5432/shop")
    assert parsed == OutboxSettings("postgres://app@db.example:5432/shop", "hub_outbox", 500, 1.0)
    assert parsed.quoted == '"hub_outbox"' and parsed.dead == '"hub_outbox_dead"'
    assert parsed.channel == "hub_outbox"


def test_the_hub_options_are_taken_out_and_the_client_library_options_kept():
    url = "postgresql://app:pw@db:6543/shop?sslmode=disable&table=sales.outbox&batch=50&poll=0.2"
    parsed = OutboxSettings.parse(url)
    assert parsed.table == "sales.outbox" and parsed.batch == 50 and parsed.poll == 0.2
    assert parsed.dsn == "postgresql://app:pw@db:6543/shop?sslmode=disable"
    assert parsed.quoted == '"sales"."outbox"'
    assert parsed.dead == '"sales"."outbox_dead"'
    assert parsed.notify_function == '"sales"."outbox_notify"'
    ddl = outbox_ddl(parsed)
    assert 'CREATE TABLE IF NOT EXISTS "sales"."outbox" (' in ddl
    assert 'CREATE TABLE IF NOT EXISTS "sales"."outbox_dead" (' in ddl
    assert "pg_notify('sales.outbox', '')" in ddl
    # a socket directory instead of a host is a host too
    assert OutboxSettings.parse("postgres:///shop?host=/run/postgresql").table == "hub_outbox"


def test_the_lock_is_one_per_table_name_the_same_on_every_hub():
    a = OutboxSettings.parse("postgres://h/db?table=a")
    again = OutboxSettings.parse("postgres://other-host/db2?table=a&poll=3")
    b = OutboxSettings.parse("postgres://h/db?table=b")
    assert a.lock_key == again.lock_key != b.lock_key
    assert -(2**63) <= a.lock_key < 2**63  # a bigint: pg_try_advisory_lock(bigint)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgres://h/db?table=a-b", "table must be a plain name"),
        ('postgres://h/db?table=a";drop table x;--', "table must be a plain name"),
        ("postgres://h/db?table=a.b.c", "table must be a plain name"),
        ("postgres://h/db?table=", "table must be a plain name"),
        ("postgres://h/db?table=9lives", "table must be a plain name"),
        ("postgres://h/db?batch=x", "option batch='x' is not int"),
        ("postgres://h/db?batch=1.5", "option batch='1.5' is not int"),
        ("postgres://h/db?batch=10001", "batch must be at most 10000"),
        ("postgres://h/db?batch=0", "option batch must be positive"),
        ("postgres://h/db?poll=-1", "option poll must be positive"),
        ("postgres://h/db?poll=soon", "option poll='soon' is not float"),
        ("postgres://h/db?table=a&table=b", "option table given twice"),
        ("postgres:///db", "the URL names no host"),
        ("postgres://user@/db", "the URL names no host"),
    ],
)
def test_an_outbox_url_that_cannot_work_is_refused_saying_why(url, says):
    with pytest.raises(SourceError) as refused:
        OutboxSettings.parse(url)
    assert says in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_largest_batch_is_taken():
    assert OutboxSettings.parse("postgres://h/db?batch=10000").batch == 10_000


# -- the password is never shown ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgres://app:s3cret@db:5432/shop?table=t", "postgres://app:***@db:5432/shop?table=t"),
        ("postgres://app:p%40ss%3Aw@db/shop", "postgres://app:***@db/shop"),
        ("postgres://:s3cret@db/shop", "postgres://:***@db/shop"),
        ("postgresql://app:s3cret@[::1]:5432/shop", "postgresql://app:***@[::1]:5432/shop"),
        (
            "nats://hub:s3cret@nats:4222/EVENTS?durable=hub",
            "nats://hub:***@nats:4222/EVENTS?durable=hub",
        ),
        # without a password the URL is shown as it is
        ("postgres://app@db:5432/shop?table=t", "postgres://app@db:5432/shop?table=t"),
        ("nats://nats:4222/EVENTS", "nats://nats:4222/EVENTS"),
    ],
)
def test_a_shown_url_hides_its_password(url, shown):
    assert shown_url(url) == shown
    assert "s3cret" not in shown_url(url) and "p%40ss" not in shown_url(url)


def test_an_outbox_is_named_by_its_url_without_the_password():
    url = "postgres://app:s3cret@db:5432/shop?table=t&poll=0.5"
    outbox = PostgresOutbox(url, Intake(Limited()))
    assert outbox.name == "postgres://app:***@db:5432/shop?table=t&poll=0.5"
    assert outbox.settings.dsn == "postgres://app:s3cret@db:5432/shop"  # the client needs it
    assert outbox.stats.state == "starting" and not outbox.stats.up


def test_a_refused_url_is_reported_without_its_password():
    with pytest.raises(ConfigError) as refused:
        parse_config(["--source", "postgres://app:s3cret@db/shop?table=no-way"], {})
    assert "s3cret" not in str(refused.value)
    assert "postgres://app:***@db/shop?table=no-way" in str(refused.value)


# -- --source and HUB_SOURCES ---------------------------------------------------------------


def test_no_source_by_default():
    assert parse_config([], {}).source_urls() == ()


def test_the_source_flag_repeats():
    a, b = "postgres://app@db/shop", "postgresql://app@db/shop?table=other"
    parsed = parse_config(["--source", a, "--port", "9000", "--source", b], {})
    assert parsed.source_urls() == (a, b)


def test_hub_sources_holds_several_urls_apart_by_spaces():
    a, b = "postgres://app@db/shop", "postgres://app@db/shop?table=other"
    parsed = parse_config([], {"HUB_SOURCES": f"  {a}   {b} "})
    assert parsed.source_urls() == (a, b)
    # the flag wins over the variable, as for every setting
    assert parse_config(["--source", b], {"HUB_SOURCES": a}).source_urls() == (b,)


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--source", "ftp://x"], {}, "starts with postgres://, postgresql:// or nats://"),
        ([], {"HUB_SOURCES": "ftp://x"}, "starts with postgres://, postgresql:// or nats://"),
        (["--source", "redis://127.0.0.1:6379"], {}, "starts with postgres://"),
        (
            ["--source", "postgres://db/a", "--source", "postgres://db/a"],
            {},
            "the same source is given twice",
        ),
        ([], {"HUB_SOURCES": "postgres://db/a postgres://db/a"}, "the same source is given twice"),
        (["--source", "postgres://db/a?batch=100000"], {}, "batch must be at most 10000"),
    ],
)
def test_a_source_that_cannot_work_is_refused_at_start_in_one_line(argv, env, says):
    with pytest.raises(ConfigError) as refused:
        parse_config(argv, env)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_the_hub_process_refuses_an_unknown_source_scheme_in_one_line_and_exits_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    done = subprocess.run(
        [*HUB, "--port", "0", "--source", "ftp://x"],
        env={**env, "HUB_JWT_SECRET": "sources-tests-secret-0123456789-abcdefghij"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("hub: error: --source 'ftp://x': a source URL starts with")


# -- the intake: what a record's body can give ---------------------------------------------


def test_a_body_decodes_as_a_publish_body_would():
    intake = Intake(Limited())
    (event,) = intake.decode(b'{"type": "payment", "user": "alice", "data": {"amount": 5}}')
    assert isinstance(event, Event) and event.name == "payment" and event.user == "alice"
    assert json.loads(event.body)["data"] == {"amount": 5}
    batch = intake.decode(b'[{"type": 5, "data": 1}, {"type": "payment", "user": "b"}]')
    assert [e.name for e in batch] == ["broadcast", "payment"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"type": "nope", "user": "a"}', "unknown event type 'nope'"),
        (b'{"type": "join", "user": "a"}', "published by the hub itself"),
        (b'{"type": "payment", "user": 7}', "user must be a non-empty string"),
        (b'{"type": "payment", "user": "a",', ""),  # cut short
        (b"", "empty body"),
        (b"[]", "empty batch"),
        (b"\xff\xfe", ""),
    ],
)
def test_a_body_the_hub_would_refuse_is_refused_with_its_reason(body, says):
    with pytest.raises(Refused) as refused:
        Intake(Limited()).decode(body)
    assert says in refused.value.reason and refused.value.reason


def test_the_publish_limits_hold_for_a_record_too():
    intake = Intake(Limited(max_body=2048, max_batch=3))
    big = json.dumps({"type": "payment", "user": "a", "data": "x" * 2100}).encode()
    with pytest.raises(Refused, match="over --max-body"):
        intake.decode(big)
    four = json.dumps([{"type": 5, "data": n} for n in range(4)]).encode()
    with pytest.raises(Refused):
        intake.decode(four)
    assert len(intake.decode(four.replace(b', {"type": 5, "data": 3}', b""))) == 3


def check_decode(intake: Intake, body: bytes) -> None:
    """The contract: events, or Refused with a reason; any other exception fails the test."""
    try:
        events = intake.decode(body)
    except Refused as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    assert events and all(isinstance(e, Event) for e in events)


SMALL = Intake(Limited(max_body=4096, max_batch=5, max_event_bytes=1024))


@FAST
@given(st.binary(max_size=600))
def test_any_bytes_give_events_or_refused_and_nothing_else(body):
    check_decode(SMALL, body)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELD_VALUES = JSON | st.sampled_from(
    ["payment", "broadcast", "log", "login", "join", "leave", 2, 5, -1, "a", "", "a" * 300]
)
EVENT = st.dictionaries(
    st.sampled_from(["type", "user", "data", "ts", "topics", "topic", "extra"]),
    FIELD_VALUES | st.lists(st.text(max_size=12), max_size=3),
    max_size=6,
)


@FAST
@given(JSON | EVENT | st.lists(EVENT, max_size=7))
def test_any_json_value_gives_events_or_refused_and_nothing_else(value):
    check_decode(SMALL, json.dumps(value).encode())


@FAST
@given(st.lists(EVENT, min_size=1, max_size=3), st.binary(max_size=8), st.integers(0, 200))
def test_a_json_body_cut_or_spliced_gives_events_or_refused(events, noise, at):
    body = json.dumps(events).encode()
    check_decode(SMALL, body[:at] + noise + body[at:])
    check_decode(SMALL, body[:at])


# -- the intake on a real hub core: stored once, refused ones named ------------------------


def test_take_stores_each_record_once_and_names_the_refused_ones():
    async def scenario() -> None:
        hub = Hub(config())
        try:
            intake, stats = Intake(hub), SourceStats()
            records = [
                ("pg:1:1", b'{"type": "payment", "user": "alice", "data": 1}'),
                ("pg:1:2", b'{"type": "nope", "user": "alice"}'),
                ("pg:1:3", b'[{"type": 5, "data": 2}, {"type": 5, "data": 3}]'),
            ]
            reasons = await intake.take(records, stats)
            assert reasons[0] is None and reasons[2] is None
            assert reasons[1] is not None and "unknown event type" in reasons[1]
            assert (stats.published, stats.replayed) == (2, 0)
            seq = hub.broker.seq
            assert seq == 3  # the two records' three events, the refused one none

            # taken again (a crash before the rows were let go of): stored before, not again
            assert await intake.take(records, stats) == reasons
            assert (stats.published, stats.replayed) == (2, 2)
            assert hub.broker.seq == seq

            # the same key with another body (a table made anew): a new event, not a replay
            other = [("pg:1:1", b'{"type": "payment", "user": "alice", "data": 99}')]
            assert await intake.take(other, stats) == [None]
            assert (stats.published, stats.replayed) == (3, 2)
            assert hub.broker.seq == seq + 1
            # another key with a body stored before under another key: a new event too
            assert await intake.take([("pg:1:4", records[0][1])], stats) == [None]
            assert (stats.published, stats.replayed) == (4, 2)
        finally:
            await hub.stop()

    run(scenario)
