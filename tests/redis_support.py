"""What the Redis tests share: the shared server on 127.0.0.1:6379 under a key prefix of the
test's own, and a private `redis-server` that a test may stop, restart and kill.

The shared server (`.ci/run` starts one if none answers): every test gets a unique prefix and
its keys are deleted afterwards, so tests and engineers sharing the server never see each
other's streams. If it does not answer, the test fails in CI (`CI=true`) and skips elsewhere,
saying so (the rule of browser_support.require_chromium).

The private server listens on a free loopback port, writes its data to a temporary directory
with an fsync per write (append-only file, no snapshots), so a stop and a start keep what it
stored. It is only ever signalled by its own PID, and always killed at teardown.

Test modules take the fixtures by name: `redis_url = redis_support.redis_url`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from browser_support import free_port, wait_until

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

__all__ = ["PrivateRedis", "RedisTarget", "private_redis", "redis_url"]


class RedisTarget(NamedTuple):
    """A Redis URL and the key prefix a test owns on it (`url, prefix = target`)."""

    url: str
    prefix: str

    def client(self) -> redis.Redis:
        """A plain (blocking) client for the test's own checks; close it after use."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)


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


class PrivateRedis:
    """A `redis-server` of this test's own on a free loopback port. `stop()` and `start()`
    keep the port and the data; `kill()` is a SIGKILL; `pause()` and `resume()` are SIGSTOP
    and SIGCONT; `close()` ends it for good."""

    def __init__(self, workdir: Path) -> None:
        if not Path(REDIS_SERVER).exists():
            why = f"{REDIS_SERVER} is missing (apt-get install redis-server)"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{why}; .ci/run installs it (Redis tests never skip in CI)")
            pytest.skip(f"{why}; in CI this fails")
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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.starts += 1

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}"
                )
            return self.answers()

        wait_until(up, timeout=10, what=f"private redis-server on port {self.port} answers")
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

    def close(self) -> None:
        if self.running:
            self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started PrivateRedis, killed at teardown whatever the test did."""
    server = PrivateRedis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.close()
