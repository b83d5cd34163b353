"""``python -m bench.joins``: what join and leave events (``--join-leave``, issue 19) cost a
connect storm.

N streams connect to a fresh hub as fast as it takes them, each its own user with a subscriber
JWT granting its topics, in three layouts: ``one-topic`` (every stream on ``room:1``),
``ten-topics`` (``room:0`` .. ``room:9``, N/10 each), and ``one-topic-all-watch`` (every stream
on ``room:1`` and on ``presence:room:1``: every member watches the joins, which is what pushing
them to every subscriber of the topic would cost). In each layout the first stream of each
topic, its probe, opens before the storm, on the topic and on its presence topic: a dashboard.
Each layout runs with join/leave off and on (``--join-leave room:*``), the two alternating
(off then on in odd rounds, on then off in even ones) so that a drift of the machine falls on
both.

The clients (this process, one event loop, raw non-blocking sockets: bench.rawconn) keep
IN_FLIGHT attempts open at once, a new one leaving as soon as one has its answer: the hub's
own pace, without listen-queue overflows. Every stream is read (an open stream once RCVLOWAT
bytes wait); each probe parses what it reads.

Reported per cell: the time from the first connect (after the probes) to the last stream's 200
and the connects/s it makes; the hub's CPU per connect over that time, and from the first
connect until the hub is quiet again (each probe has read every join of its topic, then the
hub's CPU under 5 % for QUIET_FOR); what the hub wrote (/metrics: writes, bytes, the users
published in join events); and a check, with join/leave on, that each probe read every user of
its topic join, once, and with it off, no join at all. Then, per layout, connects/s and CPU per
connect (and the connect rate one core sustains at that CPU) with join/leave on against off.
The wall-clock rate depends on what else the machine runs; the CPU per connect much less.

Processes, loopback only: the hub (pinned to the first core) started here and ended by its
PID; this process on the others. ``--quick``: 300 streams, one round, for a test.
JOINS_PROFILE=<py-spy binary>: each cell's storm profiled (collapsed stacks, logs kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench import procs, servers
from bench.rawconn import Conn, answer_head, events_request

REPO = Path(__file__).resolve().parent.parent
SECRET = "joins-bench-secret-".ljust(48, "x")
now = time.monotonic

STREAMS = 10_000
ROUNDS = 2
IN_FLIGHT = 200  # attempts waiting for their answer at once
MAX_TRIES = 5  # attempts per stream
CONNECT_WITHIN = 120.0  # seconds for every stream to open
QUIET_WITHIN = 60.0  # seconds for the hub to be quiet after the storm
QUIET_FOR = 0.3  # seconds of hub CPU under QUIET_SHARE: quiet
QUIET_SHARE = 0.05
RCVLOWAT = 64 * 1024
RUN_WITHIN = 1800.0
# layout -> (topics, whether every stream also watches its topic's joins)
LAYOUTS = {"one-topic": (1, False), "ten-topics": (10, False), "one-topic-all-watch": (1, True)}
QUICK = {"streams": 300, "rounds": 1}
JOIN_LEAVE = "room:*"
HEAD, STREAM, FAILED = range(3)
BLOCK = re.compile(rb"event: (join|leave)\ndata: ([^\n]*)\n\n")
SAMPLE = re.compile(r"^(hub_\w+)(?:\{(.*)\})? ([0-9.e+-]+)$", re.M)

token = partial(procs.token, SECRET)


@dataclass
class Row:
    layout: str
    on: bool
    round: int
    streams: int
    storm: int = 0  # the streams of the storm: all but the probes, open before it
    connect_s: float = 0.0
    cpu_storm: float = 0.0  # hub CPU seconds from the first connect to the last 200
    cpu_quiet: float = 0.0  # and to the hub quiet again
    cpu_client: float = 0.0  # this process's CPU seconds over the storm
    quiet_s: float = 0.0  # from the first connect to quiet
    writes: int = 0
    bytes: int = 0
    published: int = 0  # users in join events (hub_membership_events_total{kind="join"})
    probes_ok: bool = False
    failed: int = 0
    retried: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.layout}-{'on' if self.on else 'off'}"

    @property
    def rate(self) -> float:
        return self.storm / self.connect_s if self.connect_s else 0.0

    @property
    def ok(self) -> bool:
        return self.probes_ok and not self.failed and not self.notes


class Client:
    """One stream: its request, its attempts, what it read (its probe parses it)."""

    __slots__ = ("buf", "conn", "index", "joined", "probe", "request", "state", "storm", "tries")

    def __init__(self, storm: Storm, index: int, request: bytes, probe: bool) -> None:
        self.storm = storm
        self.index = index
        self.request = request
        self.probe = probe
        self.conn: Conn | None = None
        self.state = HEAD
        self.buf = b""
        self.tries = 0
        self.joined: list[str] = []  # a probe's: the users of the join events it read

    def attempt(self) -> None:
        self.tries += 1
        self.state = HEAD
        self.buf = b""
        conn = self.conn = Conn(self, self.storm.loop)
        try:
            conn.open(self.storm.port, self.request)
        except OSError as exc:
            self.failed(exc)

    def request_sent(self) -> None:
        pass

    def failed(self, exc: OSError) -> None:
        self._again(f"connect: {exc.strerror or exc!r}"[:80])

    def _again(self, why: str) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        storm = self.storm
        storm.errors[why] = storm.errors.get(why, 0) + 1
        if self.tries < MAX_TRIES:
            storm.retried += 1
            storm.queue.append(self)
        else:
            self.state = FAILED
            storm.failed += 1
        storm.answered()

    def received(self, data: bytes) -> None:
        if self.state == HEAD:
            self.buf += data
            head = answer_head(self.buf)
            if head is None:
                return
            status, _, data = head
            self.buf = b""
            if status != 200:
                self._again(f"status {status}")
                return
            self.state = STREAM
            if not self.probe and self.conn is not None:
                self.conn.lowat(RCVLOWAT)
            self.storm.opened()
        if self.probe:
            self.buf += data
            end = self.buf.rfind(b"\n\n")
            if end >= 0:
                for name, body in BLOCK.findall(self.buf[: end + 2]):
                    if name == b"join":
                        self.joined += json.loads(body)["data"]["users"]
                self.buf = self.buf[end + 2 :]

    def lost(self) -> None:
        if self.state == HEAD:
            self._again("closed before its answer")
        elif self.state == STREAM:
            self.storm.errors["stream closed"] = self.storm.errors.get("stream closed", 0) + 1


class Storm:
    """N clients connecting with IN_FLIGHT attempts at once: first each topic's probe (before
    the storm, so that it reads every join of its topic), then the others."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, port: int, requests: list[tuple[bytes, bool]]
    ) -> None:
        self.loop = loop
        self.port = port
        self.clients: list[Client] = []
        self.in_flight = 0
        self.open = 0
        self.failed = 0
        self.retried = 0
        self.errors: dict[str, int] = {}
        self.done = asyncio.Event()
        self.target = 0  # open + failed at which `done` is set
        self.limit = IN_FLIGHT
        self.t_last = 0.0
        for i, (request, probe) in enumerate(requests):
            self.clients.append(Client(self, i, request, probe))
        self.probes = [c for c in self.clients if c.probe]
        self.queue: list[Client] = []

    def launch(self, clients: list[Client]) -> None:
        """Open these clients (IN_FLIGHT at once); `done` is set once all have an answer."""
        self.done.clear()
        self.target = self.open + self.failed + len(clients)
        self.queue = list(reversed(clients))
        self._launch()

    def _launch(self) -> None:
        while self.queue and self.in_flight < self.limit:
            self.in_flight += 1
            self.queue.pop().attempt()

    def opened(self) -> None:
        self.open += 1
        self.answered()

    def answered(self) -> None:
        self.in_flight -= 1
        if self.open + self.failed == self.target:
            self.t_last = now()
            self.done.set()
        elif self.queue:
            self.loop.call_soon(self._launch)

    def close(self) -> None:
        for client in self.clients:
            if client.conn is not None:
                client.conn.close()


