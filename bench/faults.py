"""``python -m bench.faults``: the hub's promise on Redis, checked under faults (Jepsen-style).

The system: three hub processes (``python -m handlers.app --broker ... --redis-prefix ...``)
on one private redis-server on a free loopback port; node 2 reaches Redis through a TCP proxy
that can blackhole its link. For the failover faults: a master, a replica and three sentinels
(``tests/redis_support.SentinelGroup``), the hubs on its ``redis+sentinel://`` URL.

The clients (``bench/faults_clients.py``): publishers with and without an Idempotency-Key (one
request in flight each; a keyed one retries under the same key, the others never retry) and
subscribers that are cut at random moments, and half of them held away across each fault,
then resume with their last id on a random node.

The nemesis runs a schedule of faults, each in a phase of its own: a calm stretch, the fault
(injected, lasting, healed), a wait until every node says it is ready again, another calm
stretch. Faults:

==================  ========================================================================
redis-kill9         Redis SIGKILLed, restarted on the same port a moment later (with its
                    append-only file, fsync always, or with no persistence: the system's)
flushall            FLUSHALL
redis-sigstop       Redis SIGSTOPped for 5-20 s (6 s in --short), then SIGCONT
hub-kill9           one hub node SIGKILLed, restarted on the same port a moment later
partition           node 2's link to Redis blackholed (nothing forwarded, nothing closed)
                    for 6-12 s, then healed (what was sent meanwhile is delivered then)
failover            SENTINEL FAILOVER (a planned failover; the replica in sync first)
lagging-failover    the replica paused and cut off, publishing goes on for 2 s, then the
                    master is SIGKILLed and the lagging replica promoted (what the master
                    acknowledged meanwhile is lost: the hub must say `reset`)
==================  ========================================================================

Then every publisher stops, a last event is published, every subscriber gets it (or a
deadline passes), and the checker (``bench/faults_check.py``) reads the whole history: one row
per fault, and the exit status is 1 on any loss, double, disorder or not-published event that
arrived, on a fault that could not run (or when nothing was accepted or delivered: a vacuous
run proves nothing). A failed run keeps its directory (printed): each node's logs and each
system's ``history.json``, which ``--check`` reads again.

``--short`` is a handful of faults in under a minute (``tests/test_faults.py`` runs it in
``make test``); the default schedule runs every fault, some twice, in several minutes.
``--hub-root DIR`` runs the hub from another source tree (a ``git archive`` of an older
commit, say) with this checker. Every process is started here and ended by its own PID (also
on errors, SIGTERM and Ctrl-C); all traffic is on 127.0.0.1; every loop is bounded in count
and time.

Redis is run by ``tests/redis_support`` (``PrivateRedis``, ``SentinelGroup``), imported rather
than copied: the bench then runs Redis exactly as the tests do, and the Sentinel group exists
only there. Hub processes are started here rather than by ``tests/browser_support.HubProcess``:
a killed node must come back on the same port, in a session of its own (Ctrl-C reaches only
the bench), and be awaited without blocking the loop the clients run in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
import redis

from bench import servers
from bench.faults_check import (
    History,
    Phase,
    Publish,
    Row,
    Verdict,
    Violation,
    add,
    check,
    examples,
    load,
    table,
)
from bench.faults_clients import Blackhole, Publisher, Subscriber, http_get

REPO = Path(__file__).resolve().parent.parent
SECRET = "faults-bench-secret-".ljust(48, "x")
NODES = 3
READY_WITHIN = 30.0  # seconds every node has to be ready again after a fault is healed
DRAIN_WITHIN = 10.0  # seconds the last event has to reach every subscriber
HELD_BEFORE = 0.7  # seconds half the subscribers are away before a fault is injected
now = time.monotonic


class RedisServer(Protocol):
    """What the bench uses of tests/redis_support.PrivateRedis."""

    port: int
    url: str

    def start(self) -> Any: ...
    def kill(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...
    def client(self) -> redis.Redis: ...
    def log(self) -> str: ...


class Group(Protocol):
    """What the bench uses of tests/redis_support.SentinelGroup."""

    url: str

    def start(self) -> Any: ...
    def master(self) -> RedisServer: ...
    def failover(self, timeout: float = 30.0) -> None: ...
    def wait_replica_in_sync(self, timeout: float = 30.0) -> None: ...
    def pause_replica(self) -> None: ...
    def kill_master_promote_replica(self, timeout: float = 30.0) -> None: ...
    def close(self) -> None: ...
    def logs(self) -> str: ...


def redis_support() -> Any:
    """tests/redis_support (PrivateRedis, SentinelGroup): the tests' own servers, reused so
    that the bench and the tests run Redis the same way. It imports pytest, which the test
    extras install in the same venv; its skips become errors here (see `unavailable`)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("redis_support")


