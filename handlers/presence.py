"""GET /presence: who is online (hub.presence; README, Presence). Parse, authorize, ask the
hub, answer.

On the public port a publisher token is needed (a subscriber's is 403: it would learn who else
is online), and one limited by `publish_topics` asks only about the topics it grants; the
internal listener (--internal-port) answers without a token."""

from __future__ import annotations

from typing import Any

from handlers.base import HubHandler
from hub.auth import AuthError, Verifier
from hub.core import Hub
from hub.presence import (
    NOT_FOR_SUBSCRIBERS,
    PresenceUnavailable,
    UsersQuery,
    parse_query,
    refusal,
)
from hub.query import QueryError
from hub.topics import Grants

__all__ = ["PresenceHandler"]


class PresenceHandler(HubHandler):
    def initialize(self, hub: Hub, verifier: Verifier, authenticated: bool = True) -> None:
        super().initialize(hub, verifier)
        self.authenticated = authenticated

    async def get(self) -> None:
        limited: Grants | None = None  # the token's publish_topics, if it has the claim
        if self.authenticated:
            try:
                claims = self.verifier.verify(self.token())
            except AuthError as exc:
                self.answer_refusal(exc.refusal)
                return
            if not claims.publish:
                self.fail(403, NOT_FOR_SUBSCRIBERS)
                return
            limited = claims.publish_topics
        try:
            query = parse_query(
                {
                    name: self.get_query_arguments(name, strip=False)
                    for name in self.request.query_arguments
                }
            )
        except QueryError as exc:
            self.fail(400, exc.message, **exc.extra)
            return
        refused = refusal(query, limited)
        if refused is not None:
            self.fail(403, refused)
            return
        if self.hub.stopping:
            self.fail_retry(503, "the hub is shutting down: ask another instance", 1.0)
            return
        answer: dict[str, Any]
        try:
            if isinstance(query, UsersQuery):
                found = await self.hub.presence_of_users(query.users)
                answer = {"users": {user: p.as_json() for user, p in found.items()}}
            else:
                topic = await self.hub.presence_of_topic(query.topic, query.limit, query.after)
                answer = topic.as_json()
        except PresenceUnavailable as exc:
            self.fail_retry(503, str(exc), self.hub.config.retry)
            return
        self.answer(200, answer)
