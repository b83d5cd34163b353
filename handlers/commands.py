"""`hub token` and `hub publish`: the commands a newcomer needs besides the server.

    HUB_JWT_SECRET=... hub token --sub alice --topics payments --ttl 3600
    HUB_JWT_SECRET=... hub token --sub billing --publish
    hub token --sub alice --private-key private.pem    # RS256 or ES256, from the key's kind
    hub publish --url http://127.0.0.1:8080 --token "$PUBLISHER_TOKEN" '{"type": "payment", ...}'
    producer | hub publish --url ... --token ...       # NDJSON on stdin, one event a line

Every failure is one line on stderr and a non-zero exit, never a traceback; an error names
what the user set (a flag, or a variable) and nothing they did not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub.client import HubError, Publisher
from hub.config import JWT_ALGORITHMS, MIN_SECRET_BYTES, ConfigError, OneLineParser
from hub.keys import KeyProblem, check_private, load_private
from hub.topics import GrantError, Grants

__all__ = ["outbox_main", "publish_main", "token_main"]


# Where `hub publish` sends events when neither --url nor HUB_URL says
DEFAULT_URL = "http://127.0.0.1:8080"


def _fail(command: str, message: str) -> SystemExit:
    print(f"hub {command}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _parse(command: str, parser: OneLineParser, argv: Sequence[str]) -> argparse.Namespace:
    """The command's arguments, or its one-line error (exit 2): never argparse's usage block."""
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.unexpected(argv, extra)
    except ConfigError as exc:
        raise _fail(command, str(exc)) from None
    return args


def mint(
    sub: str,
    *,
    secret: str | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    algorithm: str = "HS256",
    ttl: float = 3600,
    topics: Sequence[str] = (),
    sid: str | None = None,
    publish: bool = False,
    publish_topics: Sequence[str] = (),
) -> str:
    """A token the hub accepts: `sub`, `iat`, `exp`, and `topics`, `sid`, `publish`,
    `publish_topics` if asked."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if topics:
        claims["topics"] = list(topics)
    if sid:
        claims["sid"] = sid
    if publish:
        claims["publish"] = True
    if publish_topics:
        claims["publish_topics"] = list(publish_topics)
    return jwt.encode(claims, secret, algorithm=algorithm)


def token_main(argv: Sequence[str]) -> None:
    parser = OneLineParser(
        prog="hub token",
        description="Print a JWT the hub accepts, signed with HUB_JWT_SECRET (HS256/384/512) or "
        "with --private-key (RS256/ES256, the private half of the hub's --jwt-public-key). Demo "
        "mode makes up its secret: use /demo/token there.",
    )
    parser.add_argument("--sub", required=True, help="who the token is for (a user id)")
    parser.add_argument(
        "--topics", default="", help="comma-separated topics it may read (names, or prefix*)"
    )
    parser.add_argument("--sid", help="a session id (a logout can end one session)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds it lives (3600)")
    parser.add_argument("--publish", action="store_true", help="a publisher token")
    parser.add_argument(
        "--publish-topics",
        default="",
        help="with --publish: comma-separated topics (names, or prefix*) it is limited to",
    )
    parser.add_argument(
        "--jwt-algorithm",
        "--algorithm",
        dest="algorithm",
        choices=JWT_ALGORITHMS,
        metavar="ALGORITHM",
        help="the hub's --jwt-algorithm (default: $HUB_JWT_ALGORITHM; else RS256 or ES256 "
        "as the --private-key's kind says: RSA, or EC on P-256; else HS256)",
    )
    parser.add_argument(
        "--private-key", metavar="PEM", help="the private key file, for RS256/ES256"
    )
    args = _parse("token", parser, argv)
    if args.ttl <= 0:
        raise _fail("token", "--ttl must be positive")
    algorithm, named = _asked_algorithm(args.algorithm, argv)
    key: str | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if args.private_key:
        if algorithm is not None and algorithm.startswith("HS"):
            raise _fail(
                "token",
                f"--private-key signs RS256 or ES256, and {named} signs with HUB_JWT_SECRET: "
                "leave one of them out",
            )
        try:
            private = load_private(args.private_key)
            algorithm = check_private(private, algorithm, named)
        except KeyProblem as exc:
            raise _fail("token", f"--private-key {args.private_key}: {exc}") from None
        assert isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        key = private
    else:
        algorithm = algorithm or "HS256"
        if not algorithm.startswith("HS"):
            raise _fail(
                "token",
                f"{named} needs --private-key PEM (the private half of the hub's --jwt-public-key)",
            )
        secret = os.environ.get("HUB_JWT_SECRET", "")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise _fail(
                "token",
                f"set HUB_JWT_SECRET (the hub's secret, {MIN_SECRET_BYTES}+ bytes) to sign with, "
                "or give --private-key PEM for RS256/ES256",
            )
        key = secret
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    publish_topics = [t.strip() for t in args.publish_topics.split(",") if t.strip()]
    if publish_topics and not args.publish:
        raise _fail("token", "--publish-topics limits a publisher: give --publish too")
    for claim, items in (("--topics", topics), ("--publish-topics", publish_topics)):
        try:
            Grants.parse(items)
        except GrantError as exc:
            raise _fail("token", f"{claim}: {exc}") from None
    try:
        print(
            mint(
                args.sub,
                secret=key,
                algorithm=algorithm,
                ttl=args.ttl,
                topics=topics,
                sid=args.sid,
                publish=args.publish,
                publish_topics=publish_topics,
            )
        )
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise _fail("token", f"cannot sign: {exc}") from None


