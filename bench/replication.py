"""``python -m bench.replication``: what Redis's replication safety options cost the hub's
publish path, and what they buy when the master dies.

A master and one replica (redis-server processes of this run's own, on free loopback ports,
no persistence, in a temporary directory, pinned to core 1 and ended by their PIDs) and the
hub's own publishing code on core 0: a ``hub.core.Hub`` on a ``RedisBroker`` on the master,
``hub.publish`` called with decoded events (what POST /publish does after its checks; no HTTP).
Three rows:

1. plain: asynchronous replication, as the hub runs today;
2. ``min-replicas-to-write 1`` and ``min-replicas-max-lag 10`` on the master (then, apart: with
   the replica stopped, how long until the master refuses writes, and the hub's answer);
3. ``WAIT 1 <timeout>`` sent after each script call on the same connection, in the same write
   (the hub's ``--redis-wait-replicas``). A publish is answered stored only when WAIT says
   the replica took it.

Each cell: events/s and the latency of each ``hub.publish`` (p50, p99) at 1 and 100 events per
publish, with 1 and with 16 publishes in flight (asyncio tasks), for CELL_SECONDS (or
CELL_MAX_PUBLISHES); the rows take turns within each cell, so they share the machine's mood.
Events/s counts the decoding too, as the hub's POST handler does it. The broker sends the
publishes that wait while a script call is in flight together in the next call, so 16 in
flight share calls (and WAITs): `call p50` is the script call's round trip as the broker's
`_call` sees it (EVALSHA, and WAIT in row 3), `per call` the publishes each call carried.

The script call alone follows (a blocking connection, the same EVALSHA, WAIT pipelined
after it in row 3, the rows alternating every few calls): what Redis and the replica add to a
call, without the hub's own time around it. Then what a publish is answered when the replica
is gone: under min-replicas-to-write (stopped, then killed), and under WAIT (killed).

Then failover: 16 publishers publish single events continuously, the master is SIGKILLed, the
replica is promoted with REPLICAOF NO ONE, and the acknowledged ids missing from its stream are
counted (3 runs each, plain and WAIT); once with the replica healthy, once with it stalled
(SIGSTOP, its link cut) for LAG_SECONDS before the kill, a replica that fell behind.
Loopback only. The hub's warnings (a failover's "Redis broker unreachable") are not shown.

tests/redis_support.PrivateRedis imports pytest and the tests' own modules (bench.faults puts
tests/ on sys.path for it); the small RedisProcess below does what this needs instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import ujson
from redis.exceptions import RedisError, ResponseError

from bench import servers
from hub.broker import BrokerUnavailable, OutcomeUnknown
from hub.config import Config
from hub.core import Hub
from hub.decode import decode_json
from hub.redis_broker import SCRIPT, SCRIPT_SHA, RedisBroker, _encode

SECRET = "bench-replication-secret-0123456789-abcdefghij"
BENCH_CORE = 0
REDIS_CORE = 1
CELL_SECONDS = 3.0
CELL_MAX_PUBLISHES = 200_000
WARMUP_SECONDS = 0.05  # per slice
RAW_SECONDS = 1.5  # per row and batch, the script alone
RAW_TURN = 10  # calls of one row before the next row's turn, the script alone
SLICES = 6  # each row's time in a cell, in turns with the other rows
BATCHES = (1, 100)
IN_FLIGHT = (1, 16)
WAIT_REPLICAS = 1
WAIT_TIMEOUT_MS = 1000
MIN_REPLICAS_MAX_LAG = 10
REFUSAL_DEADLINE = 25.0  # seconds to wait for the master to refuse writes
FAILOVER_RUNS = 3
FAILOVER_WRITERS = 16
LAG_SECONDS = 0.3
LOSS_HISTORY = 1_000_000  # no trim may drop an acknowledged entry before it is counted


def payment_body(batch: int, n: int = 0) -> bytes:
    """A JSON array of `batch` payment events for users u0.. (as the load generator's)."""
    return ujson.dumps(
        [
            {"type": 2, "user": f"u{k % 1000}", "data": {"amount": 42, "cur": "EUR", "n": n + k}}
            for k in range(batch)
        ]
    ).encode()


# -- redis-server ---------------------------------------------------------------------------


class RedisProcess:
    """A redis-server of this run's own on a free loopback port, without persistence, pinned
    to a core; started with bench.servers.spawn (ended by its PID at exit whatever happens).
    kill() is a SIGKILL, pause() and resume() are SIGSTOP and SIGCONT, all by its PID."""

    def __init__(self, tmp: Path, core: int | None, *extra: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.port = servers.free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = ["taskset", "-c", str(core)] if core is not None else []
        argv += [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir)]
        argv += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
        # a full sync streamed at once (the default waits 5 s for more replicas)
        argv += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", *extra]
        self.log = self.dir / "redis.log"
        self.proc = servers.spawn(argv, log=self.log)
        self.pid = self.proc.pid
        until(self.answers, 10, f"redis-server on port {self.port} answers")

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2
        )

    def call(self, *command: Any) -> Any:
        """One command on a connection of its own."""
        client = self.client()
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
        try:
            return bool(self.call("PING"))
        except (RedisError, OSError):
            return False

    def replication(self) -> dict[str, Any]:
        client = self.client()
        try:
            return dict(client.info("replication"))
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        servers.stop(self.proc)  # forgets it

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)


