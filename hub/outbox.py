"""The PostgreSQL outbox source (--source postgres://...): a service writes its notification
into the outbox table in the same transaction as the change it tells of, and the hub relays
it. Committed: delivered once. Rolled back: never seen.

The table (`hub outbox init`, or the DDL of `outbox_ddl`) holds one publish body per row, as
POST /publish takes it (`{"type": "payment", "user": "alice", "data": {...}}`), in a jsonb
column; a trigger NOTIFYs at commit, which wakes the relay at once; it also looks every
`poll` seconds, so a lost notification (a reconnect, a trigger dropped) delays, never loses.

One relay among all hubs: each hub's source asks for a session advisory lock on the table;
the one that holds it reads, the others stand by and ask again every `poll` seconds. Why not
`FOR UPDATE SKIP LOCKED` with every hub reading: two hubs would each take rows of the same
user and store them in whatever order their publishes finish, and per-user order is part of
the promise; the relay is not where the work is (every hub delivers every event to its own
streams, whoever relayed it: one script call stores a batch), so one reader costs nothing a
second would save (README, Event sources, has the numbers). A relay that dies (a crash, kill
-9, its machine gone) loses its session, and with it the lock: the PostgreSQL server ends a
session whose socket closed at once, one whose peer vanished by TCP keepalive, and one that
stopped talking (a frozen process) by `idle_session_timeout`; a standby takes over within
`poll` seconds of that.

The relay reads the oldest `batch` rows, in id order, stores their events (hub.sources.Intake:
each row's key is the table's OID and the row id), then deletes them, with the refused ones
moved to `<table>_dead` with the reason in the same transaction. A crash between the store and
the delete leaves the rows, which the next relay stores again: the broker answers with the
first ids (replayed) and nothing is delivered twice (within --idempotency-window: a relay that
stays down longer than that, with rows stored and not deleted, would store them again). Rows
are never skipped: there is no cursor; what is committed late, behind a higher id already
relayed, is read in the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlunsplit

from hub.broker import BrokerUnavailable
from hub.sources import Backoff, Intake, Source, SourceError, options

if TYPE_CHECKING:
    import asyncpg

__all__ = ["OutboxSettings", "PostgresOutbox", "outbox_ddl"]

log = logging.getLogger("hub.sources")

# A table name, optionally with its schema: plain identifiers only, so that quoting is exact.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}(?:\.[A-Za-z_][A-Za-z0-9_]{0,40})?")
# How many waiting rows the lag counts at most: counting is a scan, and past this many the
# exact number helps nobody.
LAG_COUNT_LIMIT = 100_000
# Bytes of bodies a batch holds at most (the first row always goes, up to --max-body).
BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class OutboxSettings:
    """What a postgres:// --source says: the server (`dsn`, without the hub's options), the
    table, the most rows taken at once (the backpressure bound) and the polling interval."""

    dsn: str
    table: str = "hub_outbox"
    batch: int = 500
    poll: float = 1.0

    @classmethod
    def parse(cls, url: str) -> OutboxSettings:
        parts, found, rest = options(
            url, {"table": str, "batch": int, "poll": float}, keep_unknown=True
        )
        table = str(found.get("table", cls.table))
        if not _NAME.fullmatch(table):
            raise SourceError(
                "table must be a plain name (letters, digits, _; optionally schema.name), "
                f"not {table[:48]!r}"
            )
        batch = int(found.get("batch", cls.batch))  # type: ignore[call-overload]
        if batch > 10_000:
            raise SourceError("batch must be at most 10000")
        poll = float(found.get("poll", cls.poll))  # type: ignore[arg-type]
        if not parts.hostname and "host=" not in rest:
            raise SourceError("the URL names no host (postgres://user@host:5432/database)")
        dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment))
        return cls(dsn, table, batch, poll)

    @property
    def quoted(self) -> str:
        return ".".join(f'"{part}"' for part in self.table.split("."))

    def _named(self, suffix: str) -> str:
        """A name beside the table's, in its schema: `"s"."t_dead"` for s.t."""
        return self.quoted[:-1] + suffix + '"'

    @property
    def dead(self) -> str:
        return self._named("_dead")

    @property
    def notify_function(self) -> str:
        return self._named("_notify")

    @property
    def channel(self) -> str:
        """The NOTIFY channel: the table's name as written."""
        return self.table

    @property
    def lock_key(self) -> int:
        """The advisory lock's key: one per table name, the same on every hub."""
        digest = hashlib.sha256(f"hub outbox {self.table}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


def outbox_ddl(settings: OutboxSettings) -> str:
    """The outbox table, its dead letters and the trigger that wakes the relay at commit.
    Safe to run again (IF NOT EXISTS, OR REPLACE)."""
    table, dead, function = settings.quoted, settings.dead, settings.notify_function
    trigger = settings.table.rsplit(".", 1)[-1] + "_notify"  # a trigger has no schema
    channel = settings.channel.replace("'", "''")
    return f"""\
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    body jsonb NOT NULL,                           -- a publish body: type, user, topics, data
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {dead} (
    id bigint PRIMARY KEY,                         -- the outbox row's id
    body text NOT NULL,                            -- as it was (cut at 64 KiB)
    reason text NOT NULL,                          -- why the hub refused it
    created_at timestamptz NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER "{trigger}"
    AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"""


class PostgresOutbox(Source):
    """One postgres:// --source (see the module's docstring)."""

    def __init__(self, url: str, intake: Intake) -> None:
        self.settings = OutboxSettings.parse(url)
        super().__init__(url, intake)
        self._conn: asyncpg.Connection | None = None
        self._lag_at = 0.0

    def _expected(self) -> tuple[type[BaseException], ...]:
        import asyncpg

        # InternalClientError: the connection broke between two queries (a FATAL while
        # idle: asyncpg then says "another operation is in progress")
        return (
            TimeoutError,
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        )

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:  # a server gone away: the socket is dropped
                conn.terminate()

    async def _session(self, backoff: Backoff) -> None:
        """One connection's life: stand by until this hub holds the lock, then relay."""
        import asyncpg

        settings, stats = self.settings, self.stats
        idle = max(10.0, settings.poll * 10)
        self._conn = conn = await asyncpg.connect(
            settings.dsn,
            timeout=5,
            # A server that stops answering (frozen, partitioned) is down after this long,
            # not after the kernel gives up on the socket: no query of the relay takes
            # seconds (a batch is at most 10,000 rows and 16 MiB).
            command_timeout=5,
            statement_cache_size=16,
            server_settings={
                "application_name": "hub outbox relay",
                # A relay whose process froze holds the lock until its session ends: the
                # server ends it after this long without a query (the relay queries at
                # least every `poll` seconds).
                "idle_session_timeout": str(int(idle * 1000)),
                "idle_in_transaction_session_timeout": str(int(idle * 1000)),
                # A relay whose machine vanished: the server finds out within ~11 s.
                "tcp_keepalives_idle": "5",
                "tcp_keepalives_interval": "2",
                "tcp_keepalives_count": "3",
            },
        )
        conn.add_termination_listener(lambda _: self._wake.set())
        exists = await conn.fetchval("SELECT to_regclass($1)::oid", settings.quoted)
        if exists is None:
            raise OSError(f"no table {settings.table} (create it: hub outbox init <the same URL>)")
        oid = int(exists)
        stats.up = True
        backoff.reset()
        while not self.closing:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", settings.lock_key):
                break
            stats.state = "standby"
            stats.leading = False
            stats.lag = 0
            await self._sleep(settings.poll)
        else:
            return
        await conn.add_listener(settings.channel, lambda *_: self._wake.set())
        stats.leading = True
        stats.state = "up"
        log.info("source %s: relaying %s", self.name, settings.table)
        await self._relay(conn, oid)

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass, a NOTIFY comes, or close()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    async def _relay(self, conn: asyncpg.Connection, oid: int) -> None:
        settings, stats = self.settings, self.stats
        # The oldest rows, up to `batch` of them and BATCH_BYTES of bodies (at least one row):
        # rows of a megabyte each must not make a batch of hundreds of megabytes. A body over
        # --max-body is measured by the server and never sent (NULL: dead-lettered).
        select = (
            f"SELECT id, CASE WHEN size > $2 THEN NULL ELSE body::text END, size FROM ("
            f"SELECT id, body, octet_length(body::text) AS size, row_number() OVER w AS n, "
            f"sum(least(octet_length(body::text), $2)) OVER w AS running "
            f"FROM (SELECT id, body FROM {settings.quoted} ORDER BY id LIMIT $1) AS oldest "
            f"WINDOW w AS (ORDER BY id)) AS sized WHERE n = 1 OR running <= $3 ORDER BY id"
        )
        limit = self.intake.hub.config.max_body
        backoff = Backoff(0.05, 2.0)
        while not self.closing:
            self._wake.clear()
            rows = await conn.fetch(select, settings.batch, limit, BATCH_BYTES)
            if rows:
                stats.held = len(rows)
                try:
                    await self._take(conn, oid, rows)
                except BrokerUnavailable as exc:
                    # The rows stay where they are; the next round reads them again.
                    stats.state = f"up (waiting for the broker: {str(exc)[:120]})"
                    await self._measure_lag(conn, len(rows))
                    await backoff.wait()
                    continue
                finally:
                    stats.held = 0
                backoff.reset()
                stats.state = "up"
            await self._measure_lag(conn, len(rows))
            if not rows:  # (a batch cut short by BATCH_BYTES is no sign the table is empty)
                await self._sleep(settings.poll)

    async def _take(self, conn: asyncpg.Connection, oid: int, rows: list[Any]) -> None:
        records: list[tuple[str, bytes]] = []
        reasons: dict[int, str] = {}
        for row_id, body, size in rows:
            if body is None:
                reasons[row_id] = f"body of {size} bytes is over --max-body"
            else:
                records.append((f"pg:{oid}:{row_id}", body.encode()))
        kept = [row_id for row_id, body, _ in rows if body is not None]
        for row_id, reason in zip(kept, await self.intake.take(records, self.stats), strict=True):
            if reason is not None:
                reasons[row_id] = reason
        async with conn.transaction():
            if reasons:
                dead = sorted(reasons)
                await conn.execute(
                    f"INSERT INTO {self.settings.dead} (id, body, reason, created_at) "
                    f"SELECT o.id, left(o.body::text, 65536), d.reason, o.created_at "
                    f"FROM {self.settings.quoted} o "
                    f"JOIN unnest($1::bigint[], $2::text[]) AS d(id, reason) ON d.id = o.id "
                    f"ON CONFLICT (id) DO NOTHING",
                    dead,
                    [reasons[i] for i in dead],
                )
            await conn.execute(
                f"DELETE FROM {self.settings.quoted} WHERE id = ANY($1::bigint[])",
                [row[0] for row in rows],
            )
        for row_id in sorted(reasons):
            self.stats.dead += 1
            log.warning(
                "source %s: row %d dead-lettered to %s_dead: %s",
                self.name,
                row_id,
                self.settings.table,
                reasons[row_id][:200],
            )

    async def _measure_lag(self, conn: asyncpg.Connection, taken: int) -> None:
        """Rows waiting (counted up to LAG_COUNT_LIMIT) and the oldest one's age, at most
        once a second: 0 without a query when the last round found the table empty."""
        stats = self.stats
        if taken == 0:
            stats.lag, stats.lag_seconds = 0, 0.0
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._lag_at < 1.0:
            return
        self._lag_at = loop.time()
        count, age = await conn.fetchrow(
            f"SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0) "
            f"FROM (SELECT created_at FROM {self.settings.quoted} ORDER BY id "
            f"LIMIT {LAG_COUNT_LIMIT}) waiting"
        )
        stats.lag, stats.lag_seconds = int(count), float(age)


async def init_outbox(url: str) -> str:
    """Create the outbox of a postgres:// --source URL (`hub outbox init`); the DDL run."""
    import asyncpg

    settings = OutboxSettings.parse(url)
    ddl = outbox_ddl(settings)
    conn = await asyncpg.connect(settings.dsn, timeout=10)
    try:
        await conn.execute(ddl)
    finally:
        await conn.close()
    return ddl
