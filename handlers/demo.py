"""Demo mode only: tokens for the demo page, and (later) the hub's own logs as log events.

Never routed outside demo mode: these endpoints hand out tokens to anyone who asks.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

from handlers.base import HubHandler
from hub.core import Hub

__all__ = ["DemoTokenHandler", "start_demo"]

TOKEN_LIFETIME = 3600


class DemoTokenHandler(HubHandler):
    def get(self) -> None:
        config = self.hub.config
        secret = config.jwt_secret
        if secret is None:
            self.fail(501, "demo tokens need an HMAC secret (HUB_JWT_SECRET)")
            return
        now = int(time.time())
        role = self.get_query_argument("role", "subscriber")
        claims: dict[str, Any]
        if role == "publisher":
            claims = {
                "sub": "demo-publisher",
                "iat": now,
                "exp": now + TOKEN_LIFETIME,
                "publish": True,
            }
        elif role == "subscriber":
            user = self.get_query_argument("user", "demo")[:64] or "demo"
            raw_topics = self.get_query_argument("topics", "*")
            topics = [t.strip() for t in raw_topics.split(",") if t.strip()] or ["*"]
            claims = {
                "sub": user,
                "iat": now,
                "exp": now + TOKEN_LIFETIME,
                "topics": topics,
                "sid": secrets.token_hex(8),
            }
        else:
            self.fail(400, "role must be subscriber or publisher")
            return
        token = jwt.encode(claims, secret, algorithm=config.jwt_algorithm)
        self.answer(200, {**claims, "token": token, "user": claims["sub"]})


def start_demo(hub: Hub) -> None:
    """Start what demo mode runs beside the hub (the log producer)."""
