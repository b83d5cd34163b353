"""GET /presence with the memory broker, over real sockets: what it answers (users online or
not, their streams, sessions and since; a topic's streams, users and members a page at a
time), who may ask what (a publisher token, limited by publish_topics to its topics; the
internal port without a token; never a subscriber), every refusal; the hub.client calls; and
the query's parser against any input (hypothesis)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlencode

import pytest
import tornado.httpserver
import tornado.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse import wait_for

from hub.client import AsyncPublisher, HubError, Publisher
from hub.presence import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_USER_LENGTH,
    MAX_USERS,
    NOT_FOR_SUBSCRIBERS,
    PARAMETERS,
    TopicQuery,
    UsersQuery,
    parse_query,
)
from hub.query import QueryError
from hub.topics import topic_error


def query(params: Any) -> str:
    return "/presence?" + urlencode(params, doseq=True)


async def ask(server, params: Any, token: str | None = None) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = await server.fetch(query(params), headers=headers)
    return response.code, json.loads(response.body)


async def presence(server, params: Any, token: str | None = None) -> Any:
    code, body = await ask(server, params, token or server.publisher_token())
    assert code == 200, (code, body)
    return body


def offline() -> dict[str, Any]:
    return {"online": False, "streams": 0, "sessions": 0, "since": None}


# -- users ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_a_user_is_offline_then_online_with_streams_sessions_and_since(hub_server):
    server = await hub_server()
    assert await presence(server, {"user": "alice"}) == {"users": {"alice": offline()}}
    before = int(time.time() * 1000)
    first = await server.stream("alice", sid="s1")
    await server.stream("alice", sid="s1")  # a second tab of the same session
    await server.stream("alice", sid="s2")
    anonymous = await server.stream("alice")  # no sid: a session of its own
    await server.stream("bob")
    after = int(time.time() * 1000)
    body = await presence(server, {"user": ["alice", "bob", "carol"]})
    alice = body["users"]["alice"]
    assert alice["online"] is True and alice["streams"] == 4 and alice["sessions"] == 3
    assert before <= alice["since"] <= after
    assert body["users"]["bob"]["streams"] == 1 and body["users"]["bob"]["sessions"] == 1
    assert body["users"]["carol"] == offline()
    assert list(body["users"]) == ["alice", "bob", "carol"]  # in the order asked

    await anonymous.aclose()

    async def alice_has(streams: int, sessions: int) -> bool:
        found = (await presence(server, {"user": "alice"}))["users"]["alice"]
        return found["streams"] == streams and found["sessions"] == sessions

    assert await wait_for(lambda: alice_has(3, 2), 5)
    await first.aclose()
    assert await wait_for(lambda: alice_has(2, 2), 5)  # s1 still has its other tab
    since = (await presence(server, {"user": "alice"}))["users"]["alice"]["since"]
    assert since >= alice["since"]  # the oldest stream left: since moves on


@pytest.mark.gen_test(timeout=15)
async def test_a_user_asked_twice_is_answered_once_and_every_stream_gone_is_offline(hub_server):
    server = await hub_server()
    stream = await server.stream("alice")
    body = await presence(server, [("user", "alice"), ("user", "alice")])
    assert list(body["users"]) == ["alice"] and body["users"]["alice"]["streams"] == 1
    await stream.aclose()

    async def gone() -> bool:
        return (await presence(server, {"user": "alice"}))["users"]["alice"] == offline()

    assert await wait_for(gone, 5)


# -- topics ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_topic_answers_its_streams_users_and_members_a_page_at_a_time(hub_server):
    server = await hub_server()
    names = ["dora", "alice", "carol", "bob", "erin"]
    for name in names:
        await server.stream(name, ["org:42"])
    await server.stream("alice", ["org:42", "other"])  # alice twice: 6 streams, 5 users
    await server.stream("zed", ["other"])
    whole = await presence(server, {"topic": "org:42"})
    assert whole == {
        "topic": "org:42",
        "streams": 6,
        "users": 5,
        "members": sorted(names),
        "next": None,
    }
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"topic": "org:42", "limit": 2}
        if after is not None:
            params["after"] = after
        page = await presence(server, params)
        assert page["streams"] == 6 and page["users"] == 5  # totals on every page
        pages.append(page["members"])
        after = page["next"]
        if after is None:
            break
        assert after == page["members"][-1]
    assert pages == [["alice", "bob"], ["carol", "dora"], ["erin"]]
    # a cursor between names, or past them all
    assert (await presence(server, {"topic": "org:42", "after": "b"}))["members"][0] == "bob"
    last = await presence(server, {"topic": "org:42", "after": "zzz"})
    assert last["members"] == [] and last["next"] is None and last["users"] == 5
    # exactly as many as the limit: no next page
    exact = await presence(server, {"topic": "org:42", "limit": 5})
    assert len(exact["members"]) == 5 and exact["next"] is None
    empty = await presence(server, {"topic": "nobody:here"})
    assert empty == {"topic": "nobody:here", "streams": 0, "users": 0, "members": [], "next": None}


# -- who may ask ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_every_refusal_says_why(hub_server):
    server = await hub_server()
    await server.stream("alice", ["org:42"])
    subscriber = server.token("alice", topics=["*"])
    limited = server.token("svc", publish=True, publish_topics=["org:42:*", "merchant:7"])

    async def refused(params: Any, token: str | None, status: int) -> str:
        code, body = await ask(server, params, token)
        assert code == status, (params, code, body)
        assert isinstance(body["error"], str)
        return str(body["error"])

    # no token, a bad one, an expired one: 401, as everywhere
    await refused({"user": "alice"}, None, 401)
    await refused({"user": "alice"}, "not.a.token", 401)
    await refused({"user": "alice"}, server.token("svc", publish=True, exp_in=-60), 401)
    # a subscriber learns nothing, whatever it asks
    assert await refused({"user": "alice"}, subscriber, 403) == NOT_FOR_SUBSCRIBERS
    assert await refused({"topic": "org:42"}, subscriber, 403) == NOT_FOR_SUBSCRIBERS
    # a publisher limited by publish_topics: its topics only, never users
    assert "publish_topics" in await refused({"user": "alice"}, limited, 403)
    assert "org:42" in await refused({"topic": "org:42"}, limited, 403)  # not org:42:*
    assert (await presence(server, {"topic": "org:42:7"}, limited))["streams"] == 0
    assert (await presence(server, {"topic": "merchant:7"}, limited))["topic"] == "merchant:7"
    # malformed queries: 400 before anything is looked up
    publisher = server.publisher_token()
    assert "topic name" in await refused({"topic": "a b"}, publisher, 400)
    assert "topic name" in await refused({"topic": "x" * 129}, publisher, 400)
    too_many = [("user", f"u{i}") for i in range(MAX_USERS + 1)]
    assert f"at most {MAX_USERS}" in await refused(too_many, publisher, 400)
    code, body = await ask(server, {"user": "alice", "topics": "org:42"}, publisher)
    assert code == 400 and body["unknown"] == ["topics"] and "presence reads" in body["error"]
    assert "not both" in await refused({"user": "a", "topic": "org:42"}, publisher, 400)
    await refused({}, publisher, 400)
    await refused([("topic", "a"), ("topic", "b")], publisher, 400)
    await refused({"topic": "a", "limit": "0"}, publisher, 400)
    await refused({"topic": "a", "limit": str(MAX_LIMIT + 1)}, publisher, 400)
    await refused({"topic": "a", "limit": "ten"}, publisher, 400)
    await refused({"user": "a", "limit": "10"}, publisher, 400)
    await refused({"user": ""}, publisher, 400)
    await refused({"user": "x" * (MAX_USER_LENGTH + 1)}, publisher, 400)
    # the token in the query, as /events takes it
    code, _ = await ask(server, {"user": "alice", "token": publisher})
    assert code == 200


@pytest.mark.gen_test(timeout=15)
async def test_the_internal_port_answers_without_a_token(hub_server):
    from handlers.app import build_internal_app

    server = await hub_server()
    await server.stream("alice", ["org:42"], sid="s1")
    sock, port = tornado.testing.bind_unused_port()
    internal = tornado.httpserver.HTTPServer(build_internal_app(server.hub))
    internal.add_sockets([sock])
    try:
        url = f"http://127.0.0.1:{port}"
        response = await server.client.fetch(url + query({"user": "alice"}), raise_error=False)
        assert response.code == 200, response.body
        assert json.loads(response.body)["users"]["alice"]["sessions"] == 1
        response = await server.client.fetch(url + query({"topic": "org:42"}), raise_error=False)
        assert json.loads(response.body)["members"] == ["alice"]
        response = await server.client.fetch(url + query({"topic": "a b"}), raise_error=False)
        assert response.code == 400
    finally:
        internal.stop()
        await internal.close_all_connections()


# -- hub.client -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_the_clients_ask_presence_and_raise_the_hubs_refusals(hub_server):
    server = await hub_server()
    await server.stream("alice", ["org:42"], sid="s1")
    await server.stream("bob", ["org:42"])
    async with AsyncPublisher(server.url, server.publisher_token()) as client:
        users = await client.presence(users=["alice", "carol"])
        assert users["users"]["alice"]["online"] and not users["users"]["carol"]["online"]
        page = await client.presence(topic="org:42", limit=1)
        assert page["members"] == ["alice"] and page["next"] == "alice"
        rest = await client.presence(topic="org:42", limit=1, after=page["next"])
        assert rest["members"] == ["bob"] and rest["next"] is None
        with pytest.raises(HubError) as refused:
            await client.presence(topic="a b")
        assert refused.value.status == 400
        with pytest.raises(TypeError):
            await client.presence(users="alice")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await client.presence(users=["alice"], topic="org:42")
    async with AsyncPublisher(server.url, server.token("alice")) as subscriber:
        with pytest.raises(HubError) as refused:
            await subscriber.presence(users=["bob"])
        assert refused.value.status == 403

    def blocking() -> tuple[Any, Any]:
        with Publisher(server.url, server.publisher_token()) as client:
            return client.presence(users=["bob"]), client.presence(topic="org:42", after="alice")

    users, page = await asyncio.get_running_loop().run_in_executor(None, blocking)
    assert users["users"]["bob"]["streams"] == 1
    assert page["members"] == ["bob"]


# -- the parser, against any input ----------------------------------------------------------

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
names = st.sampled_from(sorted(PARAMETERS)) | st.text(max_size=8)
values = st.text(max_size=20) | st.text(min_size=120, max_size=300) | st.sampled_from(["1", "1000"])
queries = st.dictionaries(names, st.lists(values, min_size=1, max_size=4), max_size=5) | st.builds(
    lambda n: {"user": [f"u{i}" for i in range(n)]}, st.integers(0, 2 * MAX_USERS)
)


@FAST
@given(queries)
def test_any_query_parses_within_its_rules_or_is_refused_as_query_error(args):
    try:
        parsed = parse_query(args)
    except QueryError as exc:
        assert exc.message and len(exc.message) < 600
        return
    assert set(args) <= PARAMETERS
    if isinstance(parsed, UsersQuery):
        assert "topic" not in args and "limit" not in args and "after" not in args
        assert 0 < len(parsed.users) <= MAX_USERS
        assert list(parsed.users) == list(dict.fromkeys(args["user"]))
        assert all(0 < len(u) <= MAX_USER_LENGTH for u in parsed.users)
    else:
        assert isinstance(parsed, TopicQuery) and "user" not in args
        assert args["topic"] == [parsed.topic] and topic_error(parsed.topic) is None
        assert 1 <= parsed.limit <= MAX_LIMIT
        assert parsed.limit == (int(args["limit"][0]) if "limit" in args else DEFAULT_LIMIT)
        assert parsed.after == (args["after"][0] if "after" in args else None)


topic_names = st.text(alphabet="abcxyz0189_-.:/@~", min_size=1, max_size=40)
user_names = st.text(min_size=1, max_size=40)


@FAST
@given(
    st.lists(user_names, min_size=1, max_size=MAX_USERS) | st.none(),
    topic_names,
    st.integers(1, MAX_LIMIT) | st.none(),
    user_names | st.none(),
    st.text(max_size=30) | st.none(),
)
def test_every_well_formed_query_parses_to_what_it_asks(users, topic, limit, after, token):
    extra = {} if token is None else {"token": [token]}
    if users is not None:
        assert parse_query({"user": users, **extra}) == UsersQuery(tuple(dict.fromkeys(users)))
        return
    args: dict[str, list[str]] = {"topic": [topic], **extra}
    if limit is not None:
        args["limit"] = [str(limit)]
    if after is not None:
        args["after"] = [after]
    expected = TopicQuery(topic, DEFAULT_LIMIT if limit is None else limit, after)
    assert parse_query(args) == expected
