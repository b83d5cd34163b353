"""Who is online: `GET /presence`'s query, its rules, and its answers from this process's
registry (`Presence`, what the memory broker's hub is: one process is the whole hub). With the
Redis broker, hub.redis_presence.RedisPresence adds every other node's share, kept in Redis.

Two questions (README, Presence): of users (`?user=a&user=b`, at most MAX_USERS), each one's
streams, sessions and the opening of its oldest stream; of a topic (`?topic=org:42`), its
streams, its distinct users, and the users themselves, sorted, a page at a time (`?limit=`,
`?after=`). A node's share of either is a small value (`NodeUser`, a user -> streams count),
so that the shares of several nodes merge exactly: sessions are distinct sids across nodes,
not a sum.

Who may ask is the handler's to check with `refusal`: the internal listener anything, a
publisher token anything its `publish_topics` claim allows (topics it grants, never users), a
subscriber token nothing (presence would tell it who else is online).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hub.query import QueryError, check_names
from hub.registry import Registry
from hub.topics import MAX_TOPIC_LENGTH, Grants, topic_error

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_USERS",
    "MAX_USER_LENGTH",
    "NOT_FOR_SUBSCRIBERS",
    "PARAMETERS",
    "NodeUser",
    "Presence",
    "PresenceQuery",
    "PresenceUnavailable",
    "TopicPresence",
    "TopicQuery",
    "UserPresence",
    "UsersQuery",
    "local_topic",
    "local_user",
    "merge_users",
    "parse_query",
    "refusal",
    "topic_page",
]

MAX_USERS = 100  # users one request may ask about
DEFAULT_LIMIT = 100  # members of a topic in one answer, unless ?limit= says
MAX_LIMIT = 1000
MAX_USER_LENGTH = 256  # hub.auth.MAX_SUB_LENGTH: no longer name is ever a stream's user
# `token` is read by the handler (HubHandler.token): a query may carry it as /events' may.
PARAMETERS = frozenset({"user", "topic", "limit", "after", "token"})

NOT_FOR_SUBSCRIBERS = (
    "presence needs a publisher token (publish: true) or the internal port: a subscriber's "
    "token may not learn who else is online"
)


class PresenceUnavailable(Exception):
    """The hub cannot say now (Redis does not answer): ask again shortly."""


# -- the query ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsersQuery:
    users: tuple[str, ...]  # distinct, in the order asked


@dataclass(frozen=True, slots=True)
class TopicQuery:
    topic: str
    limit: int = DEFAULT_LIMIT
    after: str | None = None  # members strictly after this name


PresenceQuery = UsersQuery | TopicQuery


def _user_error(name: str) -> str | None:
    if not 0 < len(name) <= MAX_USER_LENGTH:
        return f"a user name is 1 to {MAX_USER_LENGTH} characters"
    return None


def _one(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = args.get(name, ())
    if len(values) > 1:
        raise QueryError(f"give {name}= at most once")
    return values[0] if values else None


def parse_query(args: Mapping[str, Sequence[str]]) -> PresenceQuery:
    """`GET /presence`'s query (each parameter's values, decoded), or QueryError: a name it
    does not read; both `user` and `topic`, or neither; more than MAX_USERS users, or an
    empty or over-long one; not exactly one topic, or one outside hub.topics' alphabet;
    `limit` (1 to MAX_LIMIT) or `after` more than once, or with `user`. Bounds are checked
    before any work that grows with the query."""
    try:
        check_names(args, PARAMETERS)
    except QueryError as exc:  # its message speaks of streams; the rest holds as it is
        raise QueryError(
            exc.message.replace("the stream reads", "presence reads"), **exc.extra
        ) from None
    users = args.get("user", ())
    topics = args.get("topic", ())
    if users and topics:
        raise QueryError("ask about users (user=) or a topic (topic=), not both")
    if users:
        if len(users) > MAX_USERS:
            raise QueryError(f"too many users: at most {MAX_USERS} in one request")
        if "limit" in args or "after" in args:
            raise QueryError("limit= and after= page a topic's members: not with user=")
        for user in users:
            error = _user_error(user)
            if error is not None:
                raise QueryError(error, user=user[:MAX_USER_LENGTH])
        return UsersQuery(tuple(dict.fromkeys(users)))
    if not topics:
        raise QueryError("ask about users (user=, repeatable) or one topic (topic=)")
    if len(topics) > 1:
        raise QueryError("one topic a request: give topic= once")
    topic = topics[0]
    error = topic_error(topic)
    if error is not None:
        raise QueryError(f"invalid topic name: {error}", topic=topic[:MAX_TOPIC_LENGTH])
    limit = DEFAULT_LIMIT
    raw_limit = _one(args, "limit")
    if raw_limit is not None:
        if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6):
            raise QueryError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise QueryError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    after = _one(args, "after")
    if after is not None:
        error = _user_error(after)
        if error is not None:
            raise QueryError(f"after must be a user name: {error}")
    return TopicQuery(topic, limit, after)


def refusal(query: PresenceQuery, publish_topics: Grants | None) -> str | None:
    """Why a publisher token whose `publish_topics` claim is `publish_topics` (None: it has
    none, and may ask anything) may not ask `query`; None if it may. A token limited to
    topics asks only about the topics it grants: users are everyone's."""
    if publish_topics is None:
        return None
    if isinstance(query, UsersQuery):
        return (
            "this token's publish_topics claim limits it to its topics: presence of users "
            "needs a publisher token without the claim"
        )
    if query.topic not in publish_topics:
        return f'this token\'s publish_topics claim does not grant topic "{query.topic}"'
    return None


