"""What the NATS tests share: the shared server on 127.0.0.1:4222 (JetStream on) with a
stream name and subjects of the test's own, and a private `nats-server` that a test may stop,
restart, pause and kill.

The shared server (`.ci/run` starts one if none answers): every test gets a unique stream name
(`HUB_<HEX12>`) and subject prefix (`t<hex12>.events`); the test creates the stream, and it
and `<stream>_DEAD` are deleted afterwards, so tests and engineers sharing the server never
see each other's messages. If it does not answer with JetStream, the test fails in CI
(`CI=true`) and skips elsewhere, saying so (the rule of redis_support.require_redis).

The fixtures are plain (blocking) ones and the tests mostly run on Tornado's loop, so what they
ask NATS runs in `run_async`: asyncio.run in a thread of its own, which neither needs nor
touches the test thread's event loop (asyncio.run there would unset the loop pytest-tornado
made current).

The private server listens on a free loopback port with JetStream storing to a directory of
the test's own, so a stop (or a kill) and a start keep its streams and messages. It is only
ever signalled by its own PID, and always killed at teardown.

Test modules take the fixtures by name: `nats_url = nats_support.nats_url`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import nats
import pytest
from browser_support import PrivateServer, free_port, wait_until
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.js.errors import NotFoundError

SHARED_URL = "nats://127.0.0.1:4222"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

T = TypeVar("T")

__all__ = [
    "NatsTarget",
    "PrivateNats",
    "delete_streams",
    "nats_url",
    "private_nats",
    "require_nats",
    "require_nats_server",
    "run_async",
]


class NatsTarget(NamedTuple):
    """A NATS URL, and the stream name and subject prefix a test owns on it
    (`url, stream, subject_prefix = target`). The test creates the stream."""

    url: str
    stream: str
    subject_prefix: str

    @property
    def dead_stream(self) -> str:
        return f"{self.stream}_DEAD"

    @property
    def subjects(self) -> str:
        """Every subject under the prefix (`t<hex12>.events.>`), for the stream's subjects."""
        return f"{self.subject_prefix}.>"


def unique_target(url: str) -> NatsTarget:
    tag = uuid.uuid4().hex[:12]
    return NatsTarget(url, f"HUB_{tag.upper()}", f"t{tag}.events")


def run_async(step: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """`await step()` on an event loop of its own, in a thread of its own (see the module
    docstring); its result, or its exception. Fails after `timeout` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(step(), timeout)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nats-support") as pool:
        return pool.submit(asyncio.run, bounded()).result(timeout + 5)


async def _connect(url: str) -> Client:
    """A client that tries once and never reconnects: for the fixtures' own checks. (nats-py
    retries a refused server until max_reconnect_attempts even without allow_reconnect, and
    then says only NoServersError: the error it met is in the one raised instead.)"""
    met: list[Exception] = []

    async def note(exc: Exception) -> None:
        met.append(exc)

    try:
        return await nats.connect(
            url,
            connect_timeout=2,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=note,
        )
    except NoServersError:
        why = f"{type(met[-1]).__name__}: {met[-1]}" if met else "no server"
        raise ConnectionError(f"cannot connect to {url} ({why})") from None


async def _jetstream_answers(url: str) -> None:
    client = await _connect(url)
    try:
        await client.jetstream().account_info()
    finally:
        await client.close()


def _unavailable(why: str, fix: str) -> None:
    """In CI a missing server is a failure; elsewhere the test skips, and says why."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; .ci/run provides it (NATS tests never skip in CI)")
    pytest.skip(f"{why}: {fix}; in CI this fails")


def require_nats(url: str = SHARED_URL) -> None:
    """A server with JetStream that answers `url`: else fail in CI, skip elsewhere."""
    try:
        run_async(lambda: _jetstream_answers(url), timeout=10)
        return
    except (NatsError, OSError, TimeoutError) as exc:
        detail = str(exc) or "no answer in time"
        why = f"no NATS with JetStream answers on {url} ({type(exc).__name__}: {detail})"
    _unavailable(why, "start `nats-server -a 127.0.0.1 -p 4222 -js -sd <dir>`")


