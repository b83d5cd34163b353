"""The verifier's short path for HMAC tokens (hub.auth, `_accepted_payload`) against pyjwt
(hypothesis): for any token, signed or forged, well-formed or not, the hub reaches the same
verdict with the short path as with pyjwt alone: the same claims, or the same refusal."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.auth import AuthError, Claims, Verifier

SECRET = "property-secret-".ljust(64, "x")  # HS512 wants 64 bytes
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = int(time.time())


def verdict(verifier: Verifier, token: str) -> Claims | str:
    try:
        return verifier.verify(token)
    except AuthError as exc:
        return f"{exc.refusal.kind.name}: {exc.message}"


def both(token: str, algorithm: str = "HS256") -> tuple[Claims | str, Claims | str, bool]:
    """(verdict with the short path, verdict by pyjwt alone, whether the short path took it)"""
    short = Verifier(algorithm, SECRET, None)
    assert short._hmac is not None
    taken = short._accepted_payload(token) is not None
    plain = Verifier(algorithm, SECRET, None)
    plain._hmac = None
    return verdict(short, token), verdict(plain, token), taken


def accepted_by_pyjwt(token: str) -> dict[str, Any] | None:
    try:
        payload: dict[str, Any] = jwt.decode(
            token, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
        return None
    return payload


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


times = st.one_of(
    st.integers(NOW - 10**6, NOW + 10**6),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([NOW - 1, NOW, NOW + 1, NOW + 0.5, NOW - 0.5, True, False, None, "1", [1]]),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400]),
)
values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.lists(st.text(max_size=4))
)
# A valid payload with up to three of its claims changed or added (a payload of random
# claims is almost never valid but for one: each rule must be met alone).
CLAIMS = ["sub", "exp", "iat", "nbf", "aud", "jti", "sid", "topics", "publish", "iss"]
changes = st.dictionaries(
    st.sampled_from(CLAIMS), times | values | st.text(min_size=1, max_size=300), max_size=3
)
payloads = changes.map(lambda changed: {"sub": "alice", "exp": NOW + 3600, **changed})
headers = st.one_of(
    st.just({"alg": "HS256", "typ": "JWT"}),
    st.just({"alg": "HS256"}),
    st.just({"typ": "JWT", "alg": "HS256"}),
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["HS256", "HS384", "none", "RS256", "hs256"])},
        optional={"typ": st.sampled_from(["JWT", "jwt", "JOSE"]), "kid": values, "crit": values},
    ),
)


def sign(header: dict[str, Any], payload: Any, secret: str = SECRET, compact: bool = True) -> str:
    separators = (",", ":") if compact else (", ", ": ")
    h = b64(json.dumps(header, separators=separators).encode())
    p = b64(json.dumps(payload, separators=separators).encode())
    signature = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).sign(
        f"{h}.{p}".encode(), secret.encode()
    )
    return f"{h}.{p}.{b64(signature)}"


@FAST
@given(headers, payloads, st.sets(st.sampled_from(["sub", "exp"])), st.booleans(), st.booleans())
def test_any_signed_token_gets_the_same_verdict_as_pyjwt_gives(
    header, payload, dropped, right, compact
):
    for claim in dropped:
        payload.pop(claim, None)
    token = sign(header, payload, SECRET if right else "another-secret-".ljust(64, "y"), compact)
    short, plain, taken = both(token)
    assert short == plain
    if taken:  # the short path takes only what pyjwt accepts, and reads it as pyjwt does
        assert accepted_by_pyjwt(token) == payload


@FAST
@given(payloads, st.integers(0, 400), st.text(alphabet="A-_=.!+/ a\u00e9", max_size=3))
def test_a_token_edited_anywhere_gets_the_same_verdict_as_pyjwt_gives(payload, at, text):
    token = sign({"alg": "HS256", "typ": "JWT"}, payload)
    at %= len(token) + 1
    edited = token[:at] + text + token[at + len(text) :]
    short, plain, _ = both(edited)
    assert short == plain


@FAST
@given(st.text(max_size=300))
def test_any_text_gets_the_same_verdict_as_pyjwt_gives(text):
    short, plain, taken = both(text)
    assert short == plain
    assert not taken or accepted_by_pyjwt(text) is not None


def test_a_signature_in_another_spelling_of_its_bytes_is_refused_as_pyjwt_refuses_it():
    """The last character of a base64url segment has bits that decode to nothing: a token
    whose signature differs only there is the same bytes, and pyjwt refuses it (not
    canonical); so must the short path."""
    token = sign({"alg": "HS256", "typ": "JWT"}, {"sub": "alice", "exp": NOW + 3600})
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spelt = [token[:-1] + c for c in alphabet if c != token[-1]]
    assert len(spelt) == 63
    for other in spelt:
        short, plain, taken = both(other)
        assert short == plain and not taken


def test_the_short_path_takes_the_common_token_and_refuses_nothing_itself():
    """What the property tests compare is the short path at work: it takes the tokens it
    was made for (else it would be dead code), and an expired one goes to pyjwt."""
    claims = {"sub": "alice", "exp": NOW + 3600, "iat": NOW}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    short, plain, taken = both(token)
    assert taken and short == plain and isinstance(short, Claims) and short.user == "alice"
    for algorithm in ("HS384", "HS512"):
        other = jwt.encode(claims, SECRET, algorithm=algorithm)
        assert both(other, algorithm)[2]
    expired = jwt.encode({**claims, "exp": NOW - 1}, SECRET, algorithm="HS256")
    short, plain, taken = both(expired)
    assert not taken and short == plain == "TOKEN_EXPIRED: token expired"


@pytest.mark.parametrize(
    "secret", ["-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----", "ssh-rsa AAAA x"]
)
def test_a_secret_pyjwt_refuses_as_a_key_has_no_short_path(secret):
    """pyjwt refuses every token of such a secret: the short path must not accept one."""
    verifier = Verifier("HS256", secret, None)
    assert verifier._hmac is None
    token = sign({"alg": "HS256", "typ": "JWT"}, {"sub": "a", "exp": NOW + 60}, secret)
    with pytest.raises(AuthError):
        verifier.verify(token)
