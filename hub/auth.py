"""JWT verification (pyjwt) and what the claims allow.

Exactly one algorithm is accepted, the configured one: `alg: none` and algorithm confusion
(an HS256 token signed with an RS256 public key as its secret) fail the algorithm check
before any signature is looked at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from hub.refusal import Refusal, RefusalKind

VERIFIED_CACHE_SIZE = 4096
MAX_SUB_LENGTH = 256
NOT_PUBLISHER = "token may not publish (it needs the claim publish: true)"

__all__ = [
    "PUBLISHER_MAY_NOT_SUBSCRIBE",
    "AuthError",
    "Claims",
    "Verifier",
    "token_messages",
]

# Every message a token is refused with: fixed texts of the hub's own (token_messages lists
# them), whatever pyjwt or the JSON decoder below it said.
MISSING = "missing token (Authorization: Bearer, ?token= or hub_token)"
EXPIRED = "token expired"
MALFORMED = "token invalid: not a JWT (three base64url segments: header.payload.signature)"
BAD_HEADER = "token invalid: its header is not a base64url-encoded JSON object"
BAD_PAYLOAD = "token invalid: its payload is not a base64url-encoded JSON object"
BAD_SIGNATURE = "token signature invalid"
UNSUPPORTED_HEADER = "token invalid: a header parameter the hub does not support (kid, crit, b64)"
NOT_YET_VALID = "token invalid: not valid yet (its iat or nbf is in the future)"
AUDIENCE = "token invalid: it names an audience (aud), and the hub accepts none"
LACKS_CLAIM = {claim: f'token lacks the required claim "{claim}"' for claim in ("exp", "sub")}
BAD_CLAIM = {
    "sub": f"token claim sub must be a non-empty string of at most {MAX_SUB_LENGTH} chars",
    "exp": "token claim exp must be a number (NumericDate)",
    "iat": "token claim iat must be a number (NumericDate)",
    "nbf": "token claim nbf must be a number (NumericDate)",
    "topics": "token claim topics must be a list of strings",
    "sid": "token claim sid must be a string",
    "jti": "token claim jti must be a string",
}
# pyjwt's DecodeError and InvalidTokenError say what failed only in their text: its start
# picks the message (pyjwt 2.x wording; anything else is MALFORMED).
_DECODE_ERRORS = (
    ("Invalid header", BAD_HEADER),  # "Invalid header padding", "Invalid header string: ..."
    ("Invalid payload", BAD_PAYLOAD),
    ("Invalid crypto padding", MALFORMED),
    ("Expiration Time claim", BAD_CLAIM["exp"]),
    ("Not Before claim", BAD_CLAIM["nbf"]),
    ("Key ID header", UNSUPPORTED_HEADER),
    ("Invalid 'crit'", UNSUPPORTED_HEADER),
    ("Unsupported critical", UNSUPPORTED_HEADER),
    ("Payload segment must be empty", UNSUPPORTED_HEADER),
)

# The roles (README, Tokens and roles): a token with publish: true is a service's credential
# to publish, and opens no stream nor buys a ticket.
PUBLISHER_MAY_NOT_SUBSCRIBE = (
    "a publisher token (publish: true) may not open streams or get tickets: "
    "subscribe with a subscriber token (one without publish: true)"
)


def wrong_algorithm(algorithm: str) -> str:
    return f"token algorithm not allowed (expected {algorithm})"


def token_messages(algorithm: str) -> frozenset[str]:
    """Every message a token may be refused with by a Verifier of `algorithm` (and its
    publisher check), for the tests that hold the hub to them."""
    return frozenset(
        {
            MISSING,
            EXPIRED,
            MALFORMED,
            BAD_HEADER,
            BAD_PAYLOAD,
            BAD_SIGNATURE,
            UNSUPPORTED_HEADER,
            NOT_YET_VALID,
            AUDIENCE,
            NOT_PUBLISHER,
            wrong_algorithm(algorithm),
            *LACKS_CLAIM.values(),
            *BAD_CLAIM.values(),
        }
    )


class AuthError(Exception):
    """A token refused: `refusal` says why (who are you?, or not allowed)."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.refusal = Refusal(kind, message)

    @property
    def message(self) -> str:
        return self.refusal.message


