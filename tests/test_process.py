"""The `hub` command as a user runs it: a real process, real flags and variables."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import jwt
import pytest
from browser_support import free_port, wait_until

SECRET = "process-tests-secret-0123456789-abcdefghij"
HUB = [sys.executable, "-m", "handlers.app"]


def get(url: str, **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(url: str, body: bytes, **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def healthy(port: int) -> bool:
    try:
        return get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    except OSError:
        return False


@pytest.fixture
def start_hub() -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        full_env.update({"HUB_JWT_SECRET": SECRET} if env is None else env)
        proc = subprocess.Popen(
            [*HUB, *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_without_a_key_the_hub_refuses_to_start_and_says_how_to_fix_it(start_hub):
    proc = start_hub("--port", str(free_port()), env={})
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "HUB_JWT_SECRET" in out and "--demo" in out


def test_a_short_secret_is_refused(start_hub):
    proc = start_hub("--port", str(free_port()), env={"HUB_JWT_SECRET": "too-short"})
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "at least 32 bytes" in out


def open_stream(port: int, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_ends_open_streams_and_the_process_exits(start_hub):
    port = free_port()
    proc = start_hub("--port", str(port))
    wait_until(lambda: healthy(port), what="hub healthy")
    token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    streams = [open_stream(port, token) for _ in range(5)]
    for s in streams:
        assert b"retry:" in read_until(s, b"\n\n", timeout=5)
    assert wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[1]["streams"] == 5)
    proc.send_signal(signal.SIGTERM)
    for s in streams:
        rest = read_until(s, b"never-sent", timeout=5)  # returns when the hub closes it
        assert b"never-sent" not in rest
        s.close()
    assert proc.wait(timeout=10) == 0


def test_internal_listener_takes_publishes_without_token_and_the_public_port_has_none(start_hub):
    port, internal = free_port(), free_port()
    start_hub("--port", str(port), "--internal-port", str(internal))
    wait_until(lambda: healthy(port), what="hub healthy")
    token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    stream = open_stream(port, token)
    read_until(stream, b"\n\n")
    body = json.dumps({"type": 2, "user": "u1", "data": {"amount": 5}}).encode()
    status, answer = post(
        f"http://127.0.0.1:{internal}/publish", body, **{"Content-Type": "application/json"}
    )
    assert status == 202 and len(answer["ids"]) == 1
    got = read_until(stream, b"\n\n", timeout=5)
    assert f"id: {answer['ids'][0]}".encode() in got and b'"amount":5' in got
    publisher = jwt.encode(
        {"sub": "svc", "exp": int(time.time()) + 60, "publish": True}, SECRET, algorithm="HS256"
    )
    status, answer = post(
        f"http://127.0.0.1:{port}/publish",
        body,
        **{"Content-Type": "application/json", "Authorization": f"Bearer {publisher}"},
    )
    assert status == 404 and "no such endpoint" in answer["error"]
    stream.close()


def test_every_flag_has_an_environment_variable(start_hub):
    port = free_port()
    start_hub(env={"HUB_PORT": str(port), "HUB_DEMO": "1"})
    wait_until(lambda: healthy(port), what="hub healthy on HUB_PORT")
    status, token = get(f"http://127.0.0.1:{port}/demo/token?user=alice")
    assert status == 200 and token["user"] == "alice"
    claims = jwt.decode(token["token"], options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["topics"] == ["*"]


def test_demo_mode_with_a_real_secret_refuses_to_start_and_never_signs_with_it(start_hub):
    """Demo mode hands out tokens to anyone: signed with the real secret, they would be real
    publisher and user tokens."""
    proc = start_hub("--demo", "--port", str(free_port()), env={"HUB_JWT_SECRET": SECRET})
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "never signs with a configured key" in out and "Traceback" not in out


def test_demo_mode_says_at_start_that_anyone_can_get_tokens_and_publish(start_hub):
    port = free_port()
    proc = start_hub("--demo", "--port", str(port), env={})
    wait_until(lambda: healthy(port), what="demo hub healthy")
    # the topics it puts in a token follow the rules of a stream's query (hub.query)
    many = ",".join(f"t{i}" for i in range(5000))
    status, answer = get(f"http://127.0.0.1:{port}/demo/token?topics={many}")
    assert status == 400 and "too many topics" in answer["error"]
    status, answer = get(f"http://127.0.0.1:{port}/demo/token?topics=a,%20b,a,")
    assert status == 200 and answer["topics"] == ["a", "b"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert "DEMO MODE: anyone who can reach this port gets tokens" in out
    assert "to publish" in out
    # a normal stop logs no error: the log producer used to fail on "shutting down"
    assert "Traceback" not in out and " ERROR " not in out, out


def test_event_ids_stay_unique_and_increasing_across_a_restart(start_hub):
    port = free_port()
    publisher = jwt.encode(
        {"sub": "svc", "exp": int(time.time()) + 60, "publish": True}, SECRET, algorithm="HS256"
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {publisher}"}
    body = json.dumps([{"type": 5}, {"type": 5}]).encode()
    ids = []
    for _ in range(2):
        proc = start_hub("--port", str(port))
        wait_until(lambda: healthy(port), what="hub healthy")
        status, answer = post(f"http://127.0.0.1:{port}/publish", body, **headers)
        assert status == 202
        ids += answer["ids"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    keys = [tuple(int(part) for part in i.split("-")) for i in ids]
    assert len(set(ids)) == 4 and keys == sorted(keys)


def raw_request(port: int, request: bytes) -> bytes:
    """Send bytes as they are (what no HTTP client would send) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(2)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"text/event-stream" not in chunks[0]:
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def get_bytes(target: str, headers: str = "") -> str:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n"