def until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not met within {timeout:g} s: {what}")
        time.sleep(0.02)


def in_sync(master: RedisProcess) -> bool:
    """The replica is online (the master streams to it) and took a write: WAIT says so. (A
    replica that loaded its full sync is not streamed to until its first REPLCONF ACK.)"""
    master.call("SET", "bench:sync", "1")
    return int(master.call("WAIT", 1, 100)) >= 1


def start_pair(tmp: Path, core: int | None) -> tuple[RedisProcess, RedisProcess]:
    """A master and its replica, in sync."""
    master = RedisProcess(tmp, core)
    replica = RedisProcess(tmp, core, "--replicaof", "127.0.0.1", str(master.port))
    until(lambda: in_sync(master), 15, "replica in sync with the master")
    return master, replica


def set_min_replicas(master: RedisProcess, replicas: int) -> None:
    master.call("CONFIG", "SET", "min-replicas-to-write", str(replicas))
    master.call("CONFIG", "SET", "min-replicas-max-lag", str(MIN_REPLICAS_MAX_LAG))


# -- the hub ----------------------------------------------------------------------------------


class TimedBroker(RedisBroker):
    """The RedisBroker as it is, the duration of each script call (its `_call`: the round
    trip of one EVALSHA carrying every publish that waited for it) kept in `calls`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[float] = []

    async def _call(self, keys: list[str], args: list[Any]) -> list[bytes]:
        started = time.perf_counter()
        try:
            return await self._script_call(keys, args)
        finally:
            self.calls.append(time.perf_counter() - started)

    async def _script_call(self, keys: list[str], args: list[Any]) -> list[bytes]:
        return await RedisBroker._call(self, keys, args)


async def start_hub(url: str, *, wait: bool, history: int = 10_000) -> Hub:
    config = Config(
        jwt_secret=SECRET, broker=url, redis_prefix=f"bench-{uuid.uuid4().hex[:8]}", history=history
    )
    broker = TimedBroker(
        url,
        prefix=config.redis_prefix,
        history=config.history,
        revoke_ttl=config.revoke_ttl,
        max_revocations=config.max_revocations,
        wait_replicas=WAIT_REPLICAS if wait else 0,
        wait_timeout=WAIT_TIMEOUT_MS / 1000,
    )
    hub = Hub(config, broker)
    deadline = time.monotonic() + 10
    while not hub.ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"hub not ready: {broker.unready_reason()}")
        await asyncio.sleep(0.02)
    return hub


# -- steady state -----------------------------------------------------------------------------


@dataclass
class Sample:
    """What one row did in one slice of a cell."""

    latencies: list[float]
    seconds: float
    errors: int
    calls: list[float]  # the script calls' durations


@dataclass
class Cell:
    events_per_s: float
    p50_ms: float
    p99_ms: float
    publishes: int
    errors: int
    call_p50_ms: float
    per_call: float  # publishes per script call

    @classmethod
    def of(cls, samples: list[Sample], batch: int) -> Cell:
        latencies = sorted(x for s in samples for x in s.latencies)
        seconds = sum(s.seconds for s in samples)
        calls = sorted(x for s in samples for x in s.calls)
        return cls(
            len(latencies) * batch / seconds,
            percentile(latencies, 0.50) * 1000,
            percentile(latencies, 0.99) * 1000,
            len(latencies),
            sum(s.errors for s in samples),
            percentile(calls, 0.50) * 1000,
            len(latencies) / max(1, len(calls)),
        )


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure(hub: Hub, batch: int, in_flight: int, seconds: float) -> Sample:
    """`in_flight` tasks publishing `batch` events at a time for `seconds` (after a warm-up
    that fills the pipeline), each publish's latency kept."""
    body = payment_body(batch)
    latencies: list[float] = []
    errors = 0
    limit = CELL_MAX_PUBLISHES // SLICES

    async def worker(deadline: float, keep: bool) -> None:
        nonlocal errors
        while time.perf_counter() < deadline and len(latencies) < limit:
            events = decode_json(body)
            started = time.perf_counter()
            try:
                await hub.publish(events)
            except BrokerUnavailable:
                errors += keep
                await asyncio.sleep(0.01)
                continue
            if keep:
                latencies.append(time.perf_counter() - started)

    broker = hub.broker
    assert isinstance(broker, TimedBroker)
    warm = time.perf_counter() + WARMUP_SECONDS
    await asyncio.gather(*(worker(warm, False) for _ in range(in_flight)))
    broker.calls.clear()
    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds, True) for _ in range(in_flight)))
    return Sample(latencies, time.perf_counter() - started, errors, list(broker.calls))


