"""Strangers and subscribers cannot exhaust the hub: streams per user and in all are capped
(each a clear JSON error and a metric), a client that never finishes its request head or body
is closed, and at the descriptor limit the hub stops accepting instead of spinning."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import time

import jwt
import pytest
from browser_support import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from bench.flood import closed as closed_by_peer
from bench.flood import healthz

SECRET = "limits-tests-secret-0123456789-abcdefghij"
HUB = [sys.executable, "-m", "handlers.app"]


def refused(metrics_text: str, status: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "hub_streams_refused_total" and sample.labels["status"] == status:
                return sample.value
    raise AssertionError(f"no hub_streams_refused_total{{status={status}}}")


@pytest.mark.gen_test(timeout=10)
async def test_streams_past_the_per_user_cap_are_429_and_counted(hub_server):
    server = await hub_server(max_streams_per_user=2)
    metrics = (await server.fetch("/metrics")).body.decode()
    assert refused(metrics, "429") == 0 and refused(metrics, "503") == 0  # present from the start
    await server.stream("u1")
    await server.stream("u1")
    third = await server.stream("u1")
    assert third.status == 429
    assert third.body["error"].startswith("at most 2 streams per user")
    assert third.headers.get("retry-after") == "3"
    other = await server.stream("u2")
    assert other.status == 200
    metrics = (await server.fetch("/metrics")).body.decode()
    assert refused(metrics, "429") == 1
    assert 'hub_streams_capped_total{limit="per_user"} 1.0' in metrics
    assert 'hub_streams_capped_total{limit="total"} 0.0' in metrics


@pytest.mark.gen_test(timeout=10)
async def test_streams_past_the_total_cap_are_503_and_counted(hub_server):
    server = await hub_server(max_streams=2)
    await server.stream("u1")
    await server.stream("u2")
    third = await server.stream("u3")
    assert third.status == 503 and "most streams (2)" in third.body["error"]
    metrics = (await server.fetch("/metrics")).body.decode()
    assert refused(metrics, "503") == 1
    assert 'hub_streams_capped_total{limit="total"} 1.0' in metrics


def start(port: int, *args: str, nofile: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [*HUB, "--port", str(port), *args],
        env={"HUB_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
    )


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out


def publisher_token() -> str:
    return jwt.encode({"sub": "svc", "exp": int(time.time()) + 60, "publish": True}, SECRET)


def request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes, socket.socket]:
    """Send a request; read its answer's status and body (a stream's: empty, and its socket
    stays open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(head + body)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {raw!r}"
            raw += chunk
        head_bytes, rest = raw.split(b"\r\n\r\n", 1)
        status = int(head_bytes.split(b" ", 2)[1])
        if status == 200 and b"text/event-stream" in head_bytes:
            return status, b"", sock
        length = int(head_bytes.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside the answer"
            rest += chunk
    except BaseException:
        sock.close()
        raise
    return status, rest[:length], sock


def open_stream(port: int, user: str) -> tuple[int, bytes, socket.socket]:
    auth = jwt.encode({"sub": user, "exp": int(time.time()) + 60}, SECRET)
    head = f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\n\r\n"
    return request(port, head.encode())


def publish(port: int, body: bytes) -> tuple[int, dict]:
    head = (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + publisher_token().encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    status, answer, sock = request(port, head, body)
    sock.close()
    return status, json.loads(answer)


def metrics_text(port: int) -> str:
    _, text, sock = request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.close()
    return text.decode()


def metric(port: int, name: str) -> float:
    for family in text_string_to_metric_families(metrics_text(port)):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


def test_streams_leave_room_for_requests_when_they_would_fill_every_connection():
    """With every connection a stream, the hub stopped accepting: publishes and /healthz
    could not get in, and the next stream waited in the backlog instead of getting its
    503. By default streams get the connection limit less a tenth (at least 8)."""
    port = free_port()
    proc = start(port, "--max-connections", "24")
    streams: list[socket.socket] = []
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        for i in range(16):
            status, _, sock = open_stream(port, f"u{i}")
            streams.append(sock)
            assert status == 200
        status, answer, sock = open_stream(port, "u16")
        sock.close()
        assert status == 503 and "most streams (16)" in json.loads(answer)["error"], answer
        assert healthz(port)
        status, published = publish(port, b'{"type": 5, "data": {"n": 1}}')
        assert status == 202, published
        assert refused(metrics_text(port), "503") == 1
        assert metric(port, "hub_connections_open") >= 16
    finally:
        for sock in streams:
            sock.close()
        out = stop(proc)
    assert "Traceback" not in out


@pytest.mark.parametrize("flooded", ["public", "internal"])
def test_a_flood_of_half_open_connections_at_the_descriptor_limit_neither_spins_nor_wedges(
    flooded: str,
):
    """256 descriptors; 400 connections that never send a byte, on the public port or the
    internal publish port. The hub stops accepting at its cap (no EMFILE spin, no traceback
    flood), answers /healthz once the header timeout frees slots, and closes every flood
    connection."""
    port, internal = free_port(), free_port()
    proc = start(port, "--header-timeout", "1", "--internal-port", str(internal), nofile=256)
    target = port if flooded == "public" else internal
    flood: list[socket.socket] = []
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        deadline = time.monotonic() + 10
        while len(flood) < 400 and time.monotonic() < deadline:
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", target))
            flood.append(sock)
        wait_until(lambda: healthz(port), timeout=20, what="/healthz during the flood")
        wait_until(lambda: all(closed_by_peer(s) for s in flood), timeout=30, what="flood closed")
        assert healthz(port)
    finally:
        for sock in flood:
            sock.close()
        out = stop(proc)
    assert proc.returncode is not None
    assert "Traceback" not in out, out[-3000:]
    assert len(out.splitlines()) < 30, out[-3000:]  # a line per interval, not per connection
    assert "not accepting new connections" in out


def test_an_unfinished_publish_body_is_closed_after_the_body_timeout():
    port = free_port()
    proc = start(port, "--body-timeout", "1")
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        publisher = publisher_token()
        socks = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(
                b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + publisher.encode() + b"\r\n"
                b"Content-Length: 1000000\r\n\r\n" + b"[" * 1000
            )
            sock.setblocking(False)
            socks.append(sock)
        wait_until(lambda: all(closed_by_peer(s) for s in socks), timeout=15, what="bodies cut")
        for sock in socks:
            sock.close()
        assert healthz(port)
    finally:
        out = stop(proc)
    assert "Traceback" not in out


def test_a_request_head_that_trickles_in_is_cut_after_the_header_timeout():
    """The header timeout bounds the whole head, not the pause between two bytes: a client
    sending a header line every 0.2 s (slowloris) is closed all the same."""
    port = free_port()
    proc = start(port, "--header-timeout", "1")
    sock = socket.socket()
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        cut = False
        for i in range(50):  # 10 s of trickle at most
            try:
                sock.sendall(b"X-Trickle-%d: y\r\n" % i)
            except OSError:
                cut = True
                break
            if closed_by_peer(sock):
                cut = True
                break
            time.sleep(0.2)  # the trickle's pace, not a synchronisation
        assert cut, "the hub kept a trickling request head open for 10 s"
    finally:
        sock.close()
        out = stop(proc)
    assert "Traceback" not in out


def test_a_client_that_takes_no_answers_is_cut_after_slow_after():
    """A client that pipelines requests for a static file and reads nothing held its
    connection for ever once the kernel's buffers were full: no header timeout applies (the
    hub is writing, not waiting for a request) and Tornado has no write timeout. Such
    connections fill --max-connections as surely as half-open ones. Now the kernel aborts
    a connection that takes nothing for --slow-after seconds."""
    port = free_port()
    proc = start(port, "--slow-after", "2", "--header-timeout", "120")
    reader = socket.socket()
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        reader.connect(("127.0.0.1", port))
        # ~9 MB of answers: more than the kernel buffers of both ends hold
        reader.sendall(b"GET /static/hub.js HTTP/1.1\r\nHost: x\r\n\r\n" * 700)
        wait_until(
            lambda: metric(port, "hub_connections_open") == 2, timeout=10, what="reader open"
        )
        wait_until(lambda: metric(port, "hub_connections_open") == 1, timeout=20, what="reader cut")
    finally:
        reader.close()
        out = stop(proc)
    assert "Traceback" not in out and "WARNING" not in out, out[-3000:]


def test_a_stream_that_stops_reading_is_still_cut_as_slow_not_aborted_by_the_kernel():
    """Streams clear the kernel's timeout that every accepted connection gets: the flusher
    cuts them, and counts the reason."""
    port = free_port()
    proc = start(port, "--slow-after", "2")
    stream = socket.socket()
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stream.connect(("127.0.0.1", port))
        auth = jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, SECRET)
        stream.sendall(
            f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\n\r\n".encode()
        )
        wait_until(lambda: metric(port, "hub_streams_open") == 1, timeout=10, what="stream")
        event = {"type": 5, "data": {"pad": "x" * 4000}}
        for _ in range(8):  # ~6 MB: more than both ends' buffers
            status, answer = publish(port, json.dumps([event] * 200).encode())
            assert status == 202, answer
        wait_until(lambda: metric(port, "hub_streams_open") == 0, timeout=20, what="cut")
        text = metrics_text(port)
        assert 'hub_disconnects_total{reason="slow"} 1.0' in text, text
    finally:
        stream.close()
        out = stop(proc)
    assert "Traceback" not in out


@pytest.mark.parametrize("path", ["/healthz", "/events", "/static/hub.js", "/no/such/route"])
@pytest.mark.parametrize("framing", ["Content-Length: 2000000", "Transfer-Encoding: chunked"])
def test_a_body_sent_to_a_route_that_takes_none_is_refused_at_its_head(path: str, framing: str):
    """Tornado reads a body in full before a handler runs, with no timeout: a stranger (no
    token) sending GET with most of a 2 MB body held 2 MB per connection for ever. Now every
    route but the publish one answers such a request at its head: a JSON 413 (404 for a
    route that does not exist), the body unread, the connection closed."""
    port = free_port()
    proc = start(port)
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode()
        status, body, sock = request(port, head, b"400\r\n" + b"x" * 1024)
        with sock:
            if path == "/no/such/route":
                assert status == 404, body
                assert json.loads(body) == {"error": f"no such endpoint: GET {path}"}
            else:
                assert status == 413, body
                assert json.loads(body) == {
                    "error": f"GET {path} takes no request body",
                    "limit": 0,
                }
            sock.setblocking(False)
            wait_until(lambda: closed_by_peer(sock), timeout=10, what="connection closed")
        assert metric(port, "hub_connections_open") == 1  # this request's own
    finally:
        out = stop(proc)
    assert "Traceback" not in out


def send_part_of_a_body(port: int, length: int, part: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + publisher_token().encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % length + b" " * part
    )
    return sock


def test_bodies_in_progress_hold_at_most_max_body_memory_and_give_it_back():
    """Half-sent bodies each within --max-body held the sum of them all (200 x 1 MiB: 209 MB)
    until their connection closed. Now they share --max-body-memory: the body that would go
    over it is a 503 with Retry-After, and bodies cut by the body timeout give their bytes
    back (hub_publish_body_bytes returns to 0, a publish is taken again)."""
    port = free_port()
    mib = 1024 * 1024
    proc = start(port, "--body-timeout", "2", "--max-body-memory", str(2 * mib))
    held: list[socket.socket] = []
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        for _ in range(2):
            held.append(send_part_of_a_body(port, mib, 900_000))
        wait_until(
            lambda: metric(port, "hub_publish_body_bytes") == 1_800_000,
            timeout=10,
            what="both bodies held",
        )
        over = send_part_of_a_body(port, mib, 300_000)
        with over:
            over.settimeout(5)
            raw = b""
            while chunk := over.recv(65536):
                raw += chunk
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503"), raw[:300]
        assert b"Retry-After: 3" in head
        assert "--max-body-memory 2097152" in json.loads(body)["error"]
        assert metric(port, "hub_publish_body_bytes") == 1_800_000
        wait_until(lambda: all(closed_by_peer(s) for s in held), timeout=15, what="bodies cut")
        assert metric(port, "hub_publish_body_bytes") == 0
        status, answer = publish(port, b'{"type": 5, "data": {"n": 1}}')
        assert status == 202, answer
    finally:
        for sock in held:
            sock.close()
        out = stop(proc)
    assert "Traceback" not in out


def test_limits_are_flags_with_environment_variables_and_refuse_nonsense():
    from hub.config import ConfigError, parse_config

    config = parse_config(["--max-streams-per-user", "5"], {"HUB_HEADER_TIMEOUT": "3"})
    assert (config.max_streams_per_user, config.header_timeout) == (5, 3.0)
    assert config.connection_limit(1024) == 1024 - 64
    assert parse_config(["--max-connections", "100"], {}).stream_limit(1024) == 100 - 10
    assert config.stream_limit(100_000) == 100_000 - 64 - 1024
    assert parse_config(["--max-streams", "7"], {}).stream_limit(1024) == 7
    for bad in (
        ["--max-streams-per-user", "0"],
        ["--max-connections", "-1"],
        ["--body-timeout", "0"],
        ["--max-body", "2000", "--max-body-memory", "1999"],
    ):
        with pytest.raises(ConfigError):
            parse_config(bad, {})
    assert json.dumps(config.max_streams) == "0"


def test_every_number_setting_refuses_nan_and_infinity_from_flags_and_variables():
    # NaN passes `< 0` and `<= 0` alike: a NaN ticket TTL or timeout used to be taken.
    import dataclasses

    from hub.config import Config, ConfigError, parse_config

    floats = [f.name for f in dataclasses.fields(Config) if "float" in str(f.type)]
    assert {"ticket_ttl", "shutdown_spread", "heartbeat", "revoke_ttl"} <= set(floats)
    for name in floats:
        flag = "--" + name.replace("_", "-")
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match="finite"):
                parse_config([f"{flag}={value}"], {})
            with pytest.raises(ConfigError, match="finite"):
                parse_config([], {"HUB_" + name.upper(): value})
