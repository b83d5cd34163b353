"""A type added to a hub's table (one route function, one entry) reaches the browser with no
change to hub.js or the demo page: hub.js learns the names from GET /types before it subscribes,
the demo page builds its counters and publish buttons from the same list.

The hub runs in the test's process (so that its table can have the extra type), the browser is
the real headless Chromium, driven with Playwright's async API on the same event loop."""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import async_chromium

from hub.dispatch import DEFAULT_TYPES, Kind, Route
from hub.message import Event, Rejected

pytestmark = pytest.mark.browser

TIMEOUT_MS = 15_000
REFUND = 0x06


def route_refund(event: Event) -> Route:
    if not event.user:
        raise Rejected("refund needs a user")
    return Route(users=(event.user,), topics=("payments",))


WITH_REFUND = DEFAULT_TYPES.with_kind(Kind(REFUND, "refund", route_refund))


# A blank page on the hub's origin that connects with hub.js and records what it delivers,
# by listener: h.named for hub.on("refund"), h.all for hub.on("*").
HARNESS = """
window.start = async (token) => {
  const { connect } = await import("/static/hub.js");
  const h = { named: [], all: [] };
  h.conn = connect({ url: "/events", topics: ["payments"], token, share: false });
  h.conn.on("refund", (e) => h.named.push(e));
  h.conn.on("*", (e) => h.all.push(e));
  window.h = h;
};
"""
BLANK = f"<!doctype html><title>hub.js</title><script>{HARNESS}</script>"


async def blank_page(context: Any, url: str) -> Any:
    page = await context.new_page()

    async def fulfil(route: Any) -> None:
        await route.fulfill(body=BLANK, content_type="text/html")

    await page.route(url + "/blank", fulfil)
    await page.goto(url + "/blank")
    return page


@pytest.mark.gen_test(timeout=60)
async def test_an_added_type_reaches_hub_js_by_name_and_through_the_wildcard(hub_server):
    hub = await hub_server(types=WITH_REFUND)
    async with async_chromium() as browser:
        context = await browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = await blank_page(context, hub.url)
        await page.evaluate("(token) => window.start(token)", hub.token("u1", ["payments"]))
        await page.wait_for_function("() => window.h && h.conn.status === 'open'")

        (event_id,) = await hub.publish_ok({"type": "refund", "user": "u1", "data": {"n": 7}})
        await page.wait_for_function("() => h.named.length >= 1 && h.all.length >= 1")

        named, every = await page.evaluate("() => [h.named, h.all]")
        expected = {
            "id": event_id,
            "name": "refund",
            "type": REFUND,
            "user": "u1",
            "data": {"n": 7},
        }
        assert [{k: e[k] for k in expected} for e in named] == [expected]
        assert [{k: e[k] for k in expected} for e in every] == [expected]
        await context.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_demo_page_counts_and_publishes_an_added_type(hub_server):
    hub = await hub_server(types=WITH_REFUND, demo=True)
    async with async_chromium() as browser:
        context = await browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = await context.new_page()
        await page.goto(hub.url + "/?user=alice")
        await page.wait_for_function(
            "() => document.querySelector('#conn').dataset.status === 'open'"
        )

        card = page.locator(f".stat[data-type='{REFUND}']")
        assert await card.locator(".label").inner_text() == f"{REFUND} · refund"
        # the types the hub publishes itself (join, leave) are counted, never offered to publish
        internal = [t["name"] for t in WITH_REFUND.describe() if t["internal"]]
        assert internal
        buttons = await page.locator("#publish-buttons [data-publish]").evaluate_all(
            "(els) => els.map((e) => e.dataset.publish)"
        )
        assert "refund" in buttons and not set(internal) & set(buttons), buttons
        assert await page.locator(f"#count-{REFUND}").inner_text() == "0"

        # The button publishes a refund for the form's user (alice: this page's user), and the
        # page counts it when it comes back on its stream.
        await page.locator("[data-publish='refund']").click()
        await page.wait_for_function(
            "(id) => document.getElementById(id).textContent === '1'", arg=f"count-{REFUND}"
        )
        # the event may come back on the stream before the publish's own answer does
        await page.wait_for_function(
            "() => document.getElementById('pub-result').textContent.startsWith('202 refund')"
        )
        await context.close()
