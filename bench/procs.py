"""What the process benches (bench.hold, bench.storm, bench.resume_loops) share about their
processes: the hub and the side process they start (each ended by its own PID, see
bench.servers), what /proc says of a process and of the machine, the tokens they mint, the
headers of their reports, and the frame of their ``main``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar

import jwt

from bench import servers
from bench.faults_check import STORED, Attempt
from bench.faults_clients import http_get, post

REPO = Path(__file__).resolve().parent.parent
now = time.monotonic
T = TypeVar("T")

READY_WITHIN = 30.0  # seconds a hub has to answer /readyz 200
PACED_TICK = 0.01  # a paced publisher sends what it owes every PACED_TICK seconds
PACED_BATCH = 50  # events per publish at most (a publisher that fell behind catches up)


def token(secret: str, sub: str, **claims: Any) -> str:
    """A subscriber (or, with publish=True, publisher) JWT, HS256 with the hub's secret."""
    return jwt.encode(
        {"sub": sub, "exp": int(time.time()) + 7200, **claims}, secret, algorithm="HS256"
    )


def clean_env(*drop: str) -> dict[str, str]:
    """This process's environment without the hub's settings (HUB_*) nor `drop`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HUB_") and k not in drop}


def cores() -> tuple[int | None, list[int]]:
    """The hub's core and everyone else's (None, all: fewer than two cores, nothing pinned)."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return None, mine
    return mine[0], mine[1:]


# -- /proc -----------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat after its command's name (fields[1] is the parent, 11 and 12 utime
    and stime), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def cpu_s(pid: int) -> float:
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def busy_s() -> float:
    """Busy seconds of every core (/proc/stat: all but idle and iowait), softirq included."""
    total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                vals = [int(v) for v in line.split()[1:9]]
                total += sum(vals) - vals[3] - vals[4]
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a --workers supervisor's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def proc_status_kb(pid: int, field_name: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0): whether it could."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def listen_overflows() -> int:
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(dict(zip(lines[0][1:], lines[1][1:], strict=False)).get("ListenOverflows", 0))
    except (OSError, IndexError, ValueError):
        return 0


# -- the hub ---------------------------------------------------------------------------------


