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
    assert refused((await server.fetch("/metrics")).body.decode(), "429") == 1


@pytest.mark.gen_test(timeout=10)
async def test_streams_past_the_total_cap_are_503_and_counted(hub_server):
    server = await hub_server(max_streams=2)
    await server.stream("u1")
    await server.stream("u2")
    third = await server.stream("u3")
    assert third.status == 503 and "most streams (2)" in third.body["error"]
    assert refused((await server.fetch("/metrics")).body.decode(), "503") == 1


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


def test_a_flood_of_half_open_connections_at_the_descriptor_limit_neither_spins_nor_wedges():
    """256 descriptors; 400 connections that never send a byte. The hub stops accepting at
    its cap (no EMFILE spin, no traceback flood), answers /healthz once the header timeout
    frees slots, and closes every flood connection."""
    port = free_port()
    proc = start(port, "--header-timeout", "1", nofile=256)
    flood: list[socket.socket] = []
    try:
        wait_until(lambda: healthz(port), timeout=15, what="hub healthy")
        deadline = time.monotonic() + 10
        while len(flood) < 400 and time.monotonic() < deadline:
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
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
        publisher = jwt.encode(
            {"sub": "svc", "exp": int(time.time()) + 60, "publish": True}, SECRET
        )
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


def test_limits_are_flags_with_environment_variables_and_refuse_nonsense():
    from hub.config import ConfigError, parse_config

    config = parse_config(["--max-streams-per-user", "5"], {"HUB_HEADER_TIMEOUT": "3"})
    assert (config.max_streams_per_user, config.header_timeout) == (5, 3.0)
    assert config.connection_limit(1024) == 1024 - 64
    assert parse_config(["--max-connections", "100"], {}).stream_limit(1024) == 100
    for bad in (
        ["--max-streams-per-user", "0"],
        ["--max-connections", "-1"],
        ["--body-timeout", "0"],
    ):
        with pytest.raises(ConfigError):
            parse_config(bad, {})
    assert json.dumps(config.max_streams) == "0"
