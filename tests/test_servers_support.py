"""The PostgreSQL and NATS test servers (pg_support, nats_support) do what the source tests
rely on: the shared ones answer and are cleaned up after, a private PostgreSQL keeps its
committed rows through a SIGKILL (and leaves no backend behind), a private NATS keeps its
JetStream messages through a restart and a kill."""

from __future__ import annotations

import os

import nats
import nats_support
import pg_support
import psycopg
import pytest
from nats_support import NatsTarget, PrivateNats, delete_streams, run_async
from pg_support import PgTarget, PrivatePostgres, _child_pids
from psycopg import sql

pg_dsn = pg_support.pg_dsn
private_postgres = pg_support.private_postgres
nats_url = nats_support.nats_url
private_nats = nats_support.private_nats


# -- PostgreSQL ----------------------------------------------------------------------------


def test_the_shared_postgres_answers_and_what_the_test_made_is_dropped_after(
    pg_dsn: PgTarget,
) -> None:
    dsn, table = pg_dsn
    assert table.startswith("hub_outbox_") and len(table) == len("hub_outbox_") + 12
    with pg_dsn.connect() as conn:
        for name in (table, pg_dsn.dead_table):
            conn.execute(
                sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY)").format(sql.Identifier(name))
            )
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RETURN NEW; END $$"
            ).format(sql.Identifier(f"{table}_notify"))
        )
    pg_support.drop_owned(dsn, table)  # what the fixture's teardown does
    with pg_dsn.connect() as conn:
        tables = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE %s", [f"{table}%"])
        functions = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname = %s", [f"{table}_notify"]
        )
        assert tables.fetchone() == (0,)
        assert functions.fetchone() == (0,)


def test_a_private_postgres_keeps_a_committed_row_through_a_kill(
    private_postgres: PrivatePostgres,
) -> None:
    server = private_postgres
    with server.connect() as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, body jsonb NOT NULL)")
        conn.execute("INSERT INTO kept VALUES (1, '{\"n\": 1}')")
        with server.connect() as idle:  # one more backend for kill() to end
            idle.execute("SELECT 1")
            postmaster = server.proc
            assert postmaster is not None
            backends = _child_pids(postmaster.pid)
            assert backends
            server.kill()
    assert not server.running and not server.answers()
    alive = [pid for pid in backends if os.path.exists(f"/proc/{pid}")]
    assert alive == [], "a killed postmaster's backends are gone (and reaped)"
    server.start()
    with server.connect() as conn:
        assert conn.execute("SELECT id, body->>'n' FROM kept").fetchall() == [(1, "1")]
    server.restart()  # a fast shutdown and a start keep it too
    with server.connect() as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    assert server.starts == 3


def test_a_stopped_private_postgres_refuses(private_postgres: PrivatePostgres) -> None:
    private_postgres.stop()
    assert not private_postgres.running
    with pytest.raises(psycopg.OperationalError):
        private_postgres.connect(timeout=2).close()


# -- NATS ----------------------------------------------------------------------------------


async def _add_stream_and_publish(target: NatsTarget, *streams: str) -> None:
    client = await nats.connect(target.url, connect_timeout=2, allow_reconnect=False)
    try:
        js = client.jetstream()
        for n, stream in enumerate(streams):
            await js.add_stream(name=stream, subjects=[f"{target.subject_prefix}{n}.>"])
            await js.publish(f"{target.subject_prefix}{n}.a", b"kept")
    finally:
        await client.close()


async def _stream_messages(url: str, stream: str) -> int:
    client = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        info = await client.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await client.close()


def test_the_shared_nats_answers_and_the_streams_are_deleted_after(nats_url: NatsTarget) -> None:
    url, stream, prefix = nats_url
    assert stream.startswith("HUB_") and prefix.startswith("t") and prefix.endswith(".events")
    run_async(lambda: _add_stream_and_publish(nats_url, stream, nats_url.dead_stream))
    assert run_async(lambda: _stream_messages(url, stream)) == 1
    # what the fixture's teardown does (then again, finding nothing)
    assert delete_streams(url, stream, nats_url.dead_stream) == [stream, nats_url.dead_stream]


@pytest.mark.gen_test
async def test_the_shared_nats_fixture_leaves_the_tests_loop_alone(nats_url: NatsTarget) -> None:
    """On Tornado's loop (as the source tests run): the fixture's own NATS work ran on a loop
    of its own, and this test's client works on the test's."""
    client = await nats.connect(nats_url.url, connect_timeout=2, allow_reconnect=False)
    try:
        js = client.jetstream()
        await js.add_stream(name=nats_url.stream, subjects=[nats_url.subjects])
        ack = await js.publish(f"{nats_url.subject_prefix}.x", b"1")
        assert ack.stream == nats_url.stream and ack.seq == 1
    finally:
        await client.close()


def test_a_private_nats_keeps_a_stream_message_through_a_restart_and_a_kill(
    private_nats: PrivateNats,
) -> None:
    server = private_nats
    target = server.target()
    run_async(lambda: _add_stream_and_publish(target, target.stream))
    server.restart()
    assert run_async(lambda: _stream_messages(server.url, target.stream)) == 1
    server.restart(kill=True)
    assert run_async(lambda: _stream_messages(server.url, target.stream)) == 1
    assert server.starts == 3


def test_a_paused_private_nats_sends_nothing_until_resumed(private_nats: PrivateNats) -> None:
    private_nats.pause()
    try:
        assert not private_nats.answers(timeout=0.3)
    finally:
        private_nats.resume()
    assert private_nats.answers()
