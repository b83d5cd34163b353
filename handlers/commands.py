"""`hub token` and `hub publish`: the commands a newcomer needs besides the server.

    HUB_JWT_SECRET=... hub token --sub alice --topics payments --ttl 3600
    HUB_JWT_SECRET=... hub token --sub billing --publish
    hub publish --url http://127.0.0.1:8080 --token "$PUBLISHER_TOKEN" '{"type": "payment", ...}'
    producer | hub publish --url ... --token ...       # NDJSON on stdin, one event a line

Every failure is one line on stderr and a non-zero exit, never a traceback.
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

from hub.client import HubError, Publisher
from hub.config import MIN_SECRET_BYTES

__all__ = ["publish_main", "token_main"]


def _fail(command: str, message: str) -> SystemExit:
    print(f"hub {command}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def mint(
    sub: str,
    *,
    secret: str,
    algorithm: str = "HS256",
    ttl: float = 3600,
    topics: Sequence[str] = (),
    sid: str | None = None,
    publish: bool = False,
) -> str:
    """A token the hub accepts: `sub`, `iat`, `exp`, and `topics`, `sid`, `publish` if asked."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if topics:
        claims["topics"] = list(topics)
    if sid:
        claims["sid"] = sid
    if publish:
        claims["publish"] = True
    return jwt.encode(claims, secret, algorithm=algorithm)


def token_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hub token",
        description="Print a JWT the hub accepts, signed with HUB_JWT_SECRET (HS256/384/512) or "
        "with --private-key (RS256/ES256). Demo mode makes up its secret: use /demo/token there.",
    )
    parser.add_argument("--sub", required=True, help="who the token is for (a user id)")
    parser.add_argument("--topics", default="", help="comma-separated topics it may read")
    parser.add_argument("--sid", help="a session id (a logout can end one session)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds it lives (3600)")
    parser.add_argument("--publish", action="store_true", help="a publisher token")
    parser.add_argument(
        "--algorithm", default=os.environ.get("HUB_JWT_ALGORITHM", "HS256"), help="(HS256)"
    )
    parser.add_argument("--private-key", help="PEM file, for RS256/ES256")
    args = parser.parse_args(argv)
    if args.ttl <= 0:
        raise _fail("token", "--ttl must be positive")
    if args.algorithm.startswith("HS"):
        secret = os.environ.get("HUB_JWT_SECRET", "")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise _fail(
                "token",
                f"set HUB_JWT_SECRET (the hub's secret, {MIN_SECRET_BYTES}+ bytes) to sign with",
            )
        key = secret
    else:
        if not args.private_key:
            raise _fail("token", f"--algorithm {args.algorithm} needs --private-key PEM")
        try:
            with open(args.private_key) as f:
                key = f.read()
        except OSError as exc:
            raise _fail("token", f"cannot read {args.private_key}: {exc.strerror}") from None
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    try:
        print(
            mint(
                args.sub,
                secret=key,
                algorithm=args.algorithm,
                ttl=args.ttl,
                topics=topics,
                sid=args.sid,
                publish=args.publish,
            )
        )
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise _fail("token", f"cannot sign: {exc}") from None


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
    parser = argparse.ArgumentParser(
        prog="hub publish",
        description="Publish events (JSON arguments, or NDJSON on stdin), print their ids. "
        "Retries a dropped connection or a 503 without publishing twice (Idempotency-Key).",
    )
    parser.add_argument("events", nargs="*", help='e.g. \'{"type": "broadcast", "data": 1}\'')
    parser.add_argument("--url", default=os.environ.get("HUB_URL", "http://127.0.0.1:8080"))
    parser.add_argument(
        "--token",
        default=os.environ.get("HUB_TOKEN"),
        help="a publisher token ($HUB_TOKEN); without one, a 5-minute publisher token is "
        "signed with HUB_JWT_SECRET when it is set",
    )
    args = parser.parse_args(argv)
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
