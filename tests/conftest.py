"""Fixtures for the HTTP-level tests: real hubs on loopback sockets, real tokens.

`hub_server` is a factory: `server = await hub_server(history=5, ...)` builds the app from a
Config (the overrides are Config fields), serves it with a real HTTPServer on 127.0.0.1 and an
unused port, and returns a HubServer with helpers to make tokens, open SSE streams and
publish. Everything a test opened is closed at teardown, streams first, then the servers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
from prometheus_client.parser import text_string_to_metric_families
from sse import SSEClient, SSEEvent, http_request

SECRET = "test-secret-".ljust(64, "x")  # 64 bytes: enough for HS512 too
OTHER_SECRET = "another-secret-".ljust(40, "y")
ALGORITHM = "HS256"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class HubServer:
    """One running hub and what a test does with it."""

    def __init__(self, app: Any, server: Any, port: int) -> None:
        self.app = app
        self.hub = app.settings["hub"]
        self.config = self.hub.config
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.streams: list[SSEClient] = []
        self.direct: Any = None  # the DirectStreams its accept loop hands connections to
        self._client: tornado.httpclient.AsyncHTTPClient | None = None

    # -- tokens ---------------------------------------------------------------------------

    @staticmethod
    def sign(claims: Mapping[str, Any], secret: str = SECRET, algorithm: str = ALGORITHM) -> str:
        return jwt.encode(dict(claims), secret, algorithm=algorithm)

    @staticmethod
    def unsigned(claims: Mapping[str, Any]) -> str:
        """A token with header `alg: none` and an empty signature, built by hand."""
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(dict(claims)).encode())
        return f"{header}.{payload}."

    @staticmethod
    def claims(
        sub: str | None = "u1",
        topics: Iterable[str] | None = None,
        sid: str | None = None,
        exp_in: float | None = 300,
        **extra: Any,
    ) -> dict[str, Any]:
        claims: dict[str, Any] = dict(extra)
        if sub is not None:
            claims["sub"] = sub
        if exp_in is not None:
            claims["exp"] = int(time.time() + exp_in)
        if topics is not None:
            claims["topics"] = list(topics)
        if sid is not None:
            claims["sid"] = sid
        return claims

    def token(
        self,
        sub: str | None = "u1",
        topics: Iterable[str] | None = None,
        sid: str | None = None,
        exp_in: float | None = 300,
        secret: str = SECRET,
        **extra: Any,
    ) -> str:
        return self.sign(self.claims(sub, topics, sid, exp_in, **extra), secret)

    def publisher_token(self, **extra: Any) -> str:
        return self.token(sub="svc", publish=True, **extra)

    # -- streams --------------------------------------------------------------------------

    async def stream(
        self,
        sub: str = "u1",
        topics: Iterable[str] = (),
        sid: str | None = None,
        *,
        claim_topics: Iterable[str] | None = None,
        token: str | None = None,
        transport: str = "header",
        last_event_id: str | None = None,
        query: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        ready: bool = True,
        timeout: float = 5.0,
    ) -> SSEClient:
        """Open GET /events. The token (made for `sub`, allowing `claim_topics`, by default
        exactly `topics`) goes by `transport`: header, query or cookie (or none). With
        `ready`, a 200 stream is returned only after its opening bytes (retry and comment)
        have arrived, which the hub writes after registering the stream's head."""
        topics = list(topics)
        if token is None:
            allowed = topics if claim_topics is None else list(claim_topics)
            token = self.token(sub, topics=allowed or None, sid=sid)
        params: list[tuple[str, str]] = [("topic", t) for t in topics]
        params.extend(query.items() if isinstance(query, Mapping) else query)
        hdrs: dict[str, str] = dict(headers or {})
        if transport == "header":
            hdrs["Authorization"] = f"Bearer {token}"
        elif transport == "query":
            params.append(("token", token))
        elif transport == "cookie":
            hdrs["Cookie"] = f"hub_token={token}"
        elif transport != "none":
            raise ValueError(transport)
        if last_event_id is not None:
            hdrs["Last-Event-ID"] = last_event_id
        path = "/events" + ("?" + urlencode(params) if params else "")
        client = await SSEClient.connect(self.port, path, hdrs, timeout=timeout)
        self.streams.append(client)
        if ready and client.status == 200:
            opened = await client.wait_until(lambda: client.comments, timeout)
            assert opened, f"stream sent no opening comment: {bytes(client.raw)!r}"
        return client

    # -- plain requests -------------------------------------------------------------------

    @property
    def client(self) -> tornado.httpclient.AsyncHTTPClient:
        if self._client is None:
            self._client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        return self._client

    async def fetch(
        self,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tornado.httpclient.HTTPResponse:
        return await self.client.fetch(
            self.url + path,
            method=method,
            body=body,
            headers=dict(headers or {}),
            raise_error=False,
            request_timeout=10,
            follow_redirects=False,
            allow_nonstandard_methods=True,
        )

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """/metrics as Prometheus reads it: (sample name, sorted labels) -> value."""
        response = await self.fetch("/metrics")
        assert response.code == 200
        samples = {}
        for family in text_string_to_metric_families(response.body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def get_json(self, path: str) -> Any:
        response = await self.fetch(path)
        assert response.code == 200, (response.code, response.body)
        return json.loads(response.body)

    async def publish(
        self,
        body: Any,
        content_type: str | None = "application/json",
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tornado.httpclient.HTTPResponse:
        """POST /publish. `body` bytes go as they are; anything else is JSON-encoded."""
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        hdrs = {"Authorization": f"Bearer {token or self.publisher_token()}"}
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        return await self.fetch("/publish", "POST", body, hdrs)

    async def publish_ok(self, body: Any, content_type: str = "application/json") -> list[str]:
        """Publish and insist on 202; the ids."""
        response = await self.publish(body, content_type)
        assert response.code == 202, (response.code, response.body)
        ids = json.loads(response.body)["ids"]
        assert isinstance(ids, list)
        return ids

    async def marker(self, label: str) -> str:
        """Broadcast a marker event (reaches every stream); its id."""
        (event_id,) = await self.publish_ok({"type": "broadcast", "data": {"marker": label}})
        return event_id

    @staticmethod
    def is_marker(label: str):
        def check(event: SSEEvent) -> bool:
            if event.event != "broadcast":
                return False
            data = event.json().get("data")
            return isinstance(data, dict) and data.get("marker") == label

        return check

    async def before_marker(self, client: SSEClient, label: str, timeout: float = 10.0):
        """Broadcast a marker, then the events `client` gets before it."""
        await self.marker(label)
        return await client.events_until(self.is_marker(label), timeout)

    async def raw(self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""):
        """A request written byte for byte (for what an HTTP client would not send)."""
        return await http_request(self.port, method, path, headers, body)


@pytest.fixture(autouse=True, scope="module")
def _no_implicit_event_loop() -> Iterator[None]:
    """pytest-tornado's io_loop keeps the thread's current asyncio loop to restore it after the
    test. In a process where no loop was ever set, asking for it creates one that nobody closes,
    and a later test fails on its ResourceWarning. With "none" set first, nothing is created."""
    asyncio.set_event_loop(None)
    yield


@pytest.fixture
def hub_server(io_loop):
    """Factory for running hubs; see the module docstring."""
    from handlers.app import build_app
    from handlers.server import accept_within
    from handlers.stream_direct import DirectStreams, defer_accept
    from hub.config import Config

    servers: list[HubServer] = []

    async def start(types: Any = None, **overrides: Any) -> HubServer:
        """`types`: a hub.dispatch.TypeTable instead of the default table."""
        # demo mode refuses a configured key: it makes up its own
        config = Config(**({} if overrides.get("demo") else {"jwt_secret": SECRET}), **overrides)
        app = build_app(config) if types is None else build_app(config, types=types)
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        # accepted as the hub accepts (handlers.app.serve): a plain GET /events is opened
        # straight from its socket (handlers.stream_direct), anything else is Tornado's
        direct = DirectStreams(
            app.settings["hub"],
            app.settings["verifier"],
            server,
            app.settings["access_success_level"],
            app.trusted_proxies,
        )
        defer_accept(sock, config.header_timeout)
        accept_within(server, [sock], 1 << 30, lambda: 0, take=direct)
        hub_server = HubServer(app, server, port)
        hub_server.direct = direct
        servers.append(hub_server)
        return hub_server

    yield start

    async def stop_all() -> None:
        for hub_server in servers:
            for client in hub_server.streams:
                await client.aclose()
            hub_server.server.stop()
            await hub_server.hub.stop()
            await hub_server.server.close_all_connections()
            if hub_server._client is not None:
                hub_server._client.close()

    io_loop.run_sync(stop_all, timeout=15)


@pytest.fixture
def app():
    """A default hub app, for pytest-tornado's own `http_server` / `http_client` fixtures."""
    from handlers.app import build_app
    from hub.config import Config

    return build_app(Config(jwt_secret=SECRET))


@pytest.fixture(scope="module")
def browser() -> Any:
    """A headless system Chromium shared by a browser test module's tests."""
    from browser_support import chromium

    with chromium() as b:
        yield b


@pytest.fixture
def context(browser: Any) -> Any:
    """A fresh browser context (its own storage, locks and channels) for one test, with the
    browser tests' default timeout (a module may override it, with another viewport, say)."""
    ctx = browser.new_context()
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()
