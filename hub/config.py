"""Settings, from flags and HUB_* environment variables, each declared once.

A setting is one field of `Config`, declared with `setting(...)`: default, help, unit, bounds
or allowed values. Its flag (`--some-name`), its variable (`HUB_SOME_NAME`), how operator text
is parsed, its check at start and that check's message, its `--help` line, and what
tests/test_startup.py holds the README's table to, all come from that one declaration
(`SETTINGS`), so they cannot drift apart. A flag given on the command line wins over the
variable. The JWT secret comes from HUB_JWT_SECRET only: a flag would show it in `ps` output.

Checks that involve several settings (workers and the broker, ports that collide, the JWT key
and its algorithm) are code in `Config.__post_init__`, run after every setting's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import secrets
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "HEADROOM",
    "LOG_LEVELS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "parse_bool",
    "parse_config",
    "size",
]

MIN_SECRET_BYTES = 32
# The user and password of a URL, never shown in an error.
_USERINFO = re.compile(r"//[^/@]*@")
# Descriptors kept free of connections: listening sockets, log files, the broker's, a few
# for whatever the process opens, so the hub never meets EMFILE on its own accept.
HEADROOM = 64
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
# Binary units only: "MB" could mean 10**6 or 2**20, so it is refused rather than guessed.
SIZE_UNITS = {"GiB": 1024**3, "MiB": 1024**2, "KiB": 1024}
_SIZE = re.compile(r"\s*([+-]?\d+)\s*(KiB|MiB|GiB)\s*", re.IGNORECASE)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")
# What a number counts, for the flag's metavar; bytes also take KiB, MiB, GiB.
Unit = Literal["", "seconds", "bytes", "count", "port", "per second"]
_METAVARS = {
    "seconds": "SECONDS",
    "bytes": "SIZE",
    "count": "N",
    "port": "PORT",
    "per second": "RATE",
}


class ConfigError(Exception):
    """A setting that makes the hub refuse to start; the message says how to fix it."""


def parse_bool(text: str) -> bool:
    """A boolean from the environment. Anything but true/false, 1/0, yes/no (any case, spaces
    around ignored) raises ValueError: `HUB_DEMO=ture` read as false would quietly turn off
    what the operator meant to turn on."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"not a boolean: {text[:32]!r}")


def size(text: str) -> int:
    """Bytes from operator input: a whole number, or one with KiB, MiB or GiB ("64 MiB",
    "64MiB"), the way `--help` and the README show the defaults. Raises ValueError (named
    `size` for argparse's "invalid size value")."""
    try:
        return int(text)
    except ValueError:
        pass
    found = _SIZE.fullmatch(text)
    if found is None:
        raise ValueError(f"not a size: {text[:64]!r}")
    factor = {unit.lower(): n for unit, n in SIZE_UNITS.items()}[found[2].lower()]
    return int(found[1]) * factor


def shown_size(n: int) -> str:
    """Bytes as the README writes them: the largest binary unit that divides them exactly."""
    for unit, factor in SIZE_UNITS.items():
        if n and n % factor == 0:
            return f"{n // factor} {unit}"
    return str(n)


