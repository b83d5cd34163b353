"""``python -m bench``: every scenario of issue 3 against the hub (and nchan), one table.

The server under test runs as its own process pinned to core 0 (``taskset -c 0``); the load
generator (``bench/loadgen.py``) runs as another process pinned to core 1 and reports its own
CPU. Each scenario gets a fresh server process, so RSS and history start clean. Loopback only.
Every process started is ended by its PID, also on Ctrl-C and errors.

    .venv/bin/python -m bench                      # every scenario, the hub
    .venv/bin/python -m bench --nchan              # ... and nchan side by side
    .venv/bin/python -m bench --only bcast-2k,idle --duration 5
    .venv/bin/python -m bench --no-hub --nchan     # nchan alone (validates the load generator)
    .venv/bin/python -m bench --only churn --soak 30   # churn and a shorter soak, alone

The reliability scenarios (`churn`, `flood`) are commands of their own (bench/churn.py,
bench/flood.py); their reports follow the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.scenarios import Scenario, all_scenarios, select

SERVER_CORE = 0
LOADGEN_CORE = 1
LOADGEN_LIMIT_PCT = 90.0
NOISE_PCT = 15.0  # unaccounted core time above which a row is marked noisy


def mint_tokens(secret: str, n: int, path: Path) -> None:
    import jwt

    exp = int(time.time()) + 3600 * 6
    subs = [
        jwt.encode({"sub": f"u{i}", "exp": exp, "topics": ["*"]}, secret, algorithm="HS256")
        for i in range(n)
    ]
    pub = jwt.encode({"sub": "bench", "exp": exp, "publish": True}, secret, algorithm="HS256")
    path.write_text(json.dumps({"subscribers": subs, "publisher": pub}))


def run_loadgen(spec: dict[str, Any], timeout: float, log: Path) -> dict[str, Any]:
    argv = ["taskset", "-c", str(LOADGEN_CORE), sys.executable, "-m", "bench.loadgen"]
    with open(log, "ab") as err:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            preexec_fn=servers.raise_nofile,
            cwd=servers.REPO,
        )
    servers.STARTED.append(p)
    try:
        out, _ = p.communicate(json.dumps(spec).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        servers.stop(p)
        return {"error": f"loadgen did not finish in {timeout:.0f}s"}
    finally:
        servers.stop(p)
    lines = out.decode(errors="replace").strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        return {"error": f"loadgen exit {p.returncode}: {tail}"}
    try:
        res: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"loadgen output unreadable: {lines[-1][:300]}"}
    return res


def hub_kind(kind: str) -> bool:
    """`hub` (memory broker), `redis` (the Redis broker), `redis-2w` (and 2 workers)."""
    return kind == "hub" or kind.startswith("redis")


def run_one(
    sc: Scenario,
    kind: str,
    args: argparse.Namespace,
    tmp: Path,
    secret: str,
    hub_help: str,
    redis: servers.RedisServer | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": sc.name, "server": kind, "streams": sc.streams}
    row["offered"] = sc.offered
    server: servers.Server | None = None
    try:
        if hub_kind(kind):
            extra = list(args.hub_arg or [])
            core: int | str = SERVER_CORE
            if kind.startswith("redis"):
                assert redis is not None
                redis.command(b"FLUSHALL")
                extra += ["--broker", redis.url]
                workers = int(kind.partition("-")[2].rstrip("w") or 1)
                if workers > 1:
                    # several workers need several cores: they share both with the load
                    # generator (and Redis), which stay on core 1
                    extra += ["--workers", str(workers)]
                    core = f"{SERVER_CORE},{LOADGEN_CORE}"
            server = servers.HubServer(
                tmp,
                secret,
                core,
                args.loop,
                extra,
                hub_help,
                shlex.split(args.hub_cmd) if args.hub_cmd else None,
            )
        else:
            server = servers.NchanServer(tmp, SERVER_CORE)
        pub = sc.publisher("hub" if hub_kind(kind) else kind)
        if pub is not None and args.publisher:
            pub.update(json.loads(args.publisher))
        spec: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": server.port,
            "server_pid": server.pid,
            "streams": sc.streams,
            "routing": sc.routing,
            "probes": min(sc.probes, args.probes) if sc.probes else 0,
            "connect_rate": sc.extra.get("connect_rate", args.connect_rate),
            "duration": args.duration,
            "idle_hold": min(args.duration, 3.0),
            "publish": pub,
            "kind": "hub" if hub_kind(kind) else kind,
            "tokens_file": str(tmp / "tokens.json") if hub_kind(kind) else None,
            "broker_pid": redis.pid if redis is not None and kind.startswith("redis") else None,
            "core": None,  # taskset pins it
            "loadgen_loop": "uvloop",
            "rcvlowat": args.rcvlowat,
        }
        connect_budget = sc.streams / spec["connect_rate"] + 35
        timeout = connect_budget + args.duration + 60
        spec["timeout"] = timeout - 5
        res = run_loadgen(spec, timeout, tmp / f"loadgen-{sc.name}-{kind}.log")
        row.update(res)
        if server.proc is not None and server.proc.poll() is not None:
            row["error"] = (row.get("error") or "") + f" server exited ({server.proc.returncode})"
            row["server_log"] = server.log_tail()
    except Exception as e:  # one failing scenario must not end the run
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        if server is not None:
            server.stop()
    return row


# ---------------------------------------------------------------------------- the table

COLS = [
    ("scenario", 13, "<"),
    ("server", 8, "<"),
    ("streams", 7, ">"),
    ("offered/s", 9, ">"),
    ("publ/s", 9, ">"),
    ("deliv/s", 10, ">"),
    ("p50ms", 7, ">"),
    ("p90ms", 7, ">"),
    ("p99ms", 7, ">"),
    ("maxms", 7, ">"),
    ("lost", 7, ">"),
    ("srvCPU%", 7, ">"),
    ("sys%", 4, ">"),
    ("core0%", 6, ">"),
    ("KB/strm", 7, ">"),
    ("lgCPU%", 6, ">"),
    ("core1%", 6, ">"),
    ("unacc%", 6, ">"),
    ("notes", 0, "<"),
]


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    if v is None:
        return "-"
    return fmt.format(v)


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def unaccounted(r: dict[str, Any]) -> float | None:
    """Core time (both cores) neither the server, the loadgen nor the benchmark's own
    redis-server was charged for: softirq work of loopback TCP plus whatever else ran. Large
    values mean a noisy measurement."""
    cores = r.get("cores_busy_pct") or {}
    if r.get("srv_cpu_pct") is None or r.get("lg_cpu_pct") is None or not cores:
        return None
    busy = cores.get(f"cpu{SERVER_CORE}", 0) + cores.get(f"cpu{LOADGEN_CORE}", 0)
    return max(0.0, busy - r["srv_cpu_pct"] - r["lg_cpu_pct"] - (r.get("broker_cpu_pct") or 0))


def sustained(r: dict[str, Any]) -> bool | None:
    if r.get("offered") is None or r.get("published_rate") is None:
        return None
    return (
        r["published_rate"] >= 0.99 * r["offered"]
        and r.get("lost") == 0
        and not r.get("disconnects")
        and not r.get("pub_errors")
    )


def notes(r: dict[str, Any]) -> str:
    out = []
    if r.get("error"):
        return "ERROR: " + " ".join(str(r["error"]).split())[:160]
    if r.get("connect_s") is not None and r.get("scenario", "").startswith("idle"):
        out.append(f"connect all {r['connect_s']:.2f}s")
        if r["connect_s"] > 0:
            out.append(f"{r['streams'] / r['connect_s']:,.0f} connects/s")
        if r.get("connect_cpu_us") is not None:
            out.append(f"{r['connect_cpu_us']:.0f} us server CPU/connect")
    elif r.get("streams") and r.get("connect_s") is None:
        out.append(f"only {r.get('connected', 0)}/{r['streams']} connected")
    ov = (r.get("tcp_ext") or {}).get("ListenOverflows")
    if ov:
        out.append(f"{ov} listen-queue overflows")
    s = sustained(r)
    if s is True:
        out.append("sustained")
    elif s is False:
        pct = 100 * r["published_rate"] / r["offered"] if r["offered"] else 0
        out.append(f"NOT sustained ({pct:.0f}% published)")
    if r.get("offered") is None and r.get("request_rate") is not None:
        out.append(f"{r['request_rate']:,.0f} req/s")
    if r.get("extra"):
        out.append(f"extra {r['extra']}")
    if r.get("disconnects"):
        out.append(f"{r['disconnects']} streams dropped")
    if r.get("connect_errors"):
        out.append(f"{r['connect_errors']} connect errors")
    if r.get("pub_errors"):
        out.append(f"{r['pub_errors']} publish errors")
    if r.get("answers_complete") is False:
        out.append("answers missing")
    if (r.get("machine_busy_pct") or 0) >= 10:
        out.append(f"machine {r['machine_busy_pct']:.0f}% busy before")
    if (unaccounted(r) or 0) >= NOISE_PCT:
        out.append("NOISY: other work on the cores")
    if r.get("chunked_streams"):
        out.append("chunked")
    if (r.get("lg_cpu_pct") or 0) > LOADGEN_LIMIT_PCT:
        out.append("LIMITED BY LOADGEN")
    return ", ".join(out)


def format_row(r: dict[str, Any]) -> list[str]:
    kb = r.get("rss_per_stream_kb")
    return [
        r["scenario"],
        r["server"],
        _num(r.get("streams")),
        _num(r.get("offered"))
        if r.get("offered") is not None
        else ("closed" if r.get("acked_requests") is not None else "-"),
        _num(r.get("published_rate")),
        _num(r.get("delivery_rate")),
        _ms(r.get("p50_ms")),
        _ms(r.get("p90_ms")),
        _ms(r.get("p99_ms")),
        _ms(r.get("max_ms")),
        _num(r.get("lost")),
        _num(r.get("srv_cpu_pct")),
        _num(r.get("srv_sys_pct")),
        _num((r.get("cores_busy_pct") or {}).get(f"cpu{SERVER_CORE}")),
        _num(kb, "{:.1f}") if kb is not None else "-",
        _num(r.get("lg_cpu_pct")),
        _num((r.get("cores_busy_pct") or {}).get(f"cpu{LOADGEN_CORE}")),
        _num(unaccounted(r)),
        notes(r),
    ]


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    head = []
    for name, w, al in COLS:
        head.append(f"{name:{al}{w}}" if w else name)
    lines.append(" ".join(head).rstrip())
    lines.append("-" * len(lines[0]))
    for r in rows:
        cells = format_row(r)
        lines.append(
            " ".join(
                f"{c:{al}{w}}" if w else c for c, (_, w, al) in zip(cells, COLS, strict=True)
            ).rstrip()
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the targets


def check_targets(rows: list[dict[str, Any]]) -> str:
    hub = {r["scenario"]: r for r in rows if r["server"] == "hub" and not r.get("error")}
    nch = {r["scenario"]: r for r in rows if r["server"] == "nchan" and not r.get("error")}
    if not hub:
        return ""
    out = ["Targets (issue 3), hub:"]

    def line(ok: bool | None, what: str, got: str) -> None:
        mark = {True: "MET    ", False: "MISSED ", None: "n/a    "}[ok]
        out.append(f"  {mark} {what}: {got}")

    def lg(r: dict[str, Any]) -> str:
        v = r.get("lg_cpu_pct") or 0
        return " [limited by loadgen]" if v > LOADGEN_LIMIT_PCT else ""

    r = hub.get("idle-10k-ramp10k")
    if r and r.get("connect_s"):
        ov = (r.get("tcp_ext") or {}).get("ListenOverflows", 0)
        line(
            ov == 0,
            "10,000 arriving at 10,000/s: the rate sustained, no listen-queue overflow",
            f"{r['streams'] / r['connect_s']:,.0f} connects/s, {ov} overflows",
        )
    r = hub.get("idle-10k")
    if r:
        kb = r.get("rss_per_stream_kb")
        line(kb is not None and kb <= 5.0, "10,000 idle streams <= 5 KB each", f"{kb:.1f} KB")
        c = r.get("connect_s")
        line(
            c is not None and c <= 2.2,
            "10,000 connected at 5,000/s in <= 2.2 s",
            "not all connected" if c is None else f"{c:.2f} s",
        )
    for name, p99t in (
        ("bcast-2k-200", 80),
        ("bcast-2k-500", 100),
        ("bcast-2k-1000", 150),
        ("bcast-10k-100", 150),
        ("bcast-10k-200", 300),
    ):
        r = hub.get(name)
        if not r:
            continue
        s = sustained(r)
        p99 = r.get("p99_ms")
        ok = bool(s) and p99 is not None and p99 <= p99t
        line(
            ok,
            f"{name}: sustained, 0 lost, p99 <= {p99t} ms",
            f"{r.get('delivery_rate', 0):,.0f} deliveries/s, "
            f"{'sustained' if s else 'not sustained'}, lost {r.get('lost')}, "
            f"p99 {_ms(p99)} ms{lg(r)}",
        )
    # issue 7: a topic every stream reads costs what a broadcast costs (>= 90% of it, same run)
    for topic, bcast in (
        ("topic-2k-200", "bcast-2k-200"),
        ("topic-2k-500", "bcast-2k-500"),
        ("topic-2k-1000", "bcast-2k-1000"),
        ("closed-topic-2k", "closed-2k"),
    ):
        t, b = hub.get(topic), hub.get(bcast)
        if not t or not b:
            continue
        ratio = t.get("delivery_rate", 0) / max(1.0, b.get("delivery_rate", 0))
        line(
            ratio >= 0.9 and t.get("lost") == 0,
            f"{topic}: >= 90% of {bcast} deliveries/s, 0 lost",
            f"{t.get('delivery_rate', 0):,.0f}/s = {ratio:.0%} of "
            f"{b.get('delivery_rate', 0):,.0f}/s, lost {t.get('lost')}{lg(t)}",
        )
    r = hub.get("private-10k")
    if r:
        s = sustained(r)
        p99 = r.get("p99_ms")
        ok = bool(s) and p99 is not None and p99 <= 100
        line(
            ok,
            "private: 100,000 events/s routed+delivered, sustained, 0 lost, p99 <= 100 ms",
            f"published {r.get('published_rate', 0):,.0f}/s, delivered "
            f"{r.get('delivery_rate', 0):,.0f}/s, lost {r.get('lost')}, p99 {_ms(p99)} ms{lg(r)}",
        )
        n = nch.get("private-10k")
        if n:
            ratio = r.get("delivery_rate", 0) / max(1.0, n.get("delivery_rate", 0))
            line(
                ratio >= 2.5,
                "private: >= 2.5x nchan",
                f"{ratio:.2f}x (nchan {n.get('delivery_rate', 0):,.0f}/s)",
            )
        else:
            line(None, "private: >= 2.5x nchan", "nchan not run")
    r = hub.get("closed-2k")
    if r:
        n = nch.get("closed-2k")
        if n:
            ratio = r.get("delivery_rate", 0) / max(1.0, n.get("delivery_rate", 0))
            line(
                ratio >= 4 and r.get("lost") == 0,
                "closed-loop publisher: >= 4x nchan deliveries/s",
                f"{r.get('delivery_rate', 0):,.0f}/s = {ratio:.2f}x nchan "
                f"({n.get('delivery_rate', 0):,.0f}/s), lost {r.get('lost')}{lg(r)}",
            )
        else:
            line(
                None,
                "closed-loop publisher: >= 4x nchan deliveries/s",
                f"{r.get('delivery_rate', 0):,.0f}/s (nchan not run)",
            )
    r = hub.get("light-2k")
    if r:
        n = nch.get("light-2k")
        p99 = r.get("p99_ms")
        if n and n.get("p99_ms") is not None and p99 is not None:
            line(
                p99 <= n["p99_ms"] and r.get("lost") == 0,
                "light load: p99 no worse than nchan",
                f"p99 {_ms(p99)} ms vs nchan {_ms(n['p99_ms'])} ms",
            )
        else:
            line(None, "light load: p99 no worse than nchan", f"p99 {_ms(p99)} ms (no nchan)")
    r = hub.get("nosub-single")
    if r:
        rr = r.get("request_rate") or 0
        line(rr >= 5000, "no subscribers: >= 5,000 publish requests/s", f"{rr:,.0f} req/s")
    r = hub.get("nosub-batch")
    if r:
        pr = r.get("published_rate") or 0
        line(pr >= 200_000, "no subscribers, batched: >= 200,000 events/s", f"{pr:,.0f} events/s")
    return "\n".join(out)


def check_redis(rows: list[dict[str, Any]]) -> str:
    """Issue 9: the Redis broker keeps >= 80% of the memory broker's sustained throughput in
    broadcast and private routing, and adds <= 2 ms to p50 at light load (same run)."""
    ok_rows = [r for r in rows if not r.get("error")]
    mem = {r["scenario"]: r for r in ok_rows if r["server"] == "hub"}
    others = sorted({r["server"] for r in ok_rows if r["server"].startswith("redis")})
    if not mem or not others:
        return ""
    out = ["Targets (issue 9), Redis broker vs memory broker, same run:"]
    for kind in others:
        red = {r["scenario"]: r for r in ok_rows if r["server"] == kind}
        for name, r in red.items():
            m = mem.get(name)
            if m is None:
                continue
            if name.startswith(("bcast", "private", "topic", "closed", "nosub")):
                key = "published_rate" if name.startswith("nosub") else "delivery_rate"
                ratio = (r.get(key) or 0) / max(1.0, m.get(key) or 0)
                target = name.startswith(("bcast", "private"))
                met = ratio >= 0.8 and r.get("lost") in (0, None)
                mark = ("MET    " if met else "MISSED ") if target else "(info) "
                out.append(
                    f"  {mark} {kind} {name}: {r.get(key) or 0:,.0f}/s = {ratio:.0%} of memory "
                    f"{m.get(key) or 0:,.0f}/s, lost {r.get('lost')}"
                )
            elif name.startswith("light") and r.get("p50_ms") is not None and m.get("p50_ms"):
                delta = r["p50_ms"] - m["p50_ms"]
                mark = "MET    " if delta <= 2.0 else "MISSED "
                out.append(
                    f"  {mark} {kind} {name}: p50 {_ms(r['p50_ms'])} ms vs memory "
                    f"{_ms(m['p50_ms'])} ms ({delta:+.1f} ms; target <= +2 ms)"
                )
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def machine_load(seconds: float = 1.0) -> float:
    """Percent of all cores busy (user+system+irq+softirq+steal) over a short sample."""

    def busy() -> tuple[float, float]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        return sum(vals) - vals[3] - vals[4], sum(vals)

    b0, t0 = busy()
    time.sleep(seconds)
    b1, t1 = busy()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, threshold: float = 10.0) -> float:
    """Wait (up to max_wait s) until other work leaves the cores (< threshold % busy); returns
    the last load seen. Another process on the cores skews every number of a scenario."""
    deadline = time.monotonic() + max_wait
    while True:
        load = machine_load(0.5)
        if load < threshold or time.monotonic() >= deadline:
            if load >= threshold:
                print(f"bench: the machine is still {load:.0f}% busy; going on", file=sys.stderr)
            return load
        print(f"bench: waiting for a quiet machine ({load:.0f}% busy)", file=sys.stderr)


def run_module(sc: Scenario, args: argparse.Namespace) -> tuple[bool, str]:
    """Run a scenario that is a command of its own; (passed, its report)."""
    assert sc.module is not None
    argv = [sys.executable, "-m", sc.module]
    if sc.module == "bench.churn":
        argv += ["--soak", str(args.soak), "--cycles", str(args.cycles)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, cwd=servers.REPO, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=args.soak + 300)
    except BaseException as exc:
        proc.send_signal(signal.SIGTERM)  # it ends the hub it started, by PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if isinstance(exc, subprocess.TimeoutExpired):
            return False, f"{sc.name}: did not finish within {args.soak + 300:.0f} s  [FAILED]"
        raise
    return proc.returncode == 0, out.strip() or f"{sc.name}: exit {proc.returncode}  [FAILED]"


def git_head() -> str:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=servers.REPO,
            timeout=5,
        )
        return r.stdout.strip() or "no commit"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join(sc.name for sc in all_scenarios())
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="The hub's benchmark (issue 3). Scenarios: " + names,
    )
    ap.add_argument("--only", action="append", help="scenario names or prefixes, comma-separated")
    ap.add_argument("--duration", type=float, default=8.0, help="publish seconds per scenario")
    ap.add_argument("--soak", type=float, default=120.0, help="seconds of the churn's soak")
    ap.add_argument("--cycles", type=int, default=10_000, help="the churn's connect cycles")
    ap.add_argument("--nchan", action="store_true", help="also run nchan as the reference")
    ap.add_argument("--no-hub", action="store_true", help="skip the hub (with --nchan: nchan only)")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], help="the hub's event loop")
    ap.add_argument("--hub-arg", action="append", help="extra argument for the hub (repeatable)")
    ap.add_argument(
        "--broker",
        choices=["memory", "redis", "both"],
        default="memory",
        help="the hub's broker; redis and both start a private redis-server on core "
        f"{LOADGEN_CORE} (both: each scenario on memory, then on Redis, in the same run)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="with the Redis broker, also run each scenario with this many hub workers "
        "(they share both cores with the load generator and Redis)",
    )
    ap.add_argument("--hub-cmd", help="command that starts the hub instead of .venv/bin/hub")
    ap.add_argument("--connect-rate", type=float, default=5000.0, help="new streams per second")
    ap.add_argument("--probes", type=int, default=200, help="max latency probe streams")
    ap.add_argument(
        "--rcvlowat",
        type=int,
        default=0,
        help="SO_RCVLOWAT bytes on counting (non-probe) streams, fewer reads for the loadgen; "
        "default 0: read every byte as it arrives, like a browser",
    )
    ap.add_argument("--publisher", help="JSON merged into the publisher settings (experiments)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each scenario wait up to S seconds for other load to leave the cores",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="run a scenario again (up to N times) when other work ran on the cores meanwhile",
    )
    ap.add_argument(
        "--max-time",
        type=float,
        default=900.0,
        help="stop starting throughput scenarios after S seconds (churn and flood still run)",
    )
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--json", type=Path, help="write the raw results (JSON) to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = select(all_scenarios(), args.only or [])
    kinds = []
    if not args.no_hub:
        kinds += ["hub"] if args.broker in ("memory", "both") else []
        kinds += ["redis"] if args.broker in ("redis", "both") else []
        kinds += [f"redis-{args.workers}w"] if args.workers > 1 and args.broker != "memory" else []
    kinds += ["nchan"] if args.nchan else []
    if not kinds:
        raise SystemExit("nothing to run: --no-hub without --nchan")
    servers.raise_nofile()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (`cmd &`)
    hub_help = ""
    if any(hub_kind(k) for k in kinds):
        hub_help = servers.hub_help()
        if not hub_help:
            print(
                "bench: `.venv/bin/hub --help` does not work yet: skipping the hub", file=sys.stderr
            )
            kinds = [k for k in kinds if not hub_kind(k)]
    if "nchan" in kinds and not servers.nginx_available():
        print("bench: nginx with the nchan module not found: skipping nchan", file=sys.stderr)
        kinds.remove("nchan")
    if not kinds:
        return 1

    load = machine_load()
    if load > 5:
        print(f"bench: warning: the machine is {load:.0f}% busy before the start", file=sys.stderr)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    reports: list[str] = []  # of the scenarios that are commands of their own
    header = [
        f"# python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"# {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit {git_head()}",
        f"# {machine()}",
        f"# server pinned to core {SERVER_CORE}, load generator (uvloop) pinned to core "
        f"{LOADGEN_CORE}; {args.duration:g} s per scenario; hub loop: {args.loop or 'default'}",
        f"# machine busy before the start: {load:.0f}% of all cores; core0%/core1%: each core's "
        "busy time (incl. softirq) during the publish window;\n"
        "# unacc%: core time charged to neither (nor to redis-server); sys%: the server's kernel "
        "time (in srvCPU%)",
        "# server `hub`: memory broker; `redis`: Redis broker, redis-server pinned to core "
        f"{LOADGEN_CORE} (with the load generator); `redis-Nw`: N workers on both cores",
    ]
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmpname:
        tmp = Path(tmpname)
        secret = secrets.token_hex(20)
        redis: servers.RedisServer | None = None
        try:
            if any(k.startswith("redis") for k in kinds):
                redis = servers.RedisServer(tmp, LOADGEN_CORE)
            if any(hub_kind(k) for k in kinds):
                mint_tokens(secret, max(sc.streams for sc in scenarios) or 1, tmp / "tokens.json")
            for sc in scenarios:
                for kind in kinds:
                    if not sc.applies_to("hub" if hub_kind(kind) else kind) or (
                        sc.module is not None and kind != "hub"
                    ):
                        continue
                    # The reliability scenarios bound their own time (--soak): --max-time,
                    # meant for the throughput table, does not skip them.
                    if sc.module is None and time.monotonic() - started > args.max_time:
                        print(f"bench: --max-time reached, skipping {sc.name}", file=sys.stderr)
                        continue
                    if sc.module is not None:
                        wait_quiet(args.quiet_wait)
                        print(f"bench: {sc.name} ({sc.title}) ...", file=sys.stderr)
                        t = time.monotonic()
                        _, report = run_module(sc, args)
                        print(f"bench:   {time.monotonic() - t:.0f}s  {report}", file=sys.stderr)
                        reports.append(report)
                        continue
                    for attempt in range(1 + args.retries):
                        busy = wait_quiet(args.quiet_wait)
                        print(f"bench: {sc.name} ({sc.title}) on {kind} ...", file=sys.stderr)
                        t = time.monotonic()
                        row = run_one(sc, kind, args, tmp, secret, hub_help, redis)
                        row["machine_busy_pct"] = busy
                        row["attempt"] = attempt + 1
                        print(
                            f"bench:   {time.monotonic() - t:.0f}s  " + " | ".join(format_row(row)),
                            file=sys.stderr,
                        )
                        if (unaccounted(row) or 0) < NOISE_PCT:
                            break
                        print("bench:   other work ran on the cores: again", file=sys.stderr)
                    rows.append(row)
        except KeyboardInterrupt:
            interrupted = True
            print("bench: interrupted; ending the processes it started", file=sys.stderr)
        finally:
            servers.stop_all()
    text = "\n".join(header)
    if rows:
        text += "\n\n" + table(rows)
    for targets in (check_targets(rows), check_redis(rows)):
        if targets:
            text += "\n\n" + targets
    if reports:
        text += "\n\n" + "\n".join(reports)
    text += f"\n\n# total {time.monotonic() - started:.0f} s" + (
        " (interrupted)" if interrupted else ""
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
