"""Issue 9's faults, against real processes: `hub` processes (`python -m handlers.app`, as
browser_support.HubProcess starts them) sharing a real Redis, the shared server under a prefix
of the test's own or a private `redis-server` that the test stops and restarts. Clients are
raw SSE clients over loopback sockets (tests/sse.py). Every wait has a deadline; processes are
signalled by their own PIDs only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis_support
from browser_support import SECRET, HubProcess, http_json, hub_processes, readyz_of, wait_until
from redis_support import PrivateRedis, RedisTarget
from sse import SSEClient, SSEEvent, http_request, wait_for

from hub.history import parse_id

redis_url = redis_support.redis_url
private_redis = redis_support.private_redis

PUBLISHER = jwt.encode(
    {"sub": "fault-tests", "exp": int(time.time()) + 3600, "publish": True},
    SECRET,
    algorithm="HS256",
)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


def readyz(hub: HubProcess) -> int:
    return readyz_of(hub)[0]


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """Start hub processes on a Redis target (browser_support.hub_processes: each ended at
    teardown, its log printed)."""
    with hub_processes(tmp_path) as start:

        def on(target: RedisTarget, *args: str, ready: bool = True) -> HubProcess:
            return start(*target.hub_args(), *args, ready=ready)

        yield on


def token(user: str, iat: float | None = None) -> str:
    claims: dict[str, Any] = {"sub": user, "exp": int(time.time()) + 600}
    if iat is not None:
        claims["iat"] = iat
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def post(hub: HubProcess, body: Any) -> tuple[int, Any]:
    answer = await http_request(
        hub.port,
        "POST",
        "/publish",
        {"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"},
        json.dumps(body).encode(),
    )
    return answer.status, answer.json()


async def publish(hub: HubProcess, body: Any) -> list[str]:
    status, answer = await post(hub, body)
    assert status == 202, (status, answer)
    return list(answer["ids"])


async def status_of(hub: HubProcess, path: str) -> int:
    return (await http_request(hub.port, "GET", path)).status


class Streams:
    """Every stream a scenario opens, closed at its end whatever happened."""

    def __init__(self) -> None:
        self.opened: list[SSEClient] = []

    async def __aenter__(self) -> Streams:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.opened:
            await client.aclose()

    async def connect(self, hub: HubProcess, bearer: str, last_id: str | None = None) -> SSEClient:
        """GET /events with this token; the answer, whatever its status."""
        headers = {"Authorization": f"Bearer {bearer}"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        client = await SSEClient.connect(hub.port, "/events", headers)
        self.opened.append(client)
        return client

    async def open(self, hub: HubProcess, user: str, last_id: str | None = None) -> SSEClient:
        """An open stream of `user` (its own events and broadcasts), after its opening."""
        client = await self.connect(hub, token(user), last_id)
        assert client.status == 200, (client.status, client.body)
        assert await client.wait_until(lambda: "hub stream open" in client.comments)
        return client


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (R, S, T for stopped...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def ids_of(events: list[SSEEvent]) -> list[str]:
    return [e.id for e in events]


def key(event_id: str) -> tuple[int, int]:
    position = parse_id(event_id)
    assert position is not None, event_id
    return position


def test_a_publish_reaches_the_other_hub_and_a_client_resumes_there_exactly(redis_url, hubs):
    a = hubs(redis_url)
    b = hubs(redis_url)

    async def scenario() -> None:
        async with Streams() as streams:
            on_a = await streams.open(a, "u1")
            on_b = await streams.open(b, "u2")
            first = await publish(a, [{"type": 5, "data": n} for n in range(3)])
            assert ids_of(await on_b.events(3)) == first  # A's publish, on B
            assert ids_of(await on_a.events(3)) == first
            on_a.close()  # the client read three events from A and goes away
            missed = await publish(b, [{"type": 2, "user": "u1", "data": {"n": 1}}])
            missed += await publish(a, [{"type": 5, "data": "x"}, {"type": 5, "data": "y"}])
            missed += await publish(b, [{"type": 2, "user": "u2", "data": {"n": 2}}])
            entitled = missed[:3]  # u2's payment is not u1's
            resumed = await streams.open(b, "u1", last_id=first[-1])
            assert ids_of(await resumed.events(3)) == entitled
            live = await publish(a, [{"type": 5, "data": "live"}])
            event = await resumed.next_event()
            assert event.id == live[0] and event.event == "broadcast"
            assert [e.event for e in resumed.received] == ["payment"] + ["broadcast"] * 3
            # no duplicate: nothing more comes, and the whole run is each id once, in order
            with pytest.raises(TimeoutError):
                await resumed.next_event(timeout=0.3)
            seen = ids_of(on_a.received) + ids_of(resumed.received)
            assert seen == first + entitled + live
            # B's own client got what it is entitled to, in the same order
            assert ids_of(await on_b.events(4)) == [*missed[1:], live[0]]

    run(scenario)


def test_redis_stopping_and_returning(private_redis: PrivateRedis, hubs):
    """Redis stops: readiness turns 503, publishes and new streams are refused (503 JSON),
    open streams stay open with heartbeats; it returns: publishes and delivery resume in the
    same processes, and every event that was answered 202 arrives."""
    target = private_redis.target()
    a = hubs(target, "--heartbeat", "0.3")
    b = hubs(target, "--heartbeat", "0.3")
    pids = (a.proc.pid, b.proc.pid)

    def pinged(client: SSEClient, more_than: int) -> Callable[[], bool]:
        return lambda: client.comments.count("ping") > more_than

    async def scenario() -> None:
        async with Streams() as streams:
            clients = [await streams.open(a, "u1"), await streams.open(b, "u1")]
            before = await publish(a, [{"type": 5, "data": n} for n in range(3)])
            before += await publish(b, [{"type": 2, "user": "u1", "data": {"n": 1}}])
            for client in clients:
                assert ids_of(await client.events(4)) == before

            private_redis.stop()
            for hub in (a, b):
                assert await wait_for(lambda h=hub: readyz(h) == 503, 5), "readyz still 200"
                status, answer = await post(hub, [{"type": 5, "data": "refused"}])
                assert status == 503 and "not published" in answer["error"], (status, answer)
                # no new stream either: this node cannot say where a resume stands now
                refused = await streams.connect(hub, token("u2"))
                assert refused.status == 503, refused.status
                assert "Retry-After" in {k.title() for k in refused.headers}
                assert "cannot serve streams now" in refused.body["error"]
            for client in clients:
                pings = client.comments.count("ping")
                assert await client.wait_until(pinged(client, pings + 2), 5), "no heartbeats"
                assert not client.closed
            assert await status_of(a, "/healthz") == 200  # alive, only not ready

            private_redis.start()
            for hub in (a, b):
                assert await wait_for(lambda h=hub: readyz(h) == 200, 15), "not ready again"
            after = await publish(b, [{"type": 5, "data": "back"}])
            after += await publish(a, [{"type": 2, "user": "u1", "data": {"n": 2}}])
            for client in clients:
                assert ids_of(await client.events(2)) == after
                assert ids_of(client.received) == before + after  # no reset, nothing lost
                assert not client.closed
            assert all(b"refused" not in client.raw for client in clients)
            assert (a.proc.pid, b.proc.pid) == pids and a.proc.poll() is b.proc.poll() is None

    run(scenario)


def test_a_hub_started_while_redis_is_down_serves_once_it_has_loaded_the_history(
    private_redis: PrivateRedis, hubs
):
    """Before its first load a node refuses streams (503, Retry-After) and says it is not
    ready; once Redis answers, it loads the shared history and serves resumes from it."""
    target = private_redis.target()
    a = hubs(target)
    late_log: list[Callable[[], str]] = []

    async def scenario() -> None:
        async with Streams() as streams:
            ids = await publish(a, [{"type": 5, "data": n} for n in range(4)])
            private_redis.stop()
            late = hubs(target, ready=False)  # healthy (its process runs), not ready
            late_log.append(late.log)
            assert readyz(late) == 503
            refused = await streams.connect(late, token("u1"), last_id=ids[0])
            assert refused.status == 503 and "Retry-After" in {k.title() for k in refused.headers}
            assert "shared history is not loaded" in refused.body["error"]
            private_redis.start()
            assert await wait_for(lambda: readyz(late) == 200, 15), "not ready after Redis"
            resumed = await streams.open(late, "u1", last_id=ids[0])
            assert ids_of(await resumed.events(3)) == ids[1:]
            live = await publish(a, [{"type": 5, "data": "live"}])
            assert (await resumed.next_event()).id == live[0]

    run(scenario)
    # its 503s (/readyz, the refused stream) are states to watch, not errors of the hub's
    log = late_log[0]() if late_log else ""
    assert " 503 GET /readyz" in log and " ERROR " not in log and "Traceback" not in log


def test_clients_of_a_killed_hub_resume_on_the_other_and_miss_nothing(redis_url, hubs):
    a = hubs(redis_url)
    b = hubs(redis_url)
    users = ["u1", "u2", "u3"]
    published: list[tuple[str, str | None]] = []  # (id, user or None for a broadcast)

    async def publisher(count: int) -> None:
        for n in range(count):
            user = users[n % 4] if n % 4 < 3 else None
            body = {"type": 5, "data": n} if user is None else {"type": 2, "user": user}
            [eid] = await publish(a, [body])
            published.append((eid, user))

    async def scenario() -> None:
        async with Streams() as streams:
            clients = {user: await streams.open(b, user) for user in users}
            resumed: dict[str, SSEClient] = {}
            task = asyncio.get_running_loop().create_task(publisher(120))
            try:
                assert await wait_for(lambda: len(published) >= 40, 10), "publisher too slow"
                assert all(c.received for c in clients.values())  # they were reading from B
                os.kill(b.proc.pid, signal.SIGKILL)
                for user, client in clients.items():
                    assert await client.wait_closed(5), "stream of a killed hub still open"
                    resumed[user] = await streams.open(a, user, last_id=client.last_event_id)
                assert len(published) < 120, "the reconnects came after the last publish"
                await asyncio.wait_for(task, 20)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            for user in users:
                entitled = [eid for eid, to in published if to in (user, None)]
                have = len(clients[user].received)
                rest = await resumed[user].events(len(entitled) - have)
                assert ids_of(clients[user].received) + ids_of(rest) == entitled, user
            assert b.proc.wait(5) == -signal.SIGKILL

    run(scenario)


def test_a_stalled_node_does_not_slow_the_other_and_its_streams_get_reset(redis_url, hubs):
    """B is stopped (SIGSTOP) while A takes far more than --history (50) events, in more
    entries than Redis keeps; A's stream gets all of them meanwhile; B, continued, tells its
    streams to reset, and goes on from what Redis still holds. (A's requests go 10 at a time:
    XADD's MAXLEN ~ --history counts entries, so a burst of more entries than --history
    between two reads of A's own feed would trim entries that feed had not read yet, and A's
    streams would be reset too.)"""
    a = hubs(redis_url, "--history", "50")
    b = hubs(redis_url, "--history", "50")
    client = redis_url.client()

    def oldest_previous() -> tuple[int, int]:
        """The `p` of the oldest entry Redis holds: the newest id a reader cannot get."""
        [(_, fields)] = client.xrange(f"{redis_url.prefix}:events", count=1)
        return key(fields[b"p"].decode())

    async def scenario() -> None:
        async with Streams() as streams:
            on_a = await streams.open(a, "u1")
            on_b = await streams.open(b, "u1")
            early = await publish(a, [{"type": 5, "data": "early"}])
            assert ids_of(await on_b.events(1)) == early
            os.kill(b.proc.pid, signal.SIGSTOP)
            try:
                # the signal is asynchronous: B is stopped once the kernel says so
                wait_until(lambda: process_state(b.proc.pid) == "T", 5, "B stopped")
                during: list[str] = []
                for start in range(0, 300, 10):  # 300 entries, 10 requests at a time
                    batches = await asyncio.gather(
                        *(publish(a, [{"type": 5, "data": n}]) for n in range(start, start + 10))
                    )
                    during += [i for batch in batches for i in batch]
                during.sort(key=key)
                assert ids_of(await on_a.events(301, timeout=10)) == early + during
                # the entries B has not read are gone from Redis (trimmed to the history)
                assert await wait_for(lambda: oldest_previous() > key(early[0]), 5)
            finally:
                os.kill(b.proc.pid, signal.SIGCONT)
            # B may still deliver what its last read brought (Redis answered its XREAD while
            # B was stopped): a run of the events, in order, with no gap; then the reset
            before = await on_b.events_until(lambda e: e.event == "reset", timeout=10)
            assert ids_of(before) == during[: len(before)]
            reset = on_b.received[1 + len(before)]
            floor = reset.id
            assert key(floor) > key((early + ids_of(before))[-1])
            assert reset.json()["resume_from"] == floor
            rest = [eid for eid in during if key(eid) > key(floor)]
            assert rest, "nothing after the reset's id"
            assert ids_of(await on_b.events(len(rest))) == rest  # no loss past the reset
            live = await publish(a, [{"type": 5, "data": "after"}])
            assert (await on_b.next_event()).id == live[0]
            assert (await on_a.next_event()).id == live[0]

    try:
        run(scenario)
    finally:
        client.close()


def test_a_hub_started_after_a_logout_refuses_the_revoked_token(redis_url, hubs):
    a = hubs(redis_url)
    issued = int(time.time()) - 60  # whole seconds, as most issuers write iat
    old = token("leaver", iat=issued)

    async def scenario() -> None:
        async with Streams() as streams:
            on_a = await streams.connect(a, old)
            assert on_a.status == 200  # the token works until the logout
            [logout] = await publish(a, [{"type": 3, "user": "leaver"}])
            assert (await on_a.next_event()).id == logout
            assert await on_a.wait_closed(5), "the logged-out stream did not end"
            c = hubs(redis_url)  # started after the logout
            refused = await streams.connect(c, old)
            assert refused.status == 401, (refused.status, refused.body)
            assert "logged out" in refused.body["error"]
            # a token issued after the logout works, and so does another user's of the same age
            assert (await streams.connect(c, token("leaver", iat=int(time.time())))).status == 200
            assert (await streams.connect(c, token("stayed", iat=issued))).status == 200

    run(scenario)


def test_a_publish_redis_never_answers_before_shutdown_gets_a_503_not_an_error(
    private_redis: PrivateRedis, hubs
):
    """Redis frozen while a publish waits on it, then SIGTERM: when the deadline cuts that
    publish, its client gets a 503 saying the outcome is unknown (retry under the same
    Idempotency-Key), the process exits 0, and nothing is logged as an error."""
    target = private_redis.target()
    a = hubs(target, "--shutdown-timeout", "3")
    answers: list[tuple[int, Any]] = []

    def publish_blocking() -> None:
        request = urllib.request.Request(
            a.url + "/publish",
            data=json.dumps({"type": 5, "data": "frozen"}).encode(),
            headers={"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                answers.append((resp.status, json.loads(resp.read())))
        except urllib.error.HTTPError as exc:
            answers.append((exc.code, json.loads(exc.read())))

    private_redis.pause()
    try:
        worker = threading.Thread(target=publish_blocking, daemon=True)
        worker.start()
        wait_until(
            lambda: http_json(a.url + "/healthz")[1]["publishing"] == 1, 10, "publish waiting"
        )
        os.kill(a.proc.pid, signal.SIGTERM)
        assert a.proc.wait(timeout=15) == 0
        worker.join(10)
    finally:
        private_redis.resume()
    assert answers and answers[0][0] == 503, answers
    assert "Idempotency-Key" in answers[0][1]["error"]
    log = a.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
