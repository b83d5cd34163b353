"""The deployment the README shows, exercised where this machine allows: the nginx configuration
(deploy/nginx.conf, which the README shows verbatim) in front of a real hub, and the systemd
unit (deploy/hub.service), whose command line is run here without systemd.

nginx is the Debian package (`.ci/run` installs it): each test runs its own nginx as a plain
process (no master, no daemon) on a free loopback port, with a temporary directory for its
files and a self-signed certificate, and stops it by its PID. The configuration is the file's
text with three things replaced, each of which must be found exactly once: the port nginx
listens on (the README's 443), the hub's address (its 8080), and the certificate's paths.
Without nginx these tests fail in CI (`CI=true`) and skip elsewhere, saying so (the rule of
browser_support.require_chromium).

Issue 17, item 8: behind this nginx, a publish the hub refused before its body was in (a 413
at the head, by Content-Length; a 401) came back as nginx's HTML 502 (`writev() failed (32:
Broken pipe) while sending request to upstream`), 18 to 38 of the 74 below: the hub closed the
connection with the body unread, the kernel reset it, and nginx's write of the body failed
before it read the answer. The hub now reads and drops the rest of a refused body, within
bounds (handlers.base.DrainsRefusedBody); the bounds are tested here against the hub alone.

Every wait has a deadline; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from browser_support import SECRET, HubProcess, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from hub.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
UNIT = ROOT / "deploy" / "hub.service"
MAX_BODY = 1024 * 1024  # the hub's default --max-body, which the README's config is written for


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None


def require_nginx() -> str:
    """In CI a missing nginx is a failure; elsewhere the nginx tests skip, and say so."""
    exe = nginx_binary()
    if exe is not None:
        return exe
    if os.environ.get("CI") == "true":
        pytest.fail("nginx is missing; .ci/run installs it (the nginx tests never skip in CI)")
    pytest.skip("nginx is missing (apt-get install nginx-light); in CI (CI=true) this fails")


# -- one source of truth ----------------------------------------------------------------------


def readme_nginx() -> str:
    """The nginx block of the README's "Behind a reverse proxy"."""
    text = README.read_text()
    section = text.split("\n### Behind a reverse proxy\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```nginx\n(.*?)```", section, re.S)
    return block


def test_the_readme_shows_deploy_nginx_conf_as_it_is() -> None:
    assert readme_nginx() == NGINX_CONF.read_text()


def test_the_proxy_limit_is_within_what_the_hub_drains() -> None:
    """A body nginx forwards and the hub refuses is read to its end only up to twice --max-body
    (handlers.base.DRAIN_FACTOR): nginx's client_max_body_size must not be above it, nor
    below --max-body (the hub's 413 says why, with its limit)."""
    from handlers.base import DRAIN_FACTOR

    (size,) = re.findall(r"client_max_body_size (\d+)m;", NGINX_CONF.read_text())
    assert MAX_BODY <= int(size) * 1024 * 1024 <= DRAIN_FACTOR * MAX_BODY


# -- nginx in front of a hub ------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and hub.example.com, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("hub.example.com"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "hub.pem", directory / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx.conf no longer has {old!r} exactly once"
    return text.replace(old, new)


