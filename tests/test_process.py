"""The `hub` command as a user runs it: a real process, real flags and variables."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import jwt
import pytest
from browser_support import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

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


def metric(url: str, name: str) -> float:
    """One unlabelled sample of the hub's /metrics, as Prometheus parses it."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not in /metrics")


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


# -- graceful shutdown ----------------------------------------------------------------------


def read_all(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """What the hub writes on a socket until it closes it."""
    return read_until(sock, b"never-sent", timeout)


def stream_ids_and_retries(raw: bytes) -> tuple[list[str], list[int]]:
    """The ids of the events (blocks with data) and every `retry:` value of a stream body."""
    ids, retries = [], []
    for block in raw.split(b"\r\n\r\n", 1)[-1].split(b"\n\n"):
        lines = block.split(b"\n")
        fields = dict(line.split(b": ", 1) for line in lines if b": " in line)
        if b"data" in fields and b"id" in fields:
            ids.append(fields[b"id"].decode())
        retries += [int(line[7:]) for line in lines if line.startswith(b"retry: ")]
    return ids, retries


def drain_output(proc: subprocess.Popen) -> list[str]:
    """Read the process's output as it comes (a full pipe would block its logging)."""
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    thread.start()
    return out


@pytest.mark.parametrize("demo", [False, True], ids=["keyed", "demo"])
def test_sigterm_with_streams_and_publishes_in_flight_exits_0_owing_no_accepted_event(
    start_hub, demo
):
    """Publishers keep publishing through the signal, a body is half sent: every event
    answered 202 reaches every stream, each stream ends with a `retry:` in [retry, retry +
    spread], the exit is 0 within --shutdown-timeout, and the log has no error."""
    port = free_port()
    args = ["--port", str(port), "--retry", "1", "--shutdown-spread", "2"]
    args += ["--shutdown-timeout", "8"]
    proc = start_hub(*args, "--demo", env={}) if demo else start_hub(*args)
    output = drain_output(proc)
    wait_until(lambda: healthy(port), what="hub healthy")
    url = f"http://127.0.0.1:{port}"
    if demo:  # its own secret: tokens from /demo/token; the streams get its log events too
        token = get(f"{url}/demo/token?user=u1")[1]["token"]
        publisher = get(f"{url}/demo/token?role=publisher")[1]["token"]
    else:
        exp = int(time.time()) + 60
        token = jwt.encode({"sub": "u1", "exp": exp, "topics": ["*"]}, SECRET, algorithm="HS256")
        publisher = jwt.encode({"sub": "svc", "exp": exp, "publish": True}, SECRET, "HS256")
    streams = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(
            b"GET /events?topic=logs HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        opening = read_until(sock, b": hub stream open")
        assert b": hub stream open" in opening
        streams.append((sock, opening))

    accepted: list[str] = []
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {publisher}"}
    body = json.dumps([{"type": 5, "data": {"n": i}} for i in range(50)]).encode()

    def publish_until_refused() -> None:
        while True:
            try:
                status, answer = post(f"{url}/publish", body, **headers)
            except OSError:  # the listener is closed: the hub is going
                return
            if status == 202:
                accepted.extend(answer["ids"])
            elif status != 503:
                raise AssertionError((status, answer))

    publishers = [threading.Thread(target=publish_until_refused) for _ in range(2)]
    for thread in publishers:
        thread.start()
    wait_until(lambda: len(accepted) >= 500, what="publishes accepted")
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    # Half a body of 1,000,000 bytes: far more than the publishers' bodies (~2.5 KB each) that
    # the hub may hold at the same time, so the gauge shows when the hub holds this one.
    half.sendall(
        f"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {publisher}\r\n"
        f"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n".encode()
        + b"["
        + b" " * 499_999
    )
    wait_until(
        lambda: metric(url, "hub_publish_body_bytes") >= 500_000, what="the half body is held"
    )
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    bodies = [opening + read_all(sock) for sock, opening in streams]
    assert proc.wait(timeout=10) == 0
    took = time.monotonic() - started
    for thread in publishers:
        thread.join(timeout=10)
    half.close()
    for sock, _ in streams:
        sock.close()
    assert took < 8, took
    for raw in bodies:
        ids, retries = stream_ids_and_retries(raw)
        assert set(accepted) <= set(ids), len(set(accepted) - set(ids))
        assert retries[0] == 1000 and 1000 <= retries[-1] <= 3000, retries
        # the last things it got: the retry, then the end frame (code 4000, reconnect)
        assert raw.rsplit(b"event: end\ndata: ", 1)[0].endswith(b"retry: %d\n\n" % retries[-1])
        assert b'"code":4000' in raw.rsplit(b"event: end\ndata: ", 1)[1]
        assert raw.endswith(b"}\n\n")
    out = output[0] if output else proc.stdout.read()
    assert "shutting down: closing 4 streams" in out
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]


def test_a_client_that_takes_nothing_cannot_hold_the_shutdown_past_its_deadline(start_hub):
    """A stream owed megabytes whose client reads nothing would hold the close for its grace
    (5 s): --shutdown-timeout 2 cuts it and the exit is still 0, while a reading stream gets
    everything. Meanwhile, on a connection opened before the signal, /readyz, a new stream
    and a publish are 503 at once."""
    port = free_port()
    proc = start_hub("--port", str(port), "--shutdown-timeout", "2")
    output = drain_output(proc)
    wait_until(lambda: healthy(port), what="hub healthy")
    exp = int(time.time()) + 60
    token = jwt.encode({"sub": "u1", "exp": exp}, SECRET, algorithm="HS256")
    publisher = jwt.encode({"sub": "svc", "exp": exp, "publish": True}, SECRET, "HS256")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    stuck.sendall(
        f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    reader = open_stream(port, token)
    assert b"retry:" in read_until(reader, b"\n\n")
    got: list[bytes] = []
    reading = threading.Thread(target=lambda: got.append(read_all(reader, 20)), daemon=True)
    reading.start()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {publisher}"}
    body = json.dumps([{"type": 5, "data": "x" * 1000}] * 400).encode()
    ids = []
    for _ in range(10):  # 4 MB for each stream
        status, answer = post(f"http://127.0.0.1:{port}/publish", body, **headers)
        assert status == 202, answer
        ids += answer["ids"]
    # connections opened before the signal (the listener closes at once), one a request
    kept = []
    for _ in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read()
        kept.append(connection)

    def on_kept(i: int, method: str, path: str, **extra: str) -> int:
        payload = b'{"type": 5}' if method == "POST" else None
        kept[i].request(method, path, body=payload, headers=extra)
        response = kept[i].getresponse()
        response.read()
        return response.status

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: on_kept(0, "GET", "/readyz") == 503, 1.0, what="/readyz 503 at once")
    assert on_kept(1, "GET", "/events", Authorization=f"Bearer {token}") == 503
    assert on_kept(2, "POST", "/publish", **headers) == 503
    assert proc.wait(timeout=10) == 0
    took = time.monotonic() - started
    reading.join(timeout=10)
    stuck.close()
    reader.close()
    for connection in kept:
        connection.close()
    assert 1.0 < took < 3.0, took  # it waited for the stuck client, up to the deadline
    received, retries = stream_ids_and_retries(got[0])
    assert received == ids and 3000 <= retries[-1] <= 13000
    out = output[0] if output else ""
    assert "shutdown took more than --shutdown-timeout (2s)" in out, out[-2000:]
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]
