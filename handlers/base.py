"""What every handler shares: JSON errors, logs that never carry a token, and how a handler
takes a request body: publish bodies' deadlines and byte budget (`BodyDeadlines`), and the rest
of a body refused before it is in read and dropped so that a proxy gets the answer
(`DrainsRefusedBody`)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from asyncio import Future
from collections.abc import Callable, Iterable
from http.client import responses
from typing import Any
from urllib.parse import urlsplit

import ujson
from tornado.web import HTTPError, RequestHandler

from hub.auth import PUBLISHER_MAY_NOT_SUBSCRIBE, AuthError, Claims, Verifier
from hub.core import Hub
from hub.logs import redact
from hub.metrics import Metrics
from hub.refusal import Refusal, RefusalKind

__all__ = [
    "ANSWERS",
    "DRAIN_FACTOR",
    "PUBLISH_REFUSALS",
    "STREAM_REFUSALS",
    "TICKET_REFUSALS",
    "BodyDeadlines",
    "DrainsRefusedBody",
    "HubHandler",
    "JsonErrors",
    "access_logger",
    "json_body",
    "redact",
    "same_origin",
]

access_log = logging.getLogger("tornado.access")

# An error message may quote what the client sent (a path, a field name, a topic); the quote
# is cut where it is made, and every message again here, so no answer grows with the request.
MAX_ERROR_LENGTH = 512

# The one place where the core's refusals become HTTP: each kind's status, and whether the
# answer says when to come back (Retry-After: the refusal's retry_after, else --retry).
ANSWERS: dict[RefusalKind, tuple[int, bool]] = {
    RefusalKind.UNREADY: (503, True),
    RefusalKind.CAPACITY: (503, True),
    RefusalKind.PER_USER: (429, True),
    RefusalKind.TOKEN_MISSING: (401, False),
    RefusalKind.TOKEN_INVALID: (401, False),
    RefusalKind.TOKEN_EXPIRED: (401, False),
    RefusalKind.NOT_PUBLISHER: (403, False),
    RefusalKind.REVOKED: (401, False),
    RefusalKind.TICKET_MALFORMED: (401, False),
    RefusalKind.TICKET_UNKNOWN: (401, False),
    RefusalKind.BEHIND: (503, True),
}

_TOKEN = (RefusalKind.TOKEN_MISSING, RefusalKind.TOKEN_INVALID, RefusalKind.TOKEN_EXPIRED)


def _labels(kinds: Iterable[RefusalKind], own: Iterable[int]) -> tuple[str, ...]:
    """The statuses a route may refuse with, as metric label values: those the table gives
    the core's refusals it meets, and the handler's own."""
    return tuple(sorted({str(ANSWERS[kind][0]) for kind in kinds} | {str(s) for s in own}))


# The label values of the refusals counted by status, each exported at 0 from the start. The
# handlers' own: 400 a malformed request, 403 a topic the token does not allow, a publisher
# token opening a stream or a cookie from a page of another origin, 413/415/422 a publish
# body, 429 the publish rate, 503 shutting down or the broker unavailable.
PUBLISH_REFUSALS = _labels((*_TOKEN, RefusalKind.NOT_PUBLISHER), (400, 413, 415, 422, 429, 503))
STREAM_REFUSALS = _labels(
    (k for k in RefusalKind if k is not RefusalKind.NOT_PUBLISHER), (400, 403, 503)
)
TICKET_REFUSALS = _labels((*_TOKEN, RefusalKind.REVOKED), (403, 503))  # of POST /tickets

# Methods that change nothing: a cookie may authenticate them from any page (what a page of
# another origin can then read is CORS's business). Any other method authenticated by the
# hub_token cookie alone needs an Origin the hub trusts (HubHandler.cookie_refusal).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_ORIGIN_SHOWN = 100


def json_body(body: Any) -> str:
    """Every JSON answer of the hub, as written: one line, ending with a newline (so curl's
    output does not run into the prompt)."""
    return ujson.dumps(body, escape_forward_slashes=False) + "\n"


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's `Origin` names the server the request reached (its `Host`): the same
    host name and port, the port by default that of the origin's scheme. The scheme is not
    compared: behind a proxy that ends TLS the hub is reached over http by an https page."""
    try:
        page = urlsplit(origin)
        reached = urlsplit("//" + host)
        if page.scheme not in ("http", "https") or not page.hostname or not reached.hostname:
            return False
        default = 443 if page.scheme == "https" else 80
        return page.hostname == reached.hostname and (page.port or default) == (
            reached.port or default
        )
    except ValueError:  # a port that is not one
        return False


_labelled: weakref.WeakSet[Metrics] = weakref.WeakSet()


def label_refusals(metrics: Metrics) -> None:
    """Declare the statuses each route refuses with, once per hub (before its first answer:
    a scrape is a request too)."""
    if metrics in _labelled:
        return
    _labelled.add(metrics)
    metrics.declare_refusals("publish", PUBLISH_REFUSALS)
    metrics.declare_refusals("stream", STREAM_REFUSALS)
    metrics.declare_refusals("ticket", TICKET_REFUSALS)


