"""What every handler shares: JSON errors, and logs that never carry a token."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from http.client import responses
from typing import Any

import ujson
from tornado.web import HTTPError, RequestHandler

from hub.auth import AuthError, Claims, Verifier
from hub.core import Hub
from hub.logs import redact
from hub.metrics import Metrics
from hub.refusal import Refusal, RefusalKind

__all__ = [
    "ANSWERS",
    "PUBLISH_REFUSALS",
    "STREAM_REFUSALS",
    "TICKET_REFUSALS",
    "HubHandler",
    "access_logger",
    "redact",
]

access_log = logging.getLogger("tornado.access")

# An error message may quote what the client sent (a path, a field name, a topic); the quote
# is cut where it is made, and every message again here, so no answer grows with the request.
MAX_ERROR_LENGTH = 512

# The one place where the core's refusals become HTTP: each kind's status, and whether the
# answer says when to come back (Retry-After: --retry).
ANSWERS: dict[RefusalKind, tuple[int, bool]] = {
    RefusalKind.NOT_SYNCED: (503, True),
    RefusalKind.CAPACITY: (503, True),
    RefusalKind.PER_USER: (429, True),
    RefusalKind.TOKEN_MISSING: (401, False),
    RefusalKind.TOKEN_INVALID: (401, False),
    RefusalKind.TOKEN_EXPIRED: (401, False),
    RefusalKind.NOT_PUBLISHER: (403, False),
    RefusalKind.REVOKED: (401, False),
    RefusalKind.TICKET_MALFORMED: (401, False),
    RefusalKind.TICKET_UNKNOWN: (401, False),
}

_TOKEN = (RefusalKind.TOKEN_MISSING, RefusalKind.TOKEN_INVALID, RefusalKind.TOKEN_EXPIRED)


def _labels(kinds: Iterable[RefusalKind], own: Iterable[int]) -> tuple[str, ...]:
    """The statuses a route may refuse with, as metric label values: those the table gives
    the core's refusals it meets, and the handler's own."""
    return tuple(sorted({str(ANSWERS[kind][0]) for kind in kinds} | {str(s) for s in own}))


# The label values of the refusals counted by status, each exported at 0 from the start. The
# handlers' own: 400 a malformed request, 403 a topic the token does not allow, 413/415/422 a
# publish body, 429 the publish rate, 503 shutting down or the broker unavailable.
PUBLISH_REFUSALS = _labels((*_TOKEN, RefusalKind.NOT_PUBLISHER), (400, 413, 415, 422, 429, 503))
STREAM_REFUSALS = _labels(
    (k for k in RefusalKind if k is not RefusalKind.NOT_PUBLISHER), (400, 403, 503)
)
TICKET_REFUSALS = _labels((*_TOKEN, RefusalKind.REVOKED), (503,))  # of POST /tickets

_labelled: weakref.WeakSet[Metrics] = weakref.WeakSet()


def label_refusals(metrics: Metrics) -> None:
    """Export every refusal's label value at 0, once per hub (before its first answer: a
    scrape is a request too)."""
    if metrics in _labelled:
        return
    _labelled.add(metrics)
    for status in PUBLISH_REFUSALS:
        metrics.rejected.labels(status)
    for status in STREAM_REFUSALS:
        metrics.streams_refused.labels(status)
    for status in TICKET_REFUSALS:
        metrics.ticket_requests_refused.labels(status)


def access_logger(success_level: int) -> Callable[[RequestHandler], None]:
    """Tornado's access log line, with the URI redacted. Successful requests log at
    `success_level`: DEBUG normally (at thousands of publishes and connects a second, an INFO
    line each would cost more than the work), INFO in demo mode, whose page shows them.
    Refusals and errors always log."""

    def log_request(handler: RequestHandler) -> None:
        status = handler.get_status()
        if status < 400:
            level = success_level
        elif status < 500 or status == 503:
            # A 503 is always the hub's own answer (shutting down, Redis out of reach, the
            # shared history not loaded yet, the body budget full): a state to watch, not an
            # error of the hub's. What breaks is a 500.
            level = logging.WARNING
        else:
            level = logging.ERROR
        request = handler.request
        access_log.log(
            level,
            "%d %s %s (%s) %.2fms",
            status,
            request.method,
            redact(request.uri or ""),
            request.remote_ip,
            1000.0 * request.request_time(),
        )

    return log_request


class HubHandler(RequestHandler):
    def initialize(self, hub: Hub, verifier: Verifier) -> None:
        self.hub = hub
        self.verifier = verifier
        label_refusals(hub.metrics)

    def cors_headers(self) -> list[tuple[str, str]]:
        """CORS for a cross-origin page (EventSource, and hub.js asking why a stream was
        refused). A listed origin may send its cookie; "*" allows any origin without one."""
        origin = self.request.headers.get("Origin")
        allowed = self.hub.config.allowed_origins()
        if not origin or not allowed:
            return []
        if origin in allowed:
            return [
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Vary", "Origin"),
            ]
        if "*" in allowed:
            return [("Access-Control-Allow-Origin", "*")]
        return []

    def fail(self, status: int, error: str, **extra: Any) -> None:
        """Answer with a JSON error body and stop."""
        self._start_error(status)
        body = {"error": error[:MAX_ERROR_LENGTH], **extra}
        self.finish(ujson.dumps(body, escape_forward_slashes=False))

    def fail_retry(self, status: int, error: str, retry_after: float, **extra: Any) -> None:
        """fail(), telling the client when to come back (429, 503)."""
        self._start_error(status)
        self.set_header("Retry-After", str(max(1, round(retry_after))))
        body = {"error": error[:MAX_ERROR_LENGTH], **extra}
        self.finish(ujson.dumps(body, escape_forward_slashes=False))

    def answer_refusal(self, refusal: Refusal) -> int:
        """Answer a refusal of the core as ANSWERS says; return its status."""
        status, retry = ANSWERS[refusal.kind]
        if retry:
            self.fail_retry(status, refusal.message, self.hub.config.retry)
        else:
            self.fail(status, refusal.message)
        return status

    def _start_error(self, status: int) -> None:
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        if status == 401:  # RFC 9110: a 401 names the scheme to authenticate with
            self.set_header("WWW-Authenticate", 'Bearer realm="hub"')
        for name, value in self.cors_headers():
            self.set_header(name, value)

    def answer(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(ujson.dumps(body, escape_forward_slashes=False))

    def token(self) -> str | None:
        """Authorization: Bearer, else ?token= (EventSource cannot set headers), else the
        hub_token cookie."""
        header = self.request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip()
        return self.get_query_argument("token", None) or self.get_cookie("hub_token")

    def authenticate(self, publisher: bool = False) -> Claims | None:
        """The verified claims, or None after answering 401/403."""
        try:
            if publisher:
                return self.verifier.verify_publisher(self.token())
            return self.verifier.verify(self.token())
        except AuthError as exc:
            self.answer_refusal(exc.refusal)
            return None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = responses.get(status_code, "error").lower()
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.log_message:
            reason = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_header("Content-Type", "application/json")
        self.finish(ujson.dumps({"error": reason}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Tornado's own version logs the full request, query string (and so a token) included.
        if isinstance(value, HTTPError):
            return
        logging.getLogger("hub").error(
            "uncaught exception in %s %s",
            self.request.method,
            redact(self.request.uri or ""),
            exc_info=(typ, value, tb),
        )