# -- the answers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeUser:
    """One node's share of a user: streams, the opening of the oldest (epoch ms), streams
    without a sid (each its own session) and the distinct sids of the rest."""

    streams: int
    since: int
    anonymous: int
    sids: frozenset[str]


@dataclass(frozen=True, slots=True)
class UserPresence:
    streams: int = 0
    sessions: int = 0
    since: int | None = None  # epoch ms of the oldest open stream

    def as_json(self) -> dict[str, Any]:
        return {
            "online": self.streams > 0,
            "streams": self.streams,
            "sessions": self.sessions,
            "since": self.since,
        }


@dataclass(frozen=True, slots=True)
class TopicPresence:
    topic: str
    streams: int
    users: int
    members: tuple[str, ...]  # a page, sorted by code point
    next: str | None  # `after` for the next page; None: this was the last

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "streams": self.streams,
            "users": self.users,
            "members": list(self.members),
            "next": self.next,
        }


def local_user(registry: Registry, user: str) -> NodeUser | None:
    """This node's share of `user` (None: no stream here). O(the user's streams), which
    --max-streams-per-user bounds."""
    streams = registry.by_user.get(user)
    if not streams:
        return None
    sids: set[str] = set()
    anonymous = 0
    since = float("inf")
    for stream in streams:
        if stream.sid is None:
            anonymous += 1
        else:
            sids.add(stream.sid)
        since = min(since, stream.since)
    return NodeUser(len(streams), int(since * 1000), anonymous, frozenset(sids))


def merge_users(shares: Iterable[NodeUser]) -> UserPresence:
    """A user's presence from each node's share."""
    streams = anonymous = 0
    since: int | None = None
    sids: set[str] = set()
    for share in shares:
        streams += share.streams
        anonymous += share.anonymous
        sids |= share.sids
        since = share.since if since is None else min(since, share.since)
    return UserPresence(streams, len(sids) + anonymous, since if streams else None)


def local_topic(registry: Registry, topic: str) -> dict[str, int]:
    """This node's share of a topic: its users, each with their streams of it."""
    counts: dict[str, int] = {}
    for stream in registry.by_topic.get(topic, ()):
        counts[stream.user] = counts.get(stream.user, 0) + 1
    return counts


def topic_page(
    topic: str, counts: Mapping[str, int], limit: int, after: str | None
) -> TopicPresence:
    """The answer for a topic whose users (with their streams of it, all nodes merged) are
    `counts`: totals, and the first `limit` users after `after`. O(n log limit)."""
    names: Iterable[str] = counts if after is None else (u for u in counts if u > after)
    page = heapq.nsmallest(limit + 1, names)
    more = len(page) > limit
    members = tuple(page[:limit])
    return TopicPresence(
        topic, sum(counts.values()), len(counts), members, members[-1] if more else None
    )


class Presence:
    """Presence from this process's registry alone: the memory broker's, where this process
    is the whole hub. Answered at once, from what is open now."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def start(self) -> None:
        """Begin keeping what other nodes need to know (nothing here)."""

    async def close(self) -> None:
        """Stop; what other nodes were told goes (nothing here)."""

    async def users(self, users: Sequence[str]) -> dict[str, UserPresence]:
        registry = self.registry
        return {user: merge_users(_some(local_user(registry, user))) for user in users}

    async def topic(self, topic: str, limit: int, after: str | None) -> TopicPresence:
        return topic_page(topic, local_topic(self.registry, topic), limit, after)


def _some(share: NodeUser | None) -> tuple[NodeUser, ...]:
    return () if share is None else (share,)