def access_logger(success_level: int) -> Callable[[RequestHandler], None]:
    """Tornado's access log line, with the URI redacted. Successful requests log at
    `success_level`: DEBUG normally (at thousands of publishes and connects a second, an INFO
    line each would cost more than the work), INFO in demo mode, whose page shows them.
    Refusals and errors always log."""

    def log_request(handler: RequestHandler) -> None:
        status = handler.get_status()
        if status >= 400 and isinstance(handler, HubHandler) and handler.route:
            handler.hub.metrics.refused(handler.route, status)  # each answer counted once
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


class JsonErrors(RequestHandler):
    """Tornado's own errors (an HTTPError raised, an uncaught exception, a 405) as the hub's JSON
    error body, for every handler: the hub's and the static files'."""

    # Whether an HTTPError's log_message is the answer's error: the hub's handlers write theirs
    # for the client; Tornado's static file handler writes them for the log (absolute paths).
    shows_log_message = True

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = responses.get(status_code, "error").lower()
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.log_message and self.shows_log_message:
            reason = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json_body({"error": reason[:MAX_ERROR_LENGTH]}))

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


class HubHandler(JsonErrors):
    # Whose refusals this route's answers are (hub.metrics.Metrics.refused): counted by the
    # access log's hook, never by the handler's own code.
    route = ""

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
        self.finish(json_body({"error": error[:MAX_ERROR_LENGTH], **extra}))

    def fail_retry(self, status: int, error: str, retry_after: float, **extra: Any) -> None:
        """fail(), telling the client when to come back (429, 503)."""
        self._start_error(status)
        self.set_header("Retry-After", str(max(1, round(retry_after))))
        self.finish(json_body({"error": error[:MAX_ERROR_LENGTH], **extra}))

    def answer_refusal(self, refusal: Refusal) -> int:
        """Answer a refusal of the core as ANSWERS says; return its status."""
        status, retry = ANSWERS[refusal.kind]
        if retry:
            after = self.hub.config.retry if refusal.retry_after is None else refusal.retry_after
            self.fail_retry(status, refusal.message, after)
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
        self.finish(json_body(body))

    def token(self) -> str | None:
        """Authorization: Bearer, else ?token= (EventSource cannot set headers), else the
        hub_token cookie."""
        return self._token()[0]

    def _token(self) -> tuple[str | None, bool]:
        """token(), and whether it is the hub_token cookie's (which a browser sends by itself,
        whichever page makes the request)."""
        header = self.request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip(), False
        query = self.get_query_argument("token", None)
        if query:
            return query, False
        cookie = self.get_cookie("hub_token")
        return cookie, bool(cookie)

    def authenticate(self, publisher: bool = False) -> Claims | None:
        """The verified claims of a publisher's token (`publisher`) or a subscriber's, or None
        after answering: 401 for a token refused; 403 for a subscriber's token that may not
        publish, for a publisher's token where a subscriber's is needed (README, Tokens and
        roles), or for the hub_token cookie on a state-changing request from a page the hub
        does not trust (cookie_refusal)."""
        token, by_cookie = self._token()
        if by_cookie and self.request.method not in SAFE_METHODS:
            refused = self.cookie_refusal()
            if refused is not None:
                self.fail(403, refused)
                return None
        try:
            if publisher:
                return self.verifier.verify_publisher(token)
            claims = self.verifier.verify(token)
        except AuthError as exc:
            self.answer_refusal(exc.refusal)
            return None
        if claims.publish:
            self.fail(403, PUBLISHER_MAY_NOT_SUBSCRIBE)
            return None
        return claims

    def cookie_refusal(self) -> str | None:
        """Why a state-changing request authenticated by the hub_token cookie alone is refused
        (None: it is not). A browser attaches the cookie to a request any page makes (a form
        another site posts, its fetch()): only the Origin header says whose page it is. It must
        be the hub's own (same_origin) or one listed in --cors-origins ("*" does not count: it
        allows any origin without credentials). No Origin: refused, as a browser sends one with
        every POST and a client that is not a browser sends its token in Authorization."""
        origin = self.request.headers.get("Origin")
        how = "send the token in Authorization: Bearer, or list the page's origin in --cors-origins"
        if not origin:
            return f"the hub_token cookie needs an Origin header on a {self.request.method}: {how}"
        if same_origin(origin, self.request.host) or origin in self.hub.config.allowed_origins():
            return None
        shown = origin[:MAX_ORIGIN_SHOWN]
        return f'the hub_token cookie is not accepted from a page of origin "{shown}": {how}'


