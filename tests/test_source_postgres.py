"""The PostgreSQL outbox source (--source postgres://..., hub.outbox) against a real PostgreSQL:
the shared server on 127.0.0.1:5432 with an outbox table of the test's own (pg_support.pg_dsn),
or a private server the test stops and starts (pg_support.private_postgres).

Rows are written by a plain client (psycopg), in transactions of the test's making; events are
read by raw SSE clients (tests/sse.py) from in-process hubs on real sockets (conftest's
hub_server) or from `hub` processes (browser_support.HubProcess) sharing a real Redis. Every
wait has a deadline; processes are signalled by their own PIDs only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pg_support
import psycopg
import pytest
import redis_support
from browser_support import SECRET, HubProcess, http_json, hub_processes, readyz_of, wait_until
from pg_support import PgTarget, PrivatePostgres
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.types.json import Jsonb
from redis_support import PrivateRedis, RedisTarget
from sse import SSEClient, SSEEvent, wait_for

from hub.outbox import OutboxSettings, outbox_ddl

pg_dsn = pg_support.pg_dsn
private_postgres = pg_support.private_postgres
redis_url = redis_support.redis_url
private_redis = redis_support.private_redis

HUB_COMMAND = Path(sys.executable).with_name("hub")  # the console script: `hub outbox init`

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- the outbox, as the service that writes it sees it ------------------------------------


class Outbox:
    """A test's outbox table and the --source URL that names it (poll 0.2 s unless told)."""

    def __init__(self, target: PgTarget, **options: Any) -> None:
        self.target = target
        self.table = target.table
        query = {"table": target.table, "poll": "0.2", **{k: str(v) for k, v in options.items()}}
        self.url = f"{target.dsn}?{urlencode(query)}"
        self.name = self.url  # no password in it: the metrics' label is the URL as it is

    def connect(self) -> psycopg.Connection[Any]:
        return self.target.connect()

    def create(self) -> Outbox:
        """The table, its dead letters and the trigger, as `hub outbox init` makes them."""
        with self.connect() as conn:
            conn.execute(outbox_ddl(OutboxSettings.parse(self.url)).encode())
        return self

    def _named(self, suffix: str = "") -> sql.Identifier:
        return sql.Identifier(self.table + suffix)

    def insert_in(self, conn: psycopg.Connection[Any], bodies: list[Any]) -> list[int]:
        """Insert on `conn` (in its open transaction, if any); the row ids."""
        query = sql.SQL("INSERT INTO {} (body) VALUES (%s) RETURNING id").format(self._named())
        ids = []
        with conn.cursor() as cur:
            for body in bodies:
                cur.execute(query, (Jsonb(body),))
                row = cur.fetchone()
                assert row is not None
                ids.append(int(row[0]))
        return ids

    def insert(self, *bodies: Any) -> list[int]:
        """One committed transaction holding these rows; their ids."""
        with self.connect() as conn, conn.transaction():
            return self.insert_in(conn, list(bodies))

    def count(self) -> int:
        with self.connect() as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._named())).fetchone()
            assert row is not None
            return int(row[0])

    def dead(self) -> list[tuple[int, Any, str]]:
        """The dead letters: (row id, body as JSON, reason), by id."""
        with self.connect() as conn:
            query = sql.SQL("SELECT id, body, reason FROM {} ORDER BY id").format(
                self._named("_dead")
            )
            return [(int(i), json.loads(b), str(r)) for i, b, r in conn.execute(query)]


def payment(user: str, **data: Any) -> dict[str, Any]:
    return {"type": "payment", "user": user, "data": data}


def data_of(event: SSEEvent) -> Any:
    return event.json()["data"]


def is_row(key: str, value: Any) -> Callable[[SSEEvent], bool]:
    """The event of the row whose data has `key: value`."""

    def check(event: SSEEvent) -> bool:
        data = data_of(event)
        return isinstance(data, dict) and data.get(key) == value

    return check


