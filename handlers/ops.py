"""Operations: /healthz, /readyz, /metrics, the static files, and JSON 404s."""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST
from tornado.web import HTTPError, StaticFileHandler

from handlers.base import MAX_ERROR_LENGTH, HubHandler, JsonErrors, json_body
from hub.auth import Verifier
from hub.core import Hub

__all__ = [
    "HealthHandler",
    "MetricsElsewhereHandler",
    "MetricsHandler",
    "NotFoundHandler",
    "ReadyHandler",
    "StaticHandler",
    "TypesHandler",
]

STARTED = time.time()
MAX_SHOWN_PATH = 100  # of a path a 404 quotes


def _restart_clock() -> None:
    """A forked worker's uptime is its own, not its supervisor's."""
    global STARTED
    STARTED = time.time()


os.register_at_fork(after_in_child=_restart_clock)


class HealthHandler(HubHandler):
    def get(self) -> None:
        self.answer(
            200,
            {
                "status": "ok",
                "streams": len(self.hub.registry),
                "history": len(self.hub.history),
                "publishing": self.hub.publishing,  # publishes waiting on the broker
                "uptime_s": round(time.time() - STARTED, 1),
                "pid": os.getpid(),  # which process answered: with --workers, one of several
            },
        )

    def head(self) -> None:
        """As GET, without the body (Tornado sends the head only, with the body's length): load
        balancers probe with HEAD."""
        self.get()


class ReadyHandler(HubHandler):
    """Ready for new streams: 503 while shutting down or cut off from the broker, so a load
    balancer sends elsewhere."""

    def get(self) -> None:
        if self.hub.stopping:
            self.fail(503, "shutting down")
        elif not self.hub.ready:
            self.fail(503, f"not ready: {self.hub.broker.unready_reason()}")
        elif self.hub.sources:
            # A source that is down leaves the node ready: its streams and POST /publish
            # work, and every node shares the source, so a 503 would take the whole fleet
            # out of the load balancer for a database outage. The body (and hub_source_up)
            # says it (README, Event sources).
            sources = {s.name: s.stats.state for s in self.hub.sources}
            degraded = any(state.startswith("down") for state in sources.values())
            status = "degraded" if degraded else "ready"
            self.answer(200, {"status": status, "sources": sources})
        else:
            self.answer(200, {"status": "ready"})

    def head(self) -> None:
        """As GET, without the body."""
        self.get()


class MetricsHandler(HubHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.hub.metrics.exposition())


class MetricsElsewhereHandler(HubHandler):
    """/metrics on the public port when it must not answer there (--metrics-port serves
    them, or several workers share the port): the JSON 404 of an unknown path, saying where
    the metrics are."""

    def initialize(self, hub: Hub, verifier: Verifier, hint: str = "") -> None:
        super().initialize(hub, verifier)
        self.hint = hint

    def prepare(self) -> None:
        self.fail(404, f"no such endpoint: {self.request.method} {self.request.path}: {self.hint}")


class TypesHandler(HubHandler):
    """The dispatch table, for clients that learn the event names from the hub (hub.js, the
    demo page). Public: a type's number and name are no secret, and a page needs them before
    it has a token."""

    def get(self) -> None:
        for name, value in self.cors_headers():
            self.set_header(name, value)
        self.answer(200, {"types": self.hub.types.describe()})


class NotFoundHandler(HubHandler):
    def prepare(self) -> None:
        self.fail(404, f"no such endpoint: {self.request.method} {self.request.path}")


class StaticHandler(JsonErrors, StaticFileHandler):
    """The demo page and hub.js: always revalidated, so a redeploy is seen at once. Its errors
    are JSON like every other answer of the hub's (JsonErrors), and say no more than the status:
    Tornado's messages for them name the file's absolute path."""

    shows_log_message = False

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs: object) -> None:
        if status_code != 404:
            super().write_error(status_code, **kwargs)
            return
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json_body({"error": f"no such file: {self.request.path[:MAX_SHOWN_PATH]}"}))

    async def get(self, path: str, include_body: bool = True) -> None:
        await super().get(path, include_body)
        if self.get_status() == 416:  # a Range past the file: answered, but with no body
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            error = f"range not satisfiable: {self.request.headers.get('Range', '')}"
            self.write(json_body({"error": error[:MAX_ERROR_LENGTH]}))

    def parse_url_path(self, url_path: str) -> str:
        # No file is named with a NUL, and os.path.realpath raises on one (a 500 and a
        # traceback for `GET /static/%00`).
        if "\x00" in url_path:
            raise HTTPError(404)
        return super().parse_url_path(url_path)
