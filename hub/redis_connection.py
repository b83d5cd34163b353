"""The Redis client a `--broker` URL names: one server, or the master that Sentinel watches.

`redis://host:port/db`, `rediss://` (TLS) and `unix:///path?db=n` name one server (redis-py's
`from_url`). `redis+sentinel://[:password@]host[:port],host[:port]/master-name[/db]` names
sentinels (port 26379 where none is given) that are asked which server is the master now;
`rediss+sentinel://` is the same with TLS to the sentinels and to the master. The password is
the master's (and its replicas'); sentinels are asked without one; db defaults to 0; a
username, query options and anything else are refused with a ValueError that says what to
write instead.

A failover needs no restart: redis-py's SentinelConnectionPool asks the sentinels when a
connection connects, and one of its connections that gets READONLY from a demoted master
disconnects and raises ConnectionError. But a connection still open to the old master is
used as long as that server keeps it: after SENTINEL FAILOVER the old master stays a writable
master until a sentinel turns it into a replica (about 10 s later here; it closes its
clients then), and what it takes meanwhile the new master never sees. So the pool below asks
the sentinels again when a connection is taken, at most every CHECK_EVERY seconds, and
reconnects any connection that is not to the master they name; the clients of one process
for the same sentinels and master share what one of them learns. What the old master took
between the promotion and that check is still lost when it becomes a replica (and another
process may write there a little longer): the broker has to notice such a rollback
(hub.redis_broker), as after any other loss. Measured: README, Scale-out on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
import weakref
from typing import Any, NamedTuple
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

__all__ = [
    "SENTINEL_SCHEMES",
    "SENTINEL_URL_FORM",
    "SentinelURL",
    "is_sentinel_url",
    "parse_sentinel_url",
    "redact",
    "redis_client",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_URL_FORM = "redis+sentinel://[:password@]host[:port],host[:port]/master-name[/db]"
SENTINEL_PORT = 26379
# Seconds between two checks of the master's address with the sentinels (made when a
# connection is taken, so an idle client asks nobody).
CHECK_EVERY = 0.5
# Seconds a sentinel may take to connect or answer: its answers are small and immediate, and
# a stalled one delays every check until the next sentinel is asked.
SENTINEL_TIMEOUT = 1.0

_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_PORT = re.compile(r"[0-9]{1,5}")
_DB = re.compile(r"[0-9]{1,9}")


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    master: str
    db: int
    password: str | None


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SENTINEL_SCHEMES


def _host_port(item: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`, as a (host, port) pair."""
    if not item:
        raise ValueError("a sentinel host is empty (two commas, or a comma at an end)")
    port_text: str | None
    if item.startswith("["):
        host, bracket, after = item[1:].partition("]")
        if not bracket:
            raise ValueError(f"{item!r} opens a [ it does not close")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{item!r}: [{host}] is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise ValueError(f"{item!r}: after [{host}] comes :port or nothing")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text = item.partition(":")
        if ":" in port_text:
            raise ValueError(f"{item!r}: write an IPv6 address in brackets, [::1]:{SENTINEL_PORT}")
        if not _HOST.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or an IPv4 address")
        port_text = port_text if colon else None
    if port_text is None:
        return host, SENTINEL_PORT
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r} for host {host!r}: must be 1 to 65535")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelURL:
    """The sentinels, the master's name, the db and the password a Sentinel URL names.
    ValueError, with one line that says what is wrong (never the password), otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    if "?" in rest or "#" in rest:
        raise ValueError("query options are not supported (percent-encode ? and # in a password)")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon or user:
            raise ValueError("a username is not supported: write the password as :password@")
        password = unquote(secret) or None
    if not hosts:
        raise ValueError("no sentinel hosts (host:port,host:port)")
    sentinels = [_host_port(item) for item in hosts.split(",")]
    if not path:
        raise ValueError("no master name: the path is /master-name/db")
    name_text, _, db_text = path.partition("/")
    name = unquote(name_text)
    if not name:
        raise ValueError("no master name: the path is /master-name/db")
    if not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"master name {name[:40]!r} has spaces or control characters")
    if "/" in db_text:
        raise ValueError(f"the path has more than /master-name/db: /{path[:60]}")
    if db_text and not _DB.fullmatch(db_text):
        raise ValueError(f"db {db_text[:20]!r} is not a number")
    return SentinelURL(sentinels, name, int(db_text) if db_text else 0, password)


def redact(url: str) -> str:
    """The URL with the password of its userinfo replaced by ***, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hosts}{slash}{path}"


