"""What the PostgreSQL tests share: the shared server on 127.0.0.1:5432 with an outbox table
name of the test's own, and a private `postgres` that a test may stop, restart and kill.

The shared server (`.ci/run` starts one if none answers) is reached as
`postgres://postgres@127.0.0.1:5432/test` (trust authentication on loopback). Every test gets
a unique table name and whatever the test made under it (the table, `<table>_dead`, the
trigger function `<table>_notify()`) is dropped afterwards, so tests and engineers sharing the
server never see each other's rows. If it does not answer, the test fails in CI (`CI=true`)
and skips elsewhere, saying so (the rule of redis_support.require_redis).

The private server is a cluster of its own (initdb into a temporary directory) on a free
loopback port, with `fsync=on`: a kill and a start keep every committed row (crash recovery
replays the WAL). PostgreSQL refuses to run as root, so when the tests run as root it runs as
the `postgres` system user, its directory chowned to that user; that directory is under /tmp
rather than pytest's tmp_path (which is 0700 root's). Its log is in tmp_path.

It is only ever signalled by PIDs: the postmaster's (a Popen of ours), and on `kill()` those
of the backends it forked. A SIGKILLed postmaster leaves its children running (they notice
only at their next check), still attached to its shared memory, and a new postmaster refuses
to start while they are ("pre-existing shared memory block is still in use"). So `kill()`
first freezes the postmaster (SIGSTOP: it forks nothing more and reaps nothing, so its
children's PIDs stay theirs), takes a pidfd of each of its children (/proc PPid), then
SIGKILLs the postmaster and each child through its pidfd, and waits until they are gone.

Test modules take the fixtures by name: `pg_dsn = pg_support.pg_dsn`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
from browser_support import PrivateServer, free_port, wait_until
from psycopg import sql

SHARED_DSN = "postgres://postgres@127.0.0.1:5432/test"


def _newest_bin() -> Path:
    """Debian's /usr/lib/postgresql/<version>/bin of the newest version with a server in it
    (15 on Debian 12)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    versions = sorted(
        found, key=lambda b: [int(n) for n in b.parent.name.split(".") if n.isdigit()]
    )
    return versions[-1] if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _newest_bin()
INITDB = PG_BIN / "initdb"
POSTGRES = PG_BIN / "postgres"
# the system user a private server runs as when the tests run as root
PG_USER = "postgres"
# prctl(2) options (linux/prctl.h)
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

__all__ = [
    "PgTarget",
    "PrivatePostgres",
    "pg_dsn",
    "private_postgres",
    "require_postgres",
    "require_postgres_binaries",
]


class PgTarget(NamedTuple):
    """A PostgreSQL DSN and the outbox table name a test owns on it (`dsn, table = target`)."""

    dsn: str
    table: str

    @property
    def dead_table(self) -> str:
        return f"{self.table}_dead"

    def connect(self) -> psycopg.Connection[Any]:
        """A plain (blocking, autocommit) connection for the test's own checks; close it."""
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)


def unique_table() -> str:
    return f"hub_outbox_{uuid.uuid4().hex[:12]}"


def _unavailable(why: str, fix: str) -> None:
    """In CI a missing server is a failure; elsewhere the test skips, and says why."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; .ci/run provides it (PostgreSQL tests never skip in CI)")
    pytest.skip(f"{why}: {fix}; in CI this fails")


def require_postgres(dsn: str = SHARED_DSN) -> None:
    """A server that answers `dsn`: else fail in CI, skip elsewhere, saying so."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return
    except (psycopg.Error, OSError) as exc:
        why = f"no PostgreSQL answers {dsn} ({str(exc).strip()})"
    _unavailable(why, "start one with trust auth on 127.0.0.1 and a `test` database")


def require_postgres_binaries() -> None:
    """initdb and postgres (the private servers run them), and a user that may run them: their
    absence fails in CI and skips elsewhere, saying so."""
    missing = [str(b) for b in (INITDB, POSTGRES) if not b.exists()]
    if missing:
        _unavailable(f"{', '.join(missing)} missing", "apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            _unavailable(
                f"running as root and there is no `{PG_USER}` user to run postgres as",
                "apt-get install postgresql (it creates the user)",
            )


