"""The demo page in a real headless Chromium: it connects, shows what is published, shares
one connection between tabs, survives a cut connection, and keeps up with a burst."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from browser_support import (
    ARTIFACTS,
    HubProcess,
    TcpProxy,
    broadcasts,
    tags_on,
    wait_for_tags,
    wait_until,
)
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

TIMEOUT_MS = 15_000


@pytest.fixture
def hub(tmp_path) -> Iterator[HubProcess]:
    # A short retry so the browser's own reconnects (EventSource) come quickly.
    server = HubProcess(tmp_path / "hub.log", "--retry", "0.5")
    yield server
    server.stop()


@pytest.fixture
def context(browser) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def open_demo(context: Any, base_url: str) -> Any:
    page = context.new_page()
    page.goto(base_url + "/")
    expect(page.locator("#conn")).to_have_attribute("data-status", "open", timeout=TIMEOUT_MS)
    return page


def assert_each_once(page: Any, tags: list[str]) -> None:
    counts = Counter(tags_on(page))
    assert {t: counts[t] for t in tags} == dict.fromkeys(tags, 1)


def test_page_connects_and_shows_a_published_event(context, hub):
    page = open_demo(context, hub.url)
    expect(page.locator("#role")).to_have_attribute("data-role", "leader")
    assert hub.streams() == 1

    [event_id] = hub.publish({"type": 2, "user": "alice", "data": {"amount": 12.5, "tag": "p1"}})

    row = page.locator(f'#events tr[data-id="{event_id}"]')
    expect(row).to_have_count(1)
    expect(row.locator(".type")).to_have_text("2payment")
    expect(row.locator("td.user")).to_have_text("alice")
    expect(row.locator("td.payload")).to_contain_text('"amount":12.5')
    expect(page.locator("#count-2")).to_have_text("1")
    expect(page.locator("#lat-p50")).to_have_text(re.compile(r"^\d+$"))


def test_two_tabs_share_one_stream_and_hand_over_without_loss_or_duplicates(context, hub):
    first = open_demo(context, hub.url)
    second = open_demo(context, hub.url)
    pages = [first, second]
    roles = sorted(p.locator("#role").get_attribute("data-role") for p in pages)
    assert roles == ["follower", "leader"]
    hub.wait_streams(1)

    before = [f"before-{i}" for i in range(5)]
    hub.publish(broadcasts(before))
    for page in pages:
        wait_for_tags(page, before)
        assert_each_once(page, before)
    assert hub.streams() == 1
    follower = next(p for p in pages if p.locator("#role").get_attribute("data-role") != "leader")
    expect(follower.locator("#role")).to_have_text("Shared from another tab")
    screenshot(follower, "demo-follower-tab.png")

    leader = next(p for p in pages if p.locator("#role").get_attribute("data-role") == "leader")
    survivor = second if leader is first else first
    leader.close()
    # Published while the leader is gone and before the survivor has taken over: the
    # survivor must fetch these from the hub's history with its last event id.
    during = [f"during-{i}" for i in range(5)]
    hub.publish(broadcasts(during))

    expect(survivor.locator("#role")).to_have_attribute("data-role", "leader")
    expect(survivor.locator("#conn")).to_have_attribute("data-status", "open")
    after = [f"after-{i}" for i in range(5)]
    hub.publish(broadcasts(after))
    wait_for_tags(survivor, before + during + after)
    hub.wait_streams(1)

    # Events arrive in order: once this is on the page, nothing earlier can still be coming.
    hub.publish(broadcasts(["sentinel"]))
    wait_for_tags(survivor, ["sentinel"])
    assert_each_once(survivor, [*before, *during, *after, "sentinel"])
    assert hub.streams() == 1


def test_a_cut_connection_resumes_without_loss_or_duplicates(context, hub):
    proxy = TcpProxy(hub.port)
    try:
        page = open_demo(context, proxy.url)
        hub.wait_streams(1)
        before = [f"before-{i}" for i in range(3)]
        hub.publish(broadcasts(before))
        wait_for_tags(page, before)

        proxy.cut()
        hub.wait_streams(0)  # the hub has seen the stream end: what follows is missed
        expect(page.locator("#conn")).not_to_have_attribute("data-status", "open")
        missed = [f"missed-{i}" for i in range(10)]
        hub.publish(broadcasts(missed))
        # The browser tries again and is refused: the missed events cannot have reached it.
        refused = proxy.refused
        wait_until(lambda: proxy.refused > refused, 10, "a reconnect refused by the proxy")
        assert not set(missed) & set(tags_on(page))

        proxy.restore()
        expect(page.locator("#conn")).to_have_attribute("data-status", "open")
        wait_for_tags(page, missed)
        hub.publish(broadcasts(["sentinel"]))
        wait_for_tags(page, ["sentinel"])
        assert_each_once(page, [*before, *missed, "sentinel"])
        assert hub.streams() == 1
    finally:
        proxy.close()


def test_burst_screenshot(context, hub):
    page = open_demo(context, hub.url)
    # The hub's own logs too, so the logs panel has something to show.
    hub.publish(
        [
            {"type": "login", "user": "bob", "data": {"ip": "198.51.100.4"}},
            {"type": "payment", "user": "carol", "data": {"amount": 99.0, "currency": "EUR"}},
            {"type": "log", "data": {"level": "warning", "service": "billing", "message": "slow"}},
            {"type": "broadcast", "user": "ops", "data": {"message": "Deploy at 18:00"}},
        ]
    )
    page.locator("#burst").click()
    result = page.locator("#burst-result")
    expect(result).to_have_attribute("data-done", "true", timeout=30_000)
    expect(result).to_contain_text("all on screen")
    expect(page.locator("#count-2")).to_have_text("1,001")
    expect(page.locator("#events tr")).to_have_count(250)
    screenshot(page, "demo-after-burst.png")


def test_logs_panel_shows_the_hubs_own_records_filtered_by_level(context, hub):
    page = open_demo(context, hub.url)
    levels = ["debug", "info", "warning", "error"]
    hub.publish(
        [
            {"type": "log", "data": {"level": lv, "service": "svc", "message": f"lv-{lv}"}}
            for lv in levels
        ]
    )
    logs = page.locator("#logs")
    # The hub's own record of that request, published by the demo log producer.
    expect(logs).to_contain_text("POST /publish")
    expect(logs).to_contain_text("lv-info")
    expect(logs).not_to_contain_text("lv-debug")  # the default minimum level is info

    page.locator('#levels button[data-level="warning"]').click()
    expect(logs.locator("li", has_text="lv-")).to_have_count(2)
    expect(logs).to_contain_text("lv-warning")
    expect(logs).to_contain_text("lv-error")
    expect(logs).not_to_contain_text("POST /publish")  # an info record

    page.locator('#levels button[data-level="debug"]').click()
    expect(logs.locator("li", has_text="lv-")).to_have_count(4)


def screenshot(page: Any, name: str) -> None:
    """For a person to look at: artifacts/ (gitignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_a_logout_signs_every_tab_out_until_one_signs_in_again(context, hub):
    pages = [open_demo(context, hub.url) for _ in "ab"]
    hub.wait_streams(1)
    hub.publish({"type": "logout", "user": "alice", "data": {}})
    for page in pages:
        expect(page.locator("#conn")).to_have_attribute("data-status", "closed")
        expect(page.locator("#notice")).to_contain_text("alice was logged out")
    hub.wait_streams(0)

    follower = next(p for p in pages if p.locator("#role").get_attribute("data-role") != "leader")
    follower.get_by_role("button", name="Sign in again").click()
    expect(follower.locator("#conn")).to_have_attribute("data-status", "open")
    expect(follower.locator("#role")).to_have_attribute("data-role", "leader")
    expect(follower.locator("#notice")).to_be_hidden()
    hub.wait_streams(1)