class BodyDeadlines:
    """Publish bodies in progress: each must arrive within `timeout` seconds, and together
    they hold at most `limit` bytes.

    Tornado's own `body_timeout` wraps every request's body read in a timeout future: ~10 us a
    request, a tenth of the single-event publish rate (measured). Here a request only enters a
    dict when its body starts and leaves it when it ends; one timer a second, armed only while
    bodies are in progress, closes the connections of the ones past their deadline. Without
    the byte budget, a body's timeout alone still let 200 publishers sending 1 MiB bodies
    slowly hold 200 MiB.
    """

    def __init__(self, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        self.held = 0  # bytes of every body in progress
        self.started: dict[Any, float] = {}  # handler -> when its body started (loop time)
        self.sizes: dict[Any, int] = {}  # handler -> bytes of its body held so far
        self._timer: asyncio.TimerHandle | None = None

    def start(self, handler: Any) -> None:
        loop = asyncio.get_running_loop()
        self.started[handler] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(1.0, self._sweep)

    def hold(self, handler: Any, size: int) -> bool:
        """Count `size` more bytes of the handler's body, or False if the budget has no room
        for them (the caller refuses the request; done() still has to be called)."""
        if self.held + size > self.limit:
            return False
        self.held += size
        self.sizes[handler] = self.sizes.get(handler, 0) + size
        return True

    def done(self, handler: Any) -> None:
        self.started.pop(handler, None)
        self.held -= self.sizes.pop(handler, 0)

    def _sweep(self) -> None:
        self._timer = None
        if not self.started:
            return
        loop = asyncio.get_running_loop()
        horizon = loop.time() - self.timeout
        for handler, started in list(self.started.items()):
            if started <= horizon:
                self.done(handler)
                handler.request.connection.close()  # the client gets no answer: it was late
        if self.started:
            self._timer = loop.call_later(1.0, self._sweep)


# A body refused before it is in is read and dropped up to this many times --max-body, at most
# (DrainsRefusedBody). The proxy's own limit (nginx's client_max_body_size: 2m in the README) must
# not be above it; Tornado's (handlers.app: twice --max-body, and 64 KiB) is.
DRAIN_FACTOR = 2


class DrainsRefusedBody(RequestHandler):
    """A `@stream_request_body` handler that answers before its body is in (a refusal at the
    head: 413 by Content-Length, 401, 429, ...; or midway) without a proxy in front losing the
    answer.

    Tornado, once a handler has answered, closes the connection with the rest of the body
    unread, and the kernel resets a socket closed with bytes unread (RST). A reverse proxy still
    writing the body then fails its write before it reads the answer (nginx: `writev() failed
    (32: Broken pipe) while sending request to upstream`) and tells its client 502 instead of
    the hub's 413 (18 to 38 of the 74 refused publishes of tests/test_nginx.py, through the
    README's nginx): a client that retries a 5xx retries that for ever.

    Here an early answer goes out at once, whole (with its Content-Length), and the request ends
    only once the rest of the body has been read and dropped: Tornado reads it, and the
    handler's `data_received` drops each piece while `draining` (no decoding, nothing kept).
    Bounded: only a body whose Content-Length is at most `drain_limit()` bytes is drained, and
    its handler's deadline (BodyDeadlines, --body-timeout) closes the connection past it. The
    connection then stays open for the next request, as after any answer. A body that cannot be
    drained so (over the limit, without a Content-Length, or not yet sent:
    `Expect: 100-continue`) is not read: the answer says `Connection: close` (no proxy keeps the
    connection for another request), and the connection closes after it.

    The handler calls `body_expected()` in `prepare` (before any answer), `body_in()` first
    thing in its method (True: the request was answered early and is now finished), and drops
    what `data_received` gets while `draining`. An early answer is drained when it is the whole
    text given to `finish()`, as `fail()` and `write_error()` give it."""

    _body_pending = False  # the request has a body, not all of it read yet
    _draining = False  # answered early: the rest of the body is read and dropped

    def drain_limit(self) -> int:
        """Bytes of a refused body read and dropped, at most (0: none)."""
        return 0

    def body_expected(self) -> None:
        headers = self.request.headers
        self._body_pending = (
            headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers
        )

    @property
    def draining(self) -> bool:
        return self._draining

    def body_in(self) -> bool:
        """The whole body is in: True if the request was answered early (now it is finished)."""
        self._body_pending = False
        if not self._draining:
            return False
        self.finish()
        return True

    def _drainable(self) -> bool:
        headers = self.request.headers
        length = headers.get("Content-Length", "")
        return (
            length.isdigit()
            and int(length) <= self.drain_limit()
            and "Transfer-Encoding" not in headers
            and headers.get("Expect", "").lower() != "100-continue"
        )

    def finish(self, chunk: str | bytes | dict[Any, Any] | None = None) -> Future[None]:
        if self._draining:  # the body is in, or gone; or an error's answer after ours: end now
            self._draining = False
            return super().finish(chunk)
        if not self._body_pending:
            return super().finish(chunk)
        if not isinstance(chunk, (str, bytes)) or not self._drainable():
            self.set_header("Connection", "close")  # no proxy may keep it for another request
            return super().finish(chunk)
        data = chunk.encode() if isinstance(chunk, str) else chunk
        self.set_header("Content-Length", len(data))
        self.write(data)
        self._draining = True
        return self.flush()

    def on_connection_close(self) -> None:
        self._body_pending = False
        if self._draining:  # the answer was sent: it is logged and counted as any other
            self.finish()
        super().on_connection_close()
