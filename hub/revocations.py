"""Logouts remembered: a logout refuses, for --revoke-ttl seconds, the tokens of its session
(or of all the user's sessions) issued before it.

The table is kept in the order the logouts came (a logout again moves to the end), so the cap
(--max-revocations) and expiry both drop from the front and never scan the rest.
"""

from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["EXPIRIES_PER_TICK", "Revocations"]

# Expired logouts forgotten per call of `expire`, at most: a wave of logouts an hour ago must
# not stall the loop when it expires; the next tick takes the rest.
EXPIRIES_PER_TICK = 10_000


class Revocations:
    """(user, sid) -> ms of the logout; sid None = every session of the user."""

    def __init__(self, ttl: float, cap: int) -> None:
        self.ttl = ttl  # seconds a logout is remembered (--revoke-ttl)
        self.cap = cap  # logouts remembered at most (--max-revocations)
        self.table: OrderedDict[tuple[str, str | None], float] = OrderedDict()
        self.dropped = 0  # logouts forgotten at the cap before their time

    def __len__(self) -> int:
        return len(self.table)

    def revoke(self, user: str, sid: str | None, at_ms: float) -> None:
        """Refuse the tokens of the session (every session: sid None) issued before `at_ms`,
        for `ttl` seconds from then. Past the cap, the oldest logout is forgotten (a token
        issued before it works again until its exp). A logout already older than `ttl` (a
        node loading old ones) is not kept: it must not push a live one out."""
        if at_ms < (time.time() - self.ttl) * 1000:
            return
        table = self.table
        key = (user, sid)
        table[key] = max(at_ms, table.pop(key, 0.0))  # popped: it moves to the end
        if len(table) > self.cap:
            table.popitem(last=False)
            self.dropped += 1

    def is_revoked(self, user: str, sid: str | None, iat: float) -> bool:
        """Whether a logout since the token was issued ended its session (or all sessions).

        A whole-second `iat` (most issuers) cannot say whether the token came before or after
        a logout in the same second: such a token counts as issued after it (a sign-in right
        after a logout must work; the cost is that a token issued in the same second just
        before the logout stays usable). A fractional `iat` is compared exactly."""
        whole = iat == int(iat)
        for key in ((user, None), (user, sid)) if sid is not None else ((user, None),):
            at = self.table.get(key)
            if at is None:
                continue
            if (iat < at // 1000) if whole else (iat * 1000 <= at):
                return True
        return False

    def expire(self, now: float) -> None:
        """Forget the logouts older than `ttl` at `now` (seconds) from the front of the
        table, at most EXPIRIES_PER_TICK of them: the rest go on the next calls (a logout
        behind a newer one, from another node's clock, waits for it)."""
        horizon = (now - self.ttl) * 1000
        table = self.table
        for _ in range(min(EXPIRIES_PER_TICK, len(table))):
            if table[next(iter(table))] >= horizon:
                break
            table.popitem(last=False)
