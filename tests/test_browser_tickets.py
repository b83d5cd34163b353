"""hub.js with a ticket endpoint, in a real headless Chromium: every stream opens with a
one-time ticket bought with the token just before, so no token ever sits in a URL; a stream
that drops, or whose token expires, comes back on a new ticket and misses nothing; a refusal
is still explained; a page on another origin gets its tickets after a CORS preflight."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from browser_support import (
    SECRET,
    HubProcess,
    TcpProxy,
    assert_each_once,
    broadcasts,
    publish_across_renewal,
    tags,
    wait_tags,
    wait_until,
)

pytestmark = pytest.mark.browser

TIMEOUT_MS = 15_000

# window.start(options) connects with hub.js and records into window.h what it reports.
# With options.tokenFromTest the token function asks the test (window.nextToken).
HARNESS = """
window.start = async (options) => {
  const { connect } = await import("/static/hub.js");
  const h = { events: [], statuses: [], tokenCalls: 0 };
  const token = options.tokenFromTest
    ? async () => { h.tokenCalls += 1; return await window.nextToken(); }
    : options.token;
  h.conn = connect({ ...options, token });
  h.conn.on("*", (e) => h.events.push(e));
  h.conn.onStatus((status, info) => h.statuses.push({ status, ...info }));
  window.h = h;
};
"""
BLANK = f"<!doctype html><title>hub.js tickets</title><script>{HARNESS}</script>"


@pytest.fixture
def hub(tmp_path) -> Iterator[HubProcess]:
    # A short heartbeat: it is also the tick that ends streams whose token expired.
    server = HubProcess(
        tmp_path / "hub.log",
        "--retry",
        "0.5",
        "--heartbeat",
        "0.5",
        "--log-level",
        "debug",
        demo=False,
    )
    yield server
    server.stop()


def token(user: str, topics: list[str], ttl: float = 3600) -> str:
    now = time.time()
    claims = {"sub": user, "iat": int(now), "exp": int(now + ttl), "topics": topics}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Requests:
    """What the page asked of the hub: each /events URL, each POST /tickets's headers."""

    def __init__(self, page: Any) -> None:
        self.streams: list[str] = []
        self.tickets: list[dict[str, str]] = []
        self.urls: list[str] = []
        page.on("request", self._seen)

    def _seen(self, request: Any) -> None:
        self.urls.append(request.url)
        if "/events" in request.url:
            self.streams.append(request.url)
        elif request.url.endswith("/tickets") and request.method == "POST":
            self.tickets.append(dict(request.headers))

    def ticket_of(self, url: str) -> str:
        query = url.partition("?")[2]
        [ticket] = [v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "ticket"]
        return ticket


def blank_page(
    context: Any, origin: str, next_token: Callable[[], str] | None = None
) -> tuple[Any, Requests]:
    page = context.new_page()
    page.route(origin + "/blank", lambda route: route.fulfill(body=BLANK, content_type="text/html"))
    if next_token is not None:
        page.expose_function("nextToken", next_token)
    requests = Requests(page)
    page.goto(origin + "/blank")
    return page, requests


def start(page: Any, **options: Any) -> None:
    page.evaluate("(options) => window.start(options)", options)


def wait_status(page: Any, status: str) -> None:
    page.wait_for_function("(status) => window.h && h.conn.status === status", arg=status)


def assert_no_token_in_a_url(requests: Requests, *tokens: str) -> None:
    assert requests.streams, "no stream was opened"
    for url in requests.urls:
        assert "token=" not in url, url
        for secret in tokens:
            assert secret not in url, url
    for url in requests.streams:
        assert "ticket=" in url, url
    tickets = [requests.ticket_of(url) for url in requests.streams]
    assert len(set(tickets)) == len(tickets), "a ticket was presented twice"


def test_every_stream_opens_with_a_ticket_and_no_token_is_in_a_url_or_the_log(context, hub):
    secret = token("ann", ["presence"])
    page, requests = blank_page(context, hub.url)
    start(page, topics=["presence"], token=secret, ticketUrl="/tickets", share=False)
    wait_status(page, "open")
    hub.publish({"type": "login", "user": "ann", "data": {"tag": "hello"}})
    wait_tags(page, ["hello"])
    assert_no_token_in_a_url(requests, secret)
    assert [h.get("authorization") for h in requests.tickets] == [f"Bearer {secret}"]
    log = hub.log()
    assert "stream open" in log  # (--log-level debug: the access lines are there)
    assert secret not in log and secret.rsplit(".", 1)[1] not in log
    assert requests.ticket_of(requests.streams[0]) not in log