def _number(value: float) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Setting:
    """One setting as declared on `Config` (see `setting`): all that its flag, its variable,
    `--help`, its check at start and the README's test need to know about it."""

    default: object
    help: str
    unit: Unit = ""
    at_least: float | None = None
    at_most: float | None = None
    positive: bool = False  # more than 0 (a timeout or an interval)
    zero_means: str = ""  # what 0 does, said in the bound ("0 (automatic) or more")
    choices: tuple[str, ...] = ()
    ignore_case: bool = False  # of the choices
    env_only: bool = False  # no flag: a secret that `ps` would show
    fallback_env: str = ""  # read when HUB_<NAME> is not set (WEB_CONCURRENCY)
    why: str = ""  # said after a bound the value is outside of
    # A check of a value that bounds cannot say (a URL, a path), given the setting's label;
    # raises ConfigError.
    check: Callable[[str, Any], object] | None = None
    # From the field, filled in when SETTINGS is built:
    name: str = ""
    kind: type = object  # bool, int, float or str
    optional: bool = False  # None is a value ("none" in --help)

    @property
    def flag(self) -> str | None:
        return None if self.env_only else "--" + self.name.replace("_", "-")

    @property
    def var(self) -> str:
        return "HUB_" + self.name.upper()

    @property
    def label(self) -> str:
        """How messages name the setting: its flag, or its variable when it has none."""
        return self.flag or self.var

    def shown(self, value: object) -> str:
        """A value as `--help` and the README show it."""
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if self.unit == "bytes" and isinstance(value, int):
            return shown_size(value)
        if isinstance(value, int | float):
            return _number(value)
        return str(value)

    @property
    def shown_default(self) -> str:
        return self.shown(self.default)

    @property
    def bounds(self) -> str:
        """The values the setting takes, in the words of `--help` and of the check's message."""
        if self.choices:
            if len(self.choices) == 2:
                return " or ".join(self.choices)
            return "one of " + ", ".join(self.choices)
        if self.positive:
            return "positive"
        low, high = self.at_least, self.at_most
        if low is not None and high is not None:
            return f"{_number(low)} to {_number(high)}"
        if low == 0:
            return f"0 ({self.zero_means}) or more" if self.zero_means else "0 or more"
        if low is not None:
            return f"at least {_number(low)}"
        return ""

    def parse(self, source: str, raw: str) -> object:
        """Operator text (a variable's value) as the setting's type; `source` names it in
        the error."""
        if self.kind is bool:
            try:
                return parse_bool(raw)
            except ValueError:
                raise ConfigError(
                    f"{source} must be true or false (or 1/0, yes/no), not {raw[:32]!r}"
                ) from None
        try:
            return self.argparse_type(raw)
        except ValueError:
            raise ConfigError(
                f"{source}={raw[:64]!r} is not a valid value ({self.expected})"
            ) from None

    @property
    def argparse_type(self) -> Callable[[str], object]:
        if self.unit == "bytes":
            return size
        return {int: int, float: float}.get(self.kind, str)

    @property
    def expected(self) -> str:
        if self.unit == "bytes":
            return "bytes: a whole number, or with KiB, MiB or GiB"
        return {int: "a whole number", float: "a number"}.get(self.kind, "text")

    def from_environ(self, env: Mapping[str, str]) -> object:
        """The value its variable gives, or None when that is unset or empty."""
        var = self.var
        if self.fallback_env and not env.get(var) and env.get(self.fallback_env):
            var = self.fallback_env
        raw = env.get(var, "")
        return None if raw == "" else self.parse(var, raw)

    def validate(self, value: object) -> None:
        """The setting's own checks, in the order the messages are most useful."""
        if value is None and self.optional:
            return
        if not self._has_kind(value):
            raise ConfigError(
                f"{self.label} must be {self.kind.__name__}, not {type(value).__name__}"
            )
        # NaN passes every `<` and `<=`, and inf overflows the timers
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.label} must be a finite number")
        if self.choices:
            assert isinstance(value, str)
            given = value.lower() if self.ignore_case else value
            if given not in self.choices:
                raise ConfigError(f"{self.label} must be {self.bounds}, not {value[:32]!r}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            low, high = self.at_least, self.at_most
            if (
                (self.positive and value <= 0)
                or (low is not None and value < low)
                or (high is not None and value > high)
            ):
                raise ConfigError(
                    f"{self.label} must be {self.bounds}, not {self.shown(value)}{self.why}"
                )
        if self.check is not None:
            self.check(self.label, value)

    def _has_kind(self, value: object) -> bool:
        if self.kind is float:  # Config(ticket_ttl=12) from Python, as tests write it
            return isinstance(value, int | float) and not isinstance(value, bool)
        if self.kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, self.kind)


