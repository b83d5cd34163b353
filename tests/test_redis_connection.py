"""`--broker redis+sentinel://...`: the URL's parser (examples, and hypothesis properties: it
parses operator input), the start-up check in Config, and the client it builds. The client
against real sentinels and a real failover: tests/test_redis_sentinel.py."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from hub.config import Config, ConfigError
from hub.redis_connection import SentinelURL, parse_sentinel_url, redact, redis_client


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+sentinel://h1:26379,h2:26380/master-name/3",
            SentinelURL([("h1", 26379), ("h2", 26380)], "master-name", 3, None),
        ),
        ("redis+sentinel://h1/m", SentinelURL([("h1", 26379)], "m", 0, None)),
        ("redis+sentinel://h1/m/", SentinelURL([("h1", 26379)], "m", 0, None)),
        (
            "redis+sentinel://:p%40ss%3Aword@10.0.0.1:5000,[::1]:5001,[fe80::1]/m/0",
            SentinelURL(
                [("10.0.0.1", 5000), ("::1", 5001), ("fe80::1", 26379)], "m", 0, "p@ss:word"
            ),
        ),
        ("rediss+sentinel://:pw@sentinel.internal/hub%2Dmaster/15", None),
    ],
)
def test_a_sentinel_url_names_the_sentinels_the_master_the_db_and_the_password(url, parsed):
    got = parse_sentinel_url(url)
    if parsed is None:
        parsed = SentinelURL([("sentinel.internal", 26379)], "hub-master", 15, "pw")
    assert got == parsed


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "no master name"),
        ("redis+sentinel://h1:26379/", "no master name"),
        ("redis+sentinel://h1:26379//0", "no master name"),
        ("redis+sentinel:///hubmaster/0", "no sentinel hosts"),
        ("redis+sentinel://:pw@/hubmaster/0", "no sentinel hosts"),
        ("redis+sentinel://h1:26379,,h2:26379/m/0", "a sentinel host is empty"),
        ("redis+sentinel://h1:26379,/m/0", "a sentinel host is empty"),
        ("redis+sentinel://h1:0/m/0", "bad port '0' for host 'h1': must be 1 to 65535"),
        ("redis+sentinel://h1:65536/m/0", "bad port '65536'"),
        ("redis+sentinel://h1:sixty/m/0", "bad port 'sixty'"),
        ("redis+sentinel://h1:/m/0", "bad port ''"),
        ("redis+sentinel://h1:26379,h2:-1/m/0", "bad port '-1' for host 'h2'"),
        ("redis+sentinel://::1:26379/m/0", "write an IPv6 address in brackets"),
        ("redis+sentinel://[::1/m/0", "opens a [ it does not close"),
        ("redis+sentinel://[10.0.0.1]:1/m/0", "is not an IPv6 address"),
        ("redis+sentinel://[::1]x/m/0", "after [::1] comes :port or nothing"),
        ("redis+sentinel://h 1:26379/m/0", "'h 1' is not a host name"),
        ("redis+sentinel://user:pw@h1/m/0", "a username is not supported"),
        ("redis+sentinel://pw@h1/m/0", "a username is not supported"),
        ("redis+sentinel://h1/m/zero", "db 'zero' is not a number"),
        ("redis+sentinel://h1/m/0/extra", "more than /master-name/db"),
        ("redis+sentinel://h1/m%20n/0", "has spaces or control characters"),
        ("redis+sentinel://h1/m/0?socket_timeout=1", "query options are not supported"),
        ("redis://h1:6379/0", "starts with redis+sentinel:// or rediss+sentinel://"),
    ],
)
def test_a_malformed_sentinel_url_says_what_is_wrong(url, says):
    with pytest.raises(ValueError, match=r"^.+$") as raised:
        parse_sentinel_url(url)
    assert says in str(raised.value)


def test_the_start_up_check_refuses_a_malformed_one_in_one_line_without_the_password():
    with pytest.raises(ConfigError) as raised:
        Config(broker="redis+sentinel://:s3cret@h1:26379,h2:99999/hubmaster/0")
    message = str(raised.value)
    assert "\n" not in message and "s3cret" not in message
    assert message == (
        "--broker 'redis+sentinel://:***@h1:26379,h2:99999/hubmaster/0' is not a Sentinel URL "
        "(redis+sentinel://[:password@]host[:port],host[:port]/master-name[/db]): "
        "bad port '99999' for host 'h2': must be 1 to 65535"
    )
    assert Config(broker="redis+sentinel://h1,h2/hubmaster/0").broker.startswith("redis+")
    with pytest.raises(ConfigError, match=r"Redis URL .*redis\+sentinel://host:port"):
        Config(broker="sentinel://h1/m/0")


def test_redact_hides_only_the_password():
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis+sentinel://:p@w@h1,h2/m/0") == "redis+sentinel://:***@h1,h2/m/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"


# -- properties -------------------------------------------------------------------------

HOSTS = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
NAMES = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=30
).filter(lambda name: name.isprintable() and not any(c.isspace() for c in name))


@given(
    hosts=st.lists(st.tuples(HOSTS, st.none() | st.integers(1, 65535)), min_size=1, max_size=5),
    name=NAMES,
    db=st.none() | st.integers(0, 999_999_999),
    password=st.none() | st.text(min_size=1, max_size=30),
    tls=st.booleans(),
)
def test_every_well_formed_url_parses_back_to_what_it_was_made_of(hosts, name, db, password, tls):
    netloc = ",".join(host if port is None else f"{host}:{port}" for host, port in hosts)
    if password is not None:
        netloc = f":{quote(password, safe='')}@{netloc}"
    path = quote(name, safe="") + ("" if db is None else f"/{db}")
    url = f"{'rediss' if tls else 'redis'}+sentinel://{netloc}/{path}"
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == [(h.strip("[]"), 26379 if p is None else p) for h, p in hosts]
    assert parsed.master == name
    assert parsed.db == (db or 0)
    assert parsed.password == password
    assert Config(broker=url).broker == url  # the start-up check takes it too
    if password is not None:
        assert redact(url).partition("@")[0].endswith(":***")


@given(rest=st.text(max_size=80))
def test_any_text_is_a_sentinel_url_or_one_clear_value_error(rest):
    url = "redis+sentinel://" + rest
    try:
        parsed = parse_sentinel_url(url)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        with pytest.raises(ConfigError) as raised:
            Config(broker=url)
        assert "\n" not in str(raised.value)
        return
    assert parsed.sentinels and parsed.master and parsed.db >= 0
    assert all(host and 1 <= port <= 65535 for host, port in parsed.sentinels)
    assert Config(broker=url).broker == url


# -- the client it builds (connections are opened only by commands: these open none) ------


def test_the_client_takes_the_password_and_tls_to_the_master_and_asks_the_sentinels_without_one():
    async def build() -> None:
        plain = redis_client("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/m/4", socket_timeout=5)
        tls = redis_client("rediss+sentinel://127.0.0.1:1/m")
        feed = redis_client("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/m/4")
        try:
            # the broker's two clients leave an old master together: they share what they learn
            view = plain.connection_pool.view  # type: ignore[attr-defined]
            assert feed.connection_pool.view is view  # type: ignore[attr-defined]
            assert tls.connection_pool.view is not view  # type: ignore[attr-defined]
            kwargs = plain.connection_pool.connection_kwargs
            assert (kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == ("pw", 4, 5)
            assert plain.connection_pool.connection_class is SentinelManagedConnection
            sentinels = plain.sentinels.sentinels  # type: ignore[attr-defined]
            assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
            for sentinel in sentinels:
                kwargs = sentinel.connection_pool.connection_kwargs
                assert kwargs.get("password") is None
                assert kwargs["socket_timeout"] == 1.0  # capped: sentinels answer at once
            assert tls.connection_pool.connection_class is SentinelManagedSSLConnection
            (sentinel,) = tls.sentinels.sentinels  # type: ignore[attr-defined]
            assert issubclass(sentinel.connection_pool.connection_class, SSLConnection)
        finally:
            for client in (plain, tls, feed):
                await client.aclose()

    asyncio.run(build())