class _MasterView:
    """The master's address as the sentinels last named it, shared by every client of the
    same sentinels and master in this process: the broker's publishing client and its feed
    leave the old master together, not up to CHECK_EVERY apart (while one publishes to the
    old master, the other would read the new one and never see those publishes)."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self.checked = float("-inf")


_VIEWS: weakref.WeakValueDictionary[tuple[object, ...], _MasterView] = weakref.WeakValueDictionary()


class _MasterPool(SentinelConnectionPool):
    """A SentinelConnectionPool that re-asks the sentinels while its connections stay open
    (see the module's docstring): at most every CHECK_EVERY seconds (for all the clients of a
    view), when a connection is taken; a connection to a server other than the master last
    named reconnects, to the master the sentinels name then."""

    view = _MasterView()  # replaced by the view of its sentinels and master (redis_client)

    async def get_master_address(self) -> Any:
        """Ask the sentinels (redis-py disconnects the idle connections if the answer
        changed) and tell the view."""
        address = await super().get_master_address()  # type: ignore[no-untyped-call]
        self.view.address = (str(address[0]), int(address[1]))
        self.view.checked = time.monotonic()
        return address

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() - self.view.checked >= CHECK_EVERY:
            self.view.checked = time.monotonic()
            # With no answer (sentinels away, or the master down for them), the connections
            # go on as they are: a new one asks again, and fails if there is still none.
            with contextlib.suppress(MasterNotFoundError):
                await self.get_master_address()
        connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        address = self.view.address
        if (
            address is not None
            and connection.is_connected
            and (connection.host, connection.port) != address
        ):
            try:
                await connection.disconnect()
                await connection.connect()  # asks the sentinels
            except BaseException:
                await self.release(connection)
                raise
        return connection


class _NewestSentinel(Sentinel):
    """Sentinels asked together, the newest view taken. redis-py takes the first sentinel's
    answer; during a failover a sentinel not yet told names the old master, and a node that
    had moved to the new one went back and wrote there (its writes acknowledged, then lost
    when the old master was demoted: `python -m bench.faults`, 21 events in one run). Each
    sentinel's answer carries the configuration epoch it knows (raised by every failover):
    the highest one reachable wins, and the process never goes back below the highest it
    has taken."""

    newest: tuple[int, tuple[str, int]] | None = None

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        answers = await asyncio.gather(
            *(sentinel.sentinel_master(service_name) for sentinel in self.sentinels),
            return_exceptions=True,
        )
        best: tuple[int, tuple[str, int]] | None = None
        for state in answers:
            if isinstance(state, BaseException):
                if not isinstance(state, RedisError | OSError):
                    raise state
                continue
            if not isinstance(state, dict) or not self.check_master_state(state, service_name):
                continue
            epoch = int(state.get("config-epoch", 0))
            if best is None or epoch > best[0]:
                best = (epoch, (str(state["ip"]), int(state["port"])))
        if best is None:
            raise MasterNotFoundError(f"No master found for {service_name!r}")
        if self.newest is None or best[0] >= self.newest[0]:
            self.newest = best
        return self.newest[1]


class _SentinelClient(aioredis.Redis):
    """The master's client; closing it closes the clients of its sentinels too."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels is not None:
                await self.sentinels.aclose()


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client for a `--broker` URL (see the module's docstring), with redis-py's
    connection options (`socket_timeout`, `retry`, ...). The sentinels are asked with the
    same socket options capped at SENTINEL_TIMEOUT, and the same `retry`."""
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    tls = url.startswith("rediss+")
    sentinel_options: dict[str, Any] = {
        key: value
        for key, value in options.items()
        if key.startswith("socket_") or key in ("retry", "maint_notifications_config")
    }
    for key in ("socket_timeout", "socket_connect_timeout"):
        given = sentinel_options.get(key)
        sentinel_options[key] = SENTINEL_TIMEOUT if given is None else min(given, SENTINEL_TIMEOUT)
    if tls:
        sentinel_options["ssl"] = True
    sentinel = _NewestSentinel(parsed.sentinels, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    master_options = dict(options)
    if tls:
        master_options["ssl"] = True
    if parsed.password is not None:
        master_options["password"] = parsed.password
    client: _SentinelClient = sentinel.master_for(
        parsed.master,
        redis_class=_SentinelClient,
        connection_pool_class=_MasterPool,
        db=parsed.db,
        **master_options,
    )
    client.sentinels = sentinel
    service = (tuple(parsed.sentinels), parsed.master)
    view = _VIEWS.get(service)
    if view is None:
        view = _VIEWS[service] = _MasterView()
    pool: _MasterPool = client.connection_pool  # type: ignore[assignment]
    pool.view = view
    return client