def setting(
    default: T,
    help: str,
    *,
    unit: Unit = "",
    at_least: float | None = None,
    at_most: float | None = None,
    positive: bool = False,
    zero_means: str = "",
    choices: tuple[str, ...] = (),
    ignore_case: bool = False,
    env_only: bool = False,
    fallback_env: str = "",
    why: str = "",
    check: Callable[[str, Any], object] | None = None,
) -> T:
    """Declare a field of `Config` as a setting. Typed as its default, so that mypy sees
    `port: int = setting(8080, ...)` as a plain field; at run time it is a dataclass field
    that carries its `Setting`."""
    declared = Setting(
        default,
        help,
        unit=unit,
        at_least=at_least,
        at_most=at_most,
        positive=positive,
        zero_means=zero_means,
        choices=choices,
        ignore_case=ignore_case,
        env_only=env_only,
        fallback_env=fallback_env,
        why=why,
        check=check,
    )
    return dataclasses.field(default=default, metadata={"setting": declared})


# Checks of one setting's value that bounds cannot say


def _check_secret(label: str, secret: str | None) -> None:
    if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{label} must be at least {MIN_SECRET_BYTES} bytes (it has {len(secret.encode())})"
        )


def _check_printable(label: str, text: str) -> None:
    if not text or not text.isprintable():
        raise ConfigError(f"{label} must be non-empty printable text")


def _check_static_dir(label: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise ConfigError(f"{label} {path}: no such directory")
    if not os.path.isdir(path):
        raise ConfigError(f"{label} {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{label} {path}: not readable by this process")


def _check_broker(label: str, broker: str) -> None:
    """What redis-py (or the Sentinel URL's parser) cannot parse is refused now, not on the
    first connection attempt; the message never shows the URL's password."""
    if broker == "memory":
        return
    if not broker.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"{label} must be memory or a Redis URL (redis://host:port/db, or "
            "redis+sentinel://host:port,host:port/master-name/db), not "
            f"{_USERINFO.sub('//***@', broker)[:64]!r}"
        )
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
    shown = redact(broker)[:120]
    if is_sentinel_url(broker):
        try:
            parse_sentinel_url(broker)
        except ValueError as exc:
            raise ConfigError(
                f"{label} {shown!r} is not a Sentinel URL ({SENTINEL_URL_FORM}): {exc}"
            ) from None
        return
    try:
        parse_url(broker)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"{label} {shown!r} is not a Redis URL: {exc}") from None


