"""Builds the Tornado applications from a Config, and `hub`, the command that serves them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from handlers.base import BodyDeadlines, access_logger
from handlers.commands import outbox_main, publish_main, token_main
from handlers.demo import DemoTokenHandler, start_demo
from handlers.ops import (
    HealthHandler,
    MetricsElsewhereHandler,
    MetricsHandler,
    NotFoundHandler,
    ReadyHandler,
    StaticHandler,
    TypesHandler,
)
from handlers.presence import PresenceHandler
from handlers.publish import PublishHandler
from handlers.server import HubApplication, accept_within
from handlers.stream import EventsHandler
from handlers.stream_direct import DirectStreams, defer_accept
from handlers.tickets import TicketsHandler
from handlers.tornado_internals import open_connections
from handlers.workers import CannotStart, supervise
from hub.auth import Verifier
from hub.broker import BrokerMisconfigured
from hub.config import HEADROOM, Config, ConfigError, parse_config
from hub.core import Hub
from hub.dispatch import DEFAULT_TYPES, TypeTable
from hub.logs import SafeFormatter

__all__ = ["build_app", "build_internal_app", "build_metrics_app", "main", "static_dir"]

log = logging.getLogger("hub")

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")  # the kernel's cap on every listen backlog
GC_THRESHOLD = 5000


def static_dir(config: Config) -> Path:
    """--static-dir, else static/ beside the packages (a checkout), else the installed copy."""
    if config.static_dir:
        return Path(config.static_dir)
    beside = Path(__file__).resolve().parent.parent / "static"
    if beside.is_dir():
        return beside
    return Path(sys.prefix) / "share" / "hub" / "static"


def build_app(
    config: Config, hub: Hub | None = None, types: TypeTable = DEFAULT_TYPES
) -> HubApplication:
    """The public application: streams, publishing (unless an internal listener takes it),
    operations, the demo page. `app.settings["hub"]` is the core; `types` its dispatch table
    (when the hub is built here)."""
    config.require_key()
    if hub is None:
        hub = Hub(config, types=types)
    verifier = Verifier(config.jwt_algorithm, config.jwt_secret, config.jwt_public_key)
    deps: dict[str, Any] = {"hub": hub, "verifier": verifier}
    static = str(static_dir(config))
    routes: list[Any] = [
        (r"/events", EventsHandler, deps),
        (r"/tickets", TicketsHandler, deps),
        (r"/healthz", HealthHandler, deps),
        (r"/readyz", ReadyHandler, deps),
        _metrics_route(config, deps),
        (r"/types", TypesHandler, deps),
        (r"/presence", PresenceHandler, deps),
        (r"/()", StaticHandler, {"path": static, "default_filename": "index.html"}),
        (r"/static/(.*)", StaticHandler, {"path": static}),
    ]
    if config.internal_port is None:
        publishing = {**deps, "deadlines": _body_deadlines(hub)}
        routes.append((r"/publish", PublishHandler, {**publishing, "authenticated": True}))
    if config.demo:
        routes.append((r"/demo/token", DemoTokenHandler, deps))
    success_level = logging.INFO if config.demo else logging.DEBUG
    return HubApplication(
        routes,
        hub=hub,
        verifier=verifier,
        log_function=access_logger(success_level),
        access_success_level=success_level,
        compress_response=False,  # gzip would hold SSE frames back (text/event-stream is text/*)
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
    )


def build_internal_app(hub: Hub) -> HubApplication:
    """POST /publish and GET /presence without authentication, for a listener only internal
    services reach."""
    verifier = Verifier(hub.config.jwt_algorithm, hub.config.jwt_secret, hub.config.jwt_public_key)
    deps: dict[str, Any] = {"hub": hub, "verifier": verifier}
    return HubApplication(
        [
            (
                r"/publish",
                PublishHandler,
                {
                    **deps,
                    "deadlines": _body_deadlines(hub),
                    "authenticated": False,
                },
            ),
            (r"/healthz", HealthHandler, deps),
            (r"/presence", PresenceHandler, {**deps, "authenticated": False}),
        ],
        hub=hub,
        log_function=access_logger(logging.DEBUG),
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
    )


def build_metrics_app(hub: Hub) -> HubApplication:
    """/metrics, /healthz and /readyz for --metrics-port: the scrape target of one worker."""
    verifier = Verifier(hub.config.jwt_algorithm, hub.config.jwt_secret, hub.config.jwt_public_key)
    deps: dict[str, Any] = {"hub": hub, "verifier": verifier}
    return HubApplication(
        [
            (r"/metrics", MetricsHandler, deps),
            (r"/healthz", HealthHandler, deps),
            (r"/readyz", ReadyHandler, deps),
        ],
        hub=hub,
        log_function=access_logger(logging.DEBUG),
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
    )


def _metrics_route(config: Config, deps: dict[str, Any]) -> tuple[str, type, dict[str, Any]]:
    """The public port's /metrics: the metrics, unless --metrics-port serves them; and never
    with several workers, where it would show the figures of whichever worker the kernel
    handed the connection to, as if they were the hub's (README, Metrics)."""
    if config.metrics_port is not None:
        where = f"http://{config.internal_host}:{config.metrics_port}/metrics"
        if config.workers > 1:
            where += f" (worker i of {config.workers} on {config.metrics_port} + i)"
        hint = f"metrics are served on --metrics-port: {where}"
    elif config.workers > 1:
        hint = (
            f"with --workers {config.workers} each worker is its own scrape target, and this "
            "port reaches one of them at random: set --metrics-port P to scrape worker i on P + i"
        )
    else:
        return (r"/metrics", MetricsHandler, deps)
    return (r"/metrics", MetricsElsewhereHandler, {**deps, "hint": hint})


