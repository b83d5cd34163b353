"""`hub --workers N` as a user runs it: a supervisor and its forked workers, real processes on
loopback, sharing the port (SO_REUSEPORT) and a real Redis (the shared server under a prefix of
the test's own, deleted afterwards); each worker its own scrape target (--metrics-port P:
worker i on P + i). Every wait has a deadline; processes are signalled by their own PIDs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import jwt
import pytest
import redis
import test_process
from browser_support import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_process import SECRET, get, open_stream, post, read_until

from hub.config import ConfigError, parse_config

start_hub = test_process.start_hub
REDIS = "redis://127.0.0.1:6379/0"

PUBLISHER = jwt.encode(
    {"sub": "workers-tests", "exp": int(time.time()) + 3600, "publish": True},
    SECRET,
    algorithm="HS256",
)


class RedisTarget(NamedTuple):
    url: str
    prefix: str


@pytest.fixture
def redis_url() -> Iterator[RedisTarget]:
    """The shared Redis on 127.0.0.1:6379 and a key prefix of this test's own, whose keys are
    deleted afterwards. No Redis: a failure in CI (CI=true), a skip elsewhere, saying so."""
    client = redis.Redis.from_url(REDIS, socket_timeout=5, socket_connect_timeout=2)
    try:
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            why = f"no Redis answers on 127.0.0.1:6379 ({exc})"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{why}; .ci/run starts one (Redis tests never skip in CI)")
            pytest.skip(f"{why}: start redis-server; in CI (CI=true) this fails")
        prefix = f"test-workers-{uuid.uuid4().hex[:12]}"
        yield RedisTarget(REDIS, prefix)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_ports(n: int) -> int:
    """The first of `n` consecutive free loopback ports (a bounded search)."""
    for _ in range(50):
        first = free_port()
        if first + n - 1 > 65535:
            continue
        probes = []
        try:
            for port in range(first, first + n):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError(f"no {n} consecutive free ports found")


def answers(url: str) -> int:
    """The status of GET url, 0 if nothing answers."""
    try:
        return get(url)[0]
    except OSError:
        return 0


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics of the worker on `port`, read by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(port: int, name: str, **labels: str) -> float:
    return samples(port)[(name, frozenset(labels.items()))]


def start_workers(start, target, *args: str, metrics: int | None = None, env=None):
    """hub --workers 2 on the Redis target, ready (every worker's /readyz 200 when it has a
    metrics port; the public port healthy otherwise). (process, public port)."""
    port = free_port()
    extra = ["--metrics-port", str(metrics)] if metrics is not None else []
    proc = start(
        "--workers",
        "2",
        "--port",
        str(port),
        "--broker",
        target.url,
        "--redis-prefix",
        target.prefix,
        *extra,
        *args,
        env=env,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"hub exited with {proc.returncode}:\n{proc.stdout.read()}")
        if metrics is None:
            return answers(f"http://127.0.0.1:{port}/readyz") == 200
        return all(answers(f"http://127.0.0.1:{metrics + i}/readyz") == 200 for i in (0, 1))

    wait_until(ready, 15, "both workers ready")
    return proc, port


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM to the supervisor: it exits 0, with no traceback; its output."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=25)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    return out


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def stream(sockets: list[socket.socket], port: int, token: str) -> socket.socket:
    """A stream on a new connection, its opening block read."""
    sock = open_stream(port, token)
    sockets.append(sock)
    head = read_until(sock, b"\n\n")
    assert head.startswith(b"HTTP/1.1 200 "), head[:200]
    return sock


def test_two_workers_spread_streams_and_a_publish_reaches_every_one(redis_url, start_hub, sockets):
    metrics = free_ports(2)
    proc, port = start_workers(start_hub, redis_url, metrics=metrics)
    token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    streams = [stream(sockets, port, token) for _ in range(40)]

    def spread() -> tuple[float, float] | None:
        counts = (
            value(metrics, "hub_streams_open"),
            value(metrics + 1, "hub_streams_open"),
        )
        return counts if sum(counts) == 40 else None

    counts = wait_until(spread, 10, "40 streams open on the workers in all")
    assert all(n > 0 for n in counts), counts  # the kernel spread the connections
    for i in (0, 1):
        assert value(metrics + i, "hub_worker_info", worker=str(i), workers="2") == 1
    body = json.dumps({"type": "broadcast", "data": {"tag": "to-all"}}).encode()
    status, answer = post(
        f"http://127.0.0.1:{port}/publish",
        body,
        **{"Content-Type": "application/json", "Authorization": f"Bearer {PUBLISHER}"},
    )
    assert status == 202, answer
    for sock in streams:
        got = read_until(sock, b'"tag":"to-all"')
        assert f"id: {answer['ids'][0]}".encode() in got
    assert {get(f"http://127.0.0.1:{metrics + i}/healthz")[1]["pid"] for i in (0, 1)} != {proc.pid}
    out = stop(proc)
    assert "worker 0 hub: listening" in out and "worker 1 hub: listening" in out
    for sock in streams:  # every worker ended its streams, each with a last retry:
        rest = read_until(sock, b"never-sent")  # returns when the worker closes it
        assert b"retry: " in rest and b"never-sent" not in rest


def test_several_workers_with_the_memory_broker_are_refused_saying_why(start_hub):
    proc = start_hub("--workers", "2", "--port", str(free_port()))
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert out.strip().count("\n") == 0, out
    assert "--workers 2 needs --broker redis://" in out and "one worker" in out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workers", "2", "--port", "0"], "needs a fixed --port, not 0"),
        (["--workers", "2", "--port", "8080", "--internal-port", "0"], "fixed --internal-port"),
        (["--metrics-port", "0"], "--metrics-port must be 1 to 65535, not 0"),
        (["--workers", "2", "--metrics-port", "65535"], "must be 1 to 65534 with --workers 2"),
        (["--port", "9000", "--metrics-port", "9000"], "--metrics-port 9000 takes --port 9000"),
        (["--workers", "3", "--port", "9002", "--metrics-port", "9000"], "9000-9002"),
        (["--internal-port", "9001", "--workers", "2", "--metrics-port", "9000"], "--internal"),
    ],
)
def test_worker_and_metrics_ports_that_cannot_work_are_refused(args, says):
    with pytest.raises(ConfigError) as refused:
        parse_config([*args, "--broker", "redis://127.0.0.1:6379/0"], environ={})
    assert says in str(refused.value)


def test_web_concurrency_sets_the_workers_unless_hub_workers_does():
    env = {"WEB_CONCURRENCY": "3", "HUB_BROKER": "redis://x"}
    assert parse_config([], environ=env).workers == 3
    assert parse_config([], environ={**env, "HUB_WORKERS": "2"}).workers == 2


def test_demo_mode_workers_share_one_secret(redis_url, start_hub, sockets):
    metrics = free_ports(2)
    proc, port = start_workers(start_hub, redis_url, "--demo", metrics=metrics, env={})
    for n in range(16):
        status, answer = get(f"http://127.0.0.1:{port}/demo/token?user=u{n}")  # a new connection
        assert status == 200, answer
        stream(sockets, port, answer["token"])  # 200, whichever worker signed it
    served = [value(metrics + i, "hub_stream_connects_total") for i in (0, 1)]
    assert sum(served) == 16 and all(n > 0 for n in served), served
    out = stop(proc)
    for i in (0, 1):  # both workers signed some of the tokens (demo mode logs every request)
        assert f"worker {i} tornado.access: 200 GET /demo/token" in out


def worker_pid(metrics_port: int) -> int:
    status, health = get(f"http://127.0.0.1:{metrics_port}/healthz")
    assert status == 200, health
    return int(health["pid"])


def new_pid(metrics_port: int, old: int) -> int | None:
    try:
        pid = worker_pid(metrics_port)
    except OSError:
        return None
    return pid if pid != old else None


def test_a_killed_worker_is_restarted_and_its_metrics_port_answers_again(redis_url, start_hub):
    metrics = free_ports(2)
    proc, _ = start_workers(start_hub, redis_url, metrics=metrics)
    killed = worker_pid(metrics + 1)
    os.kill(killed, signal.SIGKILL)  # a worker of the hub this test started
    restarted = wait_until(lambda: new_pid(metrics + 1, killed), 10, "worker 1 restarted")
    assert value(metrics + 1, "hub_worker_info", worker="1", workers="2") == 1
    wait_until(lambda: answers(f"http://127.0.0.1:{metrics + 1}/readyz") == 200, 10, "ready")
    out = stop(proc)
    assert f"worker 1 (pid {killed}) was killed by SIGKILL" in out
    assert f"restarted as pid {restarted}" in out


def test_workers_that_keep_dying_at_once_make_the_supervisor_give_up(redis_url, start_hub):
    from handlers.workers import MAX_QUICK_DEATHS

    metrics = free_ports(2)
    proc, _ = start_workers(start_hub, redis_url, metrics=metrics)
    pid = worker_pid(metrics)
    killed: list[int] = []
    while proc.poll() is None and len(killed) < MAX_QUICK_DEATHS + 1:  # bounded
        os.kill(pid, signal.SIGKILL)  # a worker of the hub this test started
        killed.append(pid)
        replaced = wait_until(
            lambda old=pid: proc.poll() is not None or new_pid(metrics, old), 10, "restart"
        )
        if proc.poll() is not None:
            break
        pid = int(replaced)
    assert len(killed) == MAX_QUICK_DEATHS
    out, _ = proc.communicate(timeout=25)
    assert proc.returncode == 1, out
    assert out.splitlines()[-1].startswith("hub: error: workers keep dying within"), out
    assert "giving up" in out and "Traceback" not in out
    assert answers(f"http://127.0.0.1:{metrics + 1}/healthz") == 0  # the other one stopped too


def test_a_busy_port_makes_the_supervisor_exit_with_one_clear_line(redis_url, start_hub):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = start_hub(
            "--workers",
            "2",
            "--port",
            str(port),
            "--broker",
            redis_url.url,
            "--redis-prefix",
            redis_url.prefix,
        )
        out, _ = proc.communicate(timeout=25)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("hub: error:")]
    assert len(errors) == 1, out
    assert f"cannot listen on 127.0.0.1:{port} (--port): Address already in use" in errors[0]
    assert "Traceback" not in out


SUPERVISE = """
import os, sys, time
from handlers.workers import CannotStart, supervise