def _networks(label: str, text: str | None) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDR networks (an address is a network of one)."""
    networks = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{label}: {item.strip()[:64]!r} is not an IP address or a CIDR network "
                "(e.g. 10.0.0.0/8)"
            ) from None
    return tuple(networks)


@dataclass
class Config:
    """The hub's settings. Each field is declared once, with `setting`; build one from Python
    as `Config(port=0, ...)` (checked the same way) or from flags and variables with
    `parse_config`."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(
        8080, "port to listen on (0: any free port, logged)", unit="port", at_least=0, at_most=65535
    )
    demo: bool = setting(
        False,
        "demo mode: tokens at /demo/token for anyone, signed with a secret made up for the run "
        "(refuses to start with a configured key)",
    )
    jwt_secret: str | None = setting(
        None,
        "HMAC secret, 32+ bytes (a variable only: a flag would show in ps)",
        env_only=True,
        check=_check_secret,
    )
    jwt_algorithm: str = setting("HS256", "the one JWT algorithm accepted", choices=JWT_ALGORITHMS)
    jwt_public_key: str | None = setting(None, "path to a PEM public key, for RS256 / ES256")
    history: int = setting(10_000, "events kept for Last-Event-ID resume", unit="count", at_least=1)
    # An event's cost: hub.history.event_cost.
    history_bytes: int = setting(
        64 * 1024 * 1024, "bytes the kept events may take, at most", unit="bytes", at_least=1
    )
    heartbeat: float = setting(
        15.0, "seconds between heartbeat comments on a quiet stream", unit="seconds", positive=True
    )
    retry: float = setting(
        3.0, "seconds, sent as the stream's retry: field", unit="seconds", positive=True
    )
    # So that the clients of a stopped instance do not all reconnect in the same second.
    shutdown_spread: float = setting(
        10.0,
        "seconds: on shutdown each stream's retry: is drawn from [retry, retry + this], so "
        "clients do not all reconnect at once",
        unit="seconds",
        at_least=0,
    )
    # Streams get what they are owed (a client slow to take it gets up to 5 s), in-flight
    # publishes their answer, the broker its close; whatever still hangs then is cut.
    shutdown_timeout: float = setting(
        15.0,
        "seconds from SIGTERM/SIGINT to the exit (code 0), at most",
        unit="seconds",
        positive=True,
    )
    max_body: int = setting(
        1024 * 1024, "bytes of one publish body, at most (413 past it)", unit="bytes", at_least=1
    )
    # One request's work on the event loop, and no batch larger than the default --history,
    # which a resume could not replay whole.
    max_batch: int = setting(
        10_000, "events in one publish, at most (413 past it)", unit="count", at_least=1
    )
    # The JSON of one event's `data:` line.
    max_event_bytes: int = setting(
        64 * 1024,
        "bytes of one event's encoded body, at most (413 past it)",
        unit="bytes",
        at_least=1,
    )
    # Per token `sub` (the internal listener's publishers share one). 0: one publisher may
    # use the hub's whole capacity (README, Operations).
    publish_rate: float = setting(
        0.0,
        "events per second per publisher (a token bucket; 429 past it)",
        unit="per second",
        at_least=0,
        zero_means="no limit",
    )
    publish_burst: int = setting(
        10_000,
        "events a publisher's bucket holds: the largest burst, and with a rate the largest "
        "batch that can pass",
        unit="count",
        at_least=1,
    )
    # What a stream owes is shared: one copy per audience, not per stream.
    max_pending: int = setting(
        16 * 1024 * 1024,
        "bytes of frames a stream may fall behind before it is cut as slow",
        unit="bytes",
        at_least=1,
    )
    slow_after: float = setting(
        30.0,
        "seconds a stream's socket may take nothing before it is cut as slow",
        unit="seconds",
        positive=True,
    )
    # A client that connects and never finishes its request line is closed after this.
    header_timeout: float = setting(
        20.0,
        "seconds to wait for a request's head (and on an idle keep-alive connection)",
        unit="seconds",
        positive=True,
    )
    body_timeout: float = setting(
        30.0, "seconds a publish body may take to arrive in full", unit="seconds", positive=True
    )
    max_body_memory: int = setting(
        64 * 1024 * 1024,
        "bytes all publish bodies still arriving may hold together (503 past it); at least "
        "--max-body",
        unit="bytes",
    )
    max_connections: int = setting(
        0,
        "open connections past which the hub stops accepting; 0: the descriptor limit less "
        f"{HEADROOM}",
        unit="count",
        at_least=0,
        zero_means="automatic",
    )
    # With every connection a stream, publishes and health checks could not get in.
    max_streams: int = setting(
        0,
        "open streams in all (503 past it); 0: --max-connections less a tenth (8 to 1,024)",
        unit="count",
        at_least=0,
        zero_means="automatic",
    )
    # hub.js shares one stream among all of a browser's tabs.
    max_streams_per_user: int = setting(
        32, "streams of one user, at most (429 past it)", unit="count", at_least=1
    )
    flush_interval: float = setting(
        0.005,
        "seconds a flush pass waits for more events to coalesce",
        unit="seconds",
        positive=True,
    )
    internal_port: int | None = setting(
        None,
        "port of an unauthenticated POST /publish listener (then the only place to publish)",
        unit="port",
        at_least=0,
        at_most=65535,
    )
    internal_host: str = setting(
        "127.0.0.1", "address of the --internal-port and --metrics-port listeners"
    )
    revoke_ttl: float = setting(
        3600.0,
        "seconds a logout keeps refusing the tokens issued before it",
        unit="seconds",
        positive=True,
    )
    # hub.core: Hub.revoked, with Redis also `<prefix>:revoked`. 100,000 take ~25-35 MB
    # (README, Decisions): a flood of logouts for distinct users costs bounded memory.
    max_revocations: int = setting(
        100_000,
        "logouts remembered, at most: past it the oldest is forgotten, and tokens issued "
        "before it work again until their exp",
        unit="count",
        at_least=1,
    )
    # Never past its token's exp (hub.tickets).
    ticket_ttl: float = setting(
        30.0,
        "seconds a one-time stream ticket (POST /tickets) stays good, at most",
        unit="seconds",
        positive=True,
    )
    # hub.client retries a publish under the same key.
    idempotency_window: float = setting(
        300.0,
        "seconds a publish's Idempotency-Key is remembered (a retry gets the first answer's ids)",
        unit="seconds",
        positive=True,
    )
    cors_origins: str | None = setting(
        None,
        "origins whose pages may open streams cross-origin, comma-separated, or * for any "
        "(without credentials)",
    )
    static_dir: str | None = setting(
        None,
        "directory of the demo page's files; none: static/ of the checkout, else the "
        "installed copy",
        check=_check_static_dir,
    )
    # uvloop measured faster in every scenario of the benchmark.
    loop: str = setting("uvloop", "event loop", choices=("asyncio", "uvloop"))
    broker: str = setting(
        "memory",
        "memory (one process) or a Redis URL (redis://host:port/db, rediss://, unix://; "
        "redis+sentinel://host:port,host:port/master-name/db: the master Sentinel names)",
        check=_check_broker,
    )
    redis_prefix: str = setting(
        "hub",
        "prefix of the Redis keys: hubs with different prefixes are separate",
        check=_check_printable,
    )
    # WEB_CONCURRENCY, as hosting platforms name it.
    workers: int = setting(
        1,
        "processes sharing the port (SO_REUSEPORT); more than 1 needs --broker redis://...",
        unit="count",
        at_least=1,
        fallback_env="WEB_CONCURRENCY",
    )
    # Worker i of --workers on metrics_port + i: each worker is its own scrape target.
    metrics_port: int | None = setting(
        None,
        "serve /metrics, /healthz, /readyz on --internal-host:this port (worker i on this + i)",
        unit="port",
        at_least=1,
        at_most=65535,
        why=": a scrape target needs a port of its own, known in advance",
    )
    log_level: str = setting("info", "log level", choices=LOG_LEVELS, ignore_case=True)
    # Nobody else's X-Forwarded-For is believed.
    trusted_proxies: str | None = setting(
        None,
        "reverse proxies (addresses or CIDR networks, comma-separated) whose X-Forwarded-For "
        "/ X-Real-IP name the client; none: the peer's address is the client's",
        check=_networks,
    )

    def __post_init__(self) -> None:
        for declared in SETTINGS:
            declared.validate(getattr(self, declared.name))
        self._check_jwt_key()
        if self.max_body_memory < self.max_body:
            raise ConfigError(
                f"--max-body-memory ({self.max_body_memory}) must be at least --max-body "
                f"({self.max_body}): a body of the largest size could never arrive"
            )
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

    def _check_jwt_key(self) -> None:
        """The key file is read and parsed now: a missing file or a key that is none would
        otherwise surface as a traceback at start, or as a 401 for every token."""
        if self.jwt_algorithm.startswith("HS") and self.jwt_public_key:
            raise ConfigError("--jwt-public-key needs --jwt-algorithm RS256 or ES256")
        if not self.jwt_algorithm.startswith("HS") and not self.jwt_public_key:
            raise ConfigError(f"--jwt-algorithm {self.jwt_algorithm} needs --jwt-public-key")
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

    def _check_metrics_port(self) -> None:
        """--metrics-port P: worker i listens on P + i, so P .. P + workers - 1 must be ports,
        and none of them --port or --internal-port."""
        if self.metrics_port is None:
            return
        first, last = self.metrics_port, self.metrics_port + self.workers - 1
        span = f"{first}" if first == last else f"{first}-{last} (worker i on {first} + i)"
        if last > 65535:
            raise ConfigError(
                f"--metrics-port must be 1 to {65536 - self.workers} with --workers "
                f"{self.workers}, not {first}: a scrape target needs a port of its own, known "
                "in advance"
            )
        for flag, port in (("--port", self.port), ("--internal-port", self.internal_port)):
            if port is not None and first <= port <= last:
                raise ConfigError(f"--metrics-port {span} takes {flag} {port}: choose another")

    def trusted_networks(self) -> tuple[Network, ...]:
        """--trusted-proxies as networks (an address is a network of one)."""
        return _networks("--trusted-proxies", self.trusted_proxies)

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


