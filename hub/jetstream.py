"""The NATS JetStream source (--source nats://...): a durable pull consumer reads a stream whose
messages are publish bodies (`{"type": "log", "data": {...}}`, as POST /publish takes them),
and a message is acknowledged only after the hub stored its event.

    nats://[user:password@]host[:4222][,host2[:port]...]/STREAM?durable=hub&batch=256
        &ack_wait=30&dead=hub.dead.STREAM&subject=hub.events.>

The stream is the operator's: the hub never creates it (its subjects, retention, limits and
replicas are decisions about the data, not the reader's), and a stream that does not exist is a
source that is down, with the reason, retried until it does. The durable consumer is the hub's:
created if missing as a pull consumer with explicit acks, `ack_wait`, deliver-all, no limit on
redeliveries (a message is never dropped because the hub failed to store it N times) and
`max_ack_pending` four batches (several hubs may each hold one); one that exists is used as it
is (a push consumer, or one without explicit acks, is refused: down, with the reason).

Each hub fetches up to `batch` messages at a time (the backpressure bound: it fetches the next
batch only when this one is let go of) and hands them to Intake.take in stream-sequence order.
A record's key is `nats:<stream>:<stream created, µs>:<stream sequence>`, so a redelivery (a
crash between storing and acking, an ack lost with a NATS restart, an ack_wait that ran out
under a slow broker) is stored once: the broker answers it replayed and the hub acks it then.
A stream deleted and made anew restarts its sequence; its creation time keeps the new keys
apart from the old ones. What the hub refuses (bad JSON, an unknown or internal type, over
--max-body) is published to the dead-letter subject with the headers `Hub-Reason`,
`Hub-Stream`, `Hub-Sequence` and `Hub-Subject`, kept by JetStream if a stream captures that
subject (`Nats-Msg-Id` is the record's key: a dead letter published twice is kept once), then
terminated (AckTerm: never redelivered) and counted; it never blocks the messages behind it.

Several hubs share the durable consumer: each message goes to one of them, and each hub keeps
the sequence order within its batches, but batches taken by different hubs are stored in
whatever order their stores finish: order across messages taken by different hubs is not kept.
One hub per durable keeps the stream's order, but for a message redelivered after its ack_wait
(delivered to a connection that was lost before it arrived): it comes after newer ones.

A batch the broker cannot store (Redis down: BrokerUnavailable) is handed back at once, nak
without delay, and the hub waits (a capped backoff) before it fetches again: NATS gives
redeliveries before newer messages, so the same batch comes back first, to this hub or to
another whose broker answers; nothing else is read meanwhile (the backpressure), and the
messages wait in the stream, counted in hub_source_lag. A dead-letter subject that the source's
own stream captures (and its consumer reads) would bring each dead letter back for ever: the
source refuses to read then (down, saying so).

nats-py is imported when a source runs, not when its URL is checked (hub.config does that at
start for every --source).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from hub.broker import BrokerUnavailable
from hub.sources import Backoff, Intake, Source, SourceError, options

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.api import ConsumerInfo, StreamInfo
    from nats.js.client import JetStreamContext

__all__ = ["JetStreamSettings", "JetStreamSource", "subject_matches"]

log = logging.getLogger("hub.sources")

DEFAULT_PORT = 4222
# A connection attempt's bound, per server. nats-py's own reconnects are off: this module's
# loop reconnects, with hub.sources.Backoff, so that an outage is one state (down, in /readyz
# and hub_source_up), logged once, and a reconnect always re-reads the stream and the consumer
# (a stream made anew has a new creation time: the keys must follow it).
CONNECT_TIMEOUT = 2
# The JetStream API's answers (stream and consumer info, dead-letter publishes): a server that
# does not answer within this is down.
API_TIMEOUT = 2.0
# How long a fetch waits for the first message: close() is honoured within it, and an idle
# source asks the server again this often.
FETCH_TIMEOUT = 1.0
# A server that froze (SIGSTOP, a partition) is found by the client's pings: PING every
# PING_INTERVAL s, the connection closed after MAX_OUTSTANDING_PINGS unanswered. (The lag's
# consumer-info request, once a second, usually finds it sooner.)
PING_INTERVAL = 2
MAX_OUTSTANDING_PINGS = 2
# The lag (the consumer's pending and unacknowledged messages) is asked at most this often.
LAG_INTERVAL = 1.0
# max_ack_pending of a consumer the hub creates: this many batches may be out at once (a few
# hubs each holding one, and a batch delivered to a fetch that gave up before it came).
ACK_PENDING_BATCHES = 4
# How long the answer to "which stream keeps the dead letters?" is used before asking again.
DEAD_KEEPER_TTL = 10.0
# The longest reason a dead letter's Hub-Reason header carries (the log line has 200).
REASON_HEADER = 1000
MAX_BATCH = 10_000

# Stream and consumer names: NATS refuses whitespace, `.`, `*`, `>` and path separators in
# them (a name is a token of the API's subjects).
_BAD_NAME = re.compile(r"[\s.*>/\\]|[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class JetStreamSettings:
    """What a nats:// --source says (see the module's docstring). `servers` are URLs without
    credentials; `user` and `password`, or `token` (a user with no password), apply to all."""

    servers: tuple[str, ...]
    stream: str
    durable: str = "hub"
    batch: int = 256
    ack_wait: float = 30.0
    dead: str = ""  # hub.dead.<stream> when parsed without `dead`
    subject: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> JetStreamSettings:
        known: dict[str, type] = {
            "durable": str,
            "batch": int,
            "ack_wait": float,
            "dead": str,
            "subject": str,
        }
        if not url.startswith("nats://"):
            raise SourceError("a NATS source URL starts with nats://")
        _, found, _ = options(url, known, keep_unknown=False)
        parts = urlsplit(url)
        if parts.fragment:
            raise SourceError("a NATS source URL has no #fragment")
        userinfo, at, hostlist = parts.netloc.rpartition("@")
        user = password = token = None
        if at:
            name, colon, secret = userinfo.partition(":")
            if colon:
                user, password = unquote(name), unquote(secret)
            else:
                token = unquote(name)
            if not (user or password or token):
                raise SourceError("empty credentials before @ (user:password@host or token@host)")
        servers = tuple(_server(host) for host in hostlist.split(","))
        stream = unquote(parts.path.removeprefix("/"))
        if not stream:
            raise SourceError("the URL names no stream (nats://host:4222/STREAM)")
        _check_name("stream", stream)
        durable = str(found.get("durable", cls.durable))
        _check_name("durable", durable)
        batch = found.get("batch", cls.batch)
        assert isinstance(batch, int)
        if batch > MAX_BATCH:
            raise SourceError(f"batch must be at most {MAX_BATCH}")
        ack_wait = found.get("ack_wait", cls.ack_wait)
        assert isinstance(ack_wait, float | int)
        if ack_wait < 1:
            # Shorter, and a batch being stored would be redelivered to another hub as a
            # matter of course (stored once all the same, but taken twice).
            raise SourceError("ack_wait must be at least 1 (seconds)")
        dead = str(found.get("dead", f"hub.dead.{stream}"))
        _check_subject("dead", dead, wildcards=False)
        subject = found.get("subject")
        if subject is not None:
            subject = str(subject)
            _check_subject("subject", subject, wildcards=True)
        return cls(
            servers, stream, durable, batch, float(ack_wait), dead, subject, user, password, token
        )


def _server(host: str) -> str:
    """`host[:port]` (IPv6 in brackets) as a nats:// URL without credentials."""
    if not host:
        raise SourceError("the URL names no host (nats://host:4222/STREAM)")
    try:
        parts = urlsplit(f"nats://{host}")
        port = parts.port
    except ValueError:
        raise SourceError(f"{host[:64]!r} is not host or host:port") from None
    if not parts.hostname:
        raise SourceError(f"{host[:64]!r} is not host or host:port")
    shown = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"nats://{shown}:{port or DEFAULT_PORT}"