def _asked_algorithm(flag: str | None, argv: Sequence[str]) -> tuple[str | None, str]:
    """The algorithm asked for and how a message names it: the flag as typed (`--algorithm
    ES256`, `--jwt-algorithm ES256`), else HUB_JWT_ALGORITHM (the hub's own variable);
    None when neither says."""
    if flag is not None:
        typed = "--algorithm" if any(a.split("=")[0] == "--algorithm" for a in argv) else None
        return flag, f"{typed or '--jwt-algorithm'} {flag}"
    value = os.environ.get("HUB_JWT_ALGORITHM", "")
    if not value:
        return None, ""
    if value not in JWT_ALGORITHMS:
        raise _fail(
            "token",
            f"HUB_JWT_ALGORITHM must be one of {', '.join(JWT_ALGORITHMS)}, not {value[:32]!r}",
        )
    return value, f"HUB_JWT_ALGORITHM={value}"


def _events(values: Sequence[str], stdin: Any) -> list[Any]:
    texts = list(values) or [line for line in stdin if line.strip()]
    events = []
    for n, text in enumerate(texts, 1):
        try:
            event = json.loads(text)
        except ValueError as exc:
            raise _fail("publish", f"event {n} is not JSON: {exc}") from None
        events.extend(event if isinstance(event, list) else [event])
    if not events:
        raise _fail("publish", "no event: give events as JSON arguments or NDJSON on stdin")
    return events


def publish_main(argv: Sequence[str], stdin: Any = None) -> None:
    parser = OneLineParser(
        prog="hub publish",
        description="Publish events (JSON arguments, or NDJSON on stdin), print their ids. "
        "Retries a dropped connection or a 503 without publishing twice (Idempotency-Key).",
    )
    parser.add_argument("events", nargs="*", help='e.g. \'{"type": "broadcast", "data": 1}\'')
    parser.add_argument(
        "--url",
        default=os.environ.get("HUB_URL") or DEFAULT_URL,
        help=f"the hub's address (default: $HUB_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("HUB_TOKEN"),
        help="a publisher token ($HUB_TOKEN); without one, a 5-minute publisher token is "
        "signed with HUB_JWT_SECRET when it is set",
    )
    args = _parse("publish", parser, argv)
    token = args.token
    if not token:
        secret = os.environ.get("HUB_JWT_SECRET", "")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise _fail("publish", "give --token (or HUB_TOKEN), or set HUB_JWT_SECRET")
        token = mint("hub-cli", secret=secret, ttl=300, publish=True)
    events = _events(args.events, stdin if stdin is not None else sys.stdin)
    try:
        with Publisher(args.url, token) as publisher:
            ids = publisher.publish_many(events)
    except HubError as exc:
        raise _fail("publish", str(exc)) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise _fail("publish", f"{args.url}: {exc}") from None
    print("\n".join(ids))


def outbox_main(argv: Sequence[str]) -> None:
    """`hub outbox init URL`: create the outbox a postgres:// --source reads (its table, the
    dead letters, the trigger that wakes the relay); `--print` shows the SQL instead, for a
    migration tool to own."""
    parser = OneLineParser(
        prog="hub outbox",
        description="Create the PostgreSQL outbox that --source postgres://... reads "
        "(README, Event sources). Safe to run again.",
    )
    parser.add_argument("action", choices=["init"], help="init: create the tables and trigger")
    parser.add_argument(
        "url",
        nargs="?",
        default=os.environ.get("HUB_OUTBOX_URL"),
        help="the --source URL (postgres://user@host:5432/db?table=hub_outbox); "
        "default: $HUB_OUTBOX_URL",
    )
    parser.add_argument(
        "--print", action="store_true", help="print the SQL, run nothing (no connection)"
    )
    try:  # intermixed: `init --print URL` as well as `init URL --print`
        args, extra = parser.parse_known_intermixed_args(argv)
        if extra:
            parser.unexpected(argv, extra)
    except ConfigError as exc:
        raise _fail("outbox", str(exc)) from None
    if not args.url:
        raise _fail("outbox", "give the source URL (postgres://user@host:5432/db)")
    from hub.outbox import OutboxSettings, init_outbox, outbox_ddl
    from hub.sources import SourceError, shown_url

    try:
        settings = OutboxSettings.parse(args.url)
    except SourceError as exc:
        raise _fail("outbox", f"{shown_url(args.url)[:120]}: {exc}") from None
    if args.print:
        print(outbox_ddl(settings), end="")
        return
    import asyncio

    try:
        asyncio.run(init_outbox(args.url))
    except Exception as exc:  # the server's refusal or an unreachable one: one line
        raise _fail("outbox", f"{shown_url(args.url)[:120]}: {str(exc)[:300]}") from None
    print(f"outbox {settings.table} ready ({settings.table}_dead keeps what the hub refuses)")