def _declarations() -> tuple[Setting, ...]:
    """Config's fields as Settings, their type read from the annotation: a field of a type
    the flags cannot carry fails here, at import, not at an operator's first use."""
    hints = typing.get_type_hints(Config)
    found = []
    for field in dataclasses.fields(Config):
        hint = hints[field.name]
        union = typing.get_args(hint) or (hint,)  # int | None: (int, NoneType)
        kinds = [t for t in union if t is not type(None)]
        if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
            raise TypeError(
                f"Config.{field.name}: a setting is bool, int, float or str, not {hint}"
            )
        declared = field.metadata.get("setting")
        if not isinstance(declared, Setting):
            raise TypeError(f"Config.{field.name} is not declared with setting(...)")
        found.append(
            dataclasses.replace(
                declared,
                name=field.name,
                kind=kinds[0],
                optional=type(None) in union,
            )
        )
    return tuple(found)


SETTINGS: tuple[Setting, ...] = _declarations()


def help_line(declared: Setting) -> str:
    """A setting's line in `hub --help`: what it does, the values it takes, its variable (and
    the one read in its place), its default."""
    text = declared.help
    if declared.bounds:
        text += "; " + declared.bounds
    variables = f"${declared.var}" + (
        f" or ${declared.fallback_env}" if declared.fallback_env else ""
    )
    return f"{text} ({variables}; default: {declared.shown_default})"


