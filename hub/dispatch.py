"""The dispatch table: event type number -> name and route function.

A route function looks at one event and says who receives it. It runs once, at publish time,
on the node that took the publish; the route then travels with the event. Adding a type is
one route function and one entry in TABLE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from hub.message import Event, Rejected

__all__ = ["LOG", "LOGOUT", "TABLE", "Kind", "Route", "known_types", "lookup"]


class Route(NamedTuple):
    """Who receives an event: the streams of these users, the subscribers of these topics,
    or everyone. `ends` names the streams that end once they have the event:
    (user, session), where session None means all of the user's streams."""

    users: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    everyone: bool = False
    ends: tuple[str, str | None] | None = None


RouteFunction = Callable[[Event], Route]


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


def route_payment(event: Event) -> Route:
    return Route((_user(event),), _PAYMENTS)


def route_logout(event: Event) -> Route:
    user = _user(event)
    session = event.data.get("session") if isinstance(event.data, dict) else None
    if session is not None and not isinstance(session, str):
        raise Rejected("logout data.session must be a string")
    return Route((user,), _PRESENCE, False, (user, session))


def route_log(event: Event) -> Route:
    return Route((), _LOGS)


def route_broadcast(event: Event) -> Route:
    return _EVERYONE


@dataclass(frozen=True, slots=True)
class Kind:
    number: int
    name: str
    route: RouteFunction


TABLE: dict[int, Kind] = {
    kind.number: kind
    for kind in (
        Kind(0x01, "login", route_login),
        Kind(0x02, "payment", route_payment),
        Kind(0x03, "logout", route_logout),
        Kind(0x04, "log", route_log),
        Kind(0x05, "broadcast", route_broadcast),
    )
}

_BY_KEY: dict[object, Kind] = {}
for _kind in TABLE.values():
    _BY_KEY[_kind.number] = _BY_KEY[_kind.name] = _kind

LOGOUT = 0x03
LOG = 0x04


def lookup(type_: object) -> Kind:
    """The table entry for a type given as number or name; Rejected if there is none."""
    kind = _BY_KEY.get(type_) if type(type_) is int or type(type_) is str else None
    if kind is None:
        raise Rejected(f"unknown event type {type_!r}")
    return kind


def known_types() -> list[dict[str, object]]:
    return [{"type": k.number, "name": k.name} for k in TABLE.values()]
