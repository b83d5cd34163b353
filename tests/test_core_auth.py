"""Token verification with pyjwt, for each supported key kind, and the attacks on it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path

import jwt
import pytest
from browser_support import wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub.auth import AuthError, Verifier
from hub.config import Config, ConfigError, parse_config
from hub.refusal import RefusalKind

SECRET = "auth-tests-secret-0123456789-abcdefghijklmn"


def claims(**extra: object) -> dict[str, object]:
    return {"sub": "u1", "exp": int(time.time()) + 60, "topics": ["a"], **extra}


def public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_public_key_algorithms_verify_and_refuse_hmac_confusion(
    tmp_path: Path, algorithm, make_key
):
    private = make_key()
    pem = public_pem(private)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    verifier = Verifier(algorithm, None, str(key_file))
    token = jwt.encode(claims(sid="s9"), private, algorithm=algorithm)
    got = verifier.verify(token)
    assert (got.user, got.sid, got.topics.source) == ("u1", "s9", ("a",))
    # Algorithm confusion: an HS256 token whose "secret" is the public key everyone has.
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = base64.urlsafe_b64encode(json.dumps(claims()).encode())
    signing_input = header.rstrip(b"=") + b"." + payload.rstrip(b"=")
    sig = base64.urlsafe_b64encode(hmac.new(pem, signing_input, hashlib.sha256).digest())
    forged = (signing_input + b"." + sig.rstrip(b"=")).decode()
    with pytest.raises(AuthError) as err:
        verifier.verify(forged)
    assert err.value.refusal.kind is RefusalKind.TOKEN_INVALID
    assert "algorithm not allowed" in err.value.message


def test_unsigned_token_is_refused():
    verifier = Verifier("HS256", SECRET, None)
    unsigned = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(AuthError, match="algorithm not allowed"):
        verifier.verify(unsigned)


@pytest.mark.parametrize(
    ("token_claims", "message"),
    [
        ({"sub": "u1", "exp": int(time.time()) - 5}, "token expired"),
        ({"exp": 4102444800}, 'required claim "sub"'),
        ({"sub": "u1"}, 'required claim "exp"'),
        ({"sub": "u1", "exp": 4102444800, "topics": "a"}, "topics must be a list"),
    ],
)
def test_claims_that_are_missing_or_wrong_are_refused(token_claims, message):
    verifier = Verifier("HS256", SECRET, None)
    with pytest.raises(AuthError) as err:
        verifier.verify(jwt.encode(token_claims, SECRET, algorithm="HS256"))
    expired = message == "token expired"
    kind = RefusalKind.TOKEN_EXPIRED if expired else RefusalKind.TOKEN_INVALID
    assert err.value.refusal.kind is kind
    assert re.search(message, err.value.message), err.value.message


def test_publishing_needs_the_publish_claim():
    verifier = Verifier("HS256", SECRET, None)
    with pytest.raises(AuthError) as err:
        verifier.verify_publisher(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert err.value.refusal.kind is RefusalKind.NOT_PUBLISHER
    ok = verifier.verify_publisher(jwt.encode(claims(publish=True), SECRET, algorithm="HS256"))
    assert ok.publish


def test_short_secrets_and_missing_keys_stop_the_hub_with_a_clear_message():
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Config(jwt_secret="short")
    with pytest.raises(ConfigError, match="no JWT key"):
        parse_config([], {}).require_key()
    demo = parse_config(["--demo"], {})
    demo.require_key()
    assert demo.jwt_secret and len(demo.jwt_secret) >= 32


def test_flags_win_over_environment_variables():
    config = parse_config(
        ["--port", "9001"], {"HUB_PORT": "9000", "HUB_HEARTBEAT": "2.5", "HUB_DEMO": "1"}
    )
    assert (config.port, config.heartbeat, config.demo) == (9001, 2.5, True)
    with pytest.raises(ConfigError, match="HUB_HISTORY"):
        parse_config([], {"HUB_HISTORY": "lots"})


def test_a_verified_token_is_refused_once_it_expires_even_when_remembered():
    verifier = Verifier("HS256", SECRET, None)
    exp = int(time.time()) + 1
    token = jwt.encode({"sub": "u1", "exp": exp}, SECRET, algorithm="HS256")
    assert verifier.verify(token).user == "u1"
    assert verifier.verify(token).user == "u1"  # remembered
    wait_until(lambda: time.time() > exp + 0.01, timeout=5, what="the token's exp passes")
    with pytest.raises(AuthError, match="token expired"):
        verifier.verify(token)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # far in the future: the parameters are made when the suite is collected, minutes
        # before this runs (a string "now + 60" had expired by then, and pyjwt said so first)
        ({"exp": "4102444800"}, "exp must be a number"),
        ({"sub": ""}, "sub must be a non-empty string"),
        ({"sub": 42}, "sub must be a non-empty string"),  # pyjwt's own check, the hub's words
        ({"sub": "x" * 257}, "sub must be a non-empty string"),
        ({"iat": "yesterday"}, "iat must be a number"),  # pyjwt's own check, the hub's words
        ({"iat": True}, "iat must be a number"),
    ],
    ids=["string-exp", "empty-sub", "number-sub", "long-sub", "string-iat", "bool-iat"],
)
def test_claims_of_the_wrong_kind_are_refused_as_invalid(bad, message):
    verifier = Verifier("HS256", SECRET, None)
    with pytest.raises(AuthError) as err:
        verifier.verify(jwt.encode(claims(**bad), SECRET, algorithm="HS256"))
    assert err.value.refusal.kind is RefusalKind.TOKEN_INVALID
    assert re.search(message, err.value.message), err.value.message


@pytest.mark.parametrize(
    "environ",
    [{"HUB_JWT_SECRET": SECRET}, {"HUB_JWT_ALGORITHM": "RS256", "HUB_JWT_PUBLIC_KEY": "k.pem"}],
    ids=["secret", "public-key"],
)
def test_demo_mode_refuses_to_run_with_a_configured_key(tmp_path: Path, environ):
    """/demo/token signs tokens for anyone: with the real key it would hand out real ones."""
    if "HUB_JWT_PUBLIC_KEY" in environ:  # the key file is read at start: a real one
        key_file = tmp_path / "k.pem"
        key_file.write_bytes(public_pem(rsa.generate_private_key(65537, 2048)))
        environ = {**environ, "HUB_JWT_PUBLIC_KEY": str(key_file)}
    with pytest.raises(ConfigError, match="never signs with a configured key"):
        parse_config(["--demo"], environ).require_key()


def test_a_signed_exp_no_float_holds_is_refused_not_raised():
    """pyjwt takes an integer of 400 digits as exp; turning it into seconds raised
    OverflowError out of the verifier (a 500), with and without the short path."""
    token = jwt.encode(claims(exp=10**400), SECRET, algorithm="HS256")
    for short in (True, False):
        verifier = Verifier("HS256", SECRET, None)
        if not short:
            verifier._hmac = None
        with pytest.raises(AuthError) as refused:
            verifier.verify(token)
        assert refused.value.message == "token claim exp must be a number (NumericDate)"