class Nginx:
    """deploy/nginx.conf, served by a private nginx on a free loopback port in front of the
    hub on `hub_port`; HTTPS with a self-signed certificate this client trusts."""

    def __init__(self, directory: Path, hub_port: int) -> None:
        exe = require_nginx()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cert, key = self_signed(directory)
        site = NGINX_CONF.read_text()
        site = replace_once(
            site, "listen 443 ssl http2;", f"listen 127.0.0.1:{self.port} ssl http2;"
        )
        site = replace_once(site, "server 127.0.0.1:8080;", f"server 127.0.0.1:{hub_port};")
        site = replace_once(site, "/etc/ssl/certs/hub.pem", str(cert))
        site = replace_once(site, "/etc/ssl/private/hub.key", str(key))
        (directory / "hub.conf").write_text(site)
        temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(exist_ok=True)
        self.error_log = directory / "error.log"
        self.access_log = directory / "access.log"
        main = f"""
daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 512; }}
http {{
    log_format upstream '$status $request_method $uri upstream=$upstream_status '
                        'sent=$upstream_bytes_sent received=$upstream_bytes_received';
    access_log {self.access_log} upstream;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {directory}/hub.conf;
}}
"""
        (directory / "nginx.conf").write_text(main)
        self.context = ssl.create_default_context(cafile=str(cert))
        argv = [exe, "-p", str(directory), "-c", str(directory / "nginx.conf")]
        with open(directory / "stderr.log", "wb") as out:
            self.proc = subprocess.Popen(
                [*argv, "-e", str(self.error_log)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self._ready, timeout=15, what=f"nginx on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def connection(self, timeout: float = 10.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=timeout
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def logs(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log", "access.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM by PID (a fast stop), SIGKILL if it lingers; always reaped."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def behind_nginx(tmp_path: Path, *hub_args: str) -> Iterator[tuple[HubProcess, Nginx]]:
    require_nginx()
    hub = HubProcess(tmp_path / "hub.log", "--trusted-proxies", "127.0.0.1", *hub_args, demo=False)
    try:
        nginx = Nginx(tmp_path / "nginx", hub.port)
        try:
            yield hub, nginx
        finally:
            nginx.stop()
    finally:
        hub.stop()


def token(**claims: Any) -> str:
    return jwt.encode(
        {"sub": "nginx-test", "exp": int(time.time()) + 3600, **claims}, SECRET, "HS256"
    )


def json_answer(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body)
    answer = json.loads(body)
    assert isinstance(answer, dict) and answer.get("error"), answer
    return answer


HELD = ("01", "08")  # /proc/net/tcp's states ESTABLISHED and CLOSE_WAIT


def hub_connections_from(nginx_side: int) -> int:
    """Loopback TCP connections to port `nginx_side` (the hub's) that the other end (nginx)
    still holds: established, or closed by the hub and not yet by nginx."""
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == nginx_side and fields[3] in HELD:
                    held += 1
    return held


def test_refused_publishes_get_the_hubs_json_answer_through_nginx(tmp_path: Path) -> None:
    """Issue 17, item 8: oversize publishes (413 at the head, by Content-Length) and publishes
    without a valid token (401), each with a body of up to 2m that nginx forwards: one after
    another, eight at once, and after an idle spell in which the hub closed every kept-alive
    connection (nginx opens new ones, whose small TCP windows the body does not fit in), every
    answer is the hub's own JSON, never nginx's 502. A publish after them passes: the
    connections nginx kept after a refusal are sound."""
    # --header-timeout 2: the hub closes idle kept-alive connections within seconds (nginx's
    # keepalive_timeout is 15 s), for the idle spell below.
    with behind_nginx(tmp_path, "--header-timeout", "2") as (hub, nginx):
        publisher = {"Authorization": f"Bearer {token(publish=True)}"}
        oversize = b"[" + b" " * MAX_BODY + b"]"

        def publish(body: bytes, **headers: str) -> tuple[int, dict[str, str], bytes]:
            return nginx.request(
                "POST", "/publish", body, **{"Content-Type": "application/json", **headers}
            )

        def oversize_publish(_: int = 0) -> tuple[int, dict[str, str], bytes]:
            return publish(oversize, **publisher)

        def unauthorized(_: int = 0) -> tuple[int, dict[str, str], bytes]:
            return publish(b"[" + b" " * (MAX_BODY - 2) + b"]", Authorization="Bearer nonsense")

        answers = [oversize_publish() for _ in range(30)]
        answers += [unauthorized() for _ in range(10)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers += list(pool.map(oversize_publish, range(16)))
            answers += list(pool.map(unauthorized, range(8)))
        # The idle spell: every connection between nginx and the hub closed by the hub, and
        # nginx knows it (none left in CLOSE_WAIT on its side).
        wait_until(
            lambda: hub_connections_from(hub.port) == 0,
            timeout=30,
            what="the hub closed the idle connections from nginx, and nginx closed its side",
        )
        answers += [oversize_publish() for _ in range(5)]
        answers += [unauthorized() for _ in range(5)]

        statuses = [status for status, _, _ in answers]
        assert (
            statuses == [413] * 30 + [401] * 10 + [413] * 16 + [401] * 8 + [413] * 5 + [401] * 5
        ), f"{statuses}\n{nginx.logs()}"
        for status, headers, body in answers:
            answer = json_answer(status, headers, body)
            if status == 413:
                assert answer["limit"] == MAX_BODY, answer
        assert "writev() failed" not in nginx.error_log.read_text()

        status, headers, body = publish(
            json.dumps([{"type": 5, "data": "after the refusals"}]).encode(), **publisher
        )
        assert status == 202, (status, body, nginx.logs())


def test_a_body_over_the_proxy_limit_gets_nginxs_413_in_json(tmp_path: Path) -> None:
    """Past client_max_body_size (2m) nginx answers itself, without asking the hub: a 413 in
    JSON too (the config's error_page), never an HTML page."""
    with behind_nginx(tmp_path) as (_hub, nginx):
        body = b"[" + b" " * (2 * MAX_BODY) + b"]"
        status, headers, answer = nginx.request(
            "POST",
            "/publish",
            body,
            **{
                "Content-Type": "application/json",
                "Authorization": f"Bearer {token(publish=True)}",
            },
        )
        assert status == 413, (status, answer)
        assert "client_max_body_size" in json_answer(status, headers, answer)["error"]


def test_a_stream_through_nginx_gets_each_event_and_heartbeat_as_sent(tmp_path: Path) -> None:
    """GET /events through nginx: the heartbeat (`: ping`, every --heartbeat) and an event
    published while the stream is open arrive while the stream stays open, i.e. nginx buffers
    nothing of it."""
    with behind_nginx(tmp_path, "--heartbeat", "0.3") as (hub, nginx):
        conn = nginx.connection(timeout=10)
        try:
            conn.request("GET", "/events", headers={"Authorization": f"Bearer {token()}"})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("Content-Type", "").startswith("text/event-stream")
            hub.wait_streams(1)
            seen: list[bytes] = []

            def read_until(wanted: bytes) -> None:
                deadline = time.monotonic() + 10
                while not any(wanted in line for line in seen):
                    assert time.monotonic() < deadline, f"no {wanted!r} within 10 s: {seen}"
                    # Raw lines, nginx's chunked framing to its client included: the test
                    # looks for what they contain. The socket's timeout bounds each read.
                    line = response.fp.readline()
                    assert line, f"the stream ended before {wanted!r}: {seen}"
                    seen.append(line)

            read_until(b": ping")
            status, _, body = nginx.request(
                "POST",
                "/publish",
                json.dumps([{"type": 5, "data": "through nginx"}]).encode(),
                **{
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {token(publish=True)}",
                },
            )
            assert status == 202, body
            read_until(b"through nginx")
        finally:
            conn.close()


# -- the hub's side of it, without nginx ------------------------------------------------------


def raw_request(port: int, head: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP answer (Content-Length delimited) from `sock`: status line, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed within the answer"
        rest += chunk
    assert len(rest) == length, "more than the answer"
    return status_line, headers, rest


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` (within the socket's timeout)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def publish_head(length: int, *extra: str) -> str:
    lines = [
        "POST /publish HTTP/1.1",
        "Host: hub",
        f"Authorization: Bearer {token(publish=True)}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *extra,
    ]
    return "\r\n".join(lines) + "\r\n\r\n"


def rejected(hub: HubProcess, status: int) -> float:
    with urllib_open(f"{hub.url}/metrics") as text:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "hub_publish_rejected_total" and sample.labels == {
                    "status": str(status)
                }:
                    return float(sample.value)
    raise AssertionError("hub_publish_rejected_total is not in /metrics")


@contextlib.contextmanager
def urllib_open(url: str) -> Iterator[str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        yield response.read().decode()


def test_a_refused_body_is_drained_and_the_connection_kept(tmp_path: Path) -> None:
    """The hub answers 413 at the head, at once (before a byte of the body is sent), reads
    the body that follows to its end without keeping it, and serves the next request on the
    same connection; the refusal is counted once."""
    hub = HubProcess(tmp_path / "hub.log", demo=False)
    try:
        length = MAX_BODY + MAX_BODY // 2
        with raw_request(hub.port, publish_head(length)) as sock:
            status, headers, body = read_answer(sock)
            assert status.startswith("HTTP/1.1 413"), (status, body)
            assert headers.get("connection") != "close", headers
            assert json.loads(body)["limit"] == MAX_BODY
            sock.sendall(b"x" * length)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
            status, _, body = read_answer(sock)
            assert status.startswith("HTTP/1.1 200"), (status, body)
        wait_until(lambda: rejected(hub, 413) == 1, what="the 413 counted once")
    finally:
        hub.stop()


def test_a_refused_body_past_the_bounds_is_not_read(tmp_path: Path) -> None:
    """Past twice --max-body, with `Expect: 100-continue` (nothing sent yet), or chunked, the
    body is not read: the 413 says `Connection: close` and the connection closes after it. A
    drained body that stops coming is cut at --body-timeout, and its 413 still counted."""
    hub = HubProcess(tmp_path / "hub.log", "--body-timeout", "1", demo=False)
    try:
        heads = [
            publish_head(2 * MAX_BODY + 1),
            publish_head(MAX_BODY + 1, "Expect: 100-continue"),
        ]
        for head in heads:
            with raw_request(hub.port, head) as sock:
                status, headers, _ = read_answer(sock)
                assert status.startswith("HTTP/1.1 413"), status  # no 100 Continue first
                assert headers.get("connection") == "close", headers
                assert closed(sock)
        chunked = publish_head(0).replace("Content-Length: 0", "Transfer-Encoding: chunked")
        with raw_request(hub.port, chunked) as sock:
            piece = b" " * 65536
            # The hub may close before it has taken the last bytes: what a body it does not
            # drain gets. Its answer is already on the way.
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                for _ in range(MAX_BODY // len(piece) + 1):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            status, headers, _ = read_answer(sock)
            assert status.startswith("HTTP/1.1 413"), status
            assert headers.get("connection") == "close", headers
        started = time.monotonic()
        with raw_request(hub.port, publish_head(MAX_BODY + 1), timeout=15) as sock:
            status, _, _ = read_answer(sock)
            assert status.startswith("HTTP/1.1 413"), status
            sock.sendall(b"x" * 1000)  # then nothing: the body never ends
            assert closed(sock)
        assert time.monotonic() - started < 10
        wait_until(lambda: rejected(hub, 413) == 4, what="every 413 counted once")
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=20)
async def test_an_error_after_an_early_answer_ends_the_request(hub_server, monkeypatch, caplog):
    """An exception in `prepare` once the body is expected: Tornado's error answer (a 500) goes
    out as an early answer would, then Tornado ends the request; the close that follows is not
    a second end ("finish() called twice")."""
    from hub.auth import Verifier

    server = await hub_server()

    def broken(self: Verifier, token: str | None) -> None:
        raise RuntimeError("a bug in the token check")

    monkeypatch.setattr(Verifier, "verify_publisher", broken)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(publish_head(1000).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 500"), head
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await asyncio.wait_for(reader.readexactly(length), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed: the body was not sent
    finally:
        writer.close()
    assert "finish() called twice" not in caplog.text


# -- the systemd unit -------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections: each key's values in order (a key may repeat), lines continued
    by a trailing backslash joined, comments (# or ;) dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span as these units write it: `30`, `30s`, `1min`, `1min 30s`."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|s|ms)?", value):
        total += float(number) * {"min": 60.0, "s": 1.0, "ms": 0.001, "": 1.0}[unit]
    return total


def test_the_systemd_unit_runs_the_hub_and_stops_it_within_its_timeout(tmp_path: Path) -> None:
    """deploy/hub.service, as systemd would read it (systemd itself cannot run here): it runs
    the `hub` console script with flags the hub accepts, the key from an EnvironmentFile (never
    in the unit), behind the nginx of deploy/nginx.conf (the address nginx proxies to, that
    proxy trusted), stops it with SIGTERM and waits longer than the hub's --shutdown-timeout
    (and the workers supervisor's grace on top), restarts it on failure only, and raises the
    descriptor limit. Its command line, run as a plain process with the key in the environment,
    serves and exits 0 on SIGTERM within that timeout."""
    unit = unit_settings(UNIT.read_text())
    service = unit["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/hub"), argv  # setup.cfg's console script: handlers.app:main
    assert service.get("EnvironmentFile"), "the key comes from an EnvironmentFile"
    assert not any("HUB_JWT_SECRET" in value for value in service.get("Environment", []))
    config = parse_config(argv[1:], {"HUB_JWT_SECRET": SECRET})
    config.require_key()
    assert (service["KillSignal"], service["KillMode"]) == (["SIGTERM"], ["mixed"])
    (stop,) = service["TimeoutStopSec"]
    assert seconds(stop) > config.shutdown_timeout + 5.0  # handlers.app: the supervisor's grace
    assert service["Restart"] == ["on-failure"]
    (nofile,) = service["LimitNOFILE"]
    assert int(nofile.split(":")[-1]) >= 65536
    upstream = re.search(r"server (\S+):(\d+);", NGINX_CONF.read_text())
    assert upstream is not None
    assert (config.host, config.port) == (upstream.group(1), int(upstream.group(2)))
    assert any(str(network) == "127.0.0.1/32" for network in config.trusted_networks())

    port = free_port()
    args = list(argv[1:])
    args[args.index("--port") + 1] = str(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["HUB_JWT_SECRET"] = SECRET
    with open(tmp_path / "hub.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handlers.app", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _healthy(port, proc), timeout=20, what="the unit's command line serving")
        stopped = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=config.shutdown_timeout + 5) == 0
        assert time.monotonic() - stopped <= config.shutdown_timeout
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _healthy(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"exited with {proc.returncode}"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False
