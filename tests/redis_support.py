"""What the Redis tests share: the shared server on 127.0.0.1:6379 under a key prefix of the
test's own, and a private `redis-server` that a test may stop, restart and kill.

The shared server (`.ci/run` starts one if none answers): every test gets a unique prefix and
its keys are deleted afterwards, so tests and engineers sharing the server never see each
other's streams. If it does not answer, the test fails in CI (`CI=true`) and skips elsewhere,
saying so (the rule of browser_support.require_chromium).

The private server listens on a free loopback port, writes its data to a temporary directory
with an fsync per write (append-only file, no snapshots), so a stop and a start keep what it
stored. It is only ever signalled by its own PID, and always killed at teardown.

A SentinelGroup is two private servers (a master and its replica) and three `redis-server
--sentinel` processes watching them, for failovers: planned ones, and to a replica that lagged
(bench.faults uses it too). Every process of it is signalled by its own PID only.

Test modules take the fixtures by name: `redis_url = redis_support.redis_url`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis
from browser_support import PrivateServer, free_port, wait_until

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

__all__ = [
    "PrivateRedis",
    "RedisTarget",
    "SentinelGroup",
    "private_redis",
    "redis_url",
    "sentinel_group",
]


class RedisTarget(NamedTuple):
    """A Redis URL and the key prefix a test owns on it (`url, prefix = target`)."""

    url: str
    prefix: str

    def client(self) -> redis.Redis:
        """A plain (blocking) client for the test's own checks; close it after use."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def hub_args(self) -> list[str]:
        """A hub's flags for this target: its broker and key prefix."""
        return ["--broker", self.url, "--redis-prefix", self.prefix]


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def require_redis(client: redis.Redis, where: str) -> None:
    """In CI a Redis that does not answer is a failure; elsewhere the test skips, and says so."""
    try:
        client.ping()
        return
    except (redis.RedisError, OSError) as exc:
        why = f"no Redis answers on {where} ({exc})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; .ci/run starts one (Redis tests never skip in CI)")
    pytest.skip(f"{why}: start redis-server (apt-get install redis-server); in CI this fails")


