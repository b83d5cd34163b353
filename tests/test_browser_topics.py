"""Topics that publishers name (issue 19) in a real headless Chromium: the demo page joins a
named topic and publishes a broadcast to it, which reaches the pages on the topic and no other;
a name outside the topic alphabet is refused with the hub's reason. hub.js on its own: any name
of the alphabet goes through the stream's URL (with a ticket or a token), and a name the hub
refuses (400) or the token does not grant (403) closes the stream with the hub's reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from browser_support import HubProcess, broadcasts, wait_for_tags, wait_tags
from playwright.sync_api import expect
from test_browser_client import blank_page, start, token, wait_status

pytestmark = pytest.mark.browser

TIMEOUT_MS = 15_000
ODD_NAME = "team/7@example.com~a_b-c.d:e"  # every punctuation of the alphabet

# The rows of the demo page's table whose payload has this message, and their topic names.
ROWS_JS = """(message) => [...document.querySelectorAll('#events tr')]
  .filter((tr) => tr.querySelector('td.payload code').textContent.includes(message))
  .map((tr) => [...tr.querySelectorAll('td.user .topic')].map((t) => t.textContent))"""


@pytest.fixture
def demo_hub(tmp_path) -> Iterator[HubProcess]:
    server = HubProcess(tmp_path / "hub.log", "--retry", "0.5")
    yield server
    server.stop()


@pytest.fixture
def hub(tmp_path) -> Iterator[HubProcess]:
    server = HubProcess(tmp_path / "keyed.log", "--retry", "0.5", demo=False)
    yield server
    server.stop()


def wait_open(page: Any) -> None:
    expect(page.locator("#conn")).to_have_attribute("data-status", "open", timeout=TIMEOUT_MS)


def join(page: Any, topic: str) -> None:
    page.locator("#join-topic").fill(topic)
    page.locator("#join").click()


def test_a_broadcast_to_a_joined_topic_reaches_the_pages_on_it_and_not_the_other(context, demo_hub):
    # Three tabs of one browser, signed in as alice: two join org:42 (they share one stream,
    # its key has the topic), the third stays on the demo's topics (a stream of its own).
    pages = [context.new_page() for _ in "abc"]
    for page in pages:
        page.goto(demo_hub.url + "/")
        wait_open(page)
    on_topic, off_topic = pages[:2], pages[2]
    for page in on_topic:
        join(page, "org:42")
        expect(page.locator('#joined .topic[data-topic="org:42"]')).to_be_visible()
        expect(page.locator("#join-result")).to_contain_text("Joined org:42")
    for page in pages:
        wait_open(page)
    demo_hub.wait_streams(2)
    assert sorted(p.locator("#role").get_attribute("data-role") for p in on_topic) == [
        "follower",
        "leader",
    ]

    # Published from the page that is not on the topic, with its publisher token.
    off_topic.locator("#pub-topic").fill("org:42")
    off_topic.locator("#pub-message").fill("for org 42 only")
    off_topic.locator("#publish-topic").click()
    expect(off_topic.locator("#pub-result")).to_contain_text("202 broadcast to org:42")
    for page in on_topic:
        page.wait_for_function(f"() => ({ROWS_JS})('for org 42 only').length > 0")
        assert page.evaluate(ROWS_JS, "for org 42 only") == [["org:42"]]
        row = page.locator("#events tr", has_text="for org 42 only")
        expect(row.locator("td.user")).to_have_attribute(
            "title", "A broadcast to the subscribers of org:42"
        )

    # A broadcast to everyone after it reaches the third page: the topic's did not.
    demo_hub.publish(broadcasts(["after"]))
    for page in pages:
        wait_for_tags(page, ["after"])
    assert off_topic.evaluate(ROWS_JS, "for org 42 only") == []
    expect(off_topic.locator("#events tr", has_text="after").locator("td.user")).to_have_text(
        "everyone"
    )

    # Leaving: the page's stream goes back to the demo's topics, shared with the third page.
    on_topic[0].get_by_role("button", name="Leave org:42").click()
    expect(on_topic[0].locator("#joined .topic")).to_have_count(0)
    demo_hub.wait_streams(2)  # the other page keeps org:42's stream


def test_a_topic_name_outside_the_alphabet_shows_the_hubs_reason_and_keeps_the_stream(
    context, demo_hub
):
    page = context.new_page()
    page.goto(demo_hub.url + "/")
    wait_open(page)
    join(page, "org 42!")
    result = page.locator("#join-result")
    expect(result).to_contain_text('Could not join "org 42!"')
    expect(result).to_contain_text("invalid topic name: a topic name is made of letters, digits")
    expect(result).to_have_class("join-result bad")
    expect(page.locator("#joined .topic")).to_have_count(0)
    wait_open(page)
    demo_hub.wait_streams(1)

    # The publish field's refusal is the hub's too.
    page.locator("#pub-topic").fill("org 42!")
    page.locator("#publish-topic").click()
    expect(page.locator("#pub-result")).to_contain_text("broadcast to org 42! failed: HTTP 4")
    expect(page.locator("#pub-result")).to_contain_text("topic")


@pytest.mark.parametrize("ticket", [True, False], ids=["ticket", "token-in-url"])
def test_hub_js_takes_any_topic_name_of_the_alphabet(context, hub, ticket):
    page = blank_page(context, hub)
    extra = {"ticketUrl": "/tickets"} if ticket else {}
    topics = ["org:42", ODD_NAME]
    start(page, topics=topics, token=token("ann", ["org:*", "team/*"]), share=False, **extra)
    wait_status(page, "open")
    hub.wait_streams(1)
    hub.publish(
        [
            {"type": "broadcast", "topics": [ODD_NAME], "data": {"tag": "odd"}},
            {"type": "broadcast", "topics": ["org:42"], "data": {"tag": "org"}},
        ]
    )
    wait_tags(page, ["odd", "org"])
    got = page.evaluate("h.events.map((e) => [e.data.tag, e.topics])")
    assert got == [["odd", [ODD_NAME]], ["org", ["org:42"]]]


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("org:43", 'topic "org:43" is not allowed by the token'),  # 403
        ("org 42", "invalid topic name"),  # 400
    ],
    ids=["not-granted-403", "bad-name-400"],
)
@pytest.mark.parametrize("ticket", [True, False], ids=["ticket", "token-in-url"])
def test_hub_js_closes_on_a_refused_topic_with_the_hubs_reason(context, hub, topic, reason, ticket):
    page = blank_page(context, hub)
    extra = {"ticketUrl": "/tickets"} if ticket else {}
    start(page, topics=[topic], token=token("ann", ["org:42"]), share=False, **extra)
    wait_status(page, "closed")
    assert reason in page.evaluate("h.statuses.at(-1).error")
    assert hub.streams() == 0
