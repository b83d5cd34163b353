"""POST /tickets: a subscriber token in (Authorization: Bearer), a one-time stream ticket out.

`GET /events?ticket=...` then opens the stream with the ticket instead of the token, so the
long-lived JWT never sits in a URL (hub.tickets says what a ticket is bound to).

A publisher's token gets no ticket (403: it opens no stream), and the hub_token cookie alone
buys one only from a page of the hub's own origin or of --cors-origins (HubHandler.authenticate):
a browser sends the cookie with a POST any site makes.
"""

from __future__ import annotations

from handlers.base import HubHandler
from hub.auth import AuthError
from hub.broker import BrokerUnavailable

__all__ = ["TicketsHandler"]

PREFLIGHT_MAX_AGE = 600  # seconds a browser may keep the preflight's answer


class TicketsHandler(HubHandler):
    route = "ticket"

    def options(self) -> None:
        """CORS preflight: a page on a listed origin posts with an Authorization header,
        which a browser sends cross-origin only after the hub has agreed to it here."""
        cors = self.cors_headers()
        for name, value in cors:
            self.set_header(name, value)
        if cors:
            self.set_header("Access-Control-Allow-Methods", "POST")
            self.set_header("Access-Control-Allow-Headers", "Authorization")
            self.set_header("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))
        self.set_status(204)
        self.finish()

    async def post(self) -> None:
        if self.hub.stopping:
            self.fail_retry(503, "the hub is shutting down", self.hub.config.retry)
            return
        claims = self.authenticate()
        if claims is None:
            return
        refused = self.hub.session_refusal(claims)
        if refused is not None:
            self.answer_refusal(refused)
            return
        try:
            ticket, life = await self.hub.tickets.issue(claims)
        except AuthError as exc:  # the token expired meanwhile
            self.answer_refusal(exc.refusal)
            return
        except BrokerUnavailable:
            self.fail_retry(503, "the broker cannot keep tickets now: retry", self.hub.config.retry)
            return
        for name, value in self.cors_headers():
            self.set_header(name, value)
        self.answer(201, {"ticket": ticket, "expires_in": round(life, 3)})