class Unavailable(Exception):
    """A system that cannot run here (no redis-server, no SentinelGroup, a hub that refuses
    the URL): its faults are reported as not run, and the run fails."""


def unavailable(exc: BaseException) -> Unavailable:
    """pytest.skip/fail raise BaseExceptions (Skipped, Failed) with a `msg`."""
    return Unavailable(str(getattr(exc, "msg", "") or exc)[:300])


def token(sub: str, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time()) + 7200, **claims}, SECRET, algorithm="HS256"
    )


def free_port() -> int:
    return servers.free_port()


class HubNode:
    """One hub process on a fixed loopback port (kept across restarts); its logs in files.
    Started in a session of its own (Ctrl-C reaches only the bench) and remembered in
    bench.servers.STARTED, so that it is ended by its PID whatever happens."""

    def __init__(self, index: int, root: Path, workdir: Path, broker: str, prefix: str) -> None:
        self.index = index
        self.root = root
        self.workdir = workdir
        self.broker = broker
        self.prefix = prefix
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        log = self.workdir / f"hub-{self.index}-{len(self.logs)}.log"
        self.logs.append(log)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env["HUB_JWT_SECRET"] = SECRET
        argv = [sys.executable, "-m", "handlers.app", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--broker", self.broker, "--redis-prefix", self.prefix]
        argv += ["--shutdown-spread", "0", "--shutdown-timeout", "5"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        servers.STARTED.append(self.proc)

    async def wait_up(self, within: float = 30.0) -> None:
        """Until /healthz answers 200; RuntimeError with the log's tail if it exits first."""
        deadline = now() + within
        while now() < deadline:
            if not self.alive:
                break
            if await http_get(self.port, "/healthz", 1.0) == 200:
                return
            await asyncio.sleep(0.05)  # polling inside a deadline
        rc = self.proc.poll() if self.proc is not None else None
        raise RuntimeError(f"hub node {self.index} not up (exit {rc}):\n{self.log_tail()}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc in servers.STARTED:
            servers.STARTED.remove(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            servers.stop(self.proc, grace=8.0)

    def log_tail(self, n: int = 3000) -> str:
        if not self.logs:
            return ""
        return self.logs[-1].read_text(errors="replace")[-n:]


class System:
    """Redis (one server, or a Sentinel group), three hub nodes on it, and the proxy."""

    KINDS = {
        "aof": "Redis, append-only file with fsync always",
        "volatile": "Redis without persistence",
        "sentinel": "Sentinel: master, replica, 3 sentinels (AOF)",
    }

    def __init__(self, kind: str, workdir: Path, root: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.root = root
        self.redis: RedisServer | None = None
        self.group: Group | None = None
        self.proxy: Blackhole | None = None
        self.nodes: list[HubNode] = []
        self.prefix = f"faults-{uuid.uuid4().hex[:10]}"

    async def start(self) -> None:
        support = redis_support()
        if self.kind == "sentinel":
            cls = getattr(support, "SentinelGroup", None)
            if cls is None:
                raise Unavailable("tests/redis_support.SentinelGroup does not exist")
            try:
                group = cls(self.workdir / "sentinel", master_name="hubmaster", appendonly=True)
                self.group = group
                await asyncio.to_thread(group.start)
            except Exception as exc:
                raise unavailable(exc) from None
            except BaseException as exc:
                if type(exc).__name__ in ("Skipped", "Failed"):
                    raise unavailable(exc) from None
                raise
            urls = [group.url] * NODES
        else:
            try:
                server = support.PrivateRedis(self.workdir / "redis", appendonly=self.kind == "aof")
            except BaseException as exc:
                if type(exc).__name__ in ("Skipped", "Failed"):
                    raise unavailable(exc) from None
                raise
            self.redis = server
            await asyncio.to_thread(server.start)
            self.proxy = await Blackhole(server.port).start()
            urls = [server.url] * (NODES - 1) + [f"redis://127.0.0.1:{self.proxy.port}/0"]
        self.nodes = [
            HubNode(i, self.root, self.workdir, url, self.prefix) for i, url in enumerate(urls)
        ]
        for node in self.nodes:
            node.start()
        try:
            await asyncio.gather(*(node.wait_up() for node in self.nodes))
        except RuntimeError as exc:
            raise Unavailable(f"a hub node did not start: {str(exc)[-600:]}") from None
        missing = await self.wait_ready(READY_WITHIN)
        if missing:
            tails = "\n".join(self.nodes[i].log_tail(600) for i in missing)
            raise Unavailable(f"hub nodes {missing} never ready:\n{tails}")

    def endpoints(self) -> list[tuple[int, int]]:
        return [(node.index, node.port) for node in self.nodes]

    async def wait_ready(self, within: float) -> list[int]:
        """Until every node's /readyz is 200; the nodes that are not at the deadline."""
        deadline = now() + within
        while True:
            statuses = await asyncio.gather(*(http_get(n.port, "/readyz", 1.0) for n in self.nodes))
            missing = [n.index for n, s in zip(self.nodes, statuses, strict=True) if s != 200]
            if not missing or now() >= deadline:
                return missing
            await asyncio.sleep(0.1)  # polling inside a deadline

    def server(self) -> RedisServer:
        if self.group is not None:
            return self.group.master()
        assert self.redis is not None
        return self.redis

    def describe(self) -> str:
        where = "on its sentinel URL" if self.kind == "sentinel" else "node 2 through a proxy"
        return f"{self.KINDS[self.kind]}; {NODES} hub nodes ({where})"

    async def close(self) -> None:
        for node in self.nodes:
            await asyncio.to_thread(node.stop)
        if self.proxy is not None:
            await self.proxy.close()
        close_servers(self)

    def logs(self) -> list[Path]:
        return [log for node in self.nodes for log in node.logs]


SYSTEMS: list[System] = []  # every system started, for the way out of an interrupted run


def close_servers(system: System) -> None:
    """Synchronous, so that it also runs on the way out of an interrupted run."""
    with contextlib.suppress(Exception):
        if system.group is not None:
            system.group.close()
    with contextlib.suppress(Exception):
        if system.redis is not None:
            system.redis.close()


@dataclass
class Ctx:
    system: System
    rng: random.Random
    short: bool
    subscribers: list[Subscriber]
    held: list[Subscriber] = field(default_factory=list)

    def hold_half(self) -> None:
        """Cut half the subscribers and keep them away until the fault is healed: they come
        back with ids from before it, the case a lost or rolled-back history makes hard."""
        if self.held:
            return
        self.held = self.rng.sample(self.subscribers, len(self.subscribers) // 2)
        for sub in self.held:
            sub.hold(now() + 120)

    def release(self) -> None:
        for sub in self.held:
            sub.release(now() + self.rng.uniform(0.3, 1.5))
        self.held = []


# -- the nemesis ------------------------------------------------------------------------------


async def redis_kill9(ctx: Ctx) -> str:
    server = ctx.system.server()
    await asyncio.to_thread(server.kill)
    down = ctx.rng.uniform(0.5, 2.0)
    await asyncio.sleep(down)  # the fault's duration
    await asyncio.to_thread(server.start)
    kept = "AOF replayed" if ctx.system.kind == "aof" else "empty"
    return f"Redis kill -9, down {down:.1f} s, restarted ({kept})"


async def flushall(ctx: Ctx) -> str:
    client = ctx.system.server().client()
    try:
        await asyncio.to_thread(client.flushall)
    finally:
        client.close()
    return "FLUSHALL"


async def lasting(seconds: float, undo: Callable[[], None]) -> None:
    """A fault's duration, then `undo`, whatever happens meanwhile."""
    try:
        await asyncio.sleep(seconds)
    finally:
        undo()


async def redis_sigstop(ctx: Ctx) -> str:
    server = ctx.system.server()
    stalled = 6.0 if ctx.short else ctx.rng.uniform(5.0, 20.0)
    server.pause()
    await lasting(stalled, server.resume)
    return f"Redis SIGSTOP {stalled:.1f} s"


async def hub_kill9(ctx: Ctx) -> str:
    node = ctx.rng.choice(ctx.system.nodes)
    node.kill9()
    down = ctx.rng.uniform(0.5, 1.5)
    await asyncio.sleep(down)  # the fault's duration
    node.start()
    await node.wait_up()
    return f"hub node {node.index} kill -9, restarted after {down:.1f} s"


async def partition(ctx: Ctx) -> str:
    proxy = ctx.system.proxy
    if proxy is None:
        raise Unavailable("no proxy in this system")
    cut = 6.0 if ctx.short else ctx.rng.uniform(6.0, 12.0)
    proxy.block()
    await lasting(cut, proxy.heal)
    return f"node 2 cut off from Redis {cut:.1f} s"


async def failover(ctx: Ctx) -> str:
    group = ctx.system.group
    if group is None:
        raise Unavailable("no Sentinel group in this system")
    await asyncio.to_thread(group.wait_replica_in_sync, 30.0)
    began = now()
    await asyncio.to_thread(group.failover, 30.0)
    return f"SENTINEL FAILOVER ({now() - began:.1f} s)"


async def lagging_failover(ctx: Ctx) -> str:
    group = ctx.system.group
    if group is None:
        raise Unavailable("no Sentinel group in this system")
    await asyncio.to_thread(group.wait_replica_in_sync, 30.0)
    await asyncio.to_thread(group.pause_replica)
    await asyncio.sleep(1.0)  # publishing goes on to the master alone
    ctx.hold_half()  # some subscribers leave holding ids the replica never got
    await asyncio.sleep(1.0)
    began = now()
    await asyncio.to_thread(group.kill_master_promote_replica, 30.0)
    return f"failover to a replica 2 s behind ({now() - began:.1f} s)"


@dataclass(frozen=True)
class Fault:
    inject: Callable[[Ctx], Awaitable[str]]
    kinds: tuple[str, ...]
    holds_itself: bool = False


FAULTS: dict[str, Fault] = {
    "redis-kill9": Fault(redis_kill9, ("aof", "volatile")),
    "flushall": Fault(flushall, ("aof", "volatile", "sentinel")),
    "redis-sigstop": Fault(redis_sigstop, ("aof", "volatile", "sentinel")),
    "hub-kill9": Fault(hub_kill9, ("aof", "volatile", "sentinel")),
    "partition": Fault(partition, ("aof", "volatile")),
    "failover": Fault(failover, ("sentinel",)),
    "lagging-failover": Fault(lagging_failover, ("sentinel",), holds_itself=True),
}

Schedule = list[tuple[str, list[str]]]

SHORT: Schedule = [
    ("volatile", ["flushall", "redis-kill9", "redis-sigstop", "hub-kill9", "partition"])
]
LONG: Schedule = [
    (
        "aof",
        [
            "redis-kill9",
            "redis-sigstop",
            "flushall",
            "hub-kill9",
            "partition",
            "redis-kill9",
            "redis-sigstop",
            "hub-kill9",
            "partition",
        ],
    ),
    ("volatile", ["redis-kill9", "flushall", "redis-sigstop", "redis-kill9", "hub-kill9"]),
    ("sentinel", ["failover", "failover", "lagging-failover"]),
]


@dataclass
class Settings:
    short: bool
    seed: int
    publishers: int
    subscribers: int
    rate: float
    root: Path
    calm: float  # seconds before and after each fault


# -- a run --------------------------------------------------------------------------------------


SAID: list[str] = []  # the progress lines, for --out


def say(t0: float, text: str) -> None:
    line = f"faults: [{now() - t0:6.1f} s] {text}"
    SAID.append(line)
    print(line, flush=True)


async def cutter(
    subs: list[Subscriber], rng: random.Random, stop: asyncio.Event, every: float
) -> None:
    """Cut each subscriber at random moments (on average every `every` seconds)."""
    for _ in range(1_000_000):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)  # a tick of the random cuts
        if stop.is_set():
            return
        for sub in subs:
            if sub.connected and rng.random() < 0.25 / every:
                sub.cut()


async def run_system(
    kind: str, names: list[str], settings: Settings, workdir: Path, t_run: float
) -> tuple[Verdict, System | None, list[str]]:
    """Start one system, run its faults, drain, check. Always ends what it started."""
    rng = random.Random(f"{settings.seed}-{kind}")
    system = System(kind, workdir / kind, settings.root)
    SYSTEMS.append(system)
    system.workdir.mkdir(parents=True)
    anomalies: list[str] = []
    phases: list[Phase] = []
    publishes: list[Publish] = []
    subs: list[Subscriber] = []
    tasks: list[asyncio.Task[None]] = []
    pub_tasks: list[asyncio.Task[None]] = []
    stop_pub = asyncio.Event()
    stop_sub = asyncio.Event()
    stop_cuts = asyncio.Event()
    publishers: list[Publisher] = []
    t0 = now()
    try:
        say(t_run, f"{kind}: starting {system.describe()}")
        try:
            await system.start()
        except Unavailable as exc:
            say(t_run, f"{kind}: NOT RUN: {exc}")
            note = f"{kind}: not run ({', '.join(names)}): {exc}"
            rows = [Row(f"{kind}: {name}", run=False) for name in names]
            return Verdict(rows, Row("total"), [], [note]), None, []
        loop = asyncio.get_running_loop()
        run_id = uuid.uuid4().hex[:8]

        def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
            task = loop.create_task(coro)
            tasks.append(task)
            return task

        def join(n: int) -> None:
            sub = Subscriber(f"s{n}", token(f"{kind}-s{n}"), system.endpoints, rng)
            subs.append(sub)
            spawn(sub.run(stop_sub))

        for n in range(settings.subscribers):
            join(n)
        deadline = now() + 20
        while now() < deadline and not all(s.log.first_open for s in subs):
            await asyncio.sleep(0.05)  # polling inside a deadline
        t0 = now()
        phases.append(Phase(f"{kind}: start (no fault)", t0))
        for n in range(settings.publishers):
            keyed = n % 2 == 0
            name = f"{'k' if keyed else 'n'}{n}"
            pub = Publisher(
                name,
                keyed,
                token(f"{kind}-{name}", publish=True),
                system.endpoints,
                rng,
                settings.rate,
                run_id,
                publishes,
            )
            publishers.append(pub)
            pub_tasks.append(spawn(pub.run(stop_pub)))
        spawn(cutter(subs, rng, stop_cuts, every=4.0))
        await asyncio.sleep(settings.calm + 1.0)  # traffic before the first fault

        ctx = Ctx(system, rng, settings.short, subs)
        for name in names:
            fault = FAULTS[name]
            phase_start = now()
            join(len(subs))  # someone new each phase: entitled from a later opening
            await asyncio.sleep(settings.calm)
            if not fault.holds_itself:
                ctx.hold_half()  # they miss what is published from now on, then the fault
                await asyncio.sleep(HELD_BEFORE)
            say(t_run, f"{kind}: {name} ...")
            try:
                note = await fault.inject(ctx)
            except Unavailable as exc:
                note = f"{name} NOT RUN: {exc}"
                anomalies.append(f"{kind}: {note}")
            except Exception as exc:
                note = f"{name} FAILED to inject: {type(exc).__name__}: {str(exc)[:200]}"
                anomalies.append(f"{kind}: {note}")
            healed = now()
            ctx.release()
            missing = await system.wait_ready(READY_WITHIN)
            ready = f"ready again in {now() - healed:.1f} s"
            if missing:
                ready = f"nodes {missing} NOT ready {READY_WITHIN:.0f} s after"
                anomalies.append(f"{kind}: after {name}: {ready}")
            say(t_run, f"{kind}: {note}; {ready}")
            phases.append(Phase(f"{kind}: {note}", phase_start, ready))
            await asyncio.sleep(settings.calm + 1.0)

        # the drain: publishers stop, one last event, every subscriber gets it (or a deadline)
        stop_cuts.set()
        ctx.release()
        stop_pub.set()
        if pub_tasks:
            await asyncio.wait(pub_tasks, timeout=60)
        last = Publisher(
            "z",
            True,
            token(f"{kind}-z", publish=True),
            system.endpoints,
            rng,
            1.0,
            run_id,
            publishes,
        )
        marker = await last.publish_one(1)
        final = marker.tags()[0]
        drained = now() + DRAIN_WITHIN
        while now() < drained and not all(
            any(r.tag == final for r in s.log.received[-50:]) for s in subs
        ):
            await asyncio.sleep(0.05)  # polling inside a deadline
        if now() >= drained:
            anomalies.append(f"{kind}: the last event had not reached every subscriber")
        for pub in publishers:
            anomalies += [f"{kind}: {pub.name}: {a}" for a in pub.anomalies]
        say(t_run, f"{kind}: drained; {sum(len(p.tags()) for p in publishes):,} events sent")
    finally:
        stop_cuts.set()
        stop_pub.set()
        stop_sub.set()
        for sub in subs:
            sub.release(now())
            sub.cut()
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()
        await system.close()
    history = History(t0, phases, publishes, [s.log for s in subs])
    verdict = check(history)
    with open(system.workdir / "history.json", "w") as out:
        json.dump(dataclasses.asdict(history), out)
    untagged = sum(s.untagged for s in subs)
    if untagged:
        anomalies.append(f"{kind}: {untagged} events without a tag")
    return verdict, system, anomalies


LOG_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) ")
ACCESS = re.compile(r"tornado\.access: (\d{3}) (\S+) ([^\s?]+)")


def log_shape(line: str, level_at: int) -> str:
    """One key per kind of message: an access line by status, method and path; any other by
    its text with numbers and hex folded."""
    access = ACCESS.search(line)
    if access is not None:
        return "access " + " ".join(access.groups())
    return re.sub(r"[0-9a-f]{8,}|\d+", "N", line[level_at:])[:140]


def log_summary(system: System) -> list[str]:
    """Per node: the warnings, errors and tracebacks in its logs, each kind of message once."""
    out = []
    for node in system.nodes:
        counts: dict[str, int] = {}
        first: dict[str, str] = {}
        tracebacks = 0
        for log in node.logs:
            for line in log.read_text(errors="replace").splitlines():
                if "Traceback" in line:
                    tracebacks += 1
                match = LOG_LINE.search(line)
                if match is None:
                    continue
                shape = log_shape(line, match.start())
                counts[shape] = counts.get(shape, 0) + 1
                first.setdefault(shape, line[:300])
        total = sum(counts.values())
        out.append(
            f"  {system.kind} node {node.index} ({len(node.logs)} start(s)): "
            f"{total} warning/error lines, {tracebacks} tracebacks"
        )
        for shape, n in sorted(counts.items(), key=lambda kv: -kv[1])[:8]:
            out.append(f"    {n:>5} x {first[shape]}")
    return out


def merge(verdicts: list[Verdict]) -> Verdict:
    rows = [row for v in verdicts for row in v.rows]
    violations: list[Violation] = [x for v in verdicts for x in v.violations]
    return Verdict(rows, add(rows), violations, [n for v in verdicts for n in v.notes])


async def main_async(schedule: Schedule, settings: Settings, workdir: Path) -> tuple[str, bool]:
    t_run = now()
    plan = "; ".join(f"{kind} [{', '.join(names)}]" for kind, names in schedule)
    say(t_run, f"seed {settings.seed}; hub code from {settings.root}; schedule: {plan}")
    say(
        t_run,
        f"{settings.publishers} publishers ({(settings.publishers + 1) // 2} with "
        f"Idempotency-Key) at {settings.rate:g} requests/s each, {settings.subscribers} "
        "subscribers (+1 per fault)",
    )
    verdicts: list[Verdict] = []
    anomalies: list[str] = []
    logs: list[str] = []
    for kind, names in schedule:
        verdict, system, found = await run_system(kind, names, settings, workdir, t_run)
        verdicts.append(verdict)
        anomalies += found
        if system is not None:
            logs += log_summary(system)
    verdict = merge(verdicts)
    lines = [table(verdict), ""]
    if verdict.violations:
        lines += ["violations (the first of each kind):", *examples(verdict.violations), ""]
    if verdict.notes or anomalies:
        lines += ["anomalies:", *(f"  {a}" for a in verdict.notes + anomalies), ""]
    lines += ["hub logs:", *logs, ""]
    ok = verdict.ok and not any("NOT RUN" in a or "FAILED" in a for a in anomalies)
    t = verdict.total
    lines.append(
        f"faults: {'OK' if ok else 'FAILED'}: {t.accepted:,} events accepted, "
        f"{t.delivered:,} delivered; lost {t.lost}, doubled {t.doubled}, out of order "
        f"{t.disordered}, not-published delivered {t.np_delivered}; {t.covered} covered by "
        f"{t.resets} resets; {t.unknown} of unknown outcome; {now() - t_run:.0f} s"
    )
    return "\n".join(lines), ok


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--short", action="store_true", help="a handful of faults, < 1 minute")
    parser.add_argument(
        "--faults",
        help="a schedule of your own: KIND:FAULT,FAULT[;KIND:...] "
        f"(kinds {', '.join(System.KINDS)}; faults {', '.join(FAULTS)})",
    )
    parser.add_argument("--seed", type=int, default=None, help="random by default; printed")
    parser.add_argument("--publishers", type=int, default=4, help="half with Idempotency-Key")
    parser.add_argument("--subscribers", type=int, default=6)
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s per publisher")
    parser.add_argument(
        "--hub-root", type=Path, default=REPO, help="run the hub from this source tree"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs even when OK")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument(
        "--check",
        type=Path,
        metavar="HISTORY",
        help="only check a history a run kept (<logs>/<system>/history.json)",
    )
    args = parser.parse_args()
    if args.check:
        verdict = check(load(json.loads(args.check.read_text())))
        print(table(verdict))
        print("\n".join(examples(verdict.violations)))
        sys.exit(0 if verdict.ok else 1)

    schedule = SHORT if args.short else LONG
    if args.faults:
        schedule = []
        for part in args.faults.split(";"):
            kind, _, names = part.partition(":")
            schedule.append((kind.strip(), [n.strip() for n in names.split(",") if n.strip()]))
    for kind, names in schedule:
        if kind not in System.KINDS:
            parser.error(f"unknown system {kind!r}")
        for name in names:
            if name not in FAULTS or kind not in FAULTS[name].kinds:
                parser.error(f"fault {name!r} does not apply to {kind!r}")
    if shutil.which("redis-server") is None:
        print("faults: redis-server is missing (apt-get install redis-server)", file=sys.stderr)
        sys.exit(2)
    settings = Settings(
        short=args.short,
        seed=args.seed if args.seed is not None else random.randrange(1 << 30),
        publishers=args.publishers,
        subscribers=args.subscribers,
        rate=args.rate,
        root=args.hub_root.resolve(),
        calm=1.0 if args.short else 2.0,
    )

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: each process ended by PID

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="hub-faults-"))
    ok = False
    try:
        text, ok = asyncio.run(main_async(schedule, settings, workdir))
    except KeyboardInterrupt:
        print(f"faults: interrupted; logs in {workdir}", file=sys.stderr)
        sys.exit(130)
    finally:
        servers.stop_all()
        for system in SYSTEMS:
            close_servers(system)
    print(text, flush=True)
    if args.out:
        args.out.write_text("\n".join([*SAID, text]) + "\n")
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"faults: logs in {workdir}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
