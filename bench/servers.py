"""Servers under test: the hub and the nchan reference, each pinned to one core.

Every process started here is remembered by its PID and ended by that PID only
(``stop_all`` on exit, exceptions and Ctrl-C); nothing is ended by name.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STARTED: list[subprocess.Popen[bytes]] = []

NCHAN_MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
)


def raise_nofile() -> None:
    """Raise this process's fd limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (Ctrl-C reaches only us; we end it by PID)."""
    out: Any = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        p = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=raise_nofile,
            cwd=REPO,
        )
    finally:
        if log:
            out.close()
    STARTED.append(p)
    return p


def stop(p: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """End one child we started, by its PID: SIGTERM, then SIGKILL after grace."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass
    if p in STARTED:
        STARTED.remove(p)


def stop_all() -> None:
    for p in list(STARTED):
        try:
            stop(p, grace=2.0)
        except Exception as e:  # keep going: end every one
            print(f"bench: could not stop pid {p.pid}: {e}", file=sys.stderr)


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return int(r.status), bytes(r.read())


def wait_ready(p: subprocess.Popen[Any], url: str, deadline_s: float, log: Path | None) -> None:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if p.poll() is not None:
            break
        try:
            status, _ = http_get(url, 0.5)
            if status == 200:
                return
        except Exception as e:
            last = e
        time.sleep(0.05)
    tail = ""
    if log and log.exists():
        tail = log.read_text(errors="replace")[-3000:]
    rc = p.poll()
    stop(p)
    raise RuntimeError(
        f"server not ready at {url} within {deadline_s}s (exit code {rc}, last error {last})\n"
        f"{tail}"
    )


class Server:
    name = "?"
    pid: int
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        if self.log and self.log.exists():
            return self.log.read_text(errors="replace")[-n:]
        return ""


def hub_help() -> str:
    exe = REPO / ".venv" / "bin" / "hub"
    if not exe.exists():
        return ""
    try:
        r = subprocess.run(
            [str(exe), "--help"], capture_output=True, timeout=20, cwd=REPO, text=True
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout + r.stderr if r.returncode == 0 else ""


class RedisServer(Server):
    """A private redis-server for the Redis broker's scenarios (no persistence), pinned to a
    core; emptied before each scenario."""

    name = "redis"

    def __init__(self, tmp: Path, core: int) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.port = free_port()
        self.log = tmp / f"redis-{self.port}.log"
        argv = ["taskset", "-c", str(core), exe, "--bind", "127.0.0.1", "--port", str(self.port)]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
        self.proc = spawn(argv, log=self.log)
        self.pid = self.proc.pid
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while self.command(b"PING") != b"+PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {self.log_tail()}")
            time.sleep(0.05)

    def command(self, *words: bytes) -> bytes:
        """One inline command, its first reply line (b"" when the server does not answer)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
                c.sendall(b" ".join(words) + b"\r\n")
                return c.recv(4096).split(b"\r\n")[0]
        except OSError:
            return b""


class HubServer(Server):
    name = "hub"

    def __init__(
        self,
        tmp: Path,
        secret: str,
        core: int | str,
        loop: str | None,
        extra: list[str],
        help_text: str,
        cmd: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.log = tmp / f"hub-{self.port}.log"
        env = dict(os.environ)
        env["HUB_JWT_SECRET"] = secret
        argv = ["taskset", "-c", str(core), *(cmd or [str(REPO / ".venv" / "bin" / "hub")])]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        if loop:
            env["HUB_LOOP"] = loop
            if re.search(r"--loop\b", help_text):
                argv += ["--loop", loop]
        argv += extra
        self.argv = argv
        self.proc = spawn(argv, env=env, log=self.log)
        self.pid = self.proc.pid  # taskset execs the hub: same PID
        wait_ready(self.proc, f"http://127.0.0.1:{self.port}/healthz", 30.0, self.log)


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
load_module {module};

events {{
    worker_connections {conns};
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_buffer_size 64k;
    nchan_shared_memory_size 256M;

    server {{
        listen 127.0.0.1:{port};

        # EventSource subscriber: one channel per stream's ?chan= (broadcast: chan=all;
        # private routing: chan=u<N>, one channel per user)
        location = /sub {{
            nchan_subscriber eventsource;
            nchan_channel_id $arg_chan;
            nchan_subscriber_first_message newest;
        }}

        location = /pub {{
            nchan_publisher;
            nchan_channel_id $arg_chan;
            nchan_message_buffer_length 10;
            nchan_message_timeout 60s;
        }}

        location = /nchan_status {{
            nchan_stub_status;
        }}
    }}
}}
"""


def nchan_module() -> str | None:
    for c in NCHAN_MODULE_CANDIDATES:
        if os.path.exists(c):
            return c
    return None


def nginx_available() -> str | None:
    exe = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if exe and nchan_module():
        return exe
    return None


class NchanServer(Server):
    name = "nchan"

    def __init__(self, tmp: Path, core: int) -> None:
        exe = nginx_available()
        module = nchan_module()
        if not exe or not module:
            raise RuntimeError("nginx or the nchan module is not installed")
        self.port = free_port()
        d = tmp / f"nchan-{self.port}"
        d.mkdir(parents=True, exist_ok=True)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf = d / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=d, module=module, port=self.port, nofile=nofile, conns=min(20000, nofile - 100)
            )
        )
        self.log = d / "stderr.log"
        argv = ["taskset", "-c", str(core), exe, "-p", str(d), "-c", str(conf)]
        argv += ["-e", str(d / "error.log")]
        self.argv = argv
        self.proc = spawn(argv, log=self.log)
        self.pid = self.proc.pid  # master_process off: this one process serves
        wait_ready(self.proc, f"http://127.0.0.1:{self.port}/nchan_status", 15.0, self.log)

    def log_tail(self, n: int = 2000) -> str:
        assert self.log is not None
        err = self.log.parent / "error.log"
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if err.exists():
            text += err.read_text(errors="replace")
        return text[-n:]