def require_redis_server() -> None:
    """The `redis-server` binary (the private servers and the sentinels run it): its absence
    fails in CI and skips elsewhere, saying so."""
    if Path(REDIS_SERVER).exists():
        return
    why = f"{REDIS_SERVER} is missing (apt-get install redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; .ci/run installs it (Redis tests never skip in CI)")
    pytest.skip(f"{why}; in CI this fails")


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix:` (a bounded SCAN walk); the number deleted."""
    deleted = 0
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        deleted += int(client.delete(*keys[start : start + 500]))
    return deleted


@pytest.fixture
def redis_url() -> Iterator[RedisTarget]:
    """The shared Redis (db 0) and a prefix of this test's own, deleted afterwards."""
    url = f"redis://{SHARED_HOST}:{SHARED_PORT}/0"
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        require_redis(client, f"{SHARED_HOST}:{SHARED_PORT}")
        prefix = unique_prefix()
        try:
            yield RedisTarget(url, prefix)
        finally:
            delete_prefix(client, prefix)
    finally:
        client.close()


class PrivateRedis(PrivateServer):
    """A `redis-server` of this test's own on a free loopback port. `stop()` and `start()`
    keep the port and the data; `kill()` is a SIGKILL; `pause()` and `resume()` are SIGSTOP
    and SIGCONT; `close()` ends it for good."""

    kind = "redis-server"

    def __init__(
        self, workdir: Path, *, appendonly: bool = True, extra_args: Sequence[str] = ()
    ) -> None:
        require_redis_server()
        self.appendonly = appendonly
        # more `redis-server` arguments (e.g. `--replicaof 127.0.0.1 <port>`), read at each start
        self.extra_args = list(extra_args)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def target(self, prefix: str | None = None) -> RedisTarget:
        return RedisTarget(self.url, prefix or unique_prefix())

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def answers(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self) -> PrivateRedis:
        """Start the server (again, on the same port, with the data it kept) and wait until
        it answers."""
        assert not self.running, "already running"
        args = [
            REDIS_SERVER,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.starts += 1

        self.wait_answering(10)
        return self

    def _signal(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError(f"redis-server ignored {sig.name}; killed") from None

    def stop(self) -> None:
        """SIGTERM (it writes what it holds and exits) and wait until it is gone."""
        self._signal(signal.SIGTERM)
        wait_until(lambda: not self.answers(), timeout=5, what="stopped redis refuses")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets and answers nothing (what clients send waits
        unread in them) until resume(). Resume in a `finally`."""
        assert self.proc is not None and self.running, "not running"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause(): it reads and answers what waited."""
        if self.proc is not None and self.running:
            os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started PrivateRedis, killed at teardown whatever the test did."""
    server = PrivateRedis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.close()


# -- Sentinel -----------------------------------------------------------------------------

# A master is down for the sentinels after a second without an answer; two of the three
# sentinels must agree. A failover that started may take failover-timeout to give up, and the
# next one waits twice that.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
QUORUM = 2
# A master waits 5 s by default for more replicas before it streams a full sync to one.
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


class SentinelProcess(PrivateServer):
    """One `redis-server <conf> --sentinel` on a free loopback port, its config file (which
    sentinel rewrites) in a directory of its own; signalled by its own PID only."""

    kind = "redis-server --sentinel"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.myid = uuid.uuid4().hex + uuid.uuid4().hex[:8]  # 40 hex digits
        self.conf = self.dir / "sentinel.conf"
        self.log_path = self.dir / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(
        self, name: str, master: int, replica: int, others: Sequence[SentinelProcess]
    ) -> None:
        """Its config file: the master to watch, and the replica and the other sentinels
        already known (else it finds them through the master, which takes seconds)."""
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            'logfile ""',
            f"dir {self.dir}",
            f"sentinel myid {self.myid}",
            f"sentinel monitor {name} 127.0.0.1 {master} {QUORUM}",
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {name} 1",
            f"sentinel known-replica {name} 127.0.0.1 {replica}",
            *(f"sentinel known-sentinel {name} 127.0.0.1 {o.port} {o.myid}" for o in others),
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> SentinelProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, str(self.conf), "--sentinel"],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2
        )

    def ask(self, *command: str) -> object:
        """A command's answer, or None if this sentinel does not answer."""
        client = self.client()
        try:
            return client.execute_command(*command)
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"sentinel on port {self.port} exited with {self.proc.returncode}: "
                f"{self.log()[-2000:]}"
            )

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class SentinelsDisagree(AssertionError):
    """The sentinels name different masters (or some do not answer): during a failover."""


def _info(server: PrivateRedis) -> dict[str, object]:
    """INFO replication of a server, {} if it does not answer."""
    client = server.client()
    try:
        return dict(client.info("replication"))
    except (redis.RedisError, OSError):
        return {}
    finally:
        client.close()


class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2), all on free loopback ports and
    all killed by PID at `close()`. `url` is the hub's `--broker` for it. `master()` and
    `replica()` are the servers as the sentinels name them now; `failover()` is a planned
    failover (SENTINEL FAILOVER), `pause_replica()` then `kill_master_promote_replica()` the
    rollback case: what the master acknowledged after the pause is lost.

    Sentinel has no replica-validity-factor (that is Redis Cluster's): it skips a replica whose
    link has been down longer than 10 x down-after-milliseconds plus the time the master has
    been down, one it sees down (SDOWN), or one whose INFO is older than 5 s. A paused
    replica's link is counted as down from when it runs again (it notices then), so one
    paused for any time is promotable as soon as it answers the sentinels again."""

    def __init__(
        self, workdir: Path, master_name: str = "hubmaster", appendonly: bool = True
    ) -> None:
        require_redis_server()
        self.dir = workdir
        self.master_name = master_name
        first = PrivateRedis(workdir / "redis-a", appendonly=appendonly, extra_args=FAST_SYNC)
        second = PrivateRedis(workdir / "redis-b", appendonly=appendonly)
        second.extra_args = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(first.port)]
        self.servers = [first, second]
        self.sentinels = [SentinelProcess(workdir / f"sentinel-{n}") for n in range(3)]
        for sentinel in self.sentinels:
            others = [o for o in self.sentinels if o is not sentinel]
            sentinel.configure(master_name, first.port, second.port, others)
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{master_name}/0"

    # -- what the sentinels say ---------------------------------------------------------

    def _named_ports(self) -> list[int | None]:
        """The master's port as each sentinel names it (None: no answer)."""
        ports: list[int | None] = []
        for sentinel in self.sentinels:
            sentinel.check_alive()
            answer = sentinel.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            ports.append(int(answer[1]) if isinstance(answer, list | tuple) else None)
        return ports

    def _server_on(self, port: int) -> PrivateRedis:
        (server,) = [s for s in self.servers if s.port == port]
        return server

    def master(self) -> PrivateRedis:
        """The server every sentinel names as master (AssertionError if they disagree)."""
        ports = set(self._named_ports())
        if len(ports) != 1 or None in ports:
            raise SentinelsDisagree(f"the sentinels do not agree on the master: {ports}")
        (port,) = ports
        assert port is not None
        return self._server_on(port)

    def replica(self) -> PrivateRedis:
        (other,) = [s for s in self.servers if s is not self.master()]
        return other

    def _all_name(self, server: PrivateRedis) -> bool:
        return self._named_ports() == [server.port] * len(self.sentinels)

    def _sentinels_see(self, replica: PrivateRedis, link_up: bool = False) -> bool:
        """Every sentinel knows the other two, and sees `replica` up; with `link_up`, also its
        link to the master up, as the replica's INFO last said (sentinels ask a replica for it
        every 10 s). redis-py parses SENTINEL MASTER and REPLICAS into dicts."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                master: Any = client.sentinel_master(self.master_name)
                replicas: Any = client.sentinel_slaves(self.master_name)
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
            if master["num-other-sentinels"] != len(self.sentinels) - 1:
                return False
            if not any(
                r["port"] == replica.port
                and r["is_slave"]
                and not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])
                and (r["master-link-status"] == "ok" or not link_up)
                for r in replicas
            ):
                return False
        return True

    # -- what the servers say -------------------------------------------------------------

    @staticmethod
    def _in_sync(replica: PrivateRedis, master: PrivateRedis) -> bool:
        """`replica` replicates `master`, its link up, and has taken at least what the
        master had written when asked just before (so this holds under a steady load too)."""
        offset = _info(master).get("master_repl_offset")
        info = _info(replica)
        if info.get("role") != "slave" or info.get("master_port") != master.port:
            return False
        if info.get("master_link_status") != "up" or not isinstance(offset, int):
            return False
        taken = info.get("slave_repl_offset")
        return isinstance(taken, int) and taken >= offset

    @staticmethod
    def _takes_writes(server: PrivateRedis) -> bool:
        client = server.client()
        try:
            return bool(client.set("sentinel-group:probe", time.time()))
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _promoted(self, server: PrivateRedis) -> bool:
        return self._all_name(server) and self._takes_writes(server)

    # -- life -----------------------------------------------------------------------------

    def start(self) -> SentinelGroup:
        """Everything up: the replica in sync, every sentinel naming the master and seeing
        the replica and the two other sentinels."""
        master, replica = self.servers
        master.start()
        replica.start()
        wait_until(lambda: self._in_sync(replica, master), 15, "replica in sync with master")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(lambda: self._all_name(master), 15, "every sentinel names the master")
        wait_until(
            lambda: self._sentinels_see(replica, link_up=True),
            20,
            "sentinels see each other and the replica",
        )
        return self

    def failover(self, timeout: float = 30.0) -> None:
        """SENTINEL FAILOVER (again while a sentinel answers that no replica is good yet, or
        that a failover is in progress); back when every sentinel names the other server and
        it takes writes. (The old master goes on taking writes until a sentinel turns it into
        a replica, ~10 s later: `wait_replica_in_sync()` waits for that, and a second failover
        needs it.)"""
        old = self.master()
        new = self.replica()
        refusals: list[str] = []

        def started() -> bool:
            client = self.sentinels[0].client()
            try:
                client.execute_command("SENTINEL", "FAILOVER", self.master_name)
                return True
            except redis.ResponseError as exc:  # NOGOODSLAVE, INPROG
                refusals.append(str(exc))
                return False
            finally:
                client.close()

        try:
            wait_until(started, timeout, "SENTINEL FAILOVER taken")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last refusal: {refusals[-1:]}") from None
        wait_until(
            lambda: self._promoted(new), timeout, f"port {new.port} promoted from {old.port}"
        )

    def wait_replica_in_sync(self, timeout: float = 30.0) -> None:
        """Until the replica (as the sentinels name it) replicates the master with every byte
        taken, and the sentinels see it so: after a failover the old master becomes it."""

        def synced() -> bool:
            try:
                master, replica = self.master(), self.replica()
            except SentinelsDisagree:  # not yet
                return False
            return self._in_sync(replica, master) and self._sentinels_see(replica)

        wait_until(synced, timeout, "replica in sync, and the sentinels agree and see it")

    def pause_replica(self) -> None:
        """SIGSTOP the replica and cut its link, so that what the master acknowledges from now
        on never reaches it (stopping it alone is not enough: on loopback what the master sends
        waits in the replica's socket and would be applied when it runs again)."""
        master = self.master()
        replica = self.replica()
        replica.pause()
        wait_until(lambda: _process_state(replica) == "T", 5, "replica stopped")
        client = master.client()
        try:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
            wait_until(lambda: _info(master).get("connected_slaves") == 0, 5, "replica link cut")
        finally:
            client.close()

    def kill_master_promote_replica(self, timeout: float = 30.0) -> None:
        """SIGKILL the master, SIGCONT the replica; back when every sentinel names the replica
        as master and it takes writes."""
        old = self.master()
        new = self.replica()
        old.kill()
        new.resume()
        wait_until(lambda: self._promoted(new), timeout, f"port {new.port} promoted after the kill")

    def rejoin(self, timeout: float = 30.0) -> None:
        """Start the server that is down again (after `kill_master_promote_replica()`), as a
        replica of the master, and wait until it is in sync and the sentinels see it: the
        group can fail over again."""
        master = self.master()
        (down,) = [s for s in self.servers if not s.running]
        down.extra_args = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(master.port)]
        down.start()
        self.wait_replica_in_sync(timeout)

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.close()

    def logs(self) -> str:
        parts = [f"---- redis on {s.port} ----\n{s.log()[-3000:]}" for s in self.servers]
        parts += [f"---- sentinel on {s.port} ----\n{s.log()[-3000:]}" for s in self.sentinels]
        return "\n".join(parts)


def _process_state(server: PrivateRedis) -> str:
    """The state letter of /proc/<pid>/stat (T: stopped)."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A started SentinelGroup, every process of it killed at teardown whatever the test did;
    the sentinels' logs printed (pytest shows them when the test fails)."""
    group = SentinelGroup(tmp_path / "sentinel-group")
    try:
        yield group.start()
    finally:
        group.close()
        print(group.logs())