where = sys.argv[1]

def run(index):
    open(os.path.join(where, f"ready-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 10
    while not os.path.exists(os.path.join(where, "go")) and time.monotonic() < deadline:
        time.sleep(0.01)  # a fake worker waiting for the test's word, within a deadline
    raise CannotStart(f"cannot listen on port {index}: taken")

sys.exit(supervise(3, run, grace=5.0))
"""


def zombie(pid: int) -> bool:
    """Linux: `pid` has ended and waits for its parent to reap it."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "Z"


def test_workers_that_fail_to_start_together_give_one_line_and_no_wait(tmp_path):
    """Three workers that cannot start, reaped by one waitpid pass (the supervisor is stopped
    while they end): it signals and waits for none of them. It once waited out its grace for
    workers it had already reaped, then died on a traceback."""
    proc = subprocess.Popen(
        [*test_process.HUB[:1], "-c", SUPERVISE, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def ready() -> list[int]:
        return [int(p.name.split("-")[1]) for p in tmp_path.glob("ready-*")]

    try:
        pids = wait_until(lambda: len(ready()) == 3 and ready(), 10, "three workers")
        os.kill(proc.pid, signal.SIGSTOP)  # the supervisor this test started
        (tmp_path / "go").touch()
        wait_until(lambda: all(zombie(pid) for pid in pids), 10, "the three workers ended")
        os.kill(proc.pid, signal.SIGCONT)
        started = time.monotonic()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 1, (out, err)
    assert err.startswith("hub: error: worker 0: cannot listen on port 0: taken"), err
    assert err.count("hub: error:") == 1 and "Traceback" not in err, err
    assert time.monotonic() - started < 4.0  # not the 5-s grace


def test_public_metrics_with_workers_and_no_metrics_port_is_a_404_saying_why(redis_url, start_hub):
    proc, port = start_workers(start_hub, redis_url)
    status, answer = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 404
    assert answer["error"].startswith("no such endpoint: GET /metrics")
    assert "each worker is its own scrape target" in answer["error"]
    assert "--metrics-port" in answer["error"]
    out = stop(proc)
    assert out.count("without --metrics-port") == 1  # said once, by the supervisor


def test_a_metrics_port_with_one_worker_moves_metrics_off_the_public_port(start_hub):
    port, metrics = free_port(), free_port()
    proc = start_hub("--port", str(port), "--metrics-port", str(metrics))
    wait_until(lambda: answers(f"http://127.0.0.1:{metrics}/readyz") == 200, 10, "metrics port")
    assert value(metrics, "hub_worker_info", worker="0", workers="1") == 1
    assert get(f"http://127.0.0.1:{metrics}/healthz")[1]["pid"] == proc.pid  # no fork
    status, answer = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 404
    assert f"http://127.0.0.1:{metrics}/metrics" in answer["error"]
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics}/events", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404  # the metrics port serves operations only
    else:
        raise AssertionError("the metrics port served /events")
    stop(proc)