def require_nats_server() -> None:
    """The `nats-server` binary (the private servers run it): its absence fails in CI and skips
    elsewhere, saying so."""
    if Path(NATS_SERVER).exists():
        return
    _unavailable(f"{NATS_SERVER} is missing", "apt-get install nats-server")


def delete_streams(url: str, *names: str) -> list[str]:
    """Delete each stream of `names` that exists; the names of those deleted."""

    async def delete() -> list[str]:
        client = await _connect(url)
        deleted = []
        try:
            js = client.jetstream()
            for name in names:
                try:
                    await js.delete_stream(name)
                    deleted.append(name)
                except NotFoundError:
                    pass
        finally:
            await client.close()
        return deleted

    return run_async(delete)


@pytest.fixture
def nats_url() -> Iterator[NatsTarget]:
    """The shared NATS (JetStream), and a stream name and subject prefix of this test's own;
    the stream and `<stream>_DEAD` are deleted afterwards if the test made them."""
    require_nats(SHARED_URL)
    target = unique_target(SHARED_URL)
    try:
        yield target
    finally:
        delete_streams(SHARED_URL, target.stream, target.dead_stream)


def info_line(port: int, timeout: float = 1.0) -> dict[str, object] | None:
    """The INFO a NATS server sends first to a client on `port`, or None if none comes within
    `timeout` (not listening, paused, or not NATS)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:  # refused, or timed out
        return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    info = json.loads(line[5:])
    return info if isinstance(info, dict) else None


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (state T in /proc/<pid>/task/*/stat)."""
    with os.scandir(f"/proc/{pid}/task") as tasks:
        paths = [task.path for task in tasks]
    for path in paths:
        try:
            with open(f"{path}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] not in "Tt":
                    return False
        except OSError:  # a thread that ended meanwhile
            continue
    return True


class PrivateNats(PrivateServer):
    """A `nats-server` of this test's own, JetStream on, on a free loopback port. `stop()`
    (SIGTERM) and `start()` keep the port and the store; `kill()` is a SIGKILL; `pause()` and
    `resume()` are SIGSTOP and SIGCONT; `close()` ends it for good. `url` is its URL."""

    kind = "nats-server"

    def __init__(self, workdir: Path) -> None:
        require_nats_server()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = self.dir / "store"
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def target(self) -> NatsTarget:
        return unique_target(self.url)

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether it sends its INFO, with JetStream on, to a new connection within
        `timeout` seconds."""
        info = info_line(self.port, timeout)
        return info is not None and bool(info.get("jetstream"))

    def start(self, timeout: float = 15.0) -> PrivateNats:
        """Start the server (again, on the same port, with the store it kept) and wait until
        it answers with JetStream on."""
        assert not self.running, "already running"
        args = [
            NATS_SERVER,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.starts += 1

        self.wait_answering(timeout)
        return self

    def _signal(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError(f"nats-server ignored {sig.name}; killed") from None

    def stop(self) -> None:
        """SIGTERM (it closes its clients and its store, and exits) and wait until it is gone.
        A paused server is resumed first, else it could not act on the signal."""
        self.resume()
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets and answers nothing (what clients send waits
        unread in them, new connections get no INFO) until resume(). Resume in a `finally`."""
        assert self.proc is not None and self.running, "not running"
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)
        # the signal is taken by each of its threads in turn: until all have, one may still
        # accept a connection and send INFO
        wait_until(lambda: _all_threads_stopped(pid), 5, f"nats-server {pid} stopped")

    def resume(self) -> None:
        """SIGCONT after pause(): it reads and answers what waited."""
        if self.proc is not None and self.running:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> PrivateNats:
        """Stop (SIGTERM, or SIGKILL with `kill`) and start again: same port, same store."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    """A started PrivateNats, killed at teardown whatever the test did."""
    server = PrivateNats(tmp_path / "nats")
    try:
        yield server.start()
    finally:
        server.close()
