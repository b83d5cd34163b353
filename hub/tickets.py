"""One-time stream tickets: a long-lived JWT never has to sit in a stream URL.

A page (hub.js with `ticketUrl`) trades its token for a ticket with `POST /tickets`
(Authorization header: no URL, no proxy log, no browser history), then opens
`GET /events?ticket=...`. A ticket is a random 256-bit string (`secrets.token_urlsafe(32)`,
43 characters); it stands for the claims of the token it was issued for (user, session,
allowed topics, exp, iat: a logout since `iat` refuses it like the token) and is good for ONE
stream request, within `--ticket-ttl` seconds (30) and never past the token's own `exp`.

The store is the broker's (`Broker.put_ticket` / `take_ticket`): with the Redis broker a
ticket issued by one process is redeemed by any other, once (Redis `SET NX PX` and
`GETDEL`). Only the ticket's SHA-256 is ever stored, as the key: a dump of the store, a
`MONITOR` or a memory snapshot holds no usable ticket. Tickets are never logged (hub.logs
blanks `ticket=` values).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import ujson

from hub.auth import AuthError, Claims
from hub.query import QueryError
from hub.refusal import RefusalKind
from hub.topics import GrantError, Grants

if TYPE_CHECKING:
    from hub.broker import Broker

__all__ = [
    "REJECTIONS",
    "TICKET_LENGTH",
    "TicketCounters",
    "TicketRefused",
    "Tickets",
    "decode_claims",
    "encode_claims",
    "parse_ticket",
    "ticket_key",
]

log = logging.getLogger("hub")

TICKET_BYTES = 32
TICKET_LENGTH = 43  # len(secrets.token_urlsafe(32)): 32 bytes in unpadded base64url
_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")
# Why a ticket was refused: the label values of hub_tickets_rejected_total.
REJECTIONS = ("malformed", "unknown", "revoked")


class TicketRefused(AuthError):
    """A ticket refused; `reason` is one of REJECTIONS (a metric label, never the ticket)."""

    def __init__(self, reason: str, message: str) -> None:
        kind = RefusalKind.TICKET_MALFORMED if reason == "malformed" else RefusalKind.TICKET_UNKNOWN
        super().__init__(kind, message)
        self.reason = reason


class _Count(Protocol):
    def inc(self) -> None: ...


class _CountBy(Protocol):
    def labels(self, reason: str, /) -> _Count: ...


class TicketCounters(Protocol):
    """What Tickets counts in (hub.metrics.Metrics)."""

    @property
    def tickets_issued(self) -> _Count: ...

    @property
    def tickets_redeemed(self) -> _Count: ...

    @property
    def tickets_rejected(self) -> _CountBy: ...


def parse_ticket(args: Sequence[str]) -> str | None:
    """The ticket of a stream request's `?ticket=` values: None when there is none. More than
    one is a QueryError; a value that is not a ticket's shape (43 base64url characters)
    is refused (TicketRefused) by its length and characters alone, before it is hashed or looked up:
    garbage costs nothing, whatever its size."""
    if not args:
        return None
    if len(args) > 1:
        raise QueryError("at most one ticket per request")
    value = args[0]
    if len(value) != TICKET_LENGTH or _SHAPE.fullmatch(value) is None:
        raise TicketRefused("malformed", "ticket invalid: not a ticket the hub issued")
    return value


def ticket_key(ticket: str) -> str:
    """What a store keys a ticket by: its SHA-256, hex. The ticket itself is never stored."""
    return hashlib.sha256(ticket.encode("ascii")).hexdigest()


def encode_claims(claims: Claims) -> bytes:
    """What a ticket stands for: the token's claims that a stream uses (publish is not one:
    a ticket opens streams only)."""
    return ujson.dumps(
        {
            "sub": claims.user,
            "sid": claims.sid,
            "topics": list(claims.topics.source),
            "exp": claims.exp,
            "iat": claims.iat,
        },
        escape_forward_slashes=False,
    ).encode()


def decode_claims(raw: bytes | str) -> Claims:
    """The claims encode_claims stored; ValueError if that is not what `raw` holds."""
    try:
        body: Any = ujson.loads(raw)
        user, sid, topics = body["sub"], body["sid"], body["topics"]
        exp, iat = body["exp"], body["iat"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a stored ticket: {type(exc).__name__}") from None
    if (
        type(user) is not str
        or not (sid is None or type(sid) is str)
        or type(exp) not in (int, float)
        or type(iat) not in (int, float)
    ):
        raise ValueError("not a stored ticket: a field of the wrong type")
    try:
        grants = Grants.parse(topics)
    except GrantError as exc:
        raise ValueError(f"not a stored ticket: topics {exc}") from None
    return Claims(
        user=user,
        exp=float(exp),
        iat=float(iat),
        sid=sid,
        topics=grants,
        publish=False,
    )


class Tickets:
    """Issue and redeem tickets through the broker's store; counts what it does in
    `metrics` (hub_tickets_*)."""

    def __init__(self, broker: Broker, ttl: float, metrics: TicketCounters) -> None:
        self.broker = broker
        self.ttl = ttl
        self.metrics = metrics

    async def issue(self, claims: Claims) -> tuple[str, float]:
        """A new ticket for a verified token's claims, and its life in seconds:
        min(ttl, the token's exp - now). BrokerUnavailable if the store cannot take it."""
        life = min(self.ttl, claims.exp - time.time())
        if life <= 0:
            raise AuthError(RefusalKind.TOKEN_EXPIRED, "token expired")
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        await self.broker.put_ticket(ticket_key(ticket), encode_claims(claims), life)
        self.metrics.tickets_issued.inc()
        return ticket, life

    async def redeem(self, ticket: str) -> Claims:
        """The claims a ticket (as parse_ticket read it) stands for; it is spent whatever
        the answer to the request that presents it. TicketRefused for a ticket that is
        unknown, used or expired; BrokerUnavailable if the store cannot answer."""
        raw = await self.broker.take_ticket(ticket_key(ticket))
        if raw is None:
            self.reject("unknown")
            raise TicketRefused("unknown", "ticket unknown, already used or expired")
        try:
            claims = decode_claims(raw)
        except ValueError as exc:
            log.warning("a stored ticket could not be read (%s): refused", exc)
            self.reject("unknown")
            raise TicketRefused("unknown", "ticket unknown, already used or expired") from None
        if claims.exp <= time.time():  # another node's clock may run behind this one's
            self.reject("unknown")
            raise TicketRefused("unknown", "ticket expired (its token has)")
        self.metrics.tickets_redeemed.inc()
        return claims

    def reject(self, reason: str) -> None:
        self.metrics.tickets_rejected.labels(reason).inc()