def test_a_hostile_run_leaves_no_token_and_no_forged_line_in_the_log(start_hub):
    """Every log line the process writes, at debug level, after requests built to leak a token
    or forge a line: the token never appears, and every line is a record or a traceback line."""
    port = free_port()
    exp = int(time.time()) + 600
    token = jwt.encode({"sub": "u1", "exp": exp, "topics": ["*"]}, SECRET, algorithm="HS256")
    evil = jwt.encode(
        {"sub": "evil\n2026-01-01 00:00:00,000 INFO hub: forged", "exp": exp, "publish": True},
        SECRET,
        algorithm="HS256",
    )
    encoded = "".join(f"%{b:02X}" for b in token.encode())
    proc = start_hub("--port", str(port), "--log-level", "debug")
    wait_until(lambda: healthy(port), what="hub healthy")
    auth = f"Authorization: Bearer {token}\r\n"
    body = '{"type": 99}'
    requests = [
        get_bytes(f"/events?token={token}"),
        get_bytes(f"/events?%74oken={token}"),
        get_bytes(f"/events?token={encoded}"),
        get_bytes("/events?%2574oken=" + token.replace(".", "%252E")),  # encoded twice
        get_bytes(f"/static/nothing-here?token={token}"),
        get_bytes(f"/static/../../etc/passwd?token={token}"),
        get_bytes(f"/nowhere?access_token={token}", auth),
        get_bytes(f"/events?topic=a%0A2026-01-01%20INFO%20hub:%20forged&token={token}"),
        get_bytes("/events?topic=a%0D%0Aforged", auth),
        f"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {evil}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}",
        get_bytes(f"/events?token={token}&level=%0Aforged"),
        get_bytes(f"/{token}"),
        get_bytes("/events", "Authorization: Bearer " + "A" * 70_000 + "\r\n"),
    ]
    for request in requests:
        raw_request(port, request.encode("latin-1"))
    wait_until(lambda: healthy(port), what="hub still healthy after the hostile run")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert token not in out and evil not in out and encoded not in out
    assert token.split(".")[1] not in out  # not even the claims part
    record = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    )
    for line in out.splitlines():
        assert record.match(line) or line.startswith("  | "), line
    assert "forged" in out  # the attempts are in the log, escaped, on their own record's line