ROWS = (
    ("plain (async replication)", 0, False),
    (f"min-replicas-to-write 1, max-lag {MIN_REPLICAS_MAX_LAG}", 1, False),
    (f"WAIT {WAIT_REPLICAS} {WAIT_TIMEOUT_MS} after each script call", 0, True),
)


async def steady_state(master: RedisProcess, seconds: float) -> list[str]:
    hubs = [await start_hub(master.url, wait=wait) for _, _, wait in ROWS]
    results: dict[tuple[int, int, int], Cell] = {}
    try:
        for batch in BATCHES:
            for in_flight in IN_FLIGHT:
                samples: list[list[Sample]] = [[] for _ in ROWS]
                for turn in range(SLICES):  # the rows take turns, the first one rotating
                    for k in range(len(ROWS)):
                        row = (turn + k) % len(ROWS)
                        min_replicas = ROWS[row][1]
                        set_min_replicas(master, min_replicas)
                        if min_replicas:
                            good = master.replication().get("min_slaves_good_slaves")
                            assert good == 1, f"the master counts {good} good replicas"
                        samples[row].append(
                            await measure(hubs[row], batch, in_flight, seconds / SLICES)
                        )
                for row in range(len(ROWS)):
                    results[row, batch, in_flight] = Cell.of(samples[row], batch)
    finally:
        set_min_replicas(master, 0)
        for hub in hubs:
            await hub.stop(publish_wait=1.0)
    lines = [
        f"  {'row':<38} batch  in flight   events/s   p50 ms   p99 ms  call p50  per call"
        "  publishes  errors"
    ]
    for row, (name, _, _) in enumerate(ROWS):
        for batch in BATCHES:
            for in_flight in IN_FLIGHT:
                c = results[row, batch, in_flight]
                lines.append(
                    f"  {name:<38} {batch:>5}  {in_flight:>9} {c.events_per_s:>10,.0f} "
                    f"{c.p50_ms:>8.3f} {c.p99_ms:>8.3f} {c.call_p50_ms:>9.3f} {c.per_call:>9.1f}"
                    f"  {c.publishes:>9,}  {c.errors:>6}"
                )
    lines.append("  cost against plain (p50 latency, events/s):")
    for row in (1, 2):
        for batch in BATCHES:
            parts = []
            for in_flight in IN_FLIGHT:
                c, base = results[row, batch, in_flight], results[0, batch, in_flight]
                parts.append(
                    f"{in_flight:>2} in flight: p50 {c.p50_ms - base.p50_ms:+.3f} ms, "
                    f"{100 * c.events_per_s / base.events_per_s:5.1f}% of the events/s"
                )
            lines.append(f"    {ROWS[row][0]:<38} batch {batch:>3}: " + "; ".join(parts))
    return lines