def drop_owned(dsn: str, table: str, lock_timeout: float = 10.0) -> None:
    """Drop what a test made under `table`: the table, `<table>_dead`, `<table>_notify()`.
    A session still in a transaction on them (a relay the test did not stop) would make the
    DROP wait for good: after `lock_timeout` seconds it fails instead, naming the sessions."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{lock_timeout}s")))
        try:
            for name in (table, f"{table}_dead"):
                conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(
                    sql.Identifier(f"{table}_notify")
                )
            )
        except psycopg.errors.LockNotAvailable:
            holders = conn.execute(
                "SELECT a.pid, a.application_name, a.state, left(a.query, 120)"
                " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.relation = ANY (SELECT oid FROM pg_class WHERE relname LIKE %s)"
                " AND a.pid <> pg_backend_pid()",
                [f"{table}%"],
            ).fetchall()
            raise AssertionError(
                f"cannot drop {table} within {lock_timeout}s: sessions hold it: {holders}"
            ) from None


@pytest.fixture
def pg_dsn() -> Iterator[PgTarget]:
    """The shared PostgreSQL (database `test`) and an outbox table name of this test's own;
    what the test made under that name is dropped afterwards."""
    require_postgres(SHARED_DSN)
    table = unique_table()
    try:
        yield PgTarget(SHARED_DSN, table)
    finally:
        drop_owned(SHARED_DSN, table)


# -- a private server ---------------------------------------------------------------------


def _child_pids(parent: int) -> list[int]:
    """The PIDs whose /proc/<pid>/status says PPid: `parent`."""
    with os.scandir("/proc") as entries:
        pids = [int(entry.name) for entry in entries if entry.name.isdigit()]
    children = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("PPid:"):
                        if int(line.split()[1]) == parent:
                            children.append(pid)
                        break
        except OSError:  # gone meanwhile
            continue
    return children


def _state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (T: stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _reaped(pidfd: int) -> bool:
    """Whether the process of `pidfd` has ended: reaped by us if it is ours (see _subreaper),
    else ended (a pidfd turns readable then; its parent reaps it, or not)."""
    try:
        return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
    except ChildProcessError:  # not ours
        readable, _, _ = select.select([pidfd], [], [], 0)
        return bool(readable)


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """This process as the "child subreaper" (prctl) meanwhile: the children of a child that
    dies are reparented to it rather than to PID 1, so that we reap them. (PID 1 of some
    containers reaps nothing: a killed postmaster's backends would stay zombies for good.)
    Without prctl, they are left to PID 1."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        was = ctypes.c_int(0)
        if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER)")
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


class PrivatePostgres(PrivateServer):
    """A `postgres` of this test's own on a free loopback port. `stop()` and `start()` keep
    the port and the data; `kill()` is a SIGKILL of the postmaster and its backends;
    `restart()` is both (fast shutdown, or kill with `kill=True`); `close()` ends it for good
    and removes its data directory.

    `initdb_seconds` and `start_seconds` (the last start, until it answered) say how long they
    took."""

    kind = "postgres"

    def __init__(self, logdir: Path, *, database: str = "postgres") -> None:
        require_postgres_binaries()
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = logdir / "postgres.log"
        self.port = free_port()
        self.database = database
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.initdb_seconds: float | None = None
        self.start_seconds: float | None = None
        # as root: run as the postgres user, in a directory it owns (and may reach)
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_USER)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.dir = Path(tempfile.mkdtemp(prefix="hub-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "sock"
        self.sockets.mkdir()
        if self._as:
            for path in (self.dir, self.sockets):
                os.chown(path, self._as["user"], self._as["group"])

    @property
    def dsn(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{self.database}"

    def target(self, table: str | None = None) -> PgTarget:
        return PgTarget(self.dsn, table or unique_table())

    def connect(self, timeout: int = 5) -> psycopg.Connection[Any]:
        """A plain (blocking, autocommit) connection; close it after use."""
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=timeout)

    def answers(self) -> bool:
        try:
            with self.connect(timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, OSError):
            return False

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._as:
            env["HOME"] = str(self.dir)
            env["USER"] = env["LOGNAME"] = PG_USER
        return env

    def initdb(self) -> None:
        """A new cluster in the data directory: trust authentication, superuser `postgres`.
        (--no-sync: initdb's own files need no fsync, the machine does not crash under a
        test; the server itself runs with fsync=on.)"""
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            done = subprocess.run(
                [
                    str(INITDB),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    PG_USER,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                cwd=self.dir,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120,
                check=False,
                **self._as,
            )
        if done.returncode != 0:
            raise AssertionError(f"initdb exited with {done.returncode}: {self.log()[-3000:]}")
        self.initdb_seconds = time.monotonic() - began

    def start(self, timeout: float = 30.0) -> PrivatePostgres:
        """Start the server (initdb first, the first time; again, on the same port, with the
        data it kept, after a stop or a kill) and wait until it answers."""
        assert not self.running, "already running"
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        began = time.monotonic()
        args = [
            str(POSTGRES),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.sockets),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=on",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=self.dir,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **self._as,
            )
        self.starts += 1

        self.wait_answering(timeout)
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (fast shutdown: it ends the sessions, writes a checkpoint and exits once
        every backend has) and wait until it is gone; a kill if it takes longer."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"postgres ignored SIGINT for {timeout}s; killed") from None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster and every backend it forked (see the module docstring), and
        wait until they are all gone: a start after it runs crash recovery."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: _state(proc.pid) in "Tt", timeout, what="the postmaster stopped")
        pidfds = [fd for fd in map(_pidfd, _child_pids(proc.pid)) if fd is not None]
        try:
            with _subreaper():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
                for fd in pidfds:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                wait_until(
                    lambda: all(_reaped(fd) for fd in pidfds),
                    timeout,
                    what=f"the {len(pidfds)} backends of the killed postmaster gone",
                )
        finally:
            for fd in pidfds:
                os.close(fd)

    def restart(self, *, kill: bool = False) -> PrivatePostgres:
        """Stop (fast shutdown, or SIGKILL with `kill`) and start again: same port, same data."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        """End it for good (a kill: nothing is kept) and remove its data directory."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A started PrivatePostgres, killed (with its backends) and removed at teardown whatever
    the test did."""
    server = PrivatePostgres(tmp_path / "postgres")
    try:
        yield server.start()
    finally:
        server.close()