def numbers(samples: Samples, name: str) -> dict[str, float]:
    """One source's samples: `records:<outcome>` for hub_source_records_total, else by name."""
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        found = dict(labels)
        if found.get("source") != name:
            continue
        key = f"records:{found['outcome']}" if sample == "hub_source_records_total" else sample
        out[key] = value
    return out


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking call (the test's own PostgreSQL client, a server's stop or start) off the
    loop the in-process hub runs on."""
    return await asyncio.to_thread(fn, *args)


# -- in-process hubs (conftest.hub_server) ---------------------------------------------------


async def readyz(server: Any) -> Any:
    response = await server.fetch("/readyz")
    assert response.code == 200, (response.code, response.body)
    return json.loads(response.body)


async def until_state(server: Any, name: str, wanted: str, timeout: float = 10.0) -> None:
    """Until /readyz shows the source in a state that starts with `wanted`."""
    seen: list[Any] = []

    async def check() -> bool:
        seen.append(await readyz(server))
        return str(seen[-1]["sources"][name]).startswith(wanted)

    assert await wait_for(check, timeout, 0.02), f"not {wanted!r} within {timeout}s: {seen[-2:]}"


async def source_numbers(server: Any, name: str) -> dict[str, float]:
    return numbers(await server.metrics(), name)


async def until_empty(outbox: Outbox, timeout: float = 5.0) -> None:
    async def empty() -> bool:
        return await in_thread(outbox.count) == 0

    assert await wait_for(empty, timeout, 0.02), "rows left in the outbox"


@pytest.mark.gen_test(timeout=30)
async def test_a_committed_row_is_delivered_once_with_its_data_and_then_deleted(pg_dsn, hub_server):
    outbox = Outbox(pg_dsn).create()
    server = await hub_server(sources=outbox.url)
    alice = await server.stream("alice")
    bob = await server.stream("bob")
    topic = await server.stream("carol", ["payments"])
    await until_state(server, outbox.name, "up")

    data = {"amount": 12.5, "currency": "EUR", "note": 'naïve ☃ "quoted"\n', "items": [1, None]}
    body = {"type": "payment", "user": "alice", "topics": ["payments"], "data": data}
    await in_thread(outbox.insert, body)
    event = await alice.next_event(timeout=5)
    assert event.event == "payment"
    assert (event.json()["user"], event.json()["data"]) == ("alice", data)
    assert [e.id for e in await topic.events(1)] == [event.id]  # routed as a publish is

    # let go of: the row is gone, and the event never comes again
    await until_empty(outbox)
    await server.marker("after the row")
    for client in (alice, bob, topic):  # never again, and never bob's
        assert await client.events_until(server.is_marker("after the row"), timeout=5) == []
    seen = await source_numbers(server, outbox.name)
    assert seen["records:published"] == 1, seen
    assert seen["records:replayed"] == seen["records:dead"] == 0, seen
    assert seen["hub_source_up"] == seen["hub_source_leading"] == 1, seen
    assert seen["hub_source_held"] == 0 and seen["hub_source_restarts_total"] == 0, seen
    assert await in_thread(outbox.dead) == []
    assert await readyz(server) == {"status": "ready", "sources": {outbox.name: "up"}}


@pytest.mark.gen_test(timeout=30)
async def test_a_commit_wakes_the_relay_at_once_without_waiting_for_the_poll(pg_dsn, hub_server):
    """poll=30: only the trigger's NOTIFY can bring the row within seconds."""
    outbox = Outbox(pg_dsn, poll=30).create()
    server = await hub_server(sources=outbox.url)
    alice = await server.stream("alice")
    await until_state(server, outbox.name, "up")
    for n in range(3):  # each commit wakes it, the first and the ones after
        began = time.monotonic()
        await in_thread(outbox.insert, payment("alice", n=n))
        assert data_of(await alice.next_event(timeout=5)) == {"n": n}
        assert time.monotonic() - began < 5


@pytest.mark.gen_test(timeout=30)
async def test_a_lost_notification_delays_a_row_by_the_poll_never_loses_it(pg_dsn, hub_server):
    outbox = Outbox(pg_dsn, poll=0.3).create()
    with outbox.connect() as conn:  # no trigger: no NOTIFY ever comes
        conn.execute(
            sql.SQL("DROP TRIGGER {} ON {}").format(
                sql.Identifier(f"{outbox.table}_notify"), sql.Identifier(outbox.table)
            )
        )
    server = await hub_server(sources=outbox.url)
    alice = await server.stream("alice")
    await until_state(server, outbox.name, "up")
    await in_thread(outbox.insert, payment("alice", n=1), payment("alice", n=2))
    assert [data_of(e) for e in await alice.events(2, timeout=5)] == [{"n": 1}, {"n": 2}]
    await until_empty(outbox)


