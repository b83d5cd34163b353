"""``python -m bench.pgclients``: asyncpg or psycopg (3, AsyncConnection) for the outbox
relay's hot loop, against the shared PostgreSQL (postgres://postgres@127.0.0.1:5432/test).

The loop is the relay's: a table of N rows with a ~100-byte JSON body, then
`SELECT id, body::text ... ORDER BY id LIMIT 500` and `DELETE ... WHERE id = ANY($1)` until it
is empty, each statement on its own (autocommit), both clients as they come (asyncpg prepares
and caches its statements, psycopg prepares a query from its 5th run, text results). Each
run starts from a freshly filled table (TRUNCATE, so no run reads the dead rows of another);
the clients take turns, and the median of the runs is reported, in rows/s, with the CPU time
this process spent per row (the hub's share of the work; the rest is the server's). Then a
LISTEN/NOTIFY round-trip with each: from `pg_notify()` sent on one connection to its
notification read on another, median and 99th percentile.

    .venv/bin/python -m bench.pgclients
    .venv/bin/python -m bench.pgclients --rows 50000 --runs 5 --loop asyncio

On the hub's loop (uvloop, --loop asyncio for asyncio's own). Its table (and channel) has a
name of its own and is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import ujson
from psycopg import sql

DSN = "postgres://postgres@127.0.0.1:5432/test"
BODY = ujson.dumps(
    {
        "type": "payment",
        "user": "u123456",
        "topics": ["payments"],
        "data": {"amount": 1299, "currency": "EUR"},
    }
)
CLIENTS = ("asyncpg", "psycopg")


async def fill(dsn: str, table: str, rows: int) -> None:
    """The table emptied (TRUNCATE: a new file, no dead rows) and filled with `rows` rows."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        name = sql.Identifier(table)
        await conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(name))
        await conn.execute(
            sql.SQL("INSERT INTO {} (body) SELECT %s::jsonb FROM generate_series(1, %s)").format(
                name
            ),
            [BODY, rows],
        )
        await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(name))


async def relay_asyncpg(dsn: str, table: str, batch: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        select = f'SELECT id, body::text FROM "{table}" ORDER BY id LIMIT {batch}'
        delete = f'DELETE FROM "{table}" WHERE id = ANY($1)'
        done = 0
        while rows := await conn.fetch(select):
            await conn.execute(delete, [row[0] for row in rows])
            done += len(rows)
        return done
    finally:
        await conn.close()


async def relay_psycopg(dsn: str, table: str, batch: int) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        name = sql.Identifier(table)
        select = sql.SQL("SELECT id, body::text FROM {} ORDER BY id LIMIT {}").format(
            name, sql.Literal(batch)
        )
        delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(name)
        done = 0
        async with conn.cursor() as cur:
            while True:
                await cur.execute(select)
                rows = await cur.fetchall()
                if not rows:
                    return done
                await cur.execute(delete, [[row[0] for row in rows]])
                done += len(rows)


RELAYS: dict[str, Callable[[str, str, int], Awaitable[int]]] = {
    "asyncpg": relay_asyncpg,
    "psycopg": relay_psycopg,
}


async def notify_asyncpg(dsn: str, channel: str, trips: int) -> list[float]:
    listener = await asyncpg.connect(dsn)
    notifier = await asyncpg.connect(dsn)
    waiting: list[asyncio.Future[str]] = []

    def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if waiting and not waiting[0].done():
            waiting.pop(0).set_result(payload)

    try:
        await listener.add_listener(channel, heard)
        took = []
        for n in range(trips):
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            waiting.append(future)
            began = time.perf_counter()
            await notifier.execute("SELECT pg_notify($1, $2)", channel, str(n))
            assert await asyncio.wait_for(future, 5) == str(n)
            took.append(time.perf_counter() - began)
        return took
    finally:
        await listener.close()
        await notifier.close()


async def notify_psycopg(dsn: str, channel: str, trips: int) -> list[float]:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as notifier,
    ):
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        waiting: list[asyncio.Future[str]] = []

        async def read() -> None:
            # what a relay would run: one task iterating notifies() (it reads the socket only
            # while iterated)
            async for notify in listener.notifies():
                if waiting and not waiting[0].done():
                    waiting.pop(0).set_result(notify.payload)

        reader = asyncio.create_task(read())
        try:
            took = []
            for n in range(trips):
                future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                waiting.append(future)
                began = time.perf_counter()
                await notifier.execute("SELECT pg_notify(%s, %s)", [channel, str(n)])
                assert await asyncio.wait_for(future, 5) == str(n)
                took.append(time.perf_counter() - began)
            return took
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


NOTIFIES: dict[str, Callable[[str, str, int], Awaitable[list[float]]]] = {
    "asyncpg": notify_asyncpg,
    "psycopg": notify_psycopg,
}


async def measure(dsn: str, rows: int, batch: int, runs: int, trips: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    table = f"bench_pgclients_{tag}"
    rates: dict[str, list[float]] = {name: [] for name in CLIENTS}
    cpu: dict[str, list[float]] = {name: [] for name in CLIENTS}  # our CPU s per row
    trip_times: dict[str, list[float]] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, body jsonb NOT NULL, "
                "created_at timestamptz DEFAULT now())"
            ).format(sql.Identifier(table))
        )
        try:
            for _ in range(runs):
                for name in CLIENTS:  # taking turns: a drift of the server hits both
                    await fill(dsn, table, rows)
                    began, began_cpu = time.perf_counter(), time.process_time()
                    done = await RELAYS[name](dsn, table, batch)
                    took = time.perf_counter() - began
                    cpu[name].append((time.process_time() - began_cpu) / rows)
                    assert done == rows, f"{name} relayed {done} of {rows} rows"
                    rates[name].append(rows / took)
            for name in CLIENTS:
                await NOTIFIES[name](dsn, f"bench_{tag}", 20)  # warm-up
                trip_times[name] = await NOTIFIES[name](dsn, f"bench_{tag}", trips)
        finally:
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    lines = [
        f"{'client':9} {'relay rows/s':>13}  {'(each run)':<28} {'client CPU/row':>14} "
        f"{'NOTIFY median':>13} {'p99':>9}"
    ]
    for name in CLIENTS:
        each = "(" + ", ".join(f"{r:,.0f}" for r in rates[name]) + ")"
        trip = sorted(trip_times[name])
        p99 = trip[min(len(trip) - 1, int(len(trip) * 0.99))]
        lines.append(
            f"{name:9} {statistics.median(rates[name]):>13,.0f}  {each:<28} "
            f"{statistics.median(cpu[name]) * 1e6:>11.2f} us "
            f"{statistics.median(trip) * 1e3:>10.3f} ms {p99 * 1e3:>6.3f} ms"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trips", type=int, default=200, help="LISTEN/NOTIFY round-trips")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    lines = asyncio.run(measure(args.dsn, args.rows, args.batch, args.runs, args.trips))
    print(
        f"PostgreSQL clients, the outbox relay's loop ({args.rows:,} rows of "
        f"{len(BODY)} bytes, SELECT {args.batch} + DELETE = ANY), median of {args.runs} runs, "
        f"{args.loop}; {args.trips} LISTEN/NOTIFY round-trips:"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
