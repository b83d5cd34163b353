"""Why the core refuses a request, in the core's words: a kind and a message.

The handlers turn a kind into an HTTP answer (handlers.base.ANSWERS, the one table); nothing
in hub/ says how a refusal goes on the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Refusal", "RefusalKind"]


class RefusalKind(enum.Enum):
    UNREADY = "unready"  # the node's feed is not live: history not loaded, broker silent, stopped
    CAPACITY = "capacity"  # the hub holds its most streams (--max-streams)
    PER_USER = "per_user"  # the user holds its most streams (--max-streams-per-user)
    TOKEN_MISSING = "token_missing"  # no token was presented
    TOKEN_INVALID = "token_invalid"  # not a token the hub accepts: signature, algorithm, claims
    TOKEN_EXPIRED = "token_expired"  # its exp has passed
    NOT_PUBLISHER = "not_publisher"  # a valid token, without the claim publish: true
    REVOKED = "revoked"  # its session logged out since the token was issued
    TICKET_MALFORMED = "ticket_malformed"  # not the shape of a ticket the hub issues
    TICKET_UNKNOWN = "ticket_unknown"  # never issued, already used, or expired
    BEHIND = "behind"  # Last-Event-ID is past what this node has read (another node served it)


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: RefusalKind
    message: str  # for the client: what to do about it
    retry_after: float | None = None  # seconds to come back after, where the kind says when