# -- 2. a rolled-back transaction is never delivered ----------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_rolled_back_transaction_is_never_delivered(pg_dsn, hub_server):
    outbox = Outbox(pg_dsn).create()
    server = await hub_server(sources=outbox.url)
    alice = await server.stream("alice")
    await until_state(server, outbox.name, "up")

    writer = await in_thread(outbox.connect)
    try:
        writer.autocommit = False
        # the ghost's transaction is open while rows behind it are committed and relayed
        await in_thread(outbox.insert_in, writer, [payment("alice", what="ghost")])
        await in_thread(outbox.insert, payment("alice", what="first"))
        assert data_of(await alice.next_event(timeout=5)) == {"what": "first"}
        await in_thread(writer.rollback)
    finally:
        await in_thread(writer.close)
    await in_thread(outbox.insert, payment("alice", what="marker"))  # after the rollback
    assert await alice.events_until(is_row("what", "marker"), timeout=5) == []
    assert await server.before_marker(alice, "later") == []  # nor after it
    assert b"ghost" not in alice.raw
    await until_empty(outbox)
    seen = await source_numbers(server, outbox.name)
    assert (seen["records:published"], seen["records:dead"]) == (2, 0), seen


@pytest.mark.gen_test(timeout=30)
async def test_a_row_committed_late_behind_a_higher_id_is_still_delivered(pg_dsn, hub_server):
    """No cursor: a row whose id was taken before the ones relayed, committed after them, is
    read in the next round."""
    outbox = Outbox(pg_dsn).create()
    server = await hub_server(sources=outbox.url)
    alice = await server.stream("alice")
    await until_state(server, outbox.name, "up")
    writer = await in_thread(outbox.connect)
    try:
        writer.autocommit = False
        (late,) = await in_thread(outbox.insert_in, writer, [payment("alice", what="late")])
        (early,) = await in_thread(outbox.insert, payment("alice", what="early"))
        assert late < early
        assert data_of(await alice.next_event(timeout=5)) == {"what": "early"}
        await until_empty(outbox)
        await in_thread(writer.commit)
    finally:
        await in_thread(writer.close)
    assert data_of(await alice.next_event(timeout=5)) == {"what": "late"}
    await until_empty(outbox)
    assert await server.before_marker(alice, "end") == []


# -- 3. poison rows go to the dead letters, the rows behind them are delivered --------------


@pytest.mark.gen_test(timeout=30)
async def test_a_poison_row_is_dead_lettered_with_its_reason_and_the_next_row_delivered(
    pg_dsn, hub_server
):
    outbox = Outbox(pg_dsn).create()
    server = await hub_server(sources=outbox.url, max_body=2048)
    alice = await server.stream("alice")
    await until_state(server, outbox.name, "up")

    poison = [
        {"type": "no-such-type", "user": "alice", "data": 1},
        {"type": "join", "user": "alice", "topics": ["room"]},  # the hub's own
        payment("alice", blob="x" * 3000),  # over --max-body
        {"type": "payment", "user": 7, "data": {}},
        [],  # an empty batch
        "just a string",
    ]
    # together in one transaction, then alone behind a good row: neither way blocks
    ids = await in_thread(outbox.insert, *poison, payment("alice", n=1))
    await in_thread(outbox.insert, payment("alice", n=2))
    (late_poison,) = await in_thread(outbox.insert, {"type": "payment", "user": ""})
    await in_thread(outbox.insert, payment("alice", n=3))
    received = await alice.events(3, timeout=5)
    assert [data_of(e) for e in received] == [{"n": 1}, {"n": 2}, {"n": 3}]
    await until_empty(outbox)

    dead = await in_thread(outbox.dead)
    assert [row_id for row_id, _, _ in dead] == [*ids[: len(poison)], late_poison]
    assert [body for _, body, _ in dead] == [*poison, {"type": "payment", "user": ""}]
    reasons = [reason for _, _, reason in dead]
    expected = [
        "unknown event type 'no-such-type'",
        "published by the hub itself",
        "over --max-body",
        "user must be a non-empty string",
        "empty batch",
        "must be a JSON object",
        "user must be a non-empty string",
    ]
    for reason, says in zip(reasons, expected, strict=True):
        assert reason and says in reason, reasons
    seen = await source_numbers(server, outbox.name)
    assert (seen["records:dead"], seen["records:published"]) == (len(dead), 3), seen
    assert await server.before_marker(alice, "end") == []