def _parser() -> argparse.ArgumentParser:
    hidden = [s for s in SETTINGS if s.flag is None]
    parser = argparse.ArgumentParser(
        prog="hub",
        description="Server-Sent Events notification hub (see README.md)",
        epilog=" ".join(
            [
                "Every flag has a HUB_* variable (--max-body: HUB_MAX_BODY); a flag wins.",
                "Booleans in variables: true/false, 1/0 or yes/no.",
                "Sizes: bytes, or with KiB, MiB or GiB (64MiB).",
                *(f"{s.var}: {s.help}." for s in hidden),
            ]
        ).replace("%", "%%"),
    )
    for declared in SETTINGS:
        if declared.flag is None:
            continue
        text = help_line(declared).replace("%", "%%")
        if declared.kind is bool:
            parser.add_argument(declared.flag, action="store_true", default=None, help=text)
        else:
            parser.add_argument(
                declared.flag,
                type=declared.argparse_type,
                default=None,
                metavar=_METAVARS.get(declared.unit),
                help=text,
            )
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Flags over HUB_* variables over defaults. Raises ConfigError for a bad value; a flag
    that argparse cannot parse exits 2 with argparse's one line."""
    env = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    values: dict[str, object] = {}
    for declared in SETTINGS:
        given = getattr(args, declared.name, None)
        if given is None:
            given = declared.from_environ(env)
        if given is not None:
            values[declared.name] = given
    return Config(**values)  # type: ignore[arg-type]
