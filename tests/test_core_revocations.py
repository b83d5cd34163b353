"""The logouts remembered (hub.revocations): bounded by count (--max-revocations, the oldest
forgotten first) and by age (--revoke-ttl, a bounded share a tick); the whole-second `iat`
rule; the hub's tick expiring them and its metrics exporting them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from core_support import Peer, config
from prometheus_client.parser import text_string_to_metric_families
from sse import wait_for

from hub.auth import Claims
from hub.core import Hub
from hub.refusal import RefusalKind
from hub.revocations import EXPIRIES_PER_TICK, Revocations
from hub.topics import Grants


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


def test_logouts_past_the_cap_forget_the_oldest_first():
    revocations = Revocations(ttl=3600, cap=3)
    now = time.time() * 1000
    issued = time.time() - 10
    for n in range(4):
        revocations.revoke(f"u{n}", None, now)
    assert list(revocations.table) == [("u1", None), ("u2", None), ("u3", None)]
    assert not revocations.is_revoked("u0", None, issued)  # forgotten: its old tokens work again
    assert revocations.is_revoked("u3", None, issued)
    revocations.revoke("u1", None, now + 1)  # a logout again: now the newest
    revocations.revoke("u4", "s1", now + 2)
    assert list(revocations.table) == [("u3", None), ("u1", None), ("u4", "s1")]
    assert revocations.dropped == 2
    assert len(revocations) == 3


def test_a_logout_older_than_the_ttl_is_not_kept_and_pushes_none_out():
    """A node that loads old logouts (from the history or Redis) must not forget live ones for
    them at the cap."""
    revocations = Revocations(ttl=60, cap=1)
    revocations.revoke("live", None, time.time() * 1000)
    revocations.revoke("old", None, (time.time() - 61) * 1000)
    assert list(revocations.table) == [("live", None)]
    assert revocations.dropped == 0


def test_expired_logouts_are_forgotten_from_the_front_a_bounded_number_per_call():
    """The tick scanned the whole table every second: 600,000 logouts stalled the loop."""
    revocations = Revocations(ttl=60, cap=1_000_000)
    old = (time.time() - 61) * 1000
    for n in range(EXPIRIES_PER_TICK + 500):
        revocations.table[(f"u{n}", None)] = old  # as if logged out 61 s ago
    revocations.revoke("live", None, time.time() * 1000)
    revocations.expire(time.time())
    assert len(revocations) == 501  # one call's share only: the rest on the next
    revocations.expire(time.time())
    assert list(revocations.table) == [("live", None)]


def test_a_whole_second_iat_in_the_logouts_second_is_not_revoked_an_earlier_one_is():
    """Most issuers write iat in whole seconds: a sign-in in the same second as a logout was
    refused for an hour. Now such a token counts as issued after the logout."""
    revocations = Revocations(ttl=3600, cap=10)
    revocations.table[("u1", None)] = 1_000_000_400.0  # a logout at 1,000,000.4 s
    assert not revocations.is_revoked("u1", "s1", 1_000_000)  # same second, whole: after it
    assert revocations.is_revoked("u1", "s1", 999_999)  # an earlier second: before it
    assert revocations.is_revoked("u1", None, 1_000_000.3)  # fractional: exact
    assert not revocations.is_revoked("u1", None, 1_000_000.5)


def test_a_session_logout_spares_the_users_other_sessions_an_all_sessions_one_does_not():
    revocations = Revocations(ttl=3600, cap=10)
    issued = time.time() - 10
    revocations.revoke("u1", "s1", time.time() * 1000)
    assert revocations.is_revoked("u1", "s1", issued)
    assert not revocations.is_revoked("u1", "s2", issued)
    revocations.revoke("u1", None, time.time() * 1000)
    assert revocations.is_revoked("u1", "s2", issued)


def test_the_hub_refuses_a_revoked_session_as_revoked_before_any_cap():
    async def scenario() -> None:
        hub = Hub(config(max_streams_per_user=1))
        claims = Claims("u1", time.time() + 60, time.time() - 10, "s1", Grants.of([]), False)
        assert hub.admit(claims) is None
        hub.revoke("u1", "s1", time.time() * 1000)
        refused = hub.admit(claims)
        assert refused is not None and refused.kind is RefusalKind.REVOKED
        assert hub.session_refusal(claims) == refused
        await hub.stop()

    run(scenario)


def test_a_logout_expires_after_revoke_ttl_on_the_running_tick():
    async def scenario() -> None:
        hub = Hub(config(revoke_ttl=0.2, heartbeat=0.05))
        peer = Peer()
        hub.subscribe(peer.transport, "u9")  # the tick runs while streams are open
        hub.revoke("u1", None, time.time() * 1000)
        assert hub.revocations.is_revoked("u1", None, time.time() - 5)
        assert await wait_for(lambda: not hub.revocations, 5.0)
        assert not hub.revocations.is_revoked("u1", None, time.time() - 5)
        peer.shutdown()
        await hub.stop()

    run(scenario)


def test_revocations_are_exported_as_a_gauge_and_a_counter_of_those_dropped():
    async def scenario() -> None:
        hub = Hub(config(max_revocations=2))
        for n in range(5):
            hub.revoke(f"u{n}", None, time.time() * 1000)
        families = text_string_to_metric_families(hub.metrics.exposition().decode())
        samples = {s.name: s.value for f in families for s in f.samples}
        assert samples["hub_revocations"] == 2
        assert samples["hub_revocations_dropped_total"] == 3
        await hub.stop()

    run(scenario)