# -- 7. a hub started before its table: down, then relaying once `hub outbox init` ran ------


@pytest.mark.gen_test(timeout=30)
async def test_a_hub_started_before_the_table_relays_once_hub_outbox_init_made_it(
    pg_dsn, hub_server
):
    outbox = Outbox(pg_dsn)
    server = await hub_server(sources=outbox.url)
    alice = await server.stream("alice")
    await until_state(server, outbox.name, f"down: no table {outbox.table}")
    answer = await readyz(server)
    assert answer["status"] == "degraded", answer
    assert "hub outbox init" in answer["sources"][outbox.name]
    seen = await source_numbers(server, outbox.name)
    assert seen["hub_source_up"] == seen["hub_source_leading"] == 0, seen

    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    done = await in_thread(
        lambda: subprocess.run(
            [str(HUB_COMMAND), "outbox", "init", outbox.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    )
    assert done.returncode == 0, done.stderr
    assert f"outbox {outbox.table} ready" in done.stdout

    await until_state(server, outbox.name, "up", timeout=15)
    assert (await readyz(server))["status"] == "ready"
    await in_thread(outbox.insert, payment("alice", n=1))
    assert data_of(await alice.next_event(timeout=5)) == {"n": 1}
    await until_empty(outbox)
    seen = await source_numbers(server, outbox.name)
    assert seen["hub_source_up"] == seen["hub_source_leading"] == 1, seen
    assert seen["hub_source_restarts_total"] == 0, seen  # never up before: no restart


@pytest.mark.gen_test(timeout=60)
async def test_a_frozen_database_is_down_within_seconds_and_relaying_resumes_when_it_thaws(
    private_postgres, hub_server
):
    """SIGSTOP of the postmaster and every backend (a server that hangs, or a partition: the
    socket stays open, nothing answers): the source must not stay "up" for as long as the
    kernel keeps the socket; it goes down within the query timeout and comes back."""
    pg: PrivatePostgres = private_postgres
    outbox = Outbox(pg.target(), poll=0.2)
    await in_thread(outbox.create)
    server = await hub_server(sources=outbox.url)
    client = await server.stream("alice")
    await until_state(server, outbox.name, "up")
    assert pg.proc is not None
    frozen = [pg.proc.pid, *pg_support._child_pids(pg.proc.pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        await until_state(server, outbox.name, "down", timeout=20)
        assert (await readyz(server))["status"] == "degraded"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    await until_state(server, outbox.name, "up", timeout=20)
    await in_thread(outbox.insert, payment("alice", n=1))
    assert data_of(await client.next_event(timeout=10)) == {"n": 1}
    await until_empty(outbox)
    assert await server.before_marker(client, "after-thaw") == []


# -- 5. the database restarted under load loses nothing ---------------------------------------


class Writer(threading.Thread):
    """A service writing rows (`rows_per_tx` per transaction, data {"n": n}) as fast as the
    server takes them, reconnecting after every failure. A transaction whose commit was not
    answered may or may not have committed: its numbers are never written again."""

    def __init__(self, outbox: Outbox, total: int, rows_per_tx: int = 2) -> None:
        super().__init__(daemon=True)
        self.outbox = outbox
        self.total = total
        self.rows_per_tx = rows_per_tx
        self.attempted: set[int] = set()
        self.confirmed: list[int] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        next_n = 0
        conn: psycopg.Connection[Any] | None = None
        deadline = time.monotonic() + 60
        while next_n < self.total and not self.halt.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = psycopg.connect(self.outbox.target.dsn, connect_timeout=2)
                batch = list(range(next_n, min(self.total, next_n + self.rows_per_tx)))
                next_n = batch[-1] + 1
                self.attempted.update(batch)
                self.outbox.insert_in(conn, [payment("w", n=n) for n in batch])
                conn.commit()
                self.confirmed.extend(batch)
            except psycopg.OperationalError as exc:
                self.failures.append(str(exc).strip()[:200])
                if conn is not None:
                    conn.close()
                    conn = None
                self.halt.wait(0.02)  # the pace of a service's reconnects, not a synchronisation
        if conn is not None:
            conn.close()


@pytest.mark.parametrize("crash", [False, True], ids=["fast-shutdown", "kill-9"])
@pytest.mark.gen_test(timeout=90)
async def test_the_database_restarted_under_load_loses_nothing(private_postgres, hub_server, crash):
    """A fast shutdown (sessions told FATAL, a checkpoint) or a kill -9 of the postmaster and
    its backends (crash recovery at the start) while a service writes rows."""
    pg: PrivatePostgres = private_postgres
    outbox = Outbox(pg.target(), batch=50)
    await in_thread(outbox.create)
    server = await hub_server(sources=outbox.url)
    client = await server.stream("w")
    await until_state(server, outbox.name, "up")

    writer = Writer(outbox, total=600)
    writer.start()
    try:
        assert await wait_for(lambda: len(writer.confirmed) >= 200, 30), "the writer is slow"
        stopping = asyncio.ensure_future(in_thread(pg.kill if crash else pg.stop))
        try:
            # while it is down: /readyz says so (still 200: streams and POST /publish work)
            await until_state(server, outbox.name, "down", timeout=15)
            assert (await readyz(server))["status"] == "degraded"
            seen = await source_numbers(server, outbox.name)
            assert seen["hub_source_up"] == seen["hub_source_leading"] == 0, seen
        finally:
            await stopping
        assert not pg.answers()
        await until_state(server, outbox.name, "down", timeout=1)  # still down, and said so
        await in_thread(pg.start)
        await until_state(server, outbox.name, "up", timeout=20)
        assert (await readyz(server))["status"] == "ready"
        assert await wait_for(lambda: not writer.is_alive(), 60), "the writer did not finish"
    finally:
        writer.halt.set()
        await in_thread(writer.join, 10)
    assert writer.failures, "the writer never saw the outage: the restart tested nothing"
    assert len(writer.confirmed) >= 400, (len(writer.confirmed), writer.failures[-3:])

    await in_thread(outbox.insert, payment("w", end=True))  # committed after every write
    events = await client.events_until(is_row("end", True), timeout=30)
    got = [data_of(e)["n"] for e in events]
    assert len(got) == len(set(got)), "an event delivered twice"
    assert got == sorted(got), "the writer's order broken"
    assert set(got) <= writer.attempted, set(got) - writer.attempted
    missing = set(writer.confirmed) - set(got)
    assert not missing, f"{len(missing)} confirmed rows never delivered: {sorted(missing)[:10]}"
    await until_empty(outbox)
    assert await server.before_marker(client, "end") == []
    seen = await source_numbers(server, outbox.name)
    assert seen["hub_source_restarts_total"] >= 1, seen
    assert seen["hub_source_up"] == 1 and seen["records:published"] == len(got) + 1, seen


# -- hub processes sharing Redis -----------------------------------------------------------


def scrape(hub: HubProcess) -> Samples:
    with urllib.request.urlopen(hub.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def process_numbers(hub: HubProcess, name: str) -> dict[str, float]:
    return numbers(scrape(hub), name)


def state_of(hub: HubProcess, name: str) -> str:
    status, body = readyz_of(hub)
    if status != 200 or "sources" not in body:
        return f"not ready ({status})"
    return str(body["sources"][name])


PUBLISHER = jwt.encode(
    {"sub": "outbox-tests", "exp": int(time.time()) + 3600, "publish": True},
    SECRET,
    algorithm="HS256",
)


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """Start hub processes on a Redis target with an outbox source (browser_support.
    hub_processes: each ended at teardown by its PID, its log printed)."""
    with hub_processes(tmp_path) as start:

        def on(target: RedisTarget, outbox: Outbox, *args: str) -> HubProcess:
            return start(*target.hub_args(), "--source", outbox.url, *args)

        yield on


async def open_stream(hub: HubProcess, user: str, last_id: str | None = None) -> SSEClient:
    headers = {"Authorization": f"Bearer {token(user)}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    client = await SSEClient.connect(hub.port, "/events", headers)
    assert client.status == 200, (client.status, client.body)
    assert await client.wait_until(lambda: "hub stream open" in client.comments)
    return client


def publish(hub: HubProcess, body: Any) -> list[str]:
    status, answer = http_json(hub.url + "/publish", body, {"Authorization": f"Bearer {PUBLISHER}"})
    assert status == 202, (status, answer)
    return list(answer["ids"])


def marker(label: str) -> dict[str, Any]:
    return {"type": "broadcast", "data": {"marker": label}}


def is_marker(label: str) -> Callable[[SSEEvent], bool]:
    return is_row("marker", label)


def kill(hub: HubProcess) -> None:
    """kill -9, by its PID, and reap it."""
    os.kill(hub.proc.pid, signal.SIGKILL)
    hub.proc.wait(timeout=10)


# -- 4. kill -9 between storing and deleting delivers once ----------------------------------


def unread_bytes(port: int) -> int:
    """Bytes waiting unread in the sockets of the server listening on `port` (Recv-Q of its
    established connections, as `ss` reports them)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if line.strip())


def stream_entries(target: RedisTarget) -> list[tuple[str, bytes]]:
    """The Redis broker's stream (`<prefix>:events`): (entry id, its fields' bytes)."""
    client = target.client()
    try:
        entries = client.xrange(f"{target.prefix}:events")
    finally:
        client.close()
    return [
        (entry_id.decode(), b" ".join(k + b"=" + v for k, v in fields.items()))
        for entry_id, fields in entries
    ]


def test_a_hub_killed_between_storing_and_deleting_delivers_the_row_once(
    pg_dsn, private_redis: PrivateRedis, hubs
):
    target = private_redis.target()
    outbox = Outbox(pg_dsn).create()
    first = hubs(target, outbox)
    wait_until(lambda: state_of(first, outbox.name) == "up", 10, "the first hub relays")
    (before,) = publish(first, payment("alice", what="before"))
    stamp = uuid.uuid4().hex

    private_redis.pause()
    try:
        unread_before = unread_bytes(private_redis.port)
        outbox.insert(payment("alice", stamp=stamp))
        wait_until(
            lambda: process_numbers(first, outbox.name)["hub_source_held"] >= 1,
            10,
            "the hub holds the row",
        )
        wait_until(
            lambda: unread_bytes(private_redis.port) > unread_before,
            5,
            "the hub's publish waits in Redis's socket",
        )
        kill(first)
    finally:
        private_redis.resume()

    # the precondition: Redis ran the script (stored, nobody heard), the row was not deleted
    wait_until(
        lambda: any(stamp.encode() in fields for _, fields in stream_entries(target)),
        5,
        "the event stored in Redis's stream",
    )
    assert outbox.count() == 1, "the row was deleted: the kill came too late to test anything"

    second = hubs(target, outbox)
    wait_until(lambda: outbox.count() == 0, 10, "the second hub took the row and deleted it")
    seen = process_numbers(second, outbox.name)
    assert (seen["records:replayed"], seen["records:published"]) == (1, 0), seen
    assert seen["records:dead"] == 0, seen

    async def resume() -> None:
        client = await open_stream(second, "alice", last_id=before)
        try:
            publish(second, marker("end"))
            events = await client.events_until(is_marker("end"), timeout=10)
            assert [data_of(e) for e in events] == [{"stamp": stamp}]
            # its id is the one Redis stored it under
            (entry_id,) = [i for i, f in stream_entries(target) if stamp.encode() in f]
            assert events[0].id.startswith(entry_id + "-") or events[0].id == entry_id
        finally:
            await client.aclose()

    asyncio.run(resume())


# -- 6. two hubs share the outbox: one reads, the other takes over when it dies -------------


def leading(hub: HubProcess, name: str) -> bool:
    return process_numbers(hub, name)["hub_source_leading"] == 1


def test_two_hubs_share_the_outbox_one_reads_and_the_other_takes_over_when_it_dies(
    pg_dsn, redis_url, hubs
):
    outbox = Outbox(pg_dsn).create()
    a = hubs(redis_url, outbox)
    b = hubs(redis_url, outbox)
    name = outbox.name

    def one_leads() -> tuple[HubProcess, HubProcess] | None:
        states = {hub: state_of(hub, name) for hub in (a, b)}
        if sorted(states.values()) != ["standby", "up"]:
            return None
        leader = a if states[a] == "up" else b
        standby = b if leader is a else a
        return (leader, standby) if leading(leader, name) and not leading(standby, name) else None

    pair = wait_until(one_leads, 10, "one hub relays, the other stands by")
    assert pair is not None
    leader, standby = pair

    async def scenario() -> None:
        on_standby = await open_stream(standby, "u")
        on_leader = await open_stream(leader, "u")
        try:
            n = 0
            for _ in range(3):  # three transactions of 20 rows
                await in_thread(outbox.insert, *(payment("u", n=k) for k in range(n, n + 20)))
                n += 20
            for client in (on_standby, on_leader):
                assert [data_of(e)["n"] for e in await client.events(n)] == list(range(n))
            seen = process_numbers(leader, name)
            assert seen["records:published"] == n and seen["records:replayed"] == 0, seen
            assert process_numbers(standby, name)["records:published"] == 0

            # rows in flight as the leader dies, and rows after: each once, in order
            await in_thread(outbox.insert, *(payment("u", n=k) for k in range(n, n + 20)))
            kill(leader)
            # its session ends with the process, and the lock with it: the standby asks every
            # `poll` (0.2 s) seconds
            taken = await wait_for(lambda: state_of(standby, name) == "up", 5)
            assert taken, f"no takeover within 5 s: {state_of(standby, name)}"
            assert leading(standby, name)
            await in_thread(outbox.insert, *(payment("u", n=k) for k in range(n + 20, n + 40)))
            rest = await on_standby.events(40, timeout=15)
            assert [data_of(e)["n"] for e in rest] == list(range(n, n + 40))
            publish(standby, marker("end"))
            assert await on_standby.events_until(is_marker("end"), timeout=10) == []
            await until_empty(outbox)
            ids = [e.id for e in on_standby.received]
            assert len(ids) == len(set(ids)) == n + 40 + 1
        finally:
            await on_standby.aclose()
            await on_leader.aclose()

    asyncio.run(scenario())


# -- backpressure: a hub that cannot store stops reading, and says how far behind it is -----


def test_a_hub_that_cannot_store_holds_one_batch_and_the_lag_says_what_waits(
    pg_dsn, private_redis: PrivateRedis, hubs
):
    """Redis stops: the relay holds at most one batch (`batch=10`), deletes nothing, and
    hub_source_lag counts the rows waiting; Redis returns: every row arrives once, in order,
    and the lag falls back to 0."""
    target = private_redis.target()
    outbox = Outbox(pg_dsn, batch=10).create()
    hub = hubs(target, outbox)
    wait_until(lambda: state_of(hub, outbox.name) == "up", 10, "the hub relays")
    held: list[float] = []

    def sample() -> dict[str, float]:
        seen = process_numbers(hub, outbox.name)
        held.append(seen["hub_source_held"])
        return seen

    async def scenario() -> None:
        client = await open_stream(hub, "alice")
        try:
            await in_thread(private_redis.stop)
            await in_thread(outbox.insert, *(payment("alice", n=n) for n in range(35)))
            assert await wait_for(lambda: sample()["hub_source_held"] == 10, 10), held[-5:]
            assert await wait_for(lambda: sample()["hub_source_lag"] >= 35, 10), (
                f"the lag does not say what waits while the broker is down: {sample()}"
            )
            assert sample()["hub_source_lag_seconds"] > 0
            assert await in_thread(outbox.count) == 35  # nothing let go of
            assert max(held) <= 10, held  # never more than one batch
            await in_thread(private_redis.start)
            events = await client.events(35, timeout=20)
            assert [data_of(e)["n"] for e in events] == list(range(35))
            assert await wait_for(lambda: sample()["hub_source_lag"] == 0, 10), sample()
            await until_empty(outbox)
            assert max(held) <= 10, held
            seen = sample()
            assert seen["records:published"] == 35 and seen["hub_source_held"] == 0, seen
        finally:
            await client.aclose()

    asyncio.run(scenario())