def _check_name(option: str, name: str) -> None:
    if len(name) > 255 or _BAD_NAME.search(name):
        raise SourceError(
            f"{option} {name[:48]!r} is not a NATS name (no spaces, '.', '*', '>', '/' or "
            "'\\'; at most 255 characters)"
        )


def _check_subject(option: str, subject: str, *, wildcards: bool) -> None:
    tokens = subject.split(".")
    bad = (
        not subject
        or len(subject) > 1024
        or re.search(r"[\s\x00-\x1f\x7f]", subject) is not None
        or any(not token for token in tokens)
    )
    for n, token in enumerate(tokens):
        if token in ("*", ">"):
            bad = bad or not wildcards or (token == ">" and n != len(tokens) - 1)
        elif "*" in token or ">" in token:
            bad = True
    if bad:
        kind = "a subject (wildcards * and > allowed)" if wildcards else "a subject, no wildcards"
        raise SourceError(f"{option} {subject[:64]!r} is not {kind}")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the literal `subject` is one `pattern` (with NATS wildcards) names."""
    want, have = pattern.split("."), subject.split(".")
    for n, token in enumerate(want):
        if token == ">":
            return len(have) > n
        if n >= len(have) or (token != "*" and token != have[n]):
            return False
    return len(want) == len(have)


class _Down(Exception):
    """The server answers, but the source cannot read: no stream, a consumer it cannot use."""


def _stamp(info: StreamInfo) -> int:
    """The stream's creation time in µs (0 from a server that does not say)."""
    created = info.created
    return int(created.timestamp() * 1_000_000) if created is not None else 0