@dataclass(frozen=True, slots=True)
class Claims:
    user: str
    exp: float
    iat: float
    sid: str | None
    topics: frozenset[str]  # "*" = any topic
    publish: bool

    def may_subscribe(self, topic: str) -> bool:
        return "*" in self.topics or topic in self.topics


class Verifier:
    def __init__(self, algorithm: str, secret: str | None, public_key_path: str | None) -> None:
        self.algorithm = algorithm
        key: Any
        if public_key_path:
            key = Path(public_key_path).read_text()
        elif secret is not None:
            key = secret
        else:
            raise ValueError("a secret or a public key is needed")
        self._key = key
        # Verified tokens by their exact text: publishers send the same token with every
        # request and reconnecting clients resend theirs; a signature check is ~28 us.
        self._verified: dict[str, Claims] = {}

    def verify(self, token: str | None) -> Claims:
        if token:
            claims = self._verified.get(token)
            if claims is not None:
                if claims.exp > time.time():
                    return claims
                del self._verified[token]
        claims = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims  # type: ignore[index]
        return claims

    def _decode(self, token: str | None) -> Claims:
        if not token:
            raise AuthError(RefusalKind.TOKEN_MISSING, MISSING)
        if not token.isascii():
            # A JWT is base64url and dots; pyjwt would read the rest as UTF-8 (or fail to).
            raise AuthError(RefusalKind.TOKEN_INVALID, MALFORMED)
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(*self._refusal(exc)) from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            # Not pyjwt's own: a key or a library below it choking on a hostile token. A
            # token refused, never a 500, and never the exception's text (README, Tokens).
            raise AuthError(RefusalKind.TOKEN_INVALID, MALFORMED) from None
        sub = claims["sub"]
        if type(sub) is not str or not 0 < len(sub) <= MAX_SUB_LENGTH:
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["sub"])
        exp = claims["exp"]
        if type(exp) not in (int, float):
            # pyjwt takes a numeric string ("exp": "1795000000"); the RFC says NumericDate
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["exp"])
        topics = claims.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["topics"])
        sid = claims.get("sid")
        if sid is not None and not isinstance(sid, str):
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["sid"])
        iat = claims.get("iat", 0)
        if type(iat) not in (int, float):
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["iat"])
        return Claims(
            user=sub,
            exp=float(exp),
            iat=float(iat),
            sid=sid,
            topics=frozenset(topics),
            publish=claims.get("publish") is True,
        )

    def _refusal(self, exc: jwt.PyJWTError) -> tuple[RefusalKind, str]:
        """A pyjwt error as one of the fixed messages (token_messages): what the client is
        told never carries pyjwt's text, which quotes Python's own exceptions ("maximum
        recursion depth exceeded while decoding ...", a codec's complaint)."""
        if isinstance(exc, jwt.ExpiredSignatureError):
            return RefusalKind.TOKEN_EXPIRED, EXPIRED
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return RefusalKind.TOKEN_INVALID, wrong_algorithm(self.algorithm)
        if isinstance(exc, jwt.InvalidSignatureError):
            return RefusalKind.TOKEN_INVALID, BAD_SIGNATURE
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return RefusalKind.TOKEN_INVALID, LACKS_CLAIM.get(exc.claim, MALFORMED)
        if isinstance(exc, jwt.ImmatureSignatureError):
            return RefusalKind.TOKEN_INVALID, NOT_YET_VALID
        if isinstance(exc, jwt.InvalidIssuedAtError):
            return RefusalKind.TOKEN_INVALID, BAD_CLAIM["iat"]
        for name, claim in (("InvalidSubjectError", "sub"), ("InvalidJTIError", "jti")):
            # (pyjwt 2.10+: older ones check neither)
            if isinstance(exc, getattr(jwt.exceptions, name, ())):
                return RefusalKind.TOKEN_INVALID, BAD_CLAIM[claim]
        if isinstance(exc, jwt.InvalidAudienceError):
            return RefusalKind.TOKEN_INVALID, AUDIENCE
        text = str(exc)  # read to choose a message, never shown
        for prefix, message in _DECODE_ERRORS:
            if text.startswith(prefix):
                return RefusalKind.TOKEN_INVALID, message
        return RefusalKind.TOKEN_INVALID, MALFORMED

    def verify_publisher(self, token: str | None) -> Claims:
        claims = self.verify(token)
        if not claims.publish:
            raise AuthError(RefusalKind.NOT_PUBLISHER, NOT_PUBLISHER)
        return claims