def _body_deadlines(hub: Hub) -> BodyDeadlines:
    """The publish route's deadlines and byte budget (one route per process: public, or
    internal), shown in /metrics as hub_publish_body_bytes."""
    deadlines = BodyDeadlines(hub.config.body_timeout, hub.config.max_body_memory)
    hub.metrics.watch_bodies(lambda: deadlines.held)
    return deadlines


def _raise_fd_limit() -> None:
    """Each stream is a socket: take the hard limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def backlog_warning(asked: int, somaxconn: int | None) -> str | None:
    """What to tell the operator when the kernel caps the listen backlog below `asked`
    (net.core.somaxconn; None: unknown, nothing said). Past the accept queue the kernel drops
    SYNs, and each client dropped waits out a 1 s retransmit (the bench's `listen-queue
    overflows`)."""
    if somaxconn is None or somaxconn >= asked:
        return None
    return (
        f"the kernel caps the listen backlog at net.core.somaxconn = {somaxconn}, below the "
        f"{asked} the hub asks for: in a reconnect storm, connections past it are dropped and "
        "their clients wait out a 1 s SYN retransmit; set "
        f"`sysctl -w net.core.somaxconn={asked}` (and, under a storm, "
        f"`sysctl -w net.ipv4.tcp_max_syn_backlog={asked}` or more)"
    )


def read_somaxconn(path: Path) -> int | None:
    """net.core.somaxconn, or None where /proc cannot be read (not Linux, a sandbox)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _listen(
    port: int, host: str, what: str, reuse_port: bool, backlog: int = 128
) -> list[socket.socket]:
    """bind_sockets, or CannotStart saying which listener and why, in one line."""
    try:
        return bind_sockets(port, host, backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise CannotStart(
            f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}"
        ) from None


def _serve_metrics(
    hub: Hub,
    servers: list[HTTPServer],
    worker: int,
    limit: int,
    count_open: Callable[[], int],
    paused: Callable[[str], None],
) -> None:
    """This worker's own scrape target, on --internal-host:--metrics-port + worker: its own
    port, not shared (README, Metrics: one scrape target per worker)."""
    config = hub.config
    assert config.metrics_port is not None
    port = config.metrics_port + worker
    metrics = HTTPServer(build_metrics_app(hub), idle_connection_timeout=config.header_timeout)
    sockets = _listen(port, config.internal_host, "--metrics-port", reuse_port=False)
    servers.append(metrics)
    # Within the same count as the internal listener: a scraper is let in past a flood of
    # the public port, and cannot take the hub to EMFILE.
    accept_within(
        metrics,
        sockets,
        limit + HEADROOM // 2,
        count_open,
        paused,
        config.slow_after,
        on_shed=hub.metrics.connection_shed_for,
    )
    log.info("metrics on http://%s:%d/metrics", config.internal_host, port)


async def serve(config: Config, worker: int | None = None) -> None:
    """Run the hub until SIGTERM/SIGINT. `worker`: this process is worker `worker` of
    --workers (handlers.workers): it binds its listeners with SO_REUSEPORT, beside its
    siblings', and its metrics port is --metrics-port + worker."""
    # Every request leaves reference cycles behind (Tornado's handler and futures), while
    # streams live long. With the default threshold (700) the collector runs every few
    # connects during a reconnect storm; 5,000 measured 3.7 -> 2.5 s for 10,000 connects at
    # 5,000/s, for ~1 KB more per stream of garbage awaiting collection
    # (python -m bench --only idle).
    gc.set_threshold(GC_THRESHOLD, 10, 10)
    with _starting():  # any error from here on is one line (CannotStart), no traceback
        app = build_app(config)
        hub: Hub = app.settings["hub"]
        hub.metrics.name_worker(worker or 0, config.workers)
        try:
            await hub.broker.check()
        except BrokerMisconfigured as exc:
            raise CannotStart(str(exc)) from None
        shared = worker is not None
        # The body limit is enforced by PublishHandler with a JSON 413; Tornado's own limit only
        # has to be above it (Tornado would answer a bare 400 and drop the connection).
        server = HTTPServer(
            app,
            max_body_size=config.max_body * 2 + 65536,
            idle_connection_timeout=config.header_timeout,  # Tornado's header timeout too
        )  # (the body timeout: handlers.base.BodyDeadlines, cheaper than Tornado's)
        # A deep accept queue: thousands of clients reconnecting at once (a deploy, a network
        # blip) must not overflow Tornado's default of 128 and wait out SYN retransmits.
        sockets = _listen(config.port, config.host, "--port", shared, LISTEN_BACKLOG)
        warning = backlog_warning(LISTEN_BACKLOG, read_somaxconn(SOMAXCONN))
        if warning and not worker:  # one line for the hub, not one per worker
            log.warning("%s", warning)
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = config.connection_limit(descriptors)
        hub.limit_streams(config.stream_limit(descriptors))
        servers = [server]

        def count_open() -> int:
            """Every connection holds a descriptor: streams are detached from Tornado (each a
            SocketTransport), so they are counted by the registry."""
            return sum(open_connections(s) for s in servers) + len(hub.registry)

        paused = hub.metrics.accept_paused_for
        hub.metrics.watch_connections(count_open)
        # A client that stops taking answers is cut after --slow-after, like a stream that stops
        # draining (handlers.server).
        # A plain GET /events is opened straight from its socket (handlers.stream_direct);
        # every other request, and any such one in doubt, is Tornado's.
        direct = DirectStreams(
            hub,
            app.settings["verifier"],
            server,
            app.settings["access_success_level"],
            app.trusted_proxies,
        )
        for sock in sockets:
            defer_accept(sock, config.header_timeout)
        accept_within(
            server,
            sockets,
            limit,
            count_open,
            paused,
            config.slow_after,
            direct,
            on_shed=hub.metrics.connection_shed_for,
        )
        port = sockets[0].getsockname()[1]
        log.info(
            "listening on http://%s:%d%s: broker %s, %s; at most %d connections, %d streams, "
            "%d per user",
            config.host,
            port,
            " in demo mode" if config.demo else "",
            config.broker_shown(),
            "1 worker" if config.workers == 1 else f"{config.workers} workers",
            limit,
            hub.stream_limit,
            config.max_streams_per_user,
        )
        internal = None
        if config.internal_port is not None:
            internal = HTTPServer(
                build_internal_app(hub),
                max_body_size=config.max_body * 2 + 65536,
                idle_connection_timeout=config.header_timeout,
            )
            servers.append(internal)
            # The deep accept queue here too: past it the kernel drops the SYNs of a burst of
            # publishers, whose retries then wait out retransmits (1, 3, 7, 15, 31 s).
            internal_sockets = _listen(
                config.internal_port,
                config.internal_host,
                "--internal-port",
                shared,
                LISTEN_BACKLOG,
            )
            # The same count, and half the headroom beyond the public limit: a flood on the
            # public port never locks internal publishers out, and a leaking internal client
            # cannot take the hub to EMFILE either.
            accept_within(
                internal,
                internal_sockets,
                limit + HEADROOM // 2,
                count_open,
                paused,
                config.slow_after,
                on_shed=hub.metrics.connection_shed_for,
            )
            log.info(
                "publishing on http://%s:%d/publish (internal, no token)",
                config.internal_host,
                internal_sockets[0].getsockname()[1],
            )
        if config.metrics_port is not None:
            _serve_metrics(hub, servers, worker or 0, limit, count_open, paused)
        if config.demo:
            start_demo(hub)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await shut_down(hub, servers, config.shutdown_timeout)


@contextlib.contextmanager
def _starting() -> Iterator[None]:
    """Whatever fails while the hub starts (a listener, a file, the broker's set-up) ends it
    with one line saying what, and exit code 1, as CannotStart does; the traceback is logged
    at DEBUG (--log-level debug) for a bug."""
    try:
        yield
    except CannotStart:
        raise
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)
        raise CannotStart(f"cannot start: {type(exc).__name__}: {exc}") from None


async def shut_down(hub: Hub, servers: list[HTTPServer], timeout: float) -> None:
    """SIGTERM/SIGINT: stop listening; /readyz, new streams and publishes answer 503 on the
    connections still open; publishes already handed to the broker get their answer; every
    stream gets what it is owed and a jittered `retry:` (Hub.stop); then the connections
    left (keep-alive ones, bodies still arriving) are closed. All within `timeout` seconds
    (--shutdown-timeout): what still hangs then (a client that takes nothing, a broker that
    does not answer) is cut, with a warning, and the process still exits 0. A watchdog thread
    ends the process at the deadline if even the event loop's own teardown hangs (a
    cancelled task that never ends, a DNS lookup in the default executor)."""
    log.info("shutting down: closing %d streams", len(hub.registry))
    watchdog = threading.Timer(timeout, _exit_now, (timeout,))
    watchdog.daemon = True
    watchdog.start()
    for server in servers:
        server.stop()

    async def drain() -> None:
        await hub.stop(publish_wait=timeout / 3)
        await asyncio.gather(*(server.close_all_connections() for server in servers))

    # The loop's teardown after serve() returns (cancelling what is left) gets the margin.
    margin = min(1.0, timeout / 4)
    graceful = asyncio.ensure_future(drain())
    done, _ = await asyncio.wait({graceful}, timeout=timeout - margin)
    if done:
        graceful.result()
        return
    graceful.cancel()
    log.warning(
        "shutdown took more than --shutdown-timeout (%gs): cutting what still holds it up "
        "(streams whose clients have not taken what they are owed: %d; other connections: "
        "%d; publishes the broker has not answered: %d)",
        timeout,
        hub.streams_closing(),
        sum(open_connections(server) for server in servers),
        hub.publishing,
    )
    closing = asyncio.ensure_future(
        asyncio.gather(*(server.close_all_connections() for server in servers))
    )
    await asyncio.wait({closing}, timeout=margin / 2)


def _exit_now(timeout: float) -> None:
    """The watchdog: the deadline passed and the process is still here."""
    log.warning("still running %gs after the shutdown began: exiting now", timeout)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return
    try:
        config = parse_config(argv)
        config.require_key()
    except ConfigError as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # Every record, Tornado's included, is written through SafeFormatter: no token and no
    # client-made line break ever reaches the log (hub/logs.py).
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter(_log_format(None)))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    logging.captureWarnings(True)  # warnings too: they would go to stderr as they are
    for note in config.notes():  # a WEB_CONCURRENCY set aside
        log.info("%s", note)
    if config.demo:
        log.warning(
            "DEMO MODE: anyone who can reach this port gets tokens at /demo/token, for any user "
            "and to publish; tokens are signed with a secret made up for this run. "
            "Never expose demo mode to a network you do not trust."
        )
    _raise_fd_limit()
    if config.workers > 1:
        if config.metrics_port is None:
            log.warning(
                "%s without --metrics-port: /metrics answers 404 (each worker is its "
                "own scrape target: set --metrics-port P to scrape worker i on P + i)",
                config.workers_named(),
            )
        # The demo secret was made up above (require_key), before the fork: every worker
        # signs and accepts the same tokens. Each worker bounds its own shutdown; the grace
        # on top is for a worker whose watchdog could not even run.
        grace = config.shutdown_timeout + 5.0
        raise SystemExit(supervise(config.workers, lambda i: _run(config, i), grace))
    try:
        _run(config, None)
    except CannotStart as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


# `hub token ...` and `hub publish ...`: the server's flags all start with "--".
COMMANDS = {"token": token_main, "publish": publish_main, "outbox": outbox_main}


def _log_format(worker: int | None) -> str:
    """Log lines of worker i carry `worker i`: several workers write to the same output."""
    mark = "" if worker is None else f"worker {worker} "
    return f"%(asctime)s %(levelname)s {mark}%(name)s: %(message)s"


def _run(config: Config, worker: int | None) -> None:
    """The hub's event loop, in this process (a worker's, after the fork)."""
    if worker is not None:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(SafeFormatter(_log_format(worker)))
    if config.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: running on asyncio's own loop")
        else:
            uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, worker))


if __name__ == "__main__":
    main()
