"""hub.js believes only the leader of its BroadcastChannel: a hostile page of the same origin
that posts forged messages on the channel (the old unsigned format, unsigned and badly signed
messages in the new one, a leader's message with its body changed, messages signed with a key
of its own that it announces with a lock of its own) shows no forged event in any tab, leader
included, moves no tab's position, closes no tab, and makes none drop the real events after it.
Checked on hub.js pages and on the demo page."""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import HubProcess, broadcasts, tags_on, wait_for_tags, wait_until
from playwright.sync_api import expect
from test_browser_client import blank_page, start, tags, token, wait_status, wait_tags

pytestmark = pytest.mark.browser

TIMEOUT_MS = 15_000
FUTURE_ID = "99999999999999-0"  # above any real id: before the fix it made tabs drop the rest

# window.attack(channel) forges on the channel every way this page can (tampering with a signed
# message of the leader's when it sees one within 10 s); it resolves with how many it posted.
HOSTILE = """
<!doctype html><title>hostile</title><script>
window.attack = async (channel) => {
  const ch = new BroadcastChannel(channel);
  const seen = [];
  ch.onmessage = (m) => seen.push(m.data);
  const forged = (tag, id) => ({
    id, name: "broadcast", data: JSON.stringify({ type: 5, user: null, ts: 1, data: { tag } }),
  });
  const enc = (s) => new TextEncoder().encode(s);
  let posted = 0;
  const post = (m) => { ch.postMessage(m); posted += 1; };

  // The format of before: plain objects.
  post({ t: "event", ...forged("forged-plain", "99999999999999-0") });
  post({ t: "status", status: "closed", error: "forged", final: true });
  // The new format without a signature, and with one made of noise.
  const body = (tag, id, n) => JSON.stringify({ t: "event", ...forged(tag, id), n });
  post({ b: body("forged-unsigned", "99999999999999-1", 1) });
  post({ b: body("forged-noise", "99999999999999-2", 2), k: "AAAA", s: new ArrayBuffer(64) });

  // Ask the leader to speak (an unsigned hello is anyone's right), then take its words.
  post({ b: JSON.stringify({ t: "hello" }) });
  const deadline = Date.now() + 10000;
  while (!seen.some((m) => m && m.k && m.s) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  const real = seen.find((m) => m && m.k && m.s);
  if (real) {
    // The leader's key and signature on another body, and with a huge sequence number.
    post({ b: body("forged-tampered", "99999999999999-3", 1e15), k: real.k, s: real.s });
    post({ b: JSON.stringify({ t: "status", status: "closed", error: "x", final: true, n: 1e15 }),
           k: real.k, s: real.s });
    // The leader's own message again, unchanged (a replay).
    post(real);
  }

  // A key of its own, announced the way a leader announces one, and used to sign.
  const pair = await crypto.subtle.generateKey(
    { name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  const k = btoa(String.fromCharCode(...raw)).replace(/\\+/g, "-").replace(/\\//g, "_")
    .replace(/=+$/, "");
  await new Promise((held) => {
    navigator.locks.request(channel + " leader-key " + k, () => {
      held();
      return new Promise(() => {});  // held for the page's life
    });
  });
  const signed = async (message) => {
    const b = JSON.stringify(message);
    const s = await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, pair.privateKey, enc(b));
    return { b, k, s };
  };
  post(await signed({ t: "event", ...forged("forged-signed", "99999999999999-4"), n: 1 }));
  post(await signed({ t: "resign", n: 2 }));
  post(await signed({ t: "status", status: "closed", error: "forged", final: true, n: 3 }));
  return posted;
};
</script>
"""

FORGED = ["forged-plain", "forged-unsigned", "forged-noise", "forged-tampered", "forged-signed"]


def hostile_page(context: Any, base_url: str) -> Any:
    page = context.new_page()
    page.route(
        base_url + "/hostile", lambda route: route.fulfill(body=HOSTILE, content_type="text/html")
    )
    page.goto(base_url + "/hostile")
    return page


def test_forged_channel_messages_show_nothing_and_lose_nothing_on_hub_js_pages(context, tmp_path):
    hub = HubProcess(tmp_path / "hub.log", "--retry", "0.5", demo=False)
    try:
        pages = [blank_page(context, hub) for _ in "ab"]
        for page in pages:
            start(page, topics=["presence"], token=token("ann", ["*"]), key="trust")
        for page in pages:
            wait_status(page, "open")
        assert sorted(p.evaluate("h.conn.role") for p in pages) == ["follower", "leader"]
        [first] = hub.publish(broadcasts(["before"]))
        for page in pages:
            wait_tags(page, ["before"])
            assert page.evaluate("h.conn.lastEventId") == first

        hostile = hostile_page(context, hub.url)
        posted = hostile.evaluate("(c) => window.attack(c)", "hubjs:trust")

        after = [f"after-{i}" for i in range(5)]
        ids = hub.publish(broadcasts(after))
        for page in pages:
            wait_tags(page, after)
            assert tags(page) == ["before", *after]  # nothing forged, nothing lost or doubled
            assert page.evaluate("h.conn.lastEventId") == ids[-1]
            assert page.evaluate("h.conn.status") == "open"
            assert page.evaluate("h.statuses.every((s) => s.status !== 'closed')")
        assert sorted(p.evaluate("h.conn.role") for p in pages) == ["follower", "leader"]
        hub.wait_streams(1)
        assert posted == 11  # every forgery was tried, the leader's signature tampered with too

        # The real leader still leads the followers: a handover still works after the attack.
        leader = next(p for p in pages if p.evaluate("h.conn.role") == "leader")
        survivor = next(p for p in pages if p is not leader)
        leader.close()
        wait_status(survivor, "open", "leader")
        hub.publish(broadcasts(["handed-over"]))
        wait_tags(survivor, ["handed-over"])
        assert tags(survivor) == ["before", *after, "handed-over"]
    finally:
        hub.stop()


def test_forged_channel_messages_show_nothing_on_the_demo_page(context, tmp_path):
    hub = HubProcess(tmp_path / "hub.log", "--retry", "0.5")
    try:
        pages = []
        for _ in "ab":
            page = context.new_page()
            page.goto(hub.url + "/?user=alice")
            expect(page.locator("#conn")).to_have_attribute("data-status", "open")
            pages.append(page)
        hub.wait_streams(1)
        hub.publish(broadcasts(["before"]))
        for page in pages:
            wait_for_tags(page, ["before"])

        hostile = hostile_page(context, hub.url)
        hostile.evaluate("(c) => window.attack(c)", "hubjs:demo:alice")

        after = [f"after-{i}" for i in range(5)]
        hub.publish(broadcasts(after))
        for page in pages:
            wait_for_tags(page, after)
            shown = tags_on(page)
            assert not set(shown) & set(FORGED), shown
            assert sorted(shown) == sorted(["before", *after])  # each real one once
            expect(page.locator("#conn")).to_have_attribute("data-status", "open")
            assert page.locator(f'#events tr[data-id="{FUTURE_ID}"]').count() == 0
        wait_until(lambda: hub.streams() == 1, 10, "still one shared stream")
    finally:
        hub.stop()
