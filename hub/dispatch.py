"""The dispatch table: everything the hub knows about an event type, in one entry.

An entry (`Kind`) has the type's number, its name, its route function, whether its events
may name topics (`topics`), and, optionally, a per-stream filter built from the stream's query
(the `log` type's `level` and `service`). A route function looks at one event and says who
receives it; it runs once, at publish time, on the node that took the publish, and the route
then travels with the event.

Topics a publisher names (`"topics": [...]` or `"topic"` in the event, read as `event.topics`)
reach a type's route function only if its entry says `topics=True`; for any other type they are
refused (422) before it runs. The route function decides how they combine with its own route:
a `payment` goes to its user, the `payments` topic and the named topics; a `broadcast` goes to
the named topics instead of everyone. `login`, `logout` and `log` take none: their audience is
their meaning.

Adding a type is one route function and one entry in DEFAULT_TYPES. Nothing else in the hub,
in hub.js or in the demo page names a type: they learn the table from `GET /types`.
(The numbers stay plain ints rather than an IntEnum: an enum would be a second place to edit
for every new type, and a hub built with an extra type in a test could not extend it.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from hub.message import Event, Rejected, Route
from hub.query import QueryError
from hub.topics import Grants

__all__ = [
    "DEFAULT_TYPES",
    "LOG_LEVELS",
    "MEMBERSHIP_PREFIX",
    "EventFilter",
    "Kind",
    "Route",
    "TypeTable",
    "filter_log",
    "membership_topic",
    "outside_grants",
]


RouteFunction = Callable[[Event], Route]
EventFilter = Callable[[Event], bool]
# Builds a stream's filter for one type from the stream's query (name -> values), or None
# when the query asks for no filtering; raises QueryError for a bad value.
FilterFactory = Callable[[Mapping[str, Sequence[str]]], EventFilter | None]


@dataclass(frozen=True, slots=True)
class Kind:
    number: int
    name: str
    route: RouteFunction
    filter: FilterFactory | None = None
    filter_params: tuple[str, ...] = ()  # the query parameters `filter` reads, for /types
    # Published by the hub itself (join/leave): a publish naming the type is refused.
    internal: bool = False
    # Its events may name topics (event.topics); its route function says where they go.
    topics: bool = False


def _user(event: Event) -> str:
    if event.user is None:
        raise Rejected(f"{event.name} events need a user")
    return event.user


_PRESENCE = ("presence",)
_PAYMENTS = ("payments",)
_LOGS = ("logs",)
_EVERYONE = Route(everyone=True)


def route_login(event: Event) -> Route:
    return Route((_user(event),), _PRESENCE)


def _and_named(own: tuple[str, ...], event: Event) -> tuple[str, ...]:
    """The type's own topics, then those the publisher named, each once (an event queued
    twice in one channel would reach its readers twice)."""
    named = event.topics
    if not named:
        return own
    return own + tuple(topic for topic in named if topic not in own)


def route_payment(event: Event) -> Route:
    return Route((_user(event),), _and_named(_PAYMENTS, event))


def route_logout(event: Event) -> Route:
    user = _user(event)
    data = event.data
    if data is not None and not isinstance(data, dict):
        # Anything else would end every session of the user by accident.
        raise Rejected("logout data must be an object (or absent)")
    session = data.get("session") if data is not None else None
    if session is not None and not isinstance(session, str):
        raise Rejected("logout data.session must be a string")
    return Route((user,), _PRESENCE, False, (user, session))


def route_log(event: Event) -> Route:
    return Route((), _LOGS)


def route_broadcast(event: Event) -> Route:
    """Everyone, or only the subscribers of the topics the publisher named."""
    return Route(topics=event.topics) if event.topics else _EVERYONE


def outside_grants(route: Route, grants: Grants) -> str | None:
    """What of the route a publisher limited to `grants` (its publish_topics claim) may not
    reach, or None: such a publisher reaches the subscribers of its topics and no one else
    (not everyone, not a user's own streams, not a topic the type adds by itself)."""
    if route.everyone:
        return "the event would reach everyone"
    if route.users:
        return "the event would reach a user's own streams"
    if not route.topics:
        return "the event names no topic"
    for topic in route.topics:
        if topic not in grants:
            return f'topic "{topic}" is not allowed by the token\'s publish_topics'
    return None


# Where the join and leave events of a topic go: `presence:<topic>`, a topic of its own, so
# that only the streams that ask for them (and whose token grants that topic) receive them.
MEMBERSHIP_PREFIX = "presence:"


def membership_topic(topic: str) -> str:
    """The topic that carries the join and leave events of `topic`."""
    return MEMBERSHIP_PREFIX + topic


def route_membership(event: Event) -> Route:
    """`join` and `leave` (published by the hub itself, hub.joins): the subscribers of the
    membership topic (membership_topic) of the one topic the event is about, `data.topic`."""
    data = event.data
    topic = data.get("topic") if type(data) is dict else None
    if type(topic) is not str:
        raise Rejected(f"{event.name} events name their topic in data.topic")
    return Route(topics=(membership_topic(topic),))


LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def filter_log(query: Mapping[str, Sequence[str]]) -> EventFilter | None:
    """`?level=warning` (minimum level) and `?service=api` (repeatable) for `log` events."""
    levels = query.get("level") or ()
    named = query.get("service") or ()
    if len(named) > 64 or any(len(name) > 128 for name in named):
        raise QueryError("at most 64 service names of at most 128 characters")
    services = frozenset(named) or None
    min_level = 0
    if levels:
        name = levels[-1].lower()
        if name not in LOG_LEVELS:
            raise QueryError(f"unknown level {levels[-1][:32]!r}", levels=list(LOG_LEVELS))
        min_level = LOG_LEVELS[name]
    if min_level == 0 and services is None:
        return None

    def accepts(event: Event) -> bool:
        # What a publisher sent, read once per stream: only a short string is a level or a
        # service (str() of a large value would cost per stream; a dict in a set raises).
        # `data` is read once: in the history it is decoded on demand (hub.message).
        data = event.data
        if type(data) is not dict:
            data = {}
        name = data.get("level", "info")
        level = LOG_LEVELS.get(name.lower(), 0) if type(name) is str and len(name) <= 8 else 0
        if level < min_level:
            return False
        service = data.get("service")
        return services is None or (type(service) is str and service in services)

    return accepts


class TypeTable:
    """The types a hub knows, by number and by name."""

    def __init__(self, kinds: Iterable[Kind]) -> None:
        self.kinds: dict[int, Kind] = {}
        self._by_key: dict[object, Kind] = {}
        for kind in kinds:
            if kind.number in self.kinds or kind.name in self._by_key:
                raise ValueError(f"type {kind.number} / {kind.name!r} is in the table twice")
            self.kinds[kind.number] = kind
            self._by_key[kind.number] = self._by_key[kind.name] = kind
        self.filtered = tuple(k for k in self.kinds.values() if k.filter is not None)
        self.filter_params = tuple(dict.fromkeys(p for k in self.filtered for p in k.filter_params))

    def with_kind(self, kind: Kind) -> TypeTable:
        """A copy of the table with one more type."""
        return TypeTable([*self.kinds.values(), kind])

    def lookup(self, type_: object) -> Kind:
        """The entry for a type given as number or name; Rejected if there is none."""
        kind = self._by_key.get(type_) if type(type_) is int or type(type_) is str else None
        if kind is None:
            shown = repr(type_) if type(type_) in (int, str, bool, float) else type(type_).__name__
            raise Rejected(f"unknown event type {shown[:64]}")
        return kind

    def describe(self) -> list[dict[str, object]]:
        """The table as `GET /types` and the answers to an unknown type list it."""
        return [
            {
                "type": k.number,
                "name": k.name,
                "filters": list(k.filter_params),
                "topics": k.topics,
                "internal": k.internal,
            }
            for k in self.kinds.values()
        ]

    def stream_filters(self, query: Mapping[str, Sequence[str]]) -> dict[int, EventFilter]:
        """The filters a stream's query asks for, by type number (QueryError if bad)."""
        filters = {}
        for kind in self.filtered:
            assert kind.filter is not None
            accepts = kind.filter(query)
            if accepts is not None:
                filters[kind.number] = accepts
        return filters

    def __iter__(self) -> Iterator[Kind]:
        return iter(self.kinds.values())

    def __len__(self) -> int:
        return len(self.kinds)


DEFAULT_TYPES = TypeTable(
    [
        Kind(0x01, "login", route_login),
        Kind(0x02, "payment", route_payment, topics=True),
        Kind(0x03, "logout", route_logout),
        Kind(0x04, "log", route_log, filter_log, ("level", "service")),
        Kind(0x05, "broadcast", route_broadcast, topics=True),
        # The hub's own (--join-leave, hub.joins), numbered apart from publishers' additions.
        Kind(0x10, "join", route_membership, internal=True),
        Kind(0x11, "leave", route_membership, internal=True),
    ]
)