class Hub:
    """A hub process on a loopback port, its output in a log file; ended by its PID
    (bench.servers.STARTED). `argv` starts it (taskset execs the hub: the same PID)."""

    grace = 8.0  # seconds between its SIGTERM and a SIGKILL when it is stopped

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.port = port
        self.log = log
        self.argv = argv
        self.proc = servers.spawn(argv, env=env, log=log)
        self.pid = self.proc.pid

    def complete(self) -> bool:
        """Whether all its processes are there (a supervisor's workers)."""
        return True

    async def wait_ready(self, streak: int = 1) -> None:
        """Until /readyz answers 200 `streak` times in a row (and it is complete)."""
        deadline = now() + READY_WITHIN
        ok = 0
        while now() < deadline and self.proc.poll() is None:
            ok = ok + 1 if await http_get(self.port, "/readyz", 1.0) == 200 else 0
            if ok >= streak and self.complete():
                return
            await asyncio.sleep(0.05)  # polling inside a deadline
        raise RuntimeError(
            f"hub on port {self.port} not ready (exit {self.proc.poll()}):\n{self.tail()}"
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> None:
        servers.stop(self.proc, grace=self.grace)


# -- the side process --------------------------------------------------------------------------


def emit(message: dict[str, Any]) -> None:
    """In the side process: one JSON object a line on stdout."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def pipe_reader(pipe: IO[Any], limit: int = 1 << 16) -> asyncio.StreamReader:
    """A stream reader on a pipe (stdin in the side process; its stdout here)."""
    reader = asyncio.StreamReader(limit=limit)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


class Side:
    """A side process (``python -m <bench> --side ...``) seen from here: driven over its stdin
    and stdout, one JSON object a line each way (on_message takes each); its stderr in a log;
    ended when its stdin is closed, else by its PID."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        servers.STARTED.append(self.proc)
        self.reader_task: asyncio.Task[None] | None = None

    async def listen(self, limit: int) -> None:
        """Its stdout read from now on, each line to on_message (on_end once it ends)."""
        assert self.proc.stdout is not None
        reader = await pipe_reader(self.proc.stdout, limit)
        self.reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.on_message(json.loads(line))
        self.on_end()

    def on_message(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        """Its stdout ended (it exited)."""

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def close(self, within: float = 15.0) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the side process ends when its stdin does
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(within)
        servers.stop(self.proc, grace=2.0)
        if self.reader_task is not None:
            self.reader_task.cancel()


class PublishingSide(Side):
    """A side process that publishes (Paced): every id its publishes were acknowledged, in id
    order (one request in flight), and the marks awaited here."""

    ended = "the side process ended"  # what a mark still awaited fails with when it ends

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        super().__init__(argv, log, env)
        self.acks: list[str] = []
        self.marks: dict[str, asyncio.Future[list[str]]] = {}

    def acked(self, msg: dict[str, Any]) -> None:
        self.acks.extend(msg["ack"])
        future = self.marks.pop(msg["tag"], None) if msg["tag"] else None
        if future is not None and not future.done():
            future.set_result(msg["ack"])

    def mark_failed(self, tag: str, why: str) -> None:
        future = self.marks.pop(tag, None)
        if future is not None and not future.done():
            future.set_exception(RuntimeError(why))

    def on_end(self) -> None:
        for future in self.marks.values():
            if not future.done():
                future.set_exception(RuntimeError(self.ended))

    async def mark_once(self, count: int, tag: str, within: float) -> list[str]:
        """Publish `count` events tagged `tag` through the publisher's queue; their ids."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self.marks[tag] = future
        self.send({"cmd": "mark", "n": count, "tag": tag})
        return await asyncio.wait_for(future, within)


class Paced:
    """In the side process: broadcasts (type 5) POSTed to the hub on `port` at `rate`
    events/s, one request in flight, each answer reported on stdout (an `ack` here, anything
    else to `failed`); the marks queued (count, tag) go first. `stamp`: each event's data
    carries its send time (`t`, this machine's monotonic clock)."""

    def __init__(
        self,
        port: int,
        publisher_token: str,
        rate: float,
        failed: Callable[[Attempt, str | None], None],
        stamp: bool = False,
    ) -> None:
        self.port = port
        self.rate = rate
        self.failed = failed
        self.stamp = stamp
        self.headers = {
            "Authorization": f"Bearer {publisher_token}",
            "Content-Type": "application/json",
        }
        self.marks: list[tuple[int, str]] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def publish(self, events: list[dict[str, Any]], tag: str | None) -> None:
        attempt = await post(0, self.port, self.headers, json.dumps(events).encode(), timeout=10.0)
        if attempt.outcome == STORED:
            emit({"ack": json.loads(attempt.detail), "tag": tag})
        else:
            self.failed(attempt, tag)

    async def run(self) -> None:
        start, sent, n = now(), 0, 0
        while not self.stop.is_set():
            if self.marks:
                count, tag = self.marks.pop(0)
                await self.publish(
                    [{"type": 5, "data": {"mark": tag, "i": i}} for i in range(count)], tag
                )
                continue
            owed = min(PACED_BATCH, int(self.rate * (now() - start)) - sent)
            if owed >= 1:
                if self.stamp:
                    t = round(now(), 4)
                    events = [{"type": 5, "data": {"n": n + i, "t": t}} for i in range(owed)]
                else:
                    events = [{"type": 5, "data": {"n": n + i}} for i in range(owed)]
                await self.publish(events, None)
                sent += owed  # (failed or not: the pace does not catch up on refusals)
                n += owed
                continue
            with contextlib.suppress(TimeoutError):  # pacing, not a synchronisation
                await asyncio.wait_for(self.stop.wait(), PACED_TICK)

    async def close(self) -> None:
        """Stop, its publish in flight answered first (bounded)."""
        self.stop.set()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 12)


# -- the report's headers --------------------------------------------------------------------


def fmt(v: Any, spec: str = ",.0f") -> str:
    """A report's number, "-" where there is none."""
    return "-" if v is None else format(v, spec)


def ms(v: float | None) -> str:
    """A report's milliseconds: one decimal below 100, "-" where there are none."""
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def commit(*status: str, unknown: str = "?") -> str:
    """HEAD's short hash, `with uncommitted changes` when `git status --porcelain <status>`
    shows any; `unknown` when git cannot say."""

    def git(*args: str) -> str:
        try:
            r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or unknown
    dirty = git("status", "--porcelain", *status)
    return f"{head} with uncommitted changes" if dirty else head


def machine(memory: bool = True) -> str:
    """Cores, CPU model, (memory,) kernel and Python."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    if memory:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
    return (
        f"{os.cpu_count()} cores ({model}), {mem}Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


# -- main ------------------------------------------------------------------------------------


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def enough_descriptors(prog: str, streams: int) -> None:
    """Raise the descriptor limit; exit 2 when it is still short of `streams` + 200."""
    servers.raise_nofile()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < streams + 200:
        print(
            f"{prog}: {streams} streams need {streams + 200} descriptors; the limit is {soft}",
            file=sys.stderr,
        )
        sys.exit(2)


def sayer() -> tuple[float, Callable[[str], None]]:
    """SIGTERM unwinds like Ctrl-C (through every finally: each process ended by its PID); the
    run's start, and a `say` that prints a line with the seconds since."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_run = now()

    def say(text: str) -> None:
        print(f"[{now() - t_run:6.1f} s] {text}", flush=True)

    return t_run, say


def drop_logs(tmp: Path, keep: bool, say: Callable[[str], None]) -> None:
    """The run's folder of logs removed, or (keep) said where it is."""
    if keep:
        say(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def run_main(prog: str, main: Coroutine[Any, Any, T], within: float) -> T:
    """Run `main` (on uvloop when there is one) within `within` seconds; every process
    started is ended by its PID whatever happens; Ctrl-C exits 130."""
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(asyncio.wait_for(main, within))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        servers.stop_all()