# -- min-replicas-to-write with the replica stopped ------------------------------------------


async def until_refused(
    hub: Hub, master: RedisProcess, stop_replica: Callable[[], None], how: str
) -> str:
    """Publish single events one at a time; stop the replica; the time until the first
    publish is refused, how many were stored meanwhile, the hub's answer and Redis's own."""
    set_min_replicas(master, 1)
    body = payment_body(1)
    stored = 0
    stop_replica()
    stopped = time.perf_counter()
    answer = "none: not refused"
    while time.perf_counter() - stopped < REFUSAL_DEADLINE:
        try:
            await hub.publish(decode_json(body))
            stored += 1
        except BrokerUnavailable as exc:
            answer = f"{type(exc).__name__}: {exc}"
            break
        await asyncio.sleep(0.001)
    took = time.perf_counter() - stopped
    try:
        raw = repr(master.call("SET", "bench:probe", "1"))
    except ResponseError as exc:
        raw = f"-{exc}"
    return (
        f"  replica {how}: refused after {took:.2f} s ({stored:,} single-event publishes "
        f"stored meanwhile, 1 in flight, 1 ms apart)\n"
        f"    the hub's answer (POST /publish: 503 not_published): {answer}\n"
        f"    Redis's answer to a plain SET: {raw}"
    )


async def refusals(master: RedisProcess, replica: RedisProcess) -> list[str]:
    hub = await start_hub(master.url, wait=False)
    lines = [f"min-replicas-to-write 1, min-replicas-max-lag {MIN_REPLICAS_MAX_LAG}:"]
    try:
        lines.append(await until_refused(hub, master, replica.pause, "stopped (SIGSTOP)"))
        replica.resume()
        resumed = time.perf_counter()
        until(
            lambda: master.replication().get("min_slaves_good_slaves") == 1,
            15,
            "the master counts the replica again",
        )
        lines.append(
            f"    after SIGCONT the master takes writes again within "
            f"{time.perf_counter() - resumed:.2f} s"
        )
        lines.append(await until_refused(hub, master, replica.kill, "killed (SIGKILL)"))
    finally:
        set_min_replicas(master, 0)
        await hub.stop(publish_wait=1.0)
    lines.append(f"WAIT {WAIT_REPLICAS} {WAIT_TIMEOUT_MS} with the replica killed:")
    waiting = await start_hub(master.url, wait=True)
    try:
        for _ in range(2):
            started = time.perf_counter()
            try:
                await waiting.publish(decode_json(payment_body(1)))
                answer = "stored"
            except BrokerUnavailable as exc:
                answer = f"{type(exc).__name__}: {exc}"
            lines.append(
                f"  a publish answered after {time.perf_counter() - started:.2f} s "
                f"(POST /publish: 503 unknown): {answer}"
            )
    finally:
        await waiting.stop(publish_wait=1.0)
    return lines


# -- the script alone -------------------------------------------------------------------------


