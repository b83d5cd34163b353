"""Settings, from flags and HUB_* environment variables, each declared once.

A setting is one field of `Config`, declared with `setting(...)`: default, help, unit, bounds
or allowed values. Its flag (`--some-name`), its variable (`HUB_SOME_NAME`), how operator text
is parsed, its check at start and that check's message, its `--help` line, and what
tests/test_startup.py holds the README's table to, all come from that one declaration
(`SETTINGS`), so they cannot drift apart. A flag given on the command line wins over the
variable, and its text is parsed as the variable's is. The JWT secret comes from
HUB_JWT_SECRET only: a flag would show it in `ps` output. Every refusal, argparse's own (an
unknown flag, a missing value) included, is one line (ConfigError), and names what the
operator set: WEB_CONCURRENCY, a platform's, is named as such, and read only with a Redis
broker (parse_config).

Checks that involve several settings (workers and the broker, ports that collide, the JWT key
and its algorithm) are code in `Config.__post_init__`, run after every setting's own.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import difflib
import functools
import importlib.metadata
import ipaddress
import math
import os
import re
import secrets
import sys
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypeVar

from hub.topics import GrantError, Grants

__all__ = [
    "HEADROOM",
    "LOG_LEVELS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "OneLineParser",
    "Setting",
    "package_version",
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


# Settings whose value parse_config found in a variable not their own (WEB_CONCURRENCY for
# --workers), while it builds the Config: the messages of checks name what was set, never a
# flag nobody typed.
_FOUND_IN: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "_FOUND_IN", default=MappingProxyType({})
)


@functools.cache
def package_version() -> str:
    """The installed package's version (setup.cfg), for `hub --version`."""
    try:
        return importlib.metadata.version("hub")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover (a bare checkout)
        return "unknown (not installed: pip install .)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `hub: error: ...` and exit 2, like every other
    start-up error (ConfigError), rather than argparse's usage block: `--help` shows that.
    Abbreviated flags are not taken: a flag added later would make `--work 2` ambiguous, or
    another setting's."""

    def __init__(self, *args: Any, commands: Sequence[str] = (), **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands = tuple(commands)  # what may come first instead of flags (hub token)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{_plainer(message)} (see {self.prog} --help)")

    def unexpected(self, argv: Sequence[str], extra: Sequence[str]) -> NoReturn:
        """What parse_known_args left over, said as the operator would fix it: an unknown
        flag with the nearest known one, or a size's unit written apart from its number."""
        first = extra[0]
        if first.startswith("-"):
            name = first.split("=", 1)[0]
            known = [o for o in self._option_string_actions if o.startswith("--")]
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f": did you mean {near[0]}?" if near else ""
            raise ConfigError(f"unknown flag {name}{hint} (see {self.prog} --help)")
        at = list(argv).index(first) if first in argv else -1
        sized = {s.flag for s in SETTINGS if s.unit == "bytes"}
        if first.lower() in {u.lower() for u in SIZE_UNITS} and at >= 2 and argv[at - 2] in sized:
            flag, number = argv[at - 2], argv[at - 1]
            raise ConfigError(
                f"{flag} {number} {first}: a size is one word, {flag} {number}{first} "
                f"(or quoted: {flag} '{number} {first}')"
            )
        near = difflib.get_close_matches(first, self.commands, n=1, cutoff=0.6)
        if near and at == 0:
            raise ConfigError(f"unknown command {first!r}: did you mean {self.prog} {near[0]}?")
        commands = ", ".join(f"{self.prog} {c}" for c in self.commands)
        also = f", or a command first ({commands})" if commands else ""
        raise ConfigError(
            f"unexpected argument {first!r}: {self.prog} takes flags{also} (see {self.prog} --help)"
        )


def _plainer(message: str) -> str:
    """argparse's message, with "argument --x:" said as "--x:", and "--demo: ignored
    explicit argument '1'" as "--demo takes no value, not '1'"."""
    message = re.sub(
        r"^argument ([^:]+): ignored explicit argument (.*)", r"\1 takes no value, not \2", message
    )
    return re.sub(r"^argument ([^:]+): ", r"\1: ", message)


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
    # The flag repeats (--source a --source b); the variable holds the values apart by spaces.
    repeat: bool = False
    flag_name: str = ""  # the flag's name where it is not the field's (--source for sources)
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
        if self.env_only:
            return None
        return "--" + (self.flag_name or self.name).replace("_", "-")

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
        """Operator text as the setting's type, alike from a flag and from a variable;
        `source` names it in the error, as the operator wrote it: `--max-body '2 MB'` (a
        flag) or `HUB_MAX_BODY='2 MB'` (a variable)."""
        flag = source.startswith("--")
        if flag and self.kind in (int, float) and not raw.strip():
            raise ConfigError(
                f"{source} was given an empty value (an unset variable, as in {source}=$PORT?): "
                f"give one, or leave the flag out for the default, {self.shown_default}"
            )
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
            given = f"{source} {raw[:64]!r}" if flag else f"{source}={raw[:64]!r}"
            raise ConfigError(f"{given} is not a valid value ({self.expected})") from None

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
        var = self.var_in(env)
        return None if var is None else self.parse(var, env[var])

    def var_in(self, env: Mapping[str, str]) -> str | None:
        """The variable that gives the setting's value: its own, else `fallback_env`; None
        when both are unset or empty."""
        for var in (self.var, self.fallback_env):
            if var and env.get(var):
                return var
        return None

    def validate(self, value: object, label: str | None = None) -> None:
        """The setting's own checks, in the order the messages are most useful; the messages
        name the setting by `label`, else its flag (or its variable, when it has none)."""
        label = label or self.label
        if value is None and self.optional:
            return
        if not self._has_kind(value):
            raise ConfigError(f"{label} must be {self.kind.__name__}, not {type(value).__name__}")
        # NaN passes every `<` and `<=`, and inf overflows the timers
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number")
        if self.choices:
            assert isinstance(value, str)
            given = value.lower() if self.ignore_case else value
            if given not in self.choices:
                raise ConfigError(f"{label} must be {self.bounds}, not {value[:32]!r}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            low, high = self.at_least, self.at_most
            if (
                (self.positive and value <= 0)
                or (low is not None and value < low)
                or (high is not None and value > high)
            ):
                raise ConfigError(
                    f"{label} must be {self.bounds}, not {self.shown(value)}{self.why}"
                )
        if self.check is not None:
            self.check(label, value)

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
    repeat: bool = False,
    flag_name: str = "",
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
        repeat=repeat,
        flag_name=flag_name,
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


def join_leave_grants(label: str, text: str | None) -> Grants:
    """--join-leave as grants (hub.topics): comma-separated names and `name*` patterns, `*`
    for every topic; none or only commas: no topic."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    try:
        return Grants.parse(items)
    except GrantError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def source_urls(label: str, text: str | None) -> tuple[str, ...]:
    """--source's URLs, each checked by its source's parser (hub.outbox, hub.jetstream: no
    client library is imported); none: no source."""
    urls = tuple((text or "").split())
    if not urls:
        return urls
    from hub.sources import SourceError, shown_url

    for url in urls:
        try:
            if url.startswith(("postgres://", "postgresql://")):
                from hub.outbox import OutboxSettings

                OutboxSettings.parse(url)
            elif url.startswith("nats://"):
                from hub.jetstream import JetStreamSettings

                JetStreamSettings.parse(url)
            else:
                raise SourceError("a source URL starts with postgres://, postgresql:// or nats://")
        except SourceError as exc:
            raise ConfigError(f"{label} {shown_url(url)[:120]!r}: {exc}") from None
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{label}: the same source is given twice")
    return urls


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
    # Nodes of one Redis are milliseconds apart; a node further behind is overloaded or cut
    # off, and its client is better served elsewhere (503 + Retry-After) than sent back.
    catch_up_wait: float = setting(
        1.0,
        "seconds a stream whose Last-Event-ID is ahead of this node's feed (Redis broker) "
        "waits for the feed to read that far, before it is answered 503 with Retry-After",
        unit="seconds",
        at_least=0,
        at_most=30,
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
    # hub.sources; README, Event sources.
    sources: str | None = setting(
        None,
        "where events are also taken from: a PostgreSQL outbox (postgres://user@host/db"
        "?table=hub_outbox) or a NATS JetStream stream (nats://host:4222/STREAM?durable=hub); "
        "repeat the flag for several, the variable holds them apart by spaces",
        repeat=True,
        flag_name="source",
        check=source_urls,
    )
    # hub.joins; README, Join and leave events.
    join_leave: str | None = setting(
        None,
        "topics whose members' joins and leaves are published on presence:<topic> (names and "
        "name* patterns, comma-separated; * for every topic); none: off",
        check=join_leave_grants,
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
    # Replication is asynchronous: a failover to a replica that lagged loses what the old
    # master acknowledged last (README, The Redis settings the promise depends on).
    redis_wait_replicas: int = setting(
        0,
        "replicas that must have taken a publish before it is answered 202 (Redis WAIT after "
        "each script call); fewer within --redis-wait-timeout: 503 outcome unknown",
        at_least=0,
        at_most=16,
        zero_means="answer once the master stored it",
    )
    redis_wait_timeout: float = setting(
        1.0,
        "seconds a publish waits for --redis-wait-replicas",
        unit="seconds",
        positive=True,
        at_most=60,
    )
    # hub.redis_presence; README, Presence.
    presence_ttl: float = setting(
        30.0,
        "seconds within which a node that stops (a crash) drops out of GET /presence on Redis; "
        "each node renews its presence every third of it",
        unit="seconds",
        at_least=1,
        at_most=3600,
    )
    # WEB_CONCURRENCY, as hosting platforms name it: a platform's default for any web server,
    # so read only where several workers can run (parse_config).
    workers: int = setting(
        1,
        "processes sharing the port (SO_REUSEPORT); more than 1 needs --broker redis://... "
        "(without one, WEB_CONCURRENCY is ignored)",
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
        # Which settings came from a variable that is not their own (parse_config)
        found_in = self.__dict__["_found_in"] = dict(_FOUND_IN.get())
        for declared in SETTINGS:
            declared.validate(getattr(self, declared.name), found_in.get(declared.name))
        self._check_jwt_key()
        if self.max_body_memory < self.max_body:
            raise ConfigError(
                f"--max-body-memory ({self.max_body_memory}) must be at least --max-body "
                f"({self.max_body}): a body of the largest size could never arrive"
            )
        if self.workers > 1 and self.broker == "memory":
            raise ConfigError(
                f"{self._workers_need()} --broker redis://...: with the memory broker "
                "a publish would reach the streams of the one worker that took it"
            )
        if self.workers > 1 and 0 in (self.port, self.internal_port):
            flag = "--port" if self.port == 0 else "--internal-port"
            raise ConfigError(
                f"{self._workers_need()} a fixed {flag}, not 0: each worker binds it "
                "with SO_REUSEPORT, and port 0 would give every worker a port of its own"
            )
        self._check_metrics_port()

    def workers_named(self) -> str:
        """How the operator (or the platform) asked for the workers, for a message:
        `--workers 4`, or `WEB_CONCURRENCY=4`, never a flag nobody typed."""
        var = self.__dict__.get("_found_in", {}).get("workers")
        return f"{var}={self.workers}" if var else f"--workers {self.workers}"

    def _workers_need(self) -> str:
        named = self.workers_named()
        if named.startswith("--"):
            return f"{named} needs"
        return f"{named} asks for {self.workers} workers, which need"

    def broker_shown(self) -> str:
        """--broker as a log line shows it: memory, or the URL with its password as ***."""
        if self.broker == "memory":
            return self.broker
        from hub.redis_connection import redact

        # redis-py takes a password in the query string too
        return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", redact(self.broker))

    def notes(self) -> tuple[str, ...]:
        """What parse_config set aside, for an INFO line at start (a WEB_CONCURRENCY that
        the memory broker cannot honour)."""
        return tuple(self.__dict__.get("_notes", ()))

    def _check_jwt_key(self) -> None:
        """The key file is read and parsed now: a missing file, a key that is none, a key of
        the other kind (RSA for ES256) would otherwise surface as a traceback at start, or as
        a 401 for every token. A private key is refused, not used for its public half: the
        process that faces subscribers should not hold the key that mints tokens."""
        if self.jwt_algorithm.startswith("HS") and self.jwt_public_key:
            raise ConfigError("--jwt-public-key needs --jwt-algorithm RS256 or ES256")
        if not self.jwt_algorithm.startswith("HS") and not self.jwt_public_key:
            raise ConfigError(f"--jwt-algorithm {self.jwt_algorithm} needs --jwt-public-key")
        if not self.jwt_public_key:
            return
        from hub.keys import KeyProblem, load_public

        path = self.jwt_public_key
        named = f"--jwt-algorithm {self.jwt_algorithm}"
        try:
            load_public(path, self.jwt_algorithm, named)
        except KeyProblem as exc:
            raise ConfigError(f"--jwt-public-key {path}: {exc}") from None

    def _check_metrics_port(self) -> None:
        """--metrics-port P: worker i listens on P + i, so P .. P + workers - 1 must be ports,
        and none of them --port or --internal-port."""
        if self.metrics_port is None:
            return
        first, last = self.metrics_port, self.metrics_port + self.workers - 1
        span = f"{first}" if first == last else f"{first}-{last} (worker i on {first} + i)"
        if last > 65535:
            raise ConfigError(
                f"--metrics-port must be 1 to {65536 - self.workers} with "
                f"{self.workers_named()}, not {first}: a scrape target needs a port of its own, "
                "known in advance"
            )
        for flag, port in (("--port", self.port), ("--internal-port", self.internal_port)):
            if port is not None and first <= port <= last:
                raise ConfigError(f"--metrics-port {span} takes {flag} {port}: choose another")

    def source_urls(self) -> tuple[str, ...]:
        """--source as the URLs of the sources to read (none: empty)."""
        return source_urls("--source", self.sources)

    def join_leave_topics(self) -> Grants:
        """--join-leave as grants: the topics with join and leave events (none: empty)."""
        return join_leave_grants("--join-leave", self.join_leave)

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


# The commands of `hub` besides the server (handlers.commands, handlers.app.COMMANDS), as
# `hub --help` lists them.
COMMANDS = ("token", "publish", "outbox")
USAGE = """hub [--FLAG VALUE ...]                serve (the flags below)
       hub token --sub USER [--publish] ...  print a token the hub accepts (hub token --help)
       hub publish [--url URL] [EVENT ...]   publish events, print their ids (hub publish --help)
       hub outbox init postgres://...        create the outbox a --source reads (hub outbox --help)
       hub --version"""


def _paragraphs(*texts: str) -> str:
    """Text laid out as --help shows it, each paragraph wrapped on its own: a flag's name is
    never cut at a hyphen."""
    return "\n\n".join(
        textwrap.fill(text, 79, break_on_hyphens=False, break_long_words=False) for text in texts
    ).replace("%", "%%")


def _parser() -> OneLineParser:
    hidden = [s for s in SETTINGS if s.flag is None]
    parser = OneLineParser(
        prog="hub",
        commands=COMMANDS,
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Server-Sent Events notification hub (see README.md).",
            "Outside --demo the hub needs a key to verify tokens with: HUB_JWT_SECRET, an "
            f"environment variable of {MIN_SECRET_BYTES}+ bytes (python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(48))'), or --jwt-algorithm RS256/ES256 with "
            "--jwt-public-key. `hub token` mints tokens with the same key, `hub publish` "
            "publishes with one. `hub --demo` needs no key: it makes one up for the run.",
        ),
        epilog=_paragraphs(
            " ".join(
                [
                    "Every flag has a HUB_* variable (--max-body: HUB_MAX_BODY); a flag wins.",
                    "Booleans in variables: true/false, 1/0 or yes/no.",
                    "Sizes: bytes, or a whole number of KiB, MiB or GiB (64MiB, or '64 MiB').",
                    *(f"{s.var}: {s.help}." for s in hidden),
                ]
            )
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"hub {package_version()}", help="print the version"
    )
    for declared in SETTINGS:
        if declared.flag is None:
            continue
        text = help_line(declared).replace("%", "%%")
        if declared.kind is bool:
            parser.add_argument(declared.flag, action="store_true", default=None, help=text)
        elif declared.repeat:
            parser.add_argument(declared.flag, action="append", default=None, help=text)
        else:
            # Text, parsed as a variable's is (Setting.parse): the same values and the same
            # one-line errors from a flag and from its variable.
            parser.add_argument(
                declared.flag, default=None, metavar=_METAVARS.get(declared.unit), help=text
            )
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Flags over HUB_* variables over defaults. Raises ConfigError, in one line, for a bad
    value or a flag that cannot be parsed (`hub --help` and `--version` exit 0 here)."""
    env = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.unexpected(argv, extra)
    values: dict[str, object] = {}
    fallbacks: list[Setting] = []
    for declared in SETTINGS:
        given = getattr(args, (declared.flag_name or declared.name), None)
        if isinstance(given, list):  # a repeated flag: its values, as the variable holds them
            given = " ".join(given)
        if isinstance(given, str) and declared.flag is not None:
            given = declared.parse(declared.flag, given)
        elif given is None:
            var = declared.var_in(env)
            if var is not None and var == declared.fallback_env:
                fallbacks.append(declared)  # below, once the other settings are known
                continue
            if var is not None:
                given = declared.parse(var, env[var])
        if given is not None:
            values[declared.name] = given
    found_in: dict[str, str] = {}
    notes: list[str] = []
    for declared in fallbacks:
        var = declared.fallback_env
        # WEB_CONCURRENCY is a platform's default for whatever web server runs, not a
        # request to this one: honoured where several workers can run (a Redis broker),
        # else ignored with a line saying so, and the one-process Procfile starts where a
        # platform sets it.
        if declared.name == "workers" and values.get("broker", "memory") == "memory":
            if env[var].strip() != "1":
                notes.append(
                    f"{var}={env[var][:32]} ignored: one process, as the memory broker needs "
                    "(several workers need --broker redis://...)"
                )
            continue
        values[declared.name] = declared.parse(var, env[var])
        found_in[declared.name] = var
    token = _FOUND_IN.set(found_in)
    try:
        config = Config(**values)  # type: ignore[arg-type]
    finally:
        _FOUND_IN.reset(token)
    config.__dict__["_notes"] = notes
    return config