def requests_for(
    port: int, n: int, layout: str
) -> tuple[list[tuple[bytes, bool]], dict[str, list[str]]]:
    """Each stream's request (its own user, a token granting its topics) and whether it is a
    probe (its topic's first stream, which also watches the topic's joins:
    `presence:<topic>`), and the users of each topic in the order they connect."""
    topics, all_watch = LAYOUTS[layout]
    out, members = [], {}
    for i in range(n):
        user, topic = f"u{i:05d}", f"room:{i % topics if topics > 1 else 1}"
        probe = topic not in members
        members.setdefault(topic, []).append(user)
        wanted = [topic, f"presence:{topic}"] if probe or all_watch else [topic]
        query = "&".join(f"topic={t}" for t in wanted)
        request = events_request(port, token(user, topics=wanted)) + b"\r\n"
        out.append((request.replace(b"GET /events ", f"GET /events?{query} ".encode(), 1), probe))
    return out, members


async def metrics(port: int) -> dict[str, float]:
    """/metrics of the hub: sample (with its labels, as written) -> value."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        body = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    finally:
        writer.close()
    return {
        f"{name}{{{labels}}}" if labels else name: float(value)
        for name, labels, value in SAMPLE.findall(body)
    }


def profile(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """With JOINS_PROFILE=<py-spy binary>: py-spy recording the hub (collapsed stacks), ended
    by its PID; None without."""
    spy = os.environ.get("JOINS_PROFILE")
    if not spy:
        return None
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers.STARTED.append(proc)
    time.sleep(0.5)  # py-spy attaching: it samples from then on (a profile, not a measure)
    return proc


async def wait_until(cond: Callable[[], bool], within: float) -> None:
    """Poll `cond` until it holds; RuntimeError at the deadline."""
    deadline = now() + within
    while not cond():
        if now() > deadline:
            raise RuntimeError("condition not met in time")
        await asyncio.sleep(0.01)  # polling a condition, inside a deadline


async def quiet(pid: int, within: float) -> float:
    """Poll the hub's CPU until it used under QUIET_SHARE of a core for QUIET_FOR seconds
    (or `within` passed); when it was last busy (monotonic)."""
    deadline = now() + within
    last, t_last = procs.cpu_s(pid), now()
    busy_at = t_last
    while now() < deadline:
        await asyncio.sleep(QUIET_FOR / 3)  # polling the CPU clock, inside a deadline
        cpu, t = procs.cpu_s(pid), now()
        if cpu - last > QUIET_SHARE * (t - t_last):
            busy_at = t
            last, t_last = cpu, t
        elif t - t_last >= QUIET_FOR:
            return busy_at
    return busy_at


async def run_cell(row: Row, tmp: Path, core: int | None, say: Callable[[str], None]) -> None:
    loop = asyncio.get_running_loop()
    port = servers.free_port()
    flags = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if row.on:
        flags += ["--join-leave", JOIN_LEAVE]
    env = procs.clean_env("WEB_CONCURRENCY")
    env["HUB_JWT_SECRET"] = SECRET
    pin = ["taskset", "-c", str(core)] if core is not None else []
    argv = [*pin, str(REPO / ".venv" / "bin" / "hub"), *flags]
    hub = await asyncio.to_thread(
        procs.Hub, argv, port, tmp / f"hub-{row.name}-{row.round}.log", env
    )
    storm: Storm | None = None
    try:
        await hub.wait_ready()
        requests, members = requests_for(port, row.streams, row.layout)
        storm = Storm(loop, port, requests)
        storm.launch(storm.probes)
        await asyncio.wait_for(storm.done.wait(), CONNECT_WITHIN)
        if row.on:  # each probe's own join, read: the storm's joins are all it reads next
            await wait_until(lambda: all(c.joined for c in storm.probes), 10.0)
        others = [c for c in storm.clients if not c.probe]
        row.storm = len(others)
        before = await metrics(port)
        spy = profile(hub.pid, tmp / f"profile-{row.name}-{row.round}.txt")
        cpu0, t0, mine0 = procs.cpu_s(hub.pid), now(), procs.self_cpu_s()
        storm.launch(others)
        try:
            await asyncio.wait_for(storm.done.wait(), CONNECT_WITHIN)
        except TimeoutError:
            row.notes.append(f"only {storm.open}/{row.streams} open in {CONNECT_WITHIN:g} s")
        row.connect_s = (storm.t_last or now()) - t0
        row.cpu_storm = procs.cpu_s(hub.pid) - cpu0
        row.cpu_client = procs.self_cpu_s() - mine0
        if row.on:  # until each probe has read every join of its topic (or the deadline)
            with contextlib.suppress(RuntimeError):
                await wait_until(
                    lambda: all(
                        len(c.joined) >= len(members[t])
                        for c, t in zip(storm.probes, members, strict=True)
                    ),
                    QUIET_WITHIN,
                )
        busy_at = await quiet(hub.pid, QUIET_WITHIN)
        row.quiet_s = busy_at - t0
        row.cpu_quiet = procs.cpu_s(hub.pid) - cpu0
        after = await metrics(port)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            await asyncio.to_thread(spy.wait, 30)
            say(f"profile of the hub: {spy.args[-1]}")

        def grew(sample: str) -> int:
            return int(after.get(sample, 0) - before.get(sample, 0))

        row.writes = grew("hub_stream_writes_total")
        row.bytes = grew("hub_stream_bytes_total")
        row.published = grew('hub_membership_events_total{kind="join"}')
        row.failed, row.retried = storm.failed, storm.retried
        if row.on:
            # each topic's first stream (open before the others) read every user of its topic
            # join, once, itself included; the hub published each user's join once
            row.probes_ok = row.published == row.storm and all(
                sorted(c.joined) == sorted(members[t])
                for c, t in zip(storm.probes, members, strict=True)
            )
        else:
            row.probes_ok = row.published == 0 and not any(c.joined for c in storm.probes)
        if storm.errors:
            row.notes.append("errors: " + ", ".join(f"{k} x{v}" for k, v in storm.errors.items()))
        say(
            f"cell {row.name} round {row.round}: {storm.open}/{row.streams} open in "
            f"{row.connect_s:.2f} s ({row.rate:,.0f}/s), hub CPU {row.cpu_storm:.2f} s "
            f"(clients {row.cpu_client:.2f} s) "
            f"({row.cpu_quiet:.2f} s to quiet at {row.quiet_s:.2f} s), writes {row.writes:,}, "
            f"bytes {row.bytes:,}, users in joins {row.published:,}: "
            f"{'OK' if row.ok else 'FAILED'}"
        )
    finally:
        if storm is not None:
            storm.close()
        await asyncio.to_thread(hub.stop)


def order(rounds: int) -> list[tuple[int, str, bool]]:
    """(round, layout, on) in run order: off then on in odd rounds, on then off in even."""
    cells = []
    for r in range(1, rounds + 1):
        for layout in LAYOUTS:
            for on in (False, True) if r % 2 else (True, False):
                cells.append((r, layout, on))
    return cells


def table(rows: list[Row]) -> list[str]:
    out = [
        f"{'cell':<24}{'round':>6}{'streams':>9}{'connect s':>11}{'connects/s':>12}"
        f"{'CPU us/conn':>13}{'to quiet':>10}{'quiet s':>9}{'writes':>10}{'MB written':>12}"
        f"{'joined':>8}  check"
    ]
    for r in rows:
        out.append(
            f"{r.name:<24}{r.round:>6}{r.streams:>9,}{r.connect_s:>11.2f}{r.rate:>12,.0f}"
            f"{r.cpu_storm / r.storm * 1e6:>13.0f}{r.cpu_quiet / r.storm * 1e6:>10.0f}"
            f"{r.quiet_s:>9.2f}{r.writes:>10,}{r.bytes / 1e6:>12.1f}{r.published:>8,}  "
            f"{'OK' if r.ok else 'FAILED'}"
        )
    return out


def summary(rows: list[Row]) -> list[str]:
    out = []
    for layout in LAYOUTS:
        off = [r for r in rows if r.layout == layout and not r.on and r.connect_s]
        on = [r for r in rows if r.layout == layout and r.on and r.connect_s]
        if not off or not on:
            continue
        rate_off = statistics.mean(r.rate for r in off)
        rate_on = statistics.mean(r.rate for r in on)
        cpu_off = statistics.mean(r.cpu_quiet / r.storm for r in off) * 1e6
        cpu_on = statistics.mean(r.cpu_quiet / r.storm for r in on) * 1e6
        cost, cpu_cost = 1 - rate_on / rate_off, 1 - cpu_off / cpu_on
        out.append(
            f"{layout}: connects/s off {rate_off:,.0f}, on {rate_on:,.0f} "
            f"(x{rate_on / rate_off:.2f}, a cost of {cost:.0%}); hub CPU/connect to quiet "
            f"off {cpu_off:.0f} us, on "
            f"{cpu_on:.0f} us (x{cpu_on / cpu_off:.2f}: one core's connect rate "
            f"{1e6 / cpu_off:,.0f}/s -> {1e6 / cpu_on:,.0f}/s, a cost of {cpu_cost:.0%}); "
            f"target <= 20%: {'met' if max(cost, cpu_cost) <= 0.20 else 'NOT met'}"
        )
    return out


async def main_async(
    streams: int, rounds: int, keep: bool, say: Callable[[str], None]
) -> list[Row]:
    core, _ = procs.cores()
    if core is not None:
        others = sorted(os.sched_getaffinity(0) - {core})
        os.sched_setaffinity(0, others)
    tmp = Path(tempfile.mkdtemp(prefix="bench-joins-"))
    rows: list[Row] = []
    try:
        for r, layout, on in order(rounds):
            row = Row(layout, on, r, streams)
            await run_cell(row, tmp, core, say)
            rows.append(row)
    finally:
        procs.drop_logs(tmp, keep or bool(os.environ.get("JOINS_PROFILE")), say)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.joins", description=__doc__)
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--quick", action="store_true", help="300 streams, one round (a test)")
    parser.add_argument("--keep", action="store_true", help="keep the hubs' logs")
    args = parser.parse_args()
    streams = QUICK["streams"] if args.quick else args.streams
    rounds = QUICK["rounds"] if args.quick else args.rounds
    if streams < 10 or rounds < 1:
        parser.error("--streams must be at least 10 and --rounds at least 1")
    procs.enough_descriptors("bench.joins", streams)
    t_run, say = procs.sayer()
    say(f"bench.joins: {' '.join(sys.argv[1:]) or '(defaults)'}")
    say(f"machine: {procs.machine()}")
    say(f"hub: commit {procs.commit('--untracked-files=no')}")
    say(
        f"{streams:,} streams, each its own user, {IN_FLIGHT} connects in flight, after each "
        "topic's probe (on the topic and its presence topic); one-topic: all on room:1, "
        "ten-topics: room:0..9, one-topic-all-watch: all on room:1 and presence:room:1; on = "
        f"--join-leave {JOIN_LEAVE}; hub on core 0, this process on the others"
    )
    rows = procs.run_main("bench.joins", main_async(streams, rounds, args.keep, say), RUN_WITHIN)
    print()
    print("\n".join(table(rows)))
    print(
        "CPU us/conn: the hub's CPU per connect from the first connect to the last 200; to quiet: "
        "until its CPU stayed under 5 % for 0.3 s (the last join events written); writes, MB "
        "written: to stream sockets (/metrics); joined: users published in join events; check: "
        "every stream opened, and each topic's first stream read every user of its topic join "
        "once (on), or no join (off)"
    )
    print("\n".join(summary(rows)))
    ok = bool(rows) and all(r.ok for r in rows)
    print(f"total: {len(rows)} cells: {'OK' if ok else 'FAILED'} in {now() - t_run:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