def raw_calls(master: RedisProcess, seconds: float) -> list[str]:
    """The script call without the hub around it: one blocking connection, one call in
    flight, the keys and arguments the broker sends for one publish (no Idempotency-Key).
    The rows take turns every RAW_TURN calls (min-replicas set and unset between turns, on
    another connection), until each has had `seconds`: what Redis, and the replica for WAIT,
    add to a call, paired closely enough that the machine's drift falls on every row."""
    revoke_ms = int(Config(jwt_secret=SECRET).revoke_ttl * 1000)
    lines = [
        "The script call alone (EVALSHA of hub/redis_publish.lua with the broker's keys and "
        f"arguments; a blocking redis-py connection, 1 call in flight, rows alternating every "
        f"{RAW_TURN} calls):",
        f"  {'row':<38} batch     calls/s   p50 ms   p99 ms  mean ms    calls",
    ]
    master.call("SCRIPT", "LOAD", SCRIPT)
    admin = master.client()
    conn = redis.Connection(host="127.0.0.1", port=master.port, socket_timeout=5)  # type: ignore[no-untyped-call]
    n = 0

    def one_call(keys: list[str], blob: str, batch: int, wait: bool) -> float:
        nonlocal n
        n += 1
        maxlen = max(100, 10_000 // batch)  # about the 10,000 events a hub's history keeps
        args = [maxlen, revoke_ms, f"raw:{n}", 1, "", "0-0", "0badcafe", 100_000, "0"]
        args += [batch, blob, "0", "", 0]
        commands: list[tuple[Any, ...]] = [("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)]
        if wait:
            commands.append(("WAIT", WAIT_REPLICAS, WAIT_TIMEOUT_MS))
        sent = time.perf_counter()
        conn.send_packed_command(conn.pack_commands(commands))  # type: ignore[no-untyped-call]
        answers = [conn.read_response() for _ in commands]
        took = time.perf_counter() - sent
        assert bytes(answers[0][1]).startswith(b"+"), answers[0]
        assert not wait or int(answers[1]) >= WAIT_REPLICAS, answers[1]
        return took

    try:
        for batch in BATCHES:
            prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"
            keys = [f"{prefix}:events", f"{prefix}:head", f"{prefix}:revoked"]
            blob = _encode(decode_json(payment_body(batch)))
            done: list[list[float]] = [[] for _ in ROWS]
            spent = [0.0 for _ in ROWS]
            turn = 0
            while min(spent) < seconds and sum(map(len, done)) < CELL_MAX_PUBLISHES:
                row = turn % len(ROWS)
                turn += 1
                _, min_replicas, wait = ROWS[row]
                admin.execute_command("CONFIG", "SET", "min-replicas-to-write", min_replicas)  # type: ignore[no-untyped-call]
                started = time.perf_counter()
                done[row] += [one_call(keys, blob, batch, wait) for _ in range(RAW_TURN)]
                spent[row] += time.perf_counter() - started
            for row, (name, _, _) in enumerate(ROWS):
                times = sorted(done[row])
                lines.append(
                    f"  {name:<38} {batch:>5} {len(times) / spent[row]:>11,.0f} "
                    f"{percentile(times, 0.5) * 1000:>8.3f} {percentile(times, 0.99) * 1000:>8.3f}"
                    f" {1000 * sum(times) / len(times):>8.3f} {len(times):>8,}"
                )
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]
        admin.close()
        set_min_replicas(master, 0)
    return lines


# -- failover ---------------------------------------------------------------------------------


@dataclass
class Loss:
    acked: int
    missing: int
    unknown: int
    refused: int
    after_stall: int  # acknowledged after the replica stalled


async def failover_run(tmp: Path, core: int | None, *, wait: bool, stall: bool) -> Loss:
    master, replica = start_pair(tmp, core)
    hub = await start_hub(master.url, wait=wait, history=LOSS_HISTORY)
    assert isinstance(hub.broker, RedisBroker)
    stream = hub.broker.stream
    acked: list[str] = []
    unknown = refused = 0
    stalled_at: int | None = None
    running = True

    async def writer(k: int) -> None:
        nonlocal unknown, refused
        n = 0
        while running:
            n += 1
            try:
                result = await hub.publish(decode_json(payment_body(1, k * 10_000_000 + n)))
                acked.extend(result.ids)
            except OutcomeUnknown:
                unknown += 1
            except BrokerUnavailable:
                refused += 1
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(writer(k)) for k in range(FAILOVER_WRITERS)]
    try:
        await asyncio.sleep(0.5 + 0.3 * random.random())
        if stall:
            stalled_at = len(acked)
            replica.pause()
            master.call("CLIENT", "KILL", "TYPE", "replica")  # what it sends now never arrives
            await asyncio.sleep(LAG_SECONDS)
        master.kill()
        await asyncio.sleep(0.5)  # the publishes in flight get their answers
    finally:
        running = False
        await asyncio.wait(tasks, timeout=10)
        replica.resume()
    replica.call("REPLICAOF", "NO", "ONE")
    until(lambda: replica.replication().get("role") == "master", 10, "replica promoted")
    client = replica.client()
    try:
        entries = client.xrange(stream)
    finally:
        client.close()
    held = {eid.decode() for eid, _ in entries}  # type: ignore[union-attr]
    # batch 1: an entry's id is its event's id, without the epoch
    missing = sum(1 for eid in acked if eid.rsplit("-", 1)[0] not in held)
    await hub.stop(publish_wait=1.0)
    replica.kill()
    return Loss(
        len(acked),
        missing,
        unknown,
        refused,
        len(acked) - stalled_at if stalled_at is not None else 0,
    )


async def failovers(tmp: Path, core: int | None) -> list[str]:
    lines = [
        f"Failover: {FAILOVER_WRITERS} publishers (1 event each, continuously), master "
        "SIGKILLed, replica promoted (REPLICAOF NO ONE); acknowledged ids missing on it:"
    ]
    for stall in (False, True):
        for name, wait in (("plain", False), (f"WAIT {WAIT_REPLICAS} {WAIT_TIMEOUT_MS}", True)):
            runs = [
                await failover_run(tmp, core, wait=wait, stall=stall) for _ in range(FAILOVER_RUNS)
            ]
            where = (
                f"replica stalled {LAG_SECONDS:g} s before the kill" if stall else "replica healthy"
            )
            lost = " | ".join(f"{r.missing:,} of {r.acked:,}" for r in runs)
            unknown = " | ".join(str(r.unknown) for r in runs)
            line = f"  {where:<38} {name:<12} lost {lost} acknowledged; unknown {unknown}"
            if stall:
                line += "; acked after the stall began " + " | ".join(
                    f"{r.after_stall:,}" for r in runs
                )
            lines.append(line)
    return lines


# -- main -------------------------------------------------------------------------------------


async def run(tmp: Path, core: int | None, seconds: float) -> list[str]:
    master, replica = start_pair(tmp, core)
    lines = [
        "Replication options on the hub's publish path (hub.publish of decoded events through "
        "RedisBroker; master + 1 replica, no persistence):"
    ]
    lines += await steady_state(master, seconds)
    lines.append("")
    lines += raw_calls(master, RAW_SECONDS)
    lines.append("")
    lines += await refusals(master, replica)
    master.kill()
    lines.append("")
    lines += await failovers(tmp, core)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    parser.add_argument("--seconds", type=float, default=CELL_SECONDS, help="per cell")
    args = parser.parse_args()
    # the failovers' expected "Redis broker unreachable" warnings; errors still show
    logging.getLogger("hub").setLevel(logging.ERROR)
    core: int | None = None
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {BENCH_CORE})
        core = REDIS_CORE
    started = time.monotonic()
    load = os.getloadavg()[0]
    busy_before, ours_before = machine_busy(), own_cpu()
    with tempfile.TemporaryDirectory(prefix="hub-replication-") as tmp:
        try:
            lines = asyncio.run(run(Path(tmp), core, args.seconds))
        finally:
            servers.stop_all()
    wall = time.monotonic() - started
    others = (machine_busy() - busy_before) - (own_cpu() - ours_before)
    cores = os.cpu_count() or 1
    where = f"bench on core {BENCH_CORE}, redis on core {REDIS_CORE}" if core is not None else ""
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
        f"{platform.python_version()}, redis-server {redis_version()}, {cores} cores, {where}; "
        f"{wall:.0f} s; load {load:.2f} before, {os.getloadavg()[0]:.2f} after; other "
        f"processes used {100 * others / (wall * cores):.0f}% of the cores meanwhile"
    )
    print("\n".join(lines))


def machine_busy() -> float:
    """CPU seconds the machine spent busy since boot (all cores; /proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and its waited-for children (the redis-servers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def redis_version() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "?"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return next((w[2:] for w in out.split() if w.startswith("v=")), "?")


if __name__ == "__main__":
    main()
