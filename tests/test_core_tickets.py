"""The ticket core (hub.tickets) and the memory broker's ticket store, without HTTP: the
store's bound under a flood, single use, expiry; the query parser and the stored claims as
properties (hypothesis). The Redis store: test_tickets_redis.py."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from core_support import config
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.auth import AuthError, Claims
from hub.broker import MAX_MEMORY_TICKETS, MemoryBroker
from hub.core import Hub
from hub.logs import redact
from hub.query import QueryError
from hub.refusal import RefusalKind
from hub.tickets import (
    TICKET_LENGTH,
    TicketRefused,
    decode_claims,
    encode_claims,
    parse_ticket,
    ticket_key,
)
from hub.topics import Grants

PROPERTY = settings(max_examples=300, deadline=None)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


def claims(user: str = "alice", exp_in: float = 300, **overrides: Any) -> Claims:
    values: dict[str, Any] = {
        "user": user,
        "exp": time.time() + exp_in,
        "iat": time.time() - 1.5,
        "sid": "s1",
        "topics": Grants.of(["presence", "payments"]),
        "publish": False,
    }
    values.update(overrides)
    return Claims(**values)


# -- the memory store -----------------------------------------------------------------------


def test_the_memory_store_hands_a_ticket_out_once():
    async def scenario() -> None:
        broker = MemoryBroker()
        await broker.put_ticket("k1", b"claims", 30)
        assert await broker.take_ticket("k1") == b"claims"
        assert await broker.take_ticket("k1") is None
        assert await broker.take_ticket("never") is None

    run(scenario)


def test_the_memory_store_forgets_expired_tickets_and_purges_them_as_new_ones_come():
    async def scenario() -> None:
        broker = MemoryBroker()
        await broker.put_ticket("gone", b"x", 0)  # its life is over at once
        assert await broker.take_ticket("gone") is None
        for n in range(100):
            await broker.put_ticket(f"old{n}", b"x", 0)
        await broker.put_ticket("live", b"y", 30)
        assert list(broker.tickets) == ["live"]  # the expired ones went as it came
        assert broker.tickets_evicted == 0
        assert await broker.take_ticket("live") == b"y"

    run(scenario)


def test_a_flood_of_tickets_keeps_the_memory_store_at_its_cap_pushing_out_the_oldest():
    async def scenario() -> None:
        broker = MemoryBroker()
        extra = 1000
        started = time.perf_counter()
        for n in range(MAX_MEMORY_TICKETS + extra):
            await broker.put_ticket(f"k{n}", b"claims", 30)
        elapsed = time.perf_counter() - started
        assert len(broker.tickets) == MAX_MEMORY_TICKETS
        assert broker.tickets_evicted == extra
        assert await broker.take_ticket("k0") is None  # the oldest went
        assert await broker.take_ticket(f"k{extra}") == b"claims"  # the oldest kept
        last = f"k{MAX_MEMORY_TICKETS + extra - 1}"
        assert await broker.take_ticket(last) == b"claims"
        assert elapsed < 5, f"{MAX_MEMORY_TICKETS + extra} puts took {elapsed:.1f} s"

    run(scenario)


# -- issue and redeem -----------------------------------------------------------------------


def test_a_ticket_stands_for_its_tokens_claims_once_and_only_its_hash_is_stored():
    async def scenario() -> None:
        hub = Hub(config(ticket_ttl=12))
        try:
            token_claims = claims()
            ticket, life = await hub.tickets.issue(token_claims)
            assert life == 12
            assert len(ticket) == TICKET_LENGTH and parse_ticket([ticket]) == ticket
            store = hub.broker.tickets  # type: ignore[attr-defined]
            assert list(store) == [ticket_key(ticket)]
            assert ticket not in repr(store)
            redeemed = await hub.tickets.redeem(ticket)
            assert redeemed == token_claims  # user, sid, topics, exp and iat (publish: no)
            with pytest.raises(TicketRefused) as refused:
                await hub.tickets.redeem(ticket)
            assert refused.value.refusal.kind is RefusalKind.TICKET_UNKNOWN
            assert refused.value.reason == "unknown"
            assert hub.metrics.tickets_issued._value.get() == 1
            assert hub.metrics.tickets_redeemed._value.get() == 1
        finally:
            await hub.stop()

    run(scenario)


def test_a_ticket_lives_no_longer_than_its_token_and_an_expired_token_gets_none():
    async def scenario() -> None:
        hub = Hub(config(ticket_ttl=30))
        try:
            _, life = await hub.tickets.issue(claims(exp_in=4))
            assert 3.5 < life <= 4
            with pytest.raises(AuthError) as refused:
                await hub.tickets.issue(claims(exp_in=-1))
            assert refused.value.refusal.kind is RefusalKind.TOKEN_EXPIRED
            assert len(hub.broker.tickets) == 1  # type: ignore[attr-defined]  (the first)
        finally:
            await hub.stop()

    run(scenario)


def test_a_publisher_tokens_ticket_does_not_carry_publish():
    assert decode_claims(encode_claims(claims(publish=True))).publish is False


@pytest.mark.parametrize(
    "raw",
    [b"", b"null", b"[]", b"{}", b'{"sub": 1, "sid": null, "topics": [], "exp": 1, "iat": 0}'],
)
def test_stored_claims_that_are_not_a_tickets_are_refused(raw):
    with pytest.raises(ValueError):
        decode_claims(raw)


# -- properties -----------------------------------------------------------------------------


@PROPERTY
@given(st.lists(st.text(max_size=60), max_size=4))
def test_the_ticket_query_is_none_one_ticket_a_query_error_or_malformed_and_nothing_else(args):
    try:
        ticket = parse_ticket(args)
    except QueryError:
        assert len(args) > 1
        return
    except TicketRefused as exc:
        assert len(args) == 1 and exc.reason == "malformed"
        assert exc.refusal.kind is RefusalKind.TICKET_MALFORMED
        value = args[0]
        assert (
            len(value) != TICKET_LENGTH
            or not value.isascii()
            or not all(c.isalnum() or c in "-_" for c in value)
        )
        return
    if not args:
        assert ticket is None
    else:
        assert args == [ticket] and len(ticket) == TICKET_LENGTH


@PROPERTY
@given(st.integers(0, 2**64))
def test_every_ticket_the_hub_makes_parses_and_redacts(seed):
    ticket = secrets.token_urlsafe(32)
    assert parse_ticket([ticket]) == ticket
    for uri in (f"/events?ticket={ticket}", f"/events?topic=t{seed}&ticket={ticket}&x=1"):
        assert ticket not in redact(uri)


@PROPERTY
@given(
    user=st.text(min_size=1, max_size=40),
    sid=st.none() | st.text(max_size=40),
    topics=st.lists(st.from_regex(r"[A-Za-z0-9_.:/@~-]{1,20}\*?", fullmatch=True), max_size=5).map(
        Grants.of
    ),
    exp=st.floats(0, 2**40, allow_nan=False),
    iat=st.floats(0, 2**40, allow_nan=False),
)
def test_stored_claims_read_back_as_they_were(user, sid, topics, exp, iat):
    original = Claims(user=user, exp=exp, iat=iat, sid=sid, topics=topics, publish=False)
    assert decode_claims(encode_claims(original)) == original
