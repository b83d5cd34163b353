"""The NATS JetStream source (hub.jetstream) against real NATS servers: the shared one on
127.0.0.1:4222 with a stream of the test's own, or a private `nats-server` the test stops and
starts (tests/nats_support.py). The hubs are real: in the test's process (conftest's
hub_server) where nothing of the hub must die, `hub` processes (browser_support.HubProcess)
sharing a real Redis where one is stopped, killed or doubled. Clients are raw SSE clients
(tests/sse.py); events are published to the stream with nats-py, each with a counter, and each
client must get each counter exactly once. Every wait has a deadline; processes are signalled
by their own PIDs only. No mock of NATS, Redis or the hub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import nats
import nats_support
import pytest
import redis_support
from browser_support import SECRET, HubProcess, http_json, hub_processes, readyz_of
from nats.aio.client import Client
from nats.js.api import AckPolicy
from nats_support import NatsTarget, PrivateNats
from prometheus_client.parser import text_string_to_metric_families
from redis_support import PrivateRedis, RedisTarget
from sse import SSEClient, wait_for

from hub.config import ConfigError, parse_config
from hub.jetstream import JetStreamSettings, JetStreamSource, subject_matches
from hub.sources import SourceError

nats_url = nats_support.nats_url
private_nats = nats_support.private_nats
redis_url = redis_support.redis_url
private_redis = redis_support.private_redis


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


# -- the URL ---------------------------------------------------------------------------------


def test_a_nats_url_without_options_takes_the_defaults():
    parsed = JetStreamSettings.parse("nats://nats.example/EVENTS")
    assert parsed == JetStreamSettings(
        ("nats://nats.example:4222",), "EVENTS", "hub", 256, 30.0, "hub.dead.EVENTS", None
    )


def test_every_option_and_several_servers_with_credentials():
    url = (
        "nats://svc:p%40ss@a.example:4223,[::1],b.example/EV-1?durable=relay&batch=10"
        "&ack_wait=2.5&dead=ops.dead&subject=hub.events.>"
    )
    parsed = JetStreamSettings.parse(url)
    assert parsed.servers == (
        "nats://a.example:4223",
        "nats://[::1]:4222",
        "nats://b.example:4222",
    )
    assert (parsed.user, parsed.password, parsed.token) == ("svc", "p@ss", None)
    assert (parsed.stream, parsed.durable, parsed.batch, parsed.ack_wait) == (
        "EV-1",
        "relay",
        10,
        2.5,
    )
    assert (parsed.dead, parsed.subject) == ("ops.dead", "hub.events.>")
    assert "p@ss" not in repr(parsed)
    # a user without a password is a token, as nats-server reads it
    token = JetStreamSettings.parse("nats://s3cret@h/S")
    assert (token.user, token.password, token.token) == (None, None, "s3cret")
    assert "s3cret" not in repr(token)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats://h", "names no stream"),
        ("nats://h/", "names no stream"),
        ("nats:///S", "names no host"),
        ("nats://h:4222,/S", "names no host"),
        ("nats://h:port/S", "is not host or host:port"),
        ("nats://h/S.x", "stream 'S.x' is not a NATS name"),
        ("nats://h/S*", "is not a NATS name"),
        ("nats://h/S%20x", "is not a NATS name"),
        ("nats://h/S?durable=a.b", "durable 'a.b' is not a NATS name"),
        ("nats://h/S?durable=a>", "is not a NATS name"),
        ("nats://h/S?batch=0", "batch must be positive"),
        ("nats://h/S?batch=x", "is not int"),
        ("nats://h/S?batch=20000", "batch must be at most 10000"),
        ("nats://h/S?ack_wait=0.5", "ack_wait must be at least 1"),
        ("nats://h/S?dead=a.*", "dead 'a.*' is not a subject, no wildcards"),
        ("nats://h/S?dead=a..b", "is not a subject"),
        ("nats://h/S?subject=a.>.b", "subject 'a.>.b' is not a subject (wildcards"),
        ("nats://h/S?subject=a.b*", "is not a subject"),
        ("nats://h/S?table=x", "unknown option 'table'"),
        ("nats://h/S?batch=1&batch=2", "option batch given twice"),
        ("nats://@h/S", "empty credentials"),
    ],
)
def test_a_nats_url_that_cannot_work_is_refused_saying_why(url, says):
    with pytest.raises(SourceError) as refused:
        JetStreamSettings.parse(url)
    assert says in str(refused.value)


def test_the_hub_refuses_a_bad_nats_source_at_start_without_showing_the_password():
    with pytest.raises(ConfigError) as refused:
        parse_config(["--source", "nats://u:secret@h:4222/S.x"], {})
    assert "is not a NATS name" in str(refused.value)
    assert "secret" not in str(refused.value) and "u:***@h:4222" in str(refused.value)
    parse_config(["--source", "nats://h:4222/S?batch=5"], {})  # and takes a good one


def test_a_source_is_named_by_its_url_without_the_password():
    source = JetStreamSource("nats://u:pw@a:4222,b:4223/S?batch=3", intake=None)  # type: ignore[arg-type]
    assert source.name == "nats://u:***@a:4222,b:4223/S?batch=3"
    assert source.stats.state == "starting" and not source.stats.up


def test_checking_a_nats_url_does_not_import_the_client():
    code = (
        "import sys; from hub.config import parse_config; "
        "parse_config(['--source', 'nats://h/S'], {}); "
        "assert 'nats' not in sys.modules, 'nats imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("hub.>", "hub.dead.S", True),
        ("hub.*", "hub.dead.S", False),
        ("hub.*.S", "hub.dead.S", True),
        (">", "x", True),
        ("hub.dead.S", "hub.dead.S", True),
        ("hub.dead", "hub.dead.S", False),
        ("hub.dead.S.x", "hub.dead.S", False),
        ("hub.>", "hub", False),
    ],
)
def test_subjects_match_as_nats_matches_them(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches


# -- what the tests share: streams, messages, clients ---------------------------------------


async def _quiet(_: Exception) -> None:  # the errors are raised to the test: no log of them too
    return None


async def connect(url: str, *, keep_trying: bool = False) -> Client:
    """A test's own NATS client: one that gives up at once, or (`keep_trying`) a publisher
    that reconnects for ever, as a producing service would."""
    if keep_trying:
        return await nats.connect(
            url,
            connect_timeout=2,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,  # type: ignore[arg-type]
            error_cb=_quiet,
        )
    return await nats.connect(
        url,
        connect_timeout=2,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        error_cb=_quiet,
    )


def dead_subject(target: NatsTarget) -> str:
    """Beside the stream's subjects, never under them (on the shared server, the test's own)."""
    return target.subject_prefix.rsplit(".", 1)[0] + ".dead"


def source_url(target: NatsTarget, **options: object) -> str:
    query = {"durable": "hub", "ack_wait": 2, "dead": dead_subject(target), **options}
    return f"{target.url}/{target.stream}?" + "&".join(
        f"{k}={quote(str(v), safe='.>*')}" for k, v in query.items()
    )


async def make_streams(nc: Client, target: NatsTarget, *, dead: bool = True) -> None:
    """The test's stream (all subjects under its prefix) and, with `dead`, one keeping its
    dead letters (nats_support deletes both afterwards)."""
    js = nc.jetstream(timeout=5)
    await js.add_stream(name=target.stream, subjects=[target.subjects])
    if dead:
        await js.add_stream(name=target.dead_stream, subjects=[dead_subject(target)])


def create_streams(target: NatsTarget, *, dead: bool = True) -> None:
    """make_streams from a test not on an event loop (before its hubs start)."""

    async def make() -> None:
        nc = await connect(target.url)
        try:
            await make_streams(nc, target, dead=dead)
        finally:
            await nc.close()

    nats_support.run_async(make)


def body(n: int, tag: str = "") -> bytes:
    """A broadcast (every stream gets it) carrying its counter."""
    return json.dumps({"type": "broadcast", "data": {"n": n, "tag": tag}}).encode()


async def publish(nc: Client, target: NatsTarget, payload: bytes, msg_id: str | None = None) -> int:
    """Publish to the test's stream; its sequence number. With `msg_id`, retried until the
    stream takes it (JetStream keeps a message id once: a retry whose first try was stored is
    not stored again), as a producer that must not lose it would."""
    js = nc.jetstream(timeout=2)
    subject = f"{target.subject_prefix}.x"
    if msg_id is None:
        return (await js.publish(subject, payload)).seq
    deadline = time.monotonic() + 30
    while True:
        try:
            return (await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})).seq
        except (nats.errors.Error, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # a pace for the retries, within the deadline


def counters(client: SSEClient, tag: str = "") -> Counter[int]:
    """How many times each counter of `tag` arrived on the stream."""
    out: Counter[int] = Counter()
    for event in client.received:
        data = event.json().get("data")
        if isinstance(data, dict) and data.get("tag") == tag:
            out[data["n"]] += 1
    return out


async def each_once(client: SSEClient, wanted: range, tag: str = "", timeout: float = 20) -> None:
    """Every counter of `wanted` arrives, once; then nothing more comes for a moment."""
    arrived = await client.wait_until(lambda: set(counters(client, tag)) >= set(wanted), timeout)
    got = counters(client, tag)
    missing = sorted(set(wanted) - set(got))
    assert arrived, f"{len(missing)} missing: {missing[:20]}"
    with contextlib.suppress(TimeoutError):  # a late duplicate would show up now
        await client.wait_until(lambda: sum(counters(client, tag).values()) > len(wanted), 0.5)
    got = counters(client, tag)
    assert {n: c for n, c in got.items() if c != 1} == {}, "delivered more than once"
    assert sorted(got) == list(wanted)


async def consumer_settled(nc: Client, target: NatsTarget, durable: str = "hub") -> bool:
    """Nothing waits in the consumer: every message acked or terminated."""
    info = await nc.jetstream(timeout=2).consumer_info(target.stream, durable)
    return (info.num_pending, info.num_ack_pending) == (0, 0)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def source_metric(metrics: dict[Any, float], name: str, source: str, **labels: str) -> float:
    key = (name, tuple(sorted({"source": source, **labels}.items())))
    assert key in metrics, (
        f"{key} not in /metrics ({sorted(k for k in metrics if 'source' in k[0])})"
    )
    return metrics[key]


# -- in the test's process: delivery, dead letters, a missing stream, a NATS restart ----------


@pytest.mark.gen_test(timeout=60)
async def test_a_message_is_delivered_once_and_poison_is_dead_lettered_and_the_next_delivered(
    nats_url, hub_server
):
    nc = await connect(nats_url.url)
    try:
        await make_streams(nc, nats_url)
        url = source_url(nats_url)
        hub = await hub_server(sources=url)
        client = await hub.stream("u1")
        first = await publish(nc, nats_url, body(0))
        await each_once(client, range(1))
        poison = [
            b'{"type": "broadcast", "data":',  # cut short
            b'{"type": "refund", "data": 1}',  # no such type
            b'{"type": "join", "user": "mallory", "data": {"topic": "x"}}',  # the hub's own
        ]
        seqs = [await publish(nc, nats_url, p) for p in poison]
        after = await publish(nc, nats_url, body(1))
        await each_once(client, range(2))
        assert [e.json()["data"]["n"] for e in client.received] == [0, 1]
        assert seqs == [first + 1, first + 2, first + 3] and after == first + 4

        # The dead letters: each body as it was, with why, where from and which.
        js = nc.jetstream(timeout=2)

        async def dead_count() -> int:
            return (await js.stream_info(nats_url.dead_stream)).state.messages

        assert await wait_for(lambda: _equals(dead_count(), 3), 10), "dead letters not kept"
        dead = [await js.get_msg(nats_url.dead_stream, n) for n in (1, 2, 3)]
        assert [d.data for d in dead] == poison
        assert [d.subject for d in dead] == [dead_subject(nats_url)] * 3
        reasons = [(d.headers or {}).get("Hub-Reason", "") for d in dead]
        assert "malformed JSON" in reasons[0], reasons
        assert "unknown event type 'refund'" in reasons[1], reasons
        assert "published by the hub itself" in reasons[2], reasons
        for d, seq in zip(dead, seqs, strict=True):
            assert d.headers is not None
            assert d.headers["Hub-Stream"] == nats_url.stream
            assert d.headers["Hub-Sequence"] == str(seq)
            assert d.headers["Hub-Subject"] == f"{nats_url.subject_prefix}.x"
        # terminated, not left to come back: the consumer holds nothing
        assert await wait_for(lambda: consumer_settled(nc, nats_url), 5)

        metrics = await hub.metrics()
        records = "hub_source_records_total"
        assert source_metric(metrics, records, url, outcome="published") == 2
        assert source_metric(metrics, records, url, outcome="replayed") == 0
        assert source_metric(metrics, records, url, outcome="dead") == 3
        assert source_metric(metrics, "hub_source_up", url) == 1
        assert source_metric(metrics, "hub_source_held", url) == 0

        async def lag() -> float:
            return source_metric(await hub.metrics(), "hub_source_lag", url)

        # nothing waits in the consumer: no lag (once the reader has asked, within a second)
        assert await wait_for(lambda: _equals(lag(), 0), 5)
        assert hub.hub.sources[0].stats.state == "up"
    finally:
        await nc.close()


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


@pytest.mark.gen_test(timeout=60)
async def test_with_no_stream_for_the_dead_subject_its_live_subscribers_get_the_dead_letters(
    nats_url, hub_server, caplog
):
    nc = await connect(nats_url.url)
    try:
        await make_streams(nc, nats_url, dead=False)
        watcher = await nc.subscribe(dead_subject(nats_url))
        hub = await hub_server(sources=source_url(nats_url))
        client = await hub.stream("u1")
        for n in range(2):
            await publish(nc, nats_url, b"not json")
            await publish(nc, nats_url, body(n))
        await each_once(client, range(2))
        letters = [await watcher.next_msg(timeout=5) for _ in range(2)]
        assert [m.data for m in letters] == [b"not json"] * 2
        assert all("malformed JSON" in (m.headers or {}).get("Hub-Reason", "") for m in letters)
        assert await wait_for(lambda: consumer_settled(nc, nats_url), 5)
        warned = [r.getMessage() for r in caplog.records if "no stream keeps" in r.getMessage()]
        assert len(warned) == 1, warned  # said once, not per dead letter
    finally:
        await nc.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_poison_message_as_large_as_nats_takes_is_dead_lettered_cut_to_fit(
    nats_url, hub_server
):
    """The largest message NATS takes, refused: with the hub's headers it would not fit as a
    dead letter, so its body is cut, and says so; the next one arrives."""
    nc = await connect(nats_url.url)
    try:
        await make_streams(nc, nats_url)
        hub = await hub_server(sources=source_url(nats_url))
        client = await hub.stream("u1")
        huge = b"x" * (nc.max_payload - 200)  # (room for the publish's own headers)
        await publish(nc, nats_url, huge)
        await publish(nc, nats_url, body(0))
        await each_once(client, range(1))
        js = nc.jetstream(timeout=2)
        assert await wait_for(lambda: consumer_settled(nc, nats_url), 5)
        letter = await js.get_msg(nats_url.dead_stream, 1)
        assert letter.headers is not None
        assert letter.headers["Hub-Body-Cut"] == str(len(huge))
        assert "malformed JSON" in letter.headers["Hub-Reason"]
        assert letter.data is not None and huge.startswith(letter.data) and letter.data
    finally:
        await nc.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_missing_stream_is_a_source_down_until_it_exists_and_the_consumer_is_made(
    nats_url, hub_server
):
    nc = await connect(nats_url.url)
    try:
        url = source_url(nats_url, batch=8)
        hub = await hub_server(sources=url)

        async def readyz() -> dict[str, Any]:
            answer = await hub.fetch("/readyz")
            assert answer.code == 200, answer.body  # a source down never takes the node out
            return dict(json.loads(answer.body))

        assert await wait_for(lambda: _state_starts(readyz(), url, "down"), 10)
        ready = await readyz()
        assert ready["status"] == "degraded"
        assert ready["sources"][url].startswith(f"down: no stream {nats_url.stream} ")
        assert "never creates it" in ready["sources"][url]
        assert (await hub.metrics())[("hub_source_up", (("source", url),))] == 0

        await make_streams(nc, nats_url)  # the operator makes it: the source comes up
        assert await wait_for(lambda: _state_starts(readyz(), url, "up"), 10)
        assert (await readyz())["status"] == "ready"
        client = await hub.stream("u1")
        await publish(nc, nats_url, body(0))
        await each_once(client, range(1))
        config = (await nc.jetstream().consumer_info(nats_url.stream, "hub")).config
        assert config.ack_policy == AckPolicy.EXPLICIT and config.ack_wait == 2
        assert config.max_ack_pending == 4 * 8 and config.max_deliver == -1
        assert config.deliver_subject is None  # a pull consumer
    finally:
        await nc.close()


async def _state_starts(answer: Awaitable[dict[str, Any]], url: str, prefix: str) -> bool:
    return str((await answer)["sources"].get(url, "")).startswith(prefix)


@pytest.mark.gen_test(timeout=60)
async def test_a_dead_subject_the_stream_itself_captures_is_refused_not_looped(
    nats_url, hub_server
):
    nc = await connect(nats_url.url)
    try:
        await make_streams(nc, nats_url, dead=False)
        url = source_url(nats_url, dead=f"{nats_url.subject_prefix}.dead")
        hub = await hub_server(sources=url)
        source = hub.hub.sources[0]
        assert await wait_for(lambda: source.stats.state.startswith("down"), 10)
        assert "dead letters would come back" in source.stats.state, source.stats.state
        await publish(nc, nats_url, b"not json")
        info = await nc.jetstream().stream_info(nats_url.stream)
        assert info.state.messages == 1  # nothing read, nothing republished
    finally:
        await nc.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_nats_restart_under_a_trickle_delivers_each_message_once(
    private_nats: PrivateNats, hub_server
):
    """The server stops (SIGTERM) while a producer publishes a message every 20 ms and goes
    on retrying; /readyz says the source is down; the server starts again with its store; the
    source comes back on its own and every message arrives once (an ack lost with the server
    is a redelivery, stored once)."""
    target = private_nats.target()
    loop = asyncio.get_running_loop()
    admin = await connect(target.url)
    await make_streams(admin, target)
    await admin.close()
    url = source_url(target)
    hub = await hub_server(sources=url)
    client = await hub.stream("u1")
    producer = await connect(target.url, keep_trying=True)
    count = 80
    sent: list[int] = []

    async def trickle() -> None:
        for n in range(count):
            await publish(producer, target, body(n), msg_id=f"m{n}")
            sent.append(n)
            await asyncio.sleep(0.02)  # the producer's pace, not a synchronisation

    async def state() -> str:
        answer = await hub.fetch("/readyz")
        assert answer.code == 200, answer.body
        return str(json.loads(answer.body)["sources"][url])

    task = loop.create_task(trickle())
    try:
        assert await client.wait_until(lambda: len(counters(client)) >= 10, 10)
        await loop.run_in_executor(None, private_nats.stop)
        assert await wait_for(lambda: _starts(state(), "down"), 10), "not down"
        downs = len(sent)
        await loop.run_in_executor(None, private_nats.start)
        assert await wait_for(lambda: _starts(state(), "up"), 15), "not up again"
        await asyncio.wait_for(task, 40)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.close()
    assert downs < count, "the server stopped after the last publish"
    await each_once(client, range(count))
    source = hub.hub.sources[0]
    assert source.stats.restarts >= 1
    assert source.stats.published == count  # each stored once (a redelivery is a replay)


@pytest.mark.gen_test(timeout=60)
async def test_a_frozen_nats_server_is_down_within_seconds_and_reading_resumes_when_it_thaws(
    private_nats: PrivateNats, hub_server
):
    """SIGSTOP (a server that hangs, or a partition: the socket stays open, nothing answers):
    the source must not say "up" for as long as the kernel keeps the socket; the client's
    pings find it, and it reads again once the server thaws."""
    target = private_nats.target()
    admin = await connect(target.url)
    await make_streams(admin, target)
    await admin.close()
    url = source_url(target)
    hub = await hub_server(sources=url)
    client = await hub.stream("u1")

    async def state() -> str:
        answer = await hub.fetch("/readyz")
        return str(json.loads(answer.body)["sources"][url])

    assert await wait_for(lambda: _starts(state(), "up"), 10), "never up"
    private_nats.pause()
    try:
        assert await wait_for(lambda: _starts(state(), "down"), 15), "still up while frozen"
    finally:
        private_nats.resume()
    assert await wait_for(lambda: _starts(state(), "up"), 20), "not up again"
    producer = await connect(target.url)
    try:
        await publish(producer, target, body(0), msg_id="after-thaw")
    finally:
        await producer.close()
    await each_once(client, range(1))


async def _starts(text: Awaitable[str], prefix: str) -> bool:
    return (await text).startswith(prefix)


@pytest.mark.gen_test(timeout=30)
async def test_a_source_stops_within_two_seconds_and_leaves_nothing_unacked(nats_url, hub_server):
    nc = await connect(nats_url.url)
    try:
        await make_streams(nc, nats_url)
        hub = await hub_server(sources=source_url(nats_url))
        client = await hub.stream("u1")
        for n in range(50):
            await publish(nc, nats_url, body(n))
        await each_once(client, range(50))
        source = hub.hub.sources[0]
        started = time.monotonic()
        await source.close()
        await asyncio.wait_for(asyncio.gather(*hub.hub._source_tasks), 2.5)
        assert time.monotonic() - started < 2.0
        assert source.stats.state == "stopped" and not source.stats.up
        assert await consumer_settled(nc, nats_url)
    finally:
        await nc.close()


# -- hub processes: a consumer restart, two hubs, kill -9 between storing and acking ----------


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """Start `hub` processes (with a Redis target: its broker; browser_support.
    hub_processes: each ended at teardown, its log printed)."""
    with hub_processes(tmp_path) as start:

        def on(redis: RedisTarget | None, *args: str, ready: bool = True) -> HubProcess:
            return start(*(redis.hub_args() if redis else []), *args, ready=ready)

        yield on


def metrics_of(hub: HubProcess) -> dict[Any, float]:
    with urllib.request.urlopen(hub.url + "/metrics", timeout=5) as response:
        return samples(response.read().decode())


def stored_by(hub: HubProcess, url: str, outcome: str = "published") -> float:
    return source_metric(metrics_of(hub), "hub_source_records_total", url, outcome=outcome)


async def open_stream(hub: HubProcess, user: str) -> SSEClient:
    client = await SSEClient.connect(
        hub.port, "/events", {"Authorization": f"Bearer {token(user)}"}
    )
    assert client.status == 200, (client.status, client.body)
    assert await client.wait_until(lambda: "hub stream open" in client.comments)
    return client


def clean_log(hub: HubProcess) -> None:
    log = hub.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


def test_a_hub_stopped_and_started_again_loses_and_doubles_nothing(nats_url, redis_url, hubs):
    """The hub reading the stream is stopped (SIGTERM) in the middle of a trickle and started
    again; a client of another hub (no source, the same Redis) gets every message once."""
    create_streams(nats_url)
    url = source_url(nats_url)
    reader = hubs(redis_url, "--source", url)
    other = hubs(redis_url)
    count = 60
    tag = uuid.uuid4().hex[:8]

    async def scenario() -> None:
        nc = await connect(nats_url.url)
        client = await open_stream(other, "u1")
        sent: list[int] = []

        async def trickle() -> None:
            for n in range(count):
                await publish(nc, nats_url, body(n, tag))
                sent.append(n)
                await asyncio.sleep(0.03)  # the producer's pace

        loop = asyncio.get_running_loop()
        task = loop.create_task(trickle())
        try:
            assert await client.wait_until(lambda: len(counters(client, tag)) >= 10, 10)
            await loop.run_in_executor(None, reader.stop)
            assert reader.proc.returncode == 0
            stopped_at = len(sent)
            again = await loop.run_in_executor(None, lambda: hubs(redis_url, "--source", url))
            await asyncio.wait_for(task, 30)
            assert stopped_at < count, "stopped after the last publish"
            await each_once(client, range(count), tag)
            assert await wait_for(lambda: consumer_settled(nc, nats_url), 10)
            # what the first one stored and acked was not taken again
            taken = stored_by(again, url) + stored_by(again, url, "replayed")
            assert taken < count, taken
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()
            await nc.close()

    asyncio.run(scenario())
    clean_log(reader)


def test_two_hubs_share_the_durable_and_store_each_message_once(nats_url, redis_url, hubs):
    """Two hubs read through one durable consumer (batches of 16, so both take some); a
    client of each gets all 500 messages once, and the two stored 500 between them."""
    create_streams(nats_url)
    url = source_url(nats_url, batch=16)
    a = hubs(redis_url, "--source", url)
    b = hubs(redis_url, "--source", url)
    count = 500
    tag = uuid.uuid4().hex[:8]

    async def scenario() -> None:
        nc = await connect(nats_url.url)
        on_a, on_b = await open_stream(a, "u1"), await open_stream(b, "u2")
        try:
            js = nc.jetstream(timeout=5)
            subject = f"{nats_url.subject_prefix}.x"
            for start in range(0, count, 50):
                acks = await asyncio.gather(
                    *(js.publish(subject, body(n, tag)) for n in range(start, start + 50))
                )
                assert all(ack.stream == nats_url.stream for ack in acks)
            # every hub delivers every event to its own streams, whoever stored it
            await each_once(on_a, range(count), tag, timeout=30)
            await each_once(on_b, range(count), tag)
            assert await wait_for(lambda: consumer_settled(nc, nats_url), 10)
        finally:
            await on_a.aclose()
            await on_b.aclose()
            await nc.close()

    asyncio.run(scenario())
    # each message stored by one of them (a redelivery would be counted replayed)
    split = (stored_by(a, url), stored_by(b, url))
    assert sum(split) == count, split
    print("stored by each hub:", split)
    clean_log(a)
    clean_log(b)


def test_a_hub_killed_between_storing_and_acking_is_delivered_once(
    nats_url, private_redis: PrivateRedis, hubs
):
    """Redis is paused (SIGSTOP) while the reader's store of a message is on its way: the
    script call is in Redis's socket, no answer can come, so no ack either. The reader is
    killed (SIGKILL), Redis continued: it runs the call (the event is stored: a client of
    another hub gets it, the precondition). A new reader gets the message again from NATS
    after ack_wait (2 s), the broker answers it replayed, the reader acks it; the client
    has it once."""
    create_streams(nats_url)
    redis = private_redis.target()
    url = source_url(nats_url)
    reader = hubs(redis, "--source", url)
    other = hubs(redis)
    tag = uuid.uuid4().hex[:8]

    def publishing(hub: HubProcess) -> int:
        return int(http_json(hub.url + "/healthz")[1]["publishing"])

    async def scenario() -> None:
        nc = await connect(nats_url.url)
        client = await open_stream(other, "u1")
        loop = asyncio.get_running_loop()
        try:
            await publish(nc, nats_url, body(0, tag))  # the reader's Redis connection in use
            assert await client.wait_until(lambda: counters(client, tag)[0] == 1, 10)
            private_redis.pause()
            try:
                await publish(nc, nats_url, body(1, tag))
                # its store is sent (the hub turns unready only after 1.5 s of silence)
                assert await wait_for(lambda: publishing(reader) == 1, 1.2), "no store on its way"
                os.kill(reader.proc.pid, signal.SIGKILL)
                assert await loop.run_in_executor(None, reader.proc.wait, 10) == -signal.SIGKILL
            finally:
                private_redis.resume()
            # precondition: the store the killed hub sent did happen (and was never acked)
            assert await client.wait_until(lambda: counters(client, tag)[1] == 1, 15), (
                "the killed hub's store did not happen: the scenario did not run"
            )
            again = await loop.run_in_executor(None, lambda: hubs(redis, "--source", url))
            assert await wait_for(lambda: stored_by(again, url, "replayed") == 1, 15)
            assert stored_by(again, url) == 0
            assert await wait_for(lambda: consumer_settled(nc, nats_url), 5)
            await publish(nc, nats_url, body(2, tag))
            await each_once(client, range(3), tag)
        finally:
            await client.aclose()
            await nc.close()

    asyncio.run(scenario())


def test_a_broker_that_cannot_store_stops_the_reading_and_the_messages_wait_in_nats(
    nats_url, private_redis: PrivateRedis, hubs
):
    """Redis stopped: each batch the reader fetches is refused by its broker and handed back
    at once (nak), so the messages wait in NATS, never more than a batch out; Redis back: they
    arrive, once each, in seconds, though ack_wait is 30 s (a batch left to its ack_wait would
    come 30 s late)."""
    create_streams(nats_url)
    redis = private_redis.target()
    url = source_url(nats_url, ack_wait=30, batch=4)
    reader = hubs(redis, "--source", url)
    tag = uuid.uuid4().hex[:8]
    count = 20

    async def scenario() -> None:
        nc = await connect(nats_url.url)
        js = nc.jetstream(timeout=2)
        client = await open_stream(reader, "u1")
        loop = asyncio.get_running_loop()
        try:
            await publish(nc, nats_url, body(0, tag))
            assert await client.wait_until(lambda: counters(client, tag)[0] == 1, 10)
            await loop.run_in_executor(None, private_redis.stop)
            assert await wait_for(lambda: readyz_of(reader)[0] == 503, 5)
            for n in range(1, count):
                await publish(nc, nats_url, body(n, tag))

            async def handed_back() -> bool:
                info = await js.consumer_info(nats_url.stream, "hub")
                assert (info.num_ack_pending or 0) <= 4, info  # one batch out at most
                assert (info.num_pending or 0) + (info.num_ack_pending or 0) == count - 1
                return (info.num_redelivered or 0) > 0

            # the oldest batch is taken, refused by the broker, handed back, taken again
            assert await wait_for(handed_back, 15), "no batch was handed back"

            def lag() -> float:
                return source_metric(metrics_of(reader), "hub_source_lag", url)

            assert await wait_for(lambda: lag() == count - 1, 5), lag()  # all of them wait
            assert stored_by(reader, url) == 1
            await loop.run_in_executor(None, private_redis.start)
            assert await wait_for(lambda: readyz_of(reader)[0] == 200, 15)
            back = loop.time()
            await each_once(client, range(count), tag, timeout=10)
            assert loop.time() - back < 10
            assert await wait_for(lambda: consumer_settled(nc, nats_url), 5)
        finally:
            await client.aclose()
            await nc.close()

    asyncio.run(scenario())
    assert stored_by(reader, url) == count
