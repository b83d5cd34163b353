"""The seed architecture's log pipeline, end to end and real: services publish log lines to a
NATS JetStream subject, the hub (a `hub` process, --source nats://...) reads the stream, and a
headless Chromium holding `EventSource('/events?topic=logs&level=warning&service=api')` gets
the warnings and errors of `api`, and nothing else (not `api`'s info lines, not another
service's warnings)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats_support
import pytest
from browser_support import HubProcess, http_json
from nats_support import NatsTarget

pytestmark = pytest.mark.browser

nats_url = nats_support.nats_url
TIMEOUT_MS = 15_000

# A blank page on the hub's origin: it opens one EventSource and keeps what it delivers.
PAGE = """<!doctype html><title>logs</title><script>
window.follow = (url) => {
  window.lines = [];
  window.opened = false;
  const source = new EventSource(url);
  source.onopen = () => { window.opened = true; };
  source.addEventListener("log", (e) => {
    window.lines.push(Object.assign({ sseId: e.lastEventId }, JSON.parse(e.data)));
  });
};
</script>"""

# What the services log, in order; the stream must show only api's warnings and errors.
LINES = [
    ("warning", "api", "disk 91% full"),
    ("info", "api", "request served"),
    ("warning", "web", "slow render"),
    ("error", "api", "upstream refused"),
    ("debug", "api", "cache miss"),
    ("error", "billing", "card declined"),
    ("warning", "api", "retrying"),
]
WANTED = [("warning", "disk 91% full"), ("error", "upstream refused"), ("warning", "retrying")]


def log_line(level: str, service: str, message: str) -> bytes:
    return json.dumps(
        {"type": "log", "data": {"level": level, "service": service, "message": message}}
    ).encode()


async def _publish_lines(target: NatsTarget, lines: list[bytes]) -> None:
    nc = await nats.connect(target.url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        for line in lines:
            await js.publish(f"{target.subject_prefix}.logs", line)
    finally:
        await nc.close()


async def _make_stream(target: NatsTarget) -> None:
    """The stream is the operator's (the hub never makes it): `<prefix>.>`, as `hub.events.>`."""
    nc = await nats.connect(target.url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name=target.stream, subjects=[target.subjects])
        # its dead letters kept beside it (nats_support deletes this stream too)
        await js.add_stream(name=target.dead_stream, subjects=[f"hub.dead.{target.stream}"])
    finally:
        await nc.close()


@pytest.fixture
def hub(tmp_path: Path, nats_url: NatsTarget) -> Iterator[HubProcess]:
    nats_support.run_async(lambda: _make_stream(nats_url))
    source = f"{nats_url.url}/{nats_url.stream}?durable=logs&ack_wait=2"
    server = HubProcess(tmp_path / "hub.log", "--source", source)
    try:
        yield server
    finally:
        server.stop()
        print(server.log()[-4000:])


def test_log_lines_published_to_nats_reach_a_filtered_eventsource(context: Any, hub, nats_url):
    context.set_default_timeout(TIMEOUT_MS)
    status, answer = http_json(hub.url + "/demo/token?user=ops&topics=logs")
    assert status == 200, answer
    page = context.new_page()
    page.route(hub.url + "/blank", lambda route: route.fulfill(body=PAGE, content_type="text/html"))
    page.goto(hub.url + "/blank")
    page.evaluate(
        "(token) => window.follow('/events?topic=logs&level=warning&service=api&token=' + token)",
        answer["token"],
    )
    page.wait_for_function("() => window.opened")
    hub.wait_streams(1)

    lines = [log_line(*line) for line in LINES]
    nats_support.run_async(lambda: _publish_lines(nats_url, lines))
    # The last wanted line is published after every other: one hub delivers the stream in
    # order, so a line let through that must not be would have come before it.
    page.wait_for_function(
        "(last) => window.lines.some((e) => e.data.message === last)", arg=WANTED[-1][1]
    )
    got = page.evaluate("() => window.lines")
    assert [(e["data"]["level"], e["data"]["message"]) for e in got] == WANTED
    assert {e["name"] for e in got} == {"log"} and {e["data"]["service"] for e in got} == {"api"}
    assert all(e["sseId"] for e in got) and len({e["sseId"] for e in got}) == len(got)
