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

__all__ = ["AuthError", "Claims", "Verifier"]


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
            raise AuthError(
                RefusalKind.TOKEN_MISSING,
                "missing token (Authorization: Bearer, ?token= or hub_token)",
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(RefusalKind.TOKEN_EXPIRED, "token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(
                RefusalKind.TOKEN_INVALID, f'token lacks the required claim "{exc.claim}"'
            ) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(
                RefusalKind.TOKEN_INVALID,
                f"token algorithm not allowed (expected {self.algorithm})",
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError(RefusalKind.TOKEN_INVALID, "token signature invalid") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(RefusalKind.TOKEN_INVALID, f"token invalid: {exc}") from None
        sub = claims["sub"]
        if type(sub) is not str or not 0 < len(sub) <= MAX_SUB_LENGTH:
            raise AuthError(
                RefusalKind.TOKEN_INVALID,
                f"token claim sub must be a non-empty string of at most {MAX_SUB_LENGTH} chars",
            )
        exp = claims["exp"]
        if type(exp) not in (int, float):
            # pyjwt takes a numeric string ("exp": "1795000000"); the RFC says NumericDate
            raise AuthError(
                RefusalKind.TOKEN_INVALID, "token claim exp must be a number (NumericDate)"
            )
        topics = claims.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise AuthError(
                RefusalKind.TOKEN_INVALID, "token claim topics must be a list of strings"
            )
        sid = claims.get("sid")
        if sid is not None and not isinstance(sid, str):
            raise AuthError(RefusalKind.TOKEN_INVALID, "token claim sid must be a string")
        iat = claims.get("iat", 0)
        if type(iat) not in (int, float):
            raise AuthError(
                RefusalKind.TOKEN_INVALID, "token claim iat must be a number (NumericDate)"
            )
        return Claims(
            user=sub,
            exp=float(exp),
            iat=float(iat),
            sid=sid,
            topics=frozenset(topics),
            publish=claims.get("publish") is True,
        )

    def verify_publisher(self, token: str | None) -> Claims:
        claims = self.verify(token)
        if not claims.publish:
            raise AuthError(
                RefusalKind.NOT_PUBLISHER,
                "token may not publish (it needs the claim publish: true)",
            )
        return claims
