"""What every answer looks like, over real sockets: each JSON body is one line ending with a
newline (curl's output then ends before the prompt); HEAD /healthz and /readyz answer as GET
does, without the body, on the public port and the metrics port; the static files' errors are
JSON like every other error of the hub."""

from __future__ import annotations

import json
from typing import Any

import pytest
import tornado.httpserver
import tornado.testing
from sse import http_request

from handlers.app import build_metrics_app


def assert_json_line(response: Any) -> Any:
    """The body is one JSON document on one line, ending with a newline; its value."""
    body = response.body
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    return json.loads(body)


@pytest.mark.gen_test(timeout=15)
async def test_every_kind_of_json_answer_ends_with_a_newline(hub_server):
    server = await hub_server(publish_rate=1, publish_burst=1)
    token = server.token("alice")
    answers = {
        "publish 202 (answer)": await server.publish({"type": 5, "data": "hi"}),
        "publish 429 (fail_retry)": await server.publish({"type": 5}),
        "publish 401 (fail)": await server.publish({"type": 5}, token="nope"),
        "healthz": await server.fetch("/healthz"),
        "readyz": await server.fetch("/readyz"),
        "types": await server.fetch("/types"),
        "ticket 201": await server.fetch(
            "/tickets", "POST", b"", {"Authorization": f"Bearer {token}"}
        ),
        "404 (unknown path)": await server.fetch("/nowhere"),
        "405 (write_error)": await server.fetch("/healthz", "DELETE"),
        "static 404": await server.fetch("/static/no-such-file.js"),
    }
    for what, response in answers.items():
        assert response.code != 599, what
        value = assert_json_line(response)
        assert isinstance(value, dict), (what, value)
    assert answers["publish 202 (answer)"].code == 202
    assert answers["publish 429 (fail_retry)"].code == 429
    assert answers["405 (write_error)"].code == 405
    # a stream's refusal too, read byte for byte
    refused = await http_request(server.port, "GET", "/events", {})
    assert refused.status == 401 and refused.body.endswith(b"}\n"), refused.body


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
@pytest.mark.gen_test(timeout=15)
async def test_head_answers_as_get_without_the_body_on_the_public_port(hub_server, path):
    server = await hub_server()
    for stopping in (False, True):
        server.hub.stopping = stopping  # /readyz: 200, then 503 (/healthz: 200 both times)
        get = await server.fetch(path)
        head = await server.fetch(path, "HEAD")
        assert head.code == get.code, (head.code, get.code)
        assert head.body == b""
        for name in ("Content-Type", "Cache-Control", "Content-Length"):
            assert head.headers.get(name) == get.headers.get(name), name
        if get.code == 503:
            assert head.headers.get("Retry-After") == get.headers.get("Retry-After")
    assert (await server.fetch("/readyz", "HEAD")).code == 503
    server.hub.stopping = False


@pytest.mark.gen_test(timeout=15)
async def test_head_answers_on_the_metrics_port_too(hub_server):
    server = await hub_server()
    sock, port = tornado.testing.bind_unused_port()
    metrics = tornado.httpserver.HTTPServer(build_metrics_app(server.hub))
    metrics.add_sockets([sock])
    try:
        for path in ("/healthz", "/readyz"):
            url = f"http://127.0.0.1:{port}{path}"
            get = await server.client.fetch(url, raise_error=False)
            head = await server.client.fetch(url, method="HEAD", raise_error=False)
            assert (head.code, get.code) == (200, 200)
            assert head.body == b""
            assert head.headers["Content-Length"] == str(len(get.body))
            assert head.headers["Content-Type"] == get.headers["Content-Type"]
    finally:
        metrics.stop()
        await metrics.close_all_connections()


@pytest.mark.gen_test(timeout=15)
async def test_static_errors_are_json_and_say_no_more_than_the_status(hub_server, tmp_path):
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / "sub").mkdir()
    server = await hub_server(static_dir=str(tmp_path))
    missing = await server.fetch("/static/missing.js")
    assert missing.code == 404
    assert assert_json_line(missing) == {"error": "no such file: /static/missing.js"}
    directory = await server.fetch("/static/sub")
    assert directory.code == 403
    assert assert_json_line(directory) == {"error": "forbidden"}  # not Tornado's absolute path
    assert str(tmp_path) not in directory.body.decode()
    posted = await server.fetch("/static/index.html", "POST", b"")
    assert posted.code == 405
    assert_json_line(posted)
    past = await server.fetch("/static/index.html", headers={"Range": "bytes=500-"})
    assert past.code == 416
    assert past.headers["Content-Range"] == "bytes */9"
    assert "range not satisfiable" in assert_json_line(past)["error"]
    head = await server.fetch("/static/missing.js", "HEAD")
    assert (head.code, head.body) == (404, b"")
    assert head.headers["Content-Type"] == "application/json"
    # what works still works
    page = await server.fetch("/")
    assert page.code == 200 and page.body == b"<p>hi</p>"
    partial = await server.fetch("/static/index.html", headers={"Range": "bytes=0-1"})
    assert (partial.code, partial.body) == (206, b"<p")