def test_a_dropped_stream_reconnects_on_a_new_ticket_and_misses_nothing(context, hub):
    proxy = TcpProxy(hub.port)
    try:
        page, requests = blank_page(context, proxy.url)
        start(page, topics=["presence"], token=token("ann", ["*"]), ticketUrl="/tickets")
        wait_status(page, "open")
        hub.publish(broadcasts(["before"]))
        wait_tags(page, ["before"])

        proxy.cut()
        wait_status(page, "reconnecting")
        hub.publish(broadcasts(["while-1", "while-2"]))
        refused = proxy.refused
        wait_until(lambda: proxy.refused > refused, 10, "a reconnect refused by the proxy")
        proxy.restore()
        wait_status(page, "open")
        hub.publish(broadcasts(["after"]))
        wait_tags(page, ["while-1", "while-2", "after"])
        assert_each_once(page, ["before", "while-1", "while-2", "after"])
        assert len(requests.streams) >= 2
        assert_no_token_in_a_url(requests)
        hub.wait_streams(1)
    finally:
        proxy.close()


def test_an_expired_token_buys_a_new_ticket_and_the_stream_resumes_without_loss(context, hub):
    issued = iter([token("ann", ["*"], ttl=2), token("ann", ["*"])])
    page, requests = blank_page(context, hub.url, lambda: next(issued))
    start(page, topics=["presence"], tokenFromTest=True, ticketUrl="/tickets", share=False)
    wait_status(page, "open")
    sent = publish_across_renewal(page, hub)
    wait_tags(page, sent)
    assert tags(page) == sent  # each once, in order
    assert len(requests.tickets) >= 2
    assert_no_token_in_a_url(requests)


def test_a_token_the_ticket_endpoint_refuses_is_replaced_by_a_fresh_one(context, hub):
    issued = iter(["not-a-jwt", token("ann", ["presence"])])
    page, requests = blank_page(context, hub.url, lambda: next(issued))
    start(page, topics=["presence"], tokenFromTest=True, ticketUrl="/tickets", share=False)
    wait_status(page, "open")
    assert page.evaluate("h.tokenCalls") == 2
    assert len(requests.streams) == 1  # the refused token never reached the stream URL


def test_a_refused_topic_closes_with_the_hubs_reason_on_tickets_too(context, hub):
    page, _ = blank_page(context, hub.url)
    start(
        page,
        topics=["payments"],
        token=token("ann", ["presence"]),
        ticketUrl="/tickets",
        share=False,
    )
    wait_status(page, "closed")
    assert "payments" in page.evaluate("h.statuses.at(-1).error")
    assert hub.streams() == 0


def test_a_page_on_another_origin_gets_tickets_after_a_preflight(context, tmp_path):
    # The page's origin is another hub process on loopback (it serves the page hub.js): a
    # loopback page may reach the loopback hub, which lists that origin.
    pages = HubProcess(tmp_path / "pages.log", demo=False)
    hub = HubProcess(
        tmp_path / "cors.log", "--cors-origins", pages.url, "--log-level", "debug", demo=False
    )
    try:
        page = context.new_page()
        requests = Requests(page)
        page.goto(pages.url + "/healthz")  # any document of the page's origin
        page.add_script_tag(content=HARNESS)
        start(
            page,
            url=hub.url + "/events",
            ticketUrl=hub.url + "/tickets",
            topics=["presence"],
            token=token("ann", ["presence"]),
            share=False,
        )
        wait_status(page, "open")
        hub.publish({"type": "login", "user": "ann", "data": {"tag": "across"}})
        wait_tags(page, ["across"])
        assert_no_token_in_a_url(requests)
        assert requests.streams[0].startswith(hub.url + "/events?")
        assert "204 OPTIONS /tickets" in hub.log()  # the browser asked first
    finally:
        hub.stop()
        pages.stop()