class JetStreamSource(Source):
    """One nats:// --source (see the module's docstring)."""

    def __init__(self, url: str, intake: Intake) -> None:
        self.settings = JetStreamSettings.parse(url)
        super().__init__(url, intake)
        self._nc: Client | None = None
        self._lag_at = 0.0
        self._warned: set[str] = set()  # warnings given once per source
        self._keeper: str | None = None  # the stream keeping the dead letters, if any
        self._keeper_at = -DEAD_KEEPER_TTL

    def _expected(self) -> tuple[type[BaseException], ...]:
        import nats.errors

        return (_Down, nats.errors.Error, OSError, TimeoutError)

    async def _connect(self) -> Client:
        import nats
        import nats.errors

        settings = self.settings
        failures: list[Exception] = []

        async def failed(exc: Exception) -> None:
            # nats-py reports connection errors here as well as raising them: the source
            # logs an outage once (went_down), not each attempt.
            failures.append(exc)
            log.debug("source %s: %s", self.name, exc)

        try:
            # Each server tried at most twice (max_reconnect_attempts=1 is nats-py's
            # "retry once"; 0 would mean for ever), back to back, then it gives up.
            return await asyncio.wait_for(
                nats.connect(
                    servers=list(settings.servers),
                    user=settings.user,
                    password=settings.password,
                    token=settings.token,
                    name="hub",
                    connect_timeout=CONNECT_TIMEOUT,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    ping_interval=PING_INTERVAL,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    error_cb=failed,
                ),
                timeout=CONNECT_TIMEOUT * 2 * len(settings.servers) + 1,
            )
        except nats.errors.NoServersError:
            # (it says only that none was left to try: the last failure says why)
            raise failures[-1] if failures else OSError("no NATS server answered") from None

    async def _disconnect(self) -> None:
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        try:
            # The acks sent last reach the server (a round trip), then the connection ends.
            await nc.flush(timeout=1)
        except Exception:
            log.debug("source %s: the last flush failed", self.name, exc_info=True)
        try:
            await asyncio.wait_for(nc.close(), 1)
        except Exception:
            log.debug("source %s: close failed", self.name, exc_info=True)

    async def _session(self, backoff: Backoff) -> None:
        """One connection's life: check the stream, make sure of the consumer, read."""
        import nats.js.errors

        settings, stats = self.settings, self.stats
        self._nc = nc = await self._connect()
        js = nc.jetstream(timeout=API_TIMEOUT)
        try:
            stream = await js.stream_info(settings.stream)
        except nats.js.errors.NotFoundError:
            raise _Down(
                f"no stream {settings.stream} (the hub never creates it: create it with the "
                "subjects and retention you want)"
            ) from None
        await self._dead_keeper(js, fresh=True)
        consumer = await self._consumer(js)
        pull = await js.pull_subscribe_bind(settings.durable, stream=settings.stream)
        created = _stamp(stream)
        first = stats.state == "starting"
        stats.up = stats.leading = True
        stats.state = "up"
        self._lag_at = 0.0
        backoff.reset()
        log.info(
            "source %s: %s stream %s through consumer %s (%d waiting)",
            self.name,
            "reading" if first else "reading again",
            settings.stream,
            settings.durable,
            (consumer.num_pending or 0) + (consumer.num_ack_pending or 0),
        )
        await self._read(nc, js, pull, created)

    async def _dead_keeper(self, js: JetStreamContext, *, fresh: bool = False) -> str | None:
        """The stream that keeps the dead-letter subject, if one does (asked again after
        DEAD_KEEPER_TTL: an operator may make one meanwhile). Asked, not found out by
        publishing: a plain subscriber of the subject would take a JetStream publish's request
        and never answer it."""
        import nats.js.errors

        loop = asyncio.get_running_loop()
        if fresh or loop.time() - self._keeper_at >= DEAD_KEEPER_TTL:
            try:
                keeper: str | None = await js.find_stream_name_by_subject(self.settings.dead)
            except nats.js.errors.NotFoundError:
                keeper = None
            self._keeper, self._keeper_at = keeper, loop.time()
        settings = self.settings
        read = settings.subject is None or subject_matches(settings.subject, settings.dead)
        if self._keeper == settings.stream and read:
            # Each dead letter would come back to be refused again, for ever.
            raise _Down(
                f"the dead-letter subject {settings.dead} is one of stream {settings.stream}'s "
                "subjects: dead letters would come back (set dead= to a subject of another "
                "stream)"
            )
        return self._keeper

    async def _consumer(self, js: JetStreamContext) -> ConsumerInfo:
        """The durable consumer, created if missing; one that cannot work is refused."""
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        settings = self.settings
        info: ConsumerInfo
        try:
            info = await js.consumer_info(settings.stream, settings.durable)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                durable_name=settings.durable,
                description="hub --source: created by the hub",
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=settings.ack_wait,
                max_deliver=-1,  # never dropped after failed deliveries
                max_ack_pending=ACK_PENDING_BATCHES * settings.batch,
                filter_subject=settings.subject,
            )
            try:
                info = await js.add_consumer(settings.stream, config)
            except nats.js.errors.BadRequestError:
                # Another hub made it meanwhile (with other settings): use that one.
                info = await js.consumer_info(settings.stream, settings.durable)
            else:
                log.info(
                    "source %s: created the durable consumer %s on stream %s",
                    self.name,
                    settings.durable,
                    settings.stream,
                )
        config = info.config
        if config.deliver_subject:
            raise _Down(f"consumer {settings.durable} is a push consumer: the hub pulls")
        if config.ack_policy not in (None, AckPolicy.EXPLICIT):
            raise _Down(
                f"consumer {settings.durable} acks {config.ack_policy}: the hub needs explicit "
                "acks (an event is acked once stored)"
            )
        if settings.subject is not None and config.filter_subject != settings.subject:
            self._warn_once(
                "filter",
                "consumer %s exists with filter subject %r, not %r: read as it is",
                settings.durable,
                config.filter_subject,
                settings.subject,
            )
        if config.max_deliver not in (None, -1, 0):
            self._warn_once(
                "max_deliver",
                "consumer %s has max_deliver %s: a message the hub fails to store that often "
                "is dropped by NATS",
                settings.durable,
                config.max_deliver,
            )
        return info

    def _warn_once(self, what: str, message: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("source %s: " + message, self.name, *args)

    async def _read(
        self,
        nc: Client,
        js: JetStreamContext,
        pull: JetStreamContext.PullSubscription,
        created: int,
    ) -> None:
        import nats.errors

        settings, stats = self.settings, self.stats
        backoff = Backoff(0.05, 2.0)  # between tries of a batch the broker could not take
        while not self.closing:
            try:
                msgs = await pull.fetch(settings.batch, timeout=FETCH_TIMEOUT)
            except TimeoutError:  # nothing came (nats-py raises its own and asyncio's)
                if nc.is_closed:
                    raise nats.errors.ConnectionClosedError() from None
                msgs = []
            if msgs:
                # A redelivery (its ack_wait ran out) comes before newer messages, or beside
                # them: the batch goes to the broker in stream order.
                # (Msg.metadata parses the reply subject anew at each call: read once.)
                numbered = sorted(
                    ((m.metadata.sequence.stream, m) for m in msgs), key=lambda pair: pair[0]
                )
                stats.held = len(msgs)
                try:
                    stored = await self._take(nc, js, numbered, created)
                finally:
                    stats.held = 0
                if not stored:
                    if self.closing:
                        return
                    await self._measure_lag(js)  # (what waits, while the broker cannot store)
                    await self._pause(backoff)
                    continue
                backoff.reset()
                stats.state = "up"
            await self._measure_lag(js)

    async def _take(
        self, nc: Client, js: JetStreamContext, numbered: list[tuple[int, Msg]], created: int
    ) -> bool:
        """Store a batch (messages with their stream sequence, in order) and let go of it: ack
        what is stored, dead-letter what is refused. False if the broker could not take it
        (the batch is handed back)."""
        stream = self.settings.stream
        msgs = [m for _, m in numbered]
        records = [(f"nats:{stream}:{created}:{seq}", m.data) for seq, m in numbered]
        try:
            reasons = await self.intake.take(records, self.stats)
        except BrokerUnavailable as exc:
            # Handed back at once (nak, no delay), in sequence order: NATS redelivers them
            # before newer messages, to whichever hub asks first: this one after its backoff
            # (so its order holds), or another whose broker answers. Not left to ack_wait: that
            # would hold them up to 30 s after the broker is back; nor a delayed nak: newer
            # messages would overtake them. What was stored meanwhile comes back replayed.
            if not self.closing:
                self.stats.state = f"up (waiting for the broker: {str(exc)[:120]})"
            for msg in msgs:
                await msg.nak()
            return False
        for (seq, msg), (key, _), reason in zip(numbered, records, reasons, strict=True):
            if reason is None:
                await msg.ack()
            else:
                await self._dead_letter(nc, js, msg, seq, key, reason)
        return True

    async def _dead_letter(
        self, nc: Client, js: JetStreamContext, msg: Msg, seq: int, key: str, reason: str
    ) -> None:
        import nats.errors
        import nats.js.errors

        settings = self.settings
        headers = {
            "Hub-Reason": reason[:REASON_HEADER],
            "Hub-Stream": settings.stream,
            "Hub-Sequence": str(seq),
            "Hub-Subject": msg.subject,
            "Nats-Msg-Id": key,  # JetStream keeps a dead letter published twice once
        }
        body = msg.data
        room = nc.max_payload - sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items()) - 64
        if len(body) > room:  # (a message near max_payload, with our headers, would not fit)
            headers["Hub-Body-Cut"] = str(len(body))
            body = body[: max(0, room - 32)]
        keeper = await self._dead_keeper(js)
        try:
            if keeper is None:
                self._warn_once(
                    "dead",
                    "no stream keeps the dead-letter subject %s: dead letters reach only its "
                    "live subscribers (make a stream for it to keep them)",
                    settings.dead,
                )
                await nc.publish(settings.dead, body, headers=headers)
            else:
                await js.publish(settings.dead, body, timeout=API_TIMEOUT, headers=headers)
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            # The stream that kept them is gone: to the live subscribers, then.
            self._keeper_at = -DEAD_KEEPER_TTL
            await nc.publish(settings.dead, body, headers=headers)
        except nats.js.errors.APIError as exc:
            # The dead-letter stream refused it (full, say): the record is still let go of,
            # or it would block every message behind it; the warning below has its reason.
            log.warning(
                "source %s: stream %s refused dead letter %d: %s", self.name, keeper, seq, exc
            )
        await msg.term()
        self.stats.dead += 1
        log.warning(
            "source %s: message %d of stream %s dead-lettered to %s: %s",
            self.name,
            seq,
            settings.stream,
            settings.dead,
            reason[:200],
        )

    async def _measure_lag(self, js: JetStreamContext) -> None:
        """The consumer's pending and unacknowledged messages, at most once a LAG_INTERVAL.
        (A server that stopped answering fails here first: the source goes down.)"""
        loop = asyncio.get_running_loop()
        if loop.time() - self._lag_at < LAG_INTERVAL:
            return
        self._lag_at = loop.time()
        info = await js.consumer_info(self.settings.stream, self.settings.durable)
        self.stats.lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
