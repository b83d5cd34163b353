"""What the real-browser tests share: the system Chromium, a hub process, a TCP proxy.

The browser is the OS's Chromium driven by Playwright (its own browser download does not work
here). The hub runs as the `hub` command would, in demo mode, on a free loopback port, and is
killed by its PID at teardown. The proxy sits between the browser and the hub so that a test
can cut every connection and refuse new ones, then let them through again.

Every wait has a deadline; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
HUB = [sys.executable, "-m", "handlers.app"]
SECRET = "browser-tests-secret-".ljust(48, "x")

T = TypeVar("T")


def require_chromium() -> None:
    """In CI a missing browser is a failure; elsewhere the browser tests skip, and say so."""
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs it (browser tests never skip in CI)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); in CI (CI=true) this fails")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless system Chromium, closed afterwards."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.asynccontextmanager
async def async_chromium() -> AsyncIterator[Any]:
    """The same browser for a test that runs on the event loop (a hub in the test's process):
    Playwright's sync API refuses to run inside a running loop."""
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `cond` until it returns something true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met within {timeout}s (last value {value!r})")
        time.sleep(0.02)  # polling interval inside a deadline, not a synchronisation


def http_json(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


class HubProcess:
    """`hub` on a free loopback port: a subprocess, its log in a file. With `demo`, in demo
    mode (its own made-up secret, tokens from /demo/token); without, with SECRET, so that a
    test signs its own tokens (demo mode never signs with a configured key)."""

    def __init__(self, log_path: Path, *args: str, demo: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.demo = demo
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        if not demo:
            env["HUB_JWT_SECRET"] = SECRET
        mode = ["--demo"] if demo else []
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*HUB, "--host", "127.0.0.1", "--port", str(self.port), *mode, *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._publisher: str | None = None
        try:
            wait_until(self._ready, timeout=20, what=f"hub on port {self.port} healthy")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"hub exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return http_json(self.url + "/healthz")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def streams(self) -> int:
        status, body = http_json(self.url + "/healthz")
        assert status == 200, body
        return int(body["streams"])

    def wait_streams(self, n: int, timeout: float = 10.0) -> None:
        wait_until(lambda: self.streams() == n, timeout, what=f"/healthz streams == {n}")

    def publish(self, events: Any) -> list[str]:
        """POST /publish with a publisher token (the demo's, or one signed here); the ids."""
        if self._publisher is None and self.demo:
            status, body = http_json(self.url + "/demo/token?role=publisher")
            assert status == 200, body
            self._publisher = body["token"]
        elif self._publisher is None:
            claims = {"sub": "test-publisher", "exp": int(time.time()) + 3600, "publish": True}
            self._publisher = jwt.encode(claims, SECRET, algorithm="HS256")
        status, body = http_json(
            self.url + "/publish", events, {"Authorization": f"Bearer {self._publisher}"}
        )
        assert status == 202, body
        return list(body["ids"])

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers; always reaped."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class TcpProxy:
    """A loopback TCP proxy the test controls: `cut()` closes every proxied connection and
    refuses new ones (accepted, then reset) until `restore()`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._up = True
        self._closed = False
        self.refused = 0
        self.accepted = 0
        self._start(self._accept_loop)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                if self._closed or not self._up:
                    self.refused += 1
                    _reset(client)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.accepted += 1
                self._sockets.update((client, upstream))
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every proxied connection (both sides) and refuse new ones."""
        with self._lock:
            self._up = False
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            _reset(s)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


def _reset(s: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): to the peer, the connection fails at once."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


# ---- the demo page, read back from the DOM -----------------------------------------------

# The `tag` of every broadcast-style row in the live event list, as the page renders it.
TAGS_JS = """() => [...document.querySelectorAll('#events td.payload code')].map((c) => {
  try { return JSON.parse(c.textContent).tag ?? null } catch { return null }
}).filter((t) => t !== null)"""

HAS_TAGS_JS = """(tags) => {
  const seen = new Set([...document.querySelectorAll('#events td.payload code')].map((c) => {
    try { return JSON.parse(c.textContent).tag ?? null } catch { return null }
  }));
  return tags.every((t) => seen.has(t));
}"""


def tags_on(page: Any) -> list[str]:
    return list(page.evaluate(TAGS_JS))


def wait_for_tags(page: Any, tags: list[str], timeout: float = 15.0) -> None:
    page.wait_for_function(HAS_TAGS_JS, arg=tags, timeout=timeout * 1000)


def broadcasts(tags: list[str]) -> list[dict[str, Any]]:
    """One broadcast event per tag (broadcasts reach every stream, whatever its topics)."""
    return [{"type": "broadcast", "data": {"tag": tag}} for tag in tags]


def tags(page: Any) -> list[str]:
    """The `data.tag` of each event a hub.js test page has received, in order."""
    return list(page.evaluate("() => h.events.map((e) => e.data && e.data.tag).filter(Boolean)"))


def wait_tags(page: Any, wanted: list[str]) -> None:
    page.wait_for_function(
        "(wanted) => wanted.every((t) => h.events.some((e) => e.data && e.data.tag === t))",
        arg=wanted,
    )


def assert_each_once(page: Any, wanted: list[str]) -> None:
    counts = Counter(tags(page))
    assert {t: counts[t] for t in wanted} == dict.fromkeys(wanted, 1)


def publish_across_renewal(page: Any, hub: HubProcess) -> list[str]:
    """Publish a broadcast every 50 ms from before the page's first token expires until a
    second after it has asked for the next one (h.tokenCalls reaching 2); the tags sent."""
    sent: list[str] = []
    renewed_at = None
    deadline = time.monotonic() + 15  # a bound on the loop, far past the expiry
    pace = threading.Event()  # never set: its timed wait paces the publisher
    while time.monotonic() < deadline:
        sent.append(f"e{len(sent)}")
        hub.publish(broadcasts(sent[-1:]))
        if renewed_at is None and page.evaluate("h.tokenCalls") == 2:
            renewed_at = time.monotonic()
        if renewed_at is not None and time.monotonic() - renewed_at > 1.0:
            break
        pace.wait(0.05)
    assert renewed_at is not None, "the first token was never renewed"
    return sent


def readyz_of(hub: HubProcess) -> tuple[int, Any]:
    """A hub process's /readyz: status and body; (0, None) while nothing answers."""
    try:
        return http_json(hub.url + "/readyz")
    except OSError:
        return 0, None


@contextlib.contextmanager
def hub_processes(logdir: Path) -> Iterator[Callable[..., HubProcess]]:
    """`start(*args, ready=True)`: a `hub` process (with SECRET, not demo mode), waited for
    until /readyz answers 200 when `ready`. At the end each one is continued (if a test
    stopped it) and ended, by its PID, and the end of its log printed (pytest shows it when
    a test fails)."""
    started: list[HubProcess] = []

    def start(*args: str, ready: bool = True) -> HubProcess:
        hub = HubProcess(logdir / f"hub-{len(started)}.log", *args, demo=False)
        started.append(hub)
        if ready:
            wait_until(lambda: readyz_of(hub)[0] == 200, 15, f"hub {len(started)} ready")
        return hub

    try:
        yield start
    finally:
        for n, hub in enumerate(started):
            if hub.proc.poll() is None:
                os.kill(hub.proc.pid, signal.SIGCONT)
            hub.stop()
            print(f"---- hub {n} (port {hub.port}, exit {hub.proc.returncode}) ----")
            lines = [line for line in hub.log().splitlines() if "GET /" not in line]
            print("\n".join(lines[-60:]))


class PrivateServer:
    """What the tests' private servers share (redis_support.PrivateRedis and SentinelProcess,
    nats_support.PrivateNats, pg_support.PrivatePostgres): a process of the test's own
    (`proc`, signalled by its PID only), its log file, and the wait until it answers after a
    start. A server gives `answers` and `kill`."""

    kind = "server"  # how messages name it
    proc: subprocess.Popen[bytes] | None
    log_path: Path
    port: int

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """End it for good, whatever the test did."""
        if self.running:
            self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_answering(self, timeout: float) -> None:
        """Until it answers; an exit meanwhile fails at once with the end of its log, and a
        server that never answers is killed before the failure."""

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.kind} exited with {self.proc.returncode}: {self.log()[-3000:]}"
                )
            return self.answers()

        try:
            wait_until(up, timeout, what=f"private {self.kind} on port {self.port} answers")
        except BaseException:
            self.kill()
            raise
