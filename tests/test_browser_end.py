"""hub.js acts on how the hub ends a stream (its `end` frame), never on an event's name: here a
stand-in server answers each /events request with a given SSE body, so that each ending is
exactly what the test says. The real hub's logout is in test_browser_client.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from browser_support import ROOT
from test_browser_client import HARNESS

pytestmark = pytest.mark.browser

TIMEOUT_MS = 15_000
JSON = "application/json"
IDLE = "retry: 600000\n\n"  # a stream that ends with this is not reconnected within the test
TYPES = {
    "types": [
        {"type": 3, "name": "logout", "filters": []},
        {"type": 5, "name": "broadcast", "filters": []},
    ]
}


def event(event_id: str, name: str, tag: str, user: str | None = None) -> str:
    body = {"type": 5 if name == "broadcast" else 3, "user": user, "ts": 1, "data": {"tag": tag}}
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(body)}\n\n"


def end(code: int, reason: str, reconnect: bool) -> str:
    body = {"code": code, "reason": reason, "reconnect": reconnect, "detail": "scripted"}
    return f"event: end\ndata: {json.dumps(body)}\n\n"


class ScriptedHub:
    """A stand-in hub on a loopback port: static/ from the repository, /types, /tickets (t1,
    t2, ...), and /events answered with the next body of `streams` (each after a `retry: 50`;
    then idle streams), each request's query and headers recorded. Stopped by `close()`."""

    def __init__(self, streams: list[str]) -> None:
        self.streams = list(streams)
        self.requests: list[dict[str, Any]] = []
        self.tickets = 0
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: str | bytes, content_type: str) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                if urlparse(self.path).path != "/tickets":
                    return self._send(404, "", "text/plain")
                scripted.tickets += 1
                self._send(200, json.dumps({"ticket": f"t{scripted.tickets}"}), JSON)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                static = (ROOT / url.path.lstrip("/")).resolve()
                if url.path == "/blank":
                    page = f"<!doctype html><title>hub.js</title><script>{HARNESS}</script>"
                    self._send(200, page, "text/html")
                elif url.path.startswith("/static/") and static.is_relative_to(ROOT / "static"):
                    self._send(200, static.read_bytes(), "text/javascript")
                elif url.path == "/types":
                    self._send(200, json.dumps(TYPES), JSON)
                elif url.path == "/events":
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    scripted.requests.append({"query": parse_qs(url.query), "headers": headers})
                    body = "retry: 50\n\n" + scripted.streams.pop(0) if scripted.streams else IDLE
                    self._send(200, body, "text/event-stream")
                else:
                    self._send(404, "", "text/plain")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def scripted() -> Iterator[Callable[[list[str]], ScriptedHub]]:
    hubs: list[ScriptedHub] = []

    def make(streams: list[str]) -> ScriptedHub:
        hubs.append(ScriptedHub(streams))
        return hubs[-1]

    yield make
    for hub in hubs:
        hub.close()


def open_page(context: Any, hub: ScriptedHub, **options: Any) -> Any:
    page = context.new_page()
    page.expose_function("nextToken", lambda: "a.b.c")
    page.goto(hub.base + "/blank")
    page.evaluate("(options) => window.start(options)", {"share": False, **options})
    return page


def tags(page: Any) -> list[str]:
    return list(page.evaluate("() => h.events.map((e) => e.data && e.data.tag)"))


def test_an_end_without_reconnect_closes_for_good_and_an_event_named_logout_does_not(
    context, scripted
):
    hub = scripted(
        [event("1-0", "logout", "logout-event", user="ann") + end(4003, "logout", False)],
    )
    page = open_page(context, hub, token="a.b.c")
    page.wait_for_function("h.conn.status === 'closed'")
    assert page.evaluate("h.statuses.at(-1)") == {
        "status": "closed",
        "role": "leader",
        "error": "logout",
        "code": 4003,
    }
    assert tags(page) == ["logout-event"]  # the end frame is no event
    # Stopped: no EventSource, no retry pending, and no second request was made.
    assert page.evaluate("h.conn._source._es === null && !h.conn._source._running")
    assert len(hub.requests) == 1


def test_an_end_with_reconnect_resumes_with_last_event_id_after_its_retry(context, scripted):
    hub = scripted(
        [
            # an event named logout is just an event: nothing closes
            event("1-0", "broadcast", "e1") + event("2-0", "logout", "e2", user="ann"),
            # a plain close (network-like): EventSource reconnects, with Last-Event-ID
            event("3-0", "broadcast", "e3") + "retry: 50\n\n" + end(4000, "shutdown", True),
            event("4-0", "broadcast", "e4"),
        ],
    )
    page = open_page(context, hub, token="a.b.c", backoff={"base": 600000})
    page.wait_for_function("h.events.length === 4", timeout=TIMEOUT_MS)
    assert tags(page) == ["e1", "e2", "e3", "e4"]
    # The first close had no end frame, the second had one that says reconnect: EventSource
    # came back each time after the stream's `retry:` (the backoff is 10 min), with the id.
    assert [r["headers"].get("last-event-id") for r in hub.requests[1:3]] == ["2-0", "3-0"]
    assert all(s["status"] != "closed" for s in page.evaluate("h.statuses"))


def test_an_expired_end_with_tickets_gets_a_fresh_token_and_a_new_ticket(context, scripted):
    hub = scripted(
        [
            event("7-0", "broadcast", "e1") + end(4002, "expired", True),
            event("8-0", "broadcast", "e2"),
        ],
    )
    page = open_page(context, hub, tokenFromTest=True, ticketUrl="/tickets")
    page.wait_for_function("h.events.length === 2")
    assert tags(page) == ["e1", "e2"]
    assert page.evaluate("h.tokenCalls") == 2  # asked again for the token, as the frame says
    second = hub.requests[1]["query"]
    assert second["ticket"] == ["t2"]
    assert second["lastEventId"] == ["7-0"]
    assert all(s["status"] != "closed" for s in page.evaluate("h.statuses"))
