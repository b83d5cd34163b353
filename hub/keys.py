"""PEM keys for RS256 and ES256: what a key file holds, and one line saying so when it is not
the key that is needed.

The hub verifies tokens with a public key (`--jwt-public-key`); `hub token` signs them with
the private half (`--private-key`). Each refuses the other half, and a key of the wrong kind
for the algorithm, naming both: PyJWT's own errors for these (a traceback, or
"<generator object ...>") never reach the operator. A private key is refused on the hub, not
used for its public half: the process that faces subscribers has no use for the key that
mints tokens, and should not hold it.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

__all__ = [
    "KEY_ALGORITHMS",
    "KeyProblem",
    "algorithm_of",
    "check_private",
    "kind",
    "load_private",
    "load_public",
]

# The asymmetric algorithms the hub takes, and the key each needs.
KEY_ALGORITHMS = {"RS256": "an RSA key", "ES256": "an EC key on P-256"}
_PRIVATE = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_PUBLIC = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PUBLIC KEY-----")


class KeyProblem(ValueError):
    """A key file that cannot serve: the message says why, in one line, to follow
    "--flag path: "."""


def kind(key: PrivateKeyTypes | PublicKeyTypes) -> str:
    """What a key is, as a message says it: "an RSA key", "an EC key on secp384r1"."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "an EC key on P-256"
        return f"an EC key on {key.curve.name}"
    name = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
    return f"an {name} key" if name[:1] in "AEIOU" else f"a {name} key"


def algorithm_of(key: PrivateKeyTypes | PublicKeyTypes) -> str | None:
    """The algorithm of the hub's that takes this key (RS256, ES256), or None."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return "ES256"
    return None


def _read(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read it ({exc.strerror or exc})") from None
    try:
        data.decode()
    except UnicodeDecodeError:
        raise KeyProblem("not a PEM file (binary)") from None
    if b"\0" in data:
        raise KeyProblem("not a PEM file (binary)")
    return data


def _fits(key: PrivateKeyTypes | PublicKeyTypes, algorithm: str, algorithm_named: str) -> None:
    fits = algorithm_of(key)
    if fits != algorithm:
        instead = f"; {kind(key)} is for {fits}" if fits else ""
        raise KeyProblem(
            f"{kind(key)}, and {algorithm_named} needs {KEY_ALGORITHMS[algorithm]}{instead}"
        )


def load_public(path: str, algorithm: str, algorithm_named: str) -> PublicKeyTypes:
    """The public key in `path`, for `algorithm` (named in messages as `algorithm_named`,
    e.g. "--jwt-algorithm ES256"). Raises KeyProblem."""
    data = _read(path)
    if _PRIVATE.search(data):
        raise KeyProblem(
            "a PRIVATE key: give the hub only the public half (openssl pkey -in "
            f"{path} -pubout -out public.pem); the private key signs tokens and stays with "
            "whoever mints them"
        )
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyProblem(f"not a PEM public key for {algorithm}") from None
    _fits(key, algorithm, algorithm_named)
    return key


def load_private(path: str) -> PrivateKeyTypes:
    """The private key in `path`, unencrypted PEM. Raises KeyProblem."""
    data = _read(path)
    if not _PRIVATE.search(data) and _PUBLIC.search(data):
        raise KeyProblem(
            "a public key: tokens are signed with the private half (the hub verifies "
            "them with the public one, --jwt-public-key)"
        )
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:  # encrypted
        raise KeyProblem(
            f"encrypted: give an unencrypted PEM (openssl pkey -in {path} -out plain.pem)"
        ) from None
    except ValueError:
        raise KeyProblem("not a PEM private key (RSA, or EC on P-256)") from None


def check_private(key: PrivateKeyTypes, algorithm: str | None, algorithm_named: str) -> str:
    """The algorithm to sign with: `algorithm` if the key fits it, or, when None, the one
    the key's kind implies. Raises KeyProblem."""
    if algorithm is None:
        implied = algorithm_of(key)
        if implied is None:
            raise KeyProblem(
                f"{kind(key)}: the hub verifies RS256 ({KEY_ALGORITHMS['RS256']}) or ES256 "
                f"({KEY_ALGORITHMS['ES256']}, openssl's prime256v1)"
            )
        return implied
    _fits(key, algorithm, algorithm_named)
    return algorithm
