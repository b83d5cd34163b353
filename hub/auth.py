"""JWT verification (pyjwt) and what the claims allow.

Exactly one algorithm is accepted, the configured one: `alg: none` and algorithm confusion
(an HS256 token signed with an RS256 public key as its secret) fail the algorithm check
before any signature is looked at.

pyjwt decides every refusal. With an HMAC algorithm, the common token (a compact header of
the configured algorithm, canonical base64url, a valid signature, claims pyjwt certainly
accepts) is accepted by a shorter path of the hub's own (`_accepted_payload`): pyjwt spends
~30 us a token on checks that cannot fail for such a token (it re-reads the secret as a
possible PEM or JWK key for every token), which was a tenth of a stream's connect
(issue 18). Anything else, or any doubt, goes to pyjwt; `tests/test_properties_auth.py`
holds the two to the same verdict.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from hub.refusal import Refusal, RefusalKind
from hub.topics import (
    MAX_GRANTS,
    MAX_TOPIC_LENGTH,
    NO_GRANTS,
    TOPIC_ALPHABET,
    GrantError,
    Grants,
)

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
    **{
        claim: f"token claim {claim} must be a list of at most {MAX_GRANTS} topic names "
        f"({TOPIC_ALPHABET}; at most {MAX_TOPIC_LENGTH}) and patterns (a name's start, then *)"
        for claim in ("topics", "publish_topics")
    },
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


_HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact_headers(algorithm: str) -> frozenset[str]:
    """The header segments the short path takes: the configured algorithm alone or with
    typ JWT, in either order, compact JSON, as pyjwt and the common libraries write them."""
    alg, typ = f'"alg":"{algorithm}"', '"typ":"JWT"'
    return frozenset(
        _b64(text.encode()) for text in (f"{{{alg}}}", f"{{{alg},{typ}}}", f"{{{typ},{alg}}}")
    )


def _canonical_segment(segment: str) -> bytes | None:
    """A base64url segment's bytes, when it is unpadded and canonical (as pyjwt requires);
    None otherwise (pyjwt decides)."""
    if len(segment) % 4 == 1 or not _SEGMENT.fullmatch(segment):
        return None
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error):
        return None
    return data if _b64(data) == segment else None


def _whole(value: Any) -> int | None:
    """A NumericDate claim as pyjwt reads it (int()), where that cannot fail: a JSON number
    (not a bool, not a string, finite); None otherwise."""
    if type(value) is int:
        return value
    if type(value) is float and math.isfinite(value):
        return int(value)
    return None


def _seconds(value: Any, claim: str) -> float:
    """A NumericDate claim as seconds; AuthError unless it is a JSON number a float holds
    (an integer of 400 digits is one pyjwt takes, and float() would raise on)."""
    if type(value) in (int, float):
        try:
            seconds = float(value)
        except OverflowError:
            pass
        else:
            if math.isfinite(seconds):
                return seconds
    raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM[claim])


def _grants(claims: dict[str, Any], claim: str) -> Grants | None:
    """A claim of topic names and patterns (None where the token has none); AuthError, saying
    what is wrong with it, if it is not one."""
    value = claims.get(claim)
    if value is None:
        return None
    try:
        return Grants.parse(value)
    except GrantError:
        raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM[claim]) from None


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
    topics: Grants  # the topics its streams may read (hub.topics: names and name* patterns)
    publish: bool
    # A publisher's: the only topics it may reach (None: any topic, users and everyone).
    publish_topics: Grants | None = None

    def may_subscribe(self, topic: str) -> bool:
        return topic in self.topics


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
        # request and reconnecting clients resend theirs.
        self._verified: dict[str, Claims] = {}
        self._hmac: tuple[bytes, Any, frozenset[str]] | None = None
        digest = _HMAC_DIGESTS.get(algorithm)
        if digest is not None and not public_key_path:
            try:  # a secret pyjwt refuses as a key (a PEM key, say) refuses every token there
                jwt.algorithms.HMACAlgorithm(digest).prepare_key(key)
            except jwt.PyJWTError:
                pass
            else:
                self._hmac = (key.encode(), digest, _compact_headers(algorithm))

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
        claims = self._accepted_payload(token) if self._hmac is not None else None
        if claims is None:
            claims = self._decode_by_pyjwt(token)
        return self._claims(claims)

    def _accepted_payload(self, token: str) -> dict[str, Any] | None:
        """The payload of a token pyjwt certainly accepts (see the module's docstring), or
        None: let pyjwt decide."""
        assert self._hmac is not None
        key, digest, headers = self._hmac
        header, _, rest = token.partition(".")
        if header not in headers:
            return None
        payload_b64, _, signature_b64 = rest.partition(".")
        payload_bytes = _canonical_segment(payload_b64)
        signature = _canonical_segment(signature_b64)
        if payload_bytes is None or signature is None:
            return None
        signed = token[: len(header) + 1 + len(payload_b64)].encode()
        if not hmac.compare_digest(hmac.new(key, signed, digest).digest(), signature):
            return None
        try:
            payload = json.loads(payload_bytes)  # pyjwt's own parser: the same reading
        except ValueError:
            return None
        if type(payload) is not dict or "aud" in payload or payload.get("sub") is None:
            return None
        now = time.time()
        exp = _whole(payload.get("exp"))
        if exp is None or exp <= now:
            return None
        for claim in ("iat", "nbf"):
            if claim in payload:
                at = _whole(payload[claim])
                if at is None or at > now:
                    return None
        if type(payload.get("sub")) is not str:
            return None
        if "jti" in payload and type(payload["jti"]) is not str:
            return None
        return payload

    def _decode_by_pyjwt(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(
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

    @staticmethod
    def _claims(claims: dict[str, Any]) -> Claims:
        """The hub's checks on top of pyjwt's, and what it keeps of a token."""
        sub = claims["sub"]
        if type(sub) is not str or not 0 < len(sub) <= MAX_SUB_LENGTH:
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["sub"])
        # pyjwt takes a numeric string ("exp": "1795000000"); the RFC says NumericDate
        exp = _seconds(claims["exp"], "exp")
        topics = _grants(claims, "topics") or NO_GRANTS
        publish_topics = _grants(claims, "publish_topics")
        sid = claims.get("sid")
        if sid is not None and not isinstance(sid, str):
            raise AuthError(RefusalKind.TOKEN_INVALID, BAD_CLAIM["sid"])
        iat = _seconds(claims.get("iat", 0), "iat")
        return Claims(
            user=sub,
            exp=exp,
            iat=iat,
            sid=sid,
            topics=topics,
            publish=claims.get("publish") is True,
            publish_topics=publish_topics,
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
