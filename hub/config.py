"""Settings, from flags and HUB_* environment variables, in one place.

Every flag `--some-name` has the variable `HUB_SOME_NAME`; a flag given on the command line
wins over the variable. The JWT secret comes from HUB_JWT_SECRET only: a flag would show it
in `ps` output.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HEADROOM", "HELP", "LOG_LEVELS", "Config", "ConfigError", "parse_config"]

MIN_SECRET_BYTES = 32
# The user and password of a URL, never shown in an error.
_USERINFO = re.compile(r"//[^/@]*@")
# Descriptors kept free of connections: listening sockets, log files, the broker's, a few
# for whatever the process opens, so the hub never meets EMFILE on its own accept.
HEADROOM = 64
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A setting that makes the hub refuse to start; the message says how to fix it."""


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    demo: bool = False
    jwt_secret: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_public_key: str | None = None  # path to a PEM public key, for RS256 / ES256
    history: int = 10_000  # events kept for Last-Event-ID resume
    # and at most this many bytes of memory for them (hub.history: event_cost)
    history_bytes: int = 64 * 1024 * 1024
    heartbeat: float = 15.0  # seconds between heartbeat comments on a quiet stream
    retry: float = 3.0  # seconds, sent as the stream's `retry:` field
    # On shutdown each stream's retry is drawn from [retry, retry + shutdown_spread] seconds,
    # so that the clients of a stopped instance do not all reconnect in the same second.
    shutdown_spread: float = 10.0
    # Seconds from SIGTERM/SIGINT to the process's exit, at most: streams get what they are
    # owed (a client slow to take it gets up to 5 s), in-flight publishes their answer, the
    # broker its close; whatever still hangs then is cut, and the exit is still 0.
    shutdown_timeout: float = 15.0
    max_body: int = 1024 * 1024  # publish body limit, bytes
    # Events in one publish, at most (413 past it): one request's work on the event loop,
    # and no batch larger than the default --history, which a resume could not replay whole.
    max_batch: int = 10_000
    # Bytes of one event's encoded body (the JSON of its `data:` line), at most (413).
    max_event_bytes: int = 64 * 1024
    # Events a second per publisher (its token's sub; the internal listener's publishers
    # share one), a token bucket holding at most publish_burst events: past it, a 429 with
    # Retry-After. 0 = no limit (one publisher may use the hub's whole capacity: README).
    publish_rate: float = 0.0
    publish_burst: int = 10_000  # with a rate, also the largest batch that can ever pass
    # How far (bytes of frames) a stream may fall behind the events queued for it before it is
    # cut as slow. What it owes is shared (one copy per audience, not per stream).
    max_pending: int = 16 * 1024 * 1024
    slow_after: float = 30.0  # seconds a stream's socket may take nothing before it is cut
    # Seconds to wait for a request's head (and on an idle keep-alive connection): a client
    # that connects and never finishes its request line is closed after this.
    header_timeout: float = 20.0
    body_timeout: float = 30.0  # seconds a publish body may take to arrive in full
    # Bytes that publish bodies still arriving may hold together (each up to max_body); past
    # it, the body that would go over is refused with a 503 and Retry-After.
    max_body_memory: int = 64 * 1024 * 1024
    # Open connections (HTTP requests in progress plus streams) past which the hub stops
    # accepting; 0 = the descriptor limit less HEADROOM (listening sockets, logs, a broker).
    max_connections: int = 0
    # Open streams in all; 0 = max_connections less a tenth (8 to 1,024) kept for requests:
    # with every connection a stream, publishes and health checks could not get in.
    max_streams: int = 0
    max_streams_per_user: int = 32  # hub.js shares one stream among all of a browser's tabs
    flush_interval: float = 0.005  # seconds a pass waits for more events to coalesce
    internal_port: int | None = None  # serve POST /publish here, unauthenticated, and only here
    internal_host: str = "127.0.0.1"
    revoke_ttl: float = 3600.0  # seconds a logout keeps refusing the tokens issued before it
    # Logouts remembered at most (hub.core: Hub.revoked; with Redis also `<prefix>:revoked`);
    # past it the oldest is forgotten, and a token issued before it works again until its exp.
    # 100,000 take ~25-35 MB here (~250 bytes each, more with long user and session names):
    # a logout every 36 ms for the whole default --revoke-ttl, while a flood of logouts for
    # distinct users (600,000 took 177 MB) costs bounded memory.
    max_revocations: int = 100_000
    # Seconds a one-time stream ticket (POST /tickets) stays good, at most: never past its
    # token's exp (hub.tickets).
    ticket_ttl: float = 30.0
    # Seconds a publish's Idempotency-Key is remembered: a retry under the same key within it
    # gets the first answer's ids instead of publishing again (hub.client retries that way).
    idempotency_window: float = 300.0
    # Origins whose pages may open streams cross-origin (comma-separated), or "*" for any
    # (then without credentials: no cookie auth across origins).
    cors_origins: str | None = None
    static_dir: str | None = None
    loop: str = "uvloop"  # measured faster in every scenario of the benchmark; or asyncio
    # "memory" (one process) or a Redis URL (redis://host:port/db, rediss://, unix://, or
    # redis+sentinel://host:port,host:port/master-name/db for the master Sentinel names): the
    # broker that carries every publish to every hub process (hub.broker, hub.redis_connection).
    broker: str = "memory"
    # Prefix of the Redis keys: hubs that share a Redis server with different prefixes are
    # separate hubs.
    redis_prefix: str = "hub"
    # Processes that share the port (SO_REUSEPORT); more than one needs a shared broker.
    # WEB_CONCURRENCY, as hosting platforms name it, is read when HUB_WORKERS is not set.
    workers: int = 1
    # Serve /metrics, /healthz and /readyz on this port too (on --internal-host), worker i of
    # --workers on metrics_port + i: each worker is its own scrape target (README, Metrics).
    metrics_port: int | None = None
    log_level: str = "info"
    # Peers (addresses or CIDR networks, comma-separated) whose X-Forwarded-For / X-Real-IP
    # name the client: the reverse proxies in front of the hub. Nobody else's are believed.
    trusted_proxies: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # NaN passes every `< 0` and `<= 0` check below, and inf overflows the timers
            if type(value) is float and not math.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"HUB_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes "
                f"(it has {len(self.jwt_secret.encode())})"
            )
        if self.jwt_algorithm not in JWT_ALGORITHMS:
            raise ConfigError(
                f"--jwt-algorithm must be one of {', '.join(JWT_ALGORITHMS)}, "
                f"not {self.jwt_algorithm[:32]!r}"
            )
        if self.jwt_algorithm.startswith("HS") and self.jwt_public_key:
            raise ConfigError("--jwt-public-key needs --jwt-algorithm RS256 or ES256")
        if not self.jwt_algorithm.startswith("HS") and not self.jwt_public_key:
            raise ConfigError(f"--jwt-algorithm {self.jwt_algorithm} needs --jwt-public-key")
        if self.loop not in ("asyncio", "uvloop"):
            raise ConfigError("--loop must be asyncio or uvloop")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level[:32]!r}"
            )
        for flag, port in (
            ("--port", self.port),
            ("--internal-port", self.internal_port),
        ):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{flag} must be 0 to 65535, not {port}")
        self._check_public_key()
        self._check_static_dir()
        self.trusted_networks()  # raises ConfigError for an address that is none
        for name in (
            "history",
            "history_bytes",
            "max_body",
            "max_pending",
            "max_batch",
            "max_event_bytes",
            "publish_burst",
            "max_revocations",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_body_memory < self.max_body:
            raise ConfigError(
                f"--max-body-memory ({self.max_body_memory}) must be at least --max-body "
                f"({self.max_body}): a body of the largest size could never arrive"
            )
        if self.broker != "memory" and not self.broker.startswith(
            ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
        ):
            raise ConfigError(
                f"--broker must be memory or a Redis URL (redis://host:port/db, or "
                "redis+sentinel://host:port,host:port/master-name/db), not "
                f"{_USERINFO.sub('//***@', self.broker)[:64]!r}"
            )
        self._check_broker_url()
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.workers > 1 and self.broker == "memory":
            raise ConfigError(
                f"--workers {self.workers} needs --broker redis://...: with the memory broker "
                "a publish would reach the streams of the one worker that took it"
            )
        if self.workers > 1 and 0 in (self.port, self.internal_port):
            flag = "--port" if self.port == 0 else "--internal-port"
            raise ConfigError(
                f"--workers {self.workers} needs a fixed {flag}, not 0: each worker binds it "
                "with SO_REUSEPORT, and port 0 would give every worker a port of its own"
            )
        self._check_metrics_port()
        if not self.redis_prefix or not self.redis_prefix.isprintable():
            raise ConfigError("--redis-prefix must be non-empty printable text")
        if self.shutdown_spread < 0:
            raise ConfigError("--shutdown-spread must be 0 or more")
        if not 0 <= self.publish_rate < float("inf"):
            raise ConfigError("--publish-rate must be 0 (no limit) or a positive number")
        for name in ("max_connections", "max_streams"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (automatic) or more")
        if self.max_streams_per_user < 1:
            raise ConfigError("--max-streams-per-user must be at least 1")
        for name in (
            "heartbeat",
            "retry",
            "flush_interval",
            "slow_after",
            "header_timeout",
            "body_timeout",
            "ticket_ttl",
            "shutdown_timeout",
            "idempotency_window",
            "revoke_ttl",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")

    def _check_metrics_port(self) -> None:
        """--metrics-port P: worker i listens on P + i, so P .. P + workers - 1 must be ports,
        and none of them --port or --internal-port."""
        if self.metrics_port is None:
            return
        first, last = self.metrics_port, self.metrics_port + self.workers - 1
        span = f"{first}" if first == last else f"{first}-{last} (worker i on {first} + i)"
        if first < 1 or last > 65535:
            raise ConfigError(
                f"--metrics-port must be 1 to {65536 - self.workers}"
                + (f" with --workers {self.workers}" if self.workers > 1 else "")
                + f", not {first}: a scrape target needs a port of its own, known in advance"
            )
        for flag, port in (("--port", self.port), ("--internal-port", self.internal_port)):
            if port is not None and first <= port <= last:
                raise ConfigError(f"--metrics-port {span} takes {flag} {port}: choose another")

    def _check_public_key(self) -> None:
        """The key file is read and parsed now: a missing file or a key that is none would
        otherwise surface as a traceback at start, or as a 401 for every token."""
        if not self.jwt_public_key:
            return
        import jwt

        path = self.jwt_public_key
        try:
            text = Path(path).read_text()
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"--jwt-public-key {path}: cannot read it ({reason})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--jwt-public-key {path}: not a PEM file (binary)") from None
        try:
            jwt.algorithms.get_default_algorithms()[self.jwt_algorithm].prepare_key(text)
        except (jwt.InvalidKeyError, ValueError, TypeError):
            raise ConfigError(
                f"--jwt-public-key {path}: not a PEM public key for {self.jwt_algorithm}"
            ) from None

    def _check_static_dir(self) -> None:
        if self.static_dir is None:
            return
        path = self.static_dir
        if not os.path.exists(path):
            raise ConfigError(f"--static-dir {path}: no such directory")
        if not os.path.isdir(path):
            raise ConfigError(f"--static-dir {path}: not a directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"--static-dir {path}: not readable by this process")

    def _check_broker_url(self) -> None:
        """What redis-py (or the Sentinel URL's parser) cannot parse is refused now, not on
        the first connection attempt; the message never shows the URL's password."""
        if self.broker == "memory":
            return
        try:
            from redis.connection import parse_url

            from hub.redis_connection import (
                SENTINEL_URL_FORM,
                is_sentinel_url,
                parse_sentinel_url,
                redact,
            )
        except ImportError:  # pragma: no cover (a dependency of the package)
            return
        shown = redact(self.broker)[:120]
        if is_sentinel_url(self.broker):
            try:
                parse_sentinel_url(self.broker)
            except ValueError as exc:
                raise ConfigError(
                    f"--broker {shown!r} is not a Sentinel URL ({SENTINEL_URL_FORM}): {exc}"
                ) from None
            return
        try:
            parse_url(self.broker)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ConfigError(f"--broker {shown!r} is not a Redis URL: {exc}") from None

    def trusted_networks(self) -> tuple[Network, ...]:
        """--trusted-proxies as networks (an address is a network of one)."""
        networks = []
        for item in (self.trusted_proxies or "").split(","):
            if not item.strip():
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"--trusted-proxies: {item.strip()[:64]!r} is not an IP address or a "
                    "CIDR network (e.g. 10.0.0.0/8)"
                ) from None
        return tuple(networks)

    def connection_limit(self, descriptors: int) -> int:
        """--max-connections, or what the descriptor limit leaves after HEADROOM."""
        return self.max_connections or max(16, descriptors - HEADROOM)

    def stream_limit(self, descriptors: int) -> int:
        """--max-streams, or the connection limit less what requests need (see max_streams)."""
        if self.max_streams:
            return self.max_streams
        connections = self.connection_limit(descriptors)
        return connections - max(8, min(1024, connections // 10))

    def allowed_origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in (self.cors_origins or "").split(",") if o.strip())

    def require_key(self) -> None:
        """Outside demo mode the hub does not start without a key to verify tokens with;
        in demo mode it makes up a secret for this run."""
        made_up = self.__dict__.get("_demo_secret")
        configured = self.jwt_secret is not None and self.jwt_secret != made_up
        if self.demo and (configured or self.jwt_public_key is not None):
            # /demo/token signs tokens for anyone who asks: with the real key, that would hand
            # out real publisher and user tokens.
            raise ConfigError(
                "--demo hands out tokens to anyone and never signs with a configured key: "
                "unset HUB_JWT_SECRET / --jwt-public-key, or run without --demo"
            )
        if self.jwt_secret is None and self.jwt_public_key is None:
            if not self.demo:
                raise ConfigError(
                    "no JWT key: set HUB_JWT_SECRET (32+ bytes), or --jwt-algorithm RS256/ES256 "
                    "with --jwt-public-key, or run with --demo to try the hub with demo tokens"
                )
            self.jwt_secret = self.__dict__["_demo_secret"] = secrets.token_urlsafe(48)


# `hub --help`, one line per setting: what it does, its unit, the values it takes. The
# default and the variable are added from the field (parse_config); the README's
# Configuration table says the same (tests/test_startup.py compares them).
HELP: dict[str, str] = {
    "host": "address to listen on (0.0.0.0: every interface)",
    "port": "port to listen on, 0 to 65535 (0: any free port, logged)",
    "demo": "demo mode: tokens at /demo/token for anyone, signed with a secret made up for "
    "the run (refuses to start with a configured key)",
    "jwt_secret": "HMAC secret, 32+ bytes (HUB_JWT_SECRET only: a flag would show in ps)",
    "jwt_algorithm": "the one JWT algorithm accepted: " + ", ".join(JWT_ALGORITHMS),
    "jwt_public_key": "path to a PEM public key, for RS256 / ES256",
    "history": "events kept for Last-Event-ID resume (at least 1)",
    "history_bytes": "bytes the kept events may take, at most (at least 1)",
    "heartbeat": "seconds between heartbeat comments on a quiet stream",
    "retry": "seconds, sent as the stream's retry: field",
    "shutdown_spread": "seconds: on shutdown each stream's retry: is drawn from "
    "[retry, retry + this], so clients do not all reconnect at once (0 or more)",
    "shutdown_timeout": "seconds from SIGTERM/SIGINT to the exit (code 0), at most",
    "max_body": "bytes of one publish body, at most (413 past it)",
    "max_batch": "events in one publish, at most (413 past it)",
    "max_event_bytes": "bytes of one event's encoded body, at most (413 past it)",
    "publish_rate": "events per second per publisher (a token bucket; 429 past it); 0: no limit",
    "publish_burst": "events a publisher's bucket holds: the largest burst, and with a rate "
    "the largest batch that can pass",
    "max_pending": "bytes of frames a stream may fall behind before it is cut as slow",
    "slow_after": "seconds a stream's socket may take nothing before it is cut as slow",
    "header_timeout": "seconds to wait for a request's head (and on an idle keep-alive connection)",
    "body_timeout": "seconds a publish body may take to arrive in full",
    "max_body_memory": "bytes all publish bodies still arriving may hold together (503 past "
    "it); at least --max-body",
    "max_connections": "open connections past which the hub stops accepting; 0: the "
    "descriptor limit less 64",
    "max_streams": "open streams in all (503 past it); 0: --max-connections less a tenth "
    "(8 to 1,024)",
    "max_streams_per_user": "streams of one user, at most (429 past it)",
    "flush_interval": "seconds a flush pass waits for more events to coalesce",
    "internal_port": "port of an unauthenticated POST /publish listener (then the only "
    "place to publish), 0 to 65535",
    "internal_host": "address of the --internal-port and --metrics-port listeners",
    "revoke_ttl": "seconds a logout keeps refusing the tokens issued before it",
    "max_revocations": "logouts remembered, at most (at least 1): past it the oldest is "
    "forgotten, and tokens issued before it work again until their exp",
    "ticket_ttl": "seconds a one-time stream ticket (POST /tickets) stays good, at most",
    "idempotency_window": "seconds a publish's Idempotency-Key is remembered (a retry gets "
    "the first answer's ids)",
    "cors_origins": "origins whose pages may open streams cross-origin, comma-separated, "
    "or * for any (without credentials)",
    "static_dir": "directory of the demo page's files; none: static/ of the checkout, "
    "else the installed copy",
    "loop": "event loop: uvloop or asyncio",
    "broker": "memory (one process) or a Redis URL (redis://host:port/db, rediss://, unix://; "
    "redis+sentinel://host:port,host:port/master-name/db: the master Sentinel names)",
    "redis_prefix": "prefix of the Redis keys: hubs with different prefixes are separate",
    "workers": "processes sharing the port (SO_REUSEPORT), at least 1; more than 1 needs "
    "--broker redis://... (WEB_CONCURRENCY when HUB_WORKERS is not set)",
    "metrics_port": "serve /metrics, /healthz, /readyz on --internal-host:this port "
    "(worker i on this + i)",
    "log_level": "one of " + ", ".join(LOG_LEVELS),
    "trusted_proxies": "reverse proxies (addresses or CIDR networks, comma-separated) whose "
    "X-Forwarded-For / X-Real-IP name the client; none: the peer's address is the client's",
}


def shown_default(value: object) -> str:
    """A default as `hub --help` and the README show it."""
    if value is None:
        return "none"
    if value is False:
        return "off"
    return str(value)


def _flag_type(field: dataclasses.Field[object]) -> type:
    text = str(field.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Flags over HUB_* variables over defaults. Raises ConfigError for bad values."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="hub", description="Server-Sent Events notification hub (see README.md)"
    )
    for field in dataclasses.fields(Config):
        if field.name == "jwt_secret":
            continue
        flag = "--" + field.name.replace("_", "-")
        var = "HUB_" + field.name.upper()
        text = f"{HELP[field.name]} (${var}; default: {shown_default(field.default)})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, type=_flag_type(field), default=None, help=text)
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for field in dataclasses.fields(Config):
        var = "HUB_" + field.name.upper()
        if field.name == "workers" and not env.get(var) and env.get("WEB_CONCURRENCY"):
            var = "WEB_CONCURRENCY"
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
        elif var in env and env[var] != "":
            raw = env[var]
            try:
                if field.type in ("bool", bool):
                    values[field.name] = raw.lower() in ("1", "true", "yes", "on")
                elif field.name == "jwt_secret":
                    values[field.name] = raw
                else:
                    values[field.name] = _flag_type(field)(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not a valid value") from None
    return Config(**values)  # type: ignore[arg-type]
