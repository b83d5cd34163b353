"""Topic names and the grants that name them.

A topic name is 1 to MAX_TOPIC_LENGTH characters of the alphabet below, checked once where it
enters (a publish, a stream's query, a token's claim): letters, digits and `_ - . : / @ ~`,
enough for `org:42`, `merchant/7/orders` or `user@example.com`, and nothing a URL query, an SSE
field or a log line would need to escape. `*` is never part of a name: in a grant it is the
pattern's wildcard.

A grant (`Grants`, from a token's `topics` or `publish_topics` claim) lists exact names and
prefix patterns: `org:42:*` grants every topic that begins with `org:42:`, and `*` alone grants
every topic (Mercure's topic selectors, reduced to the case that is cheap to check). Checking a
topic costs a set lookup per distinct pattern length (at most MAX_TOPIC_LENGTH + 1 of them),
whatever the number of patterns: a stream asking for 64 topics against a token of thousands of
patterns stays cheap (bench: `python -m bench.grants`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "MAX_EVENT_TOPICS",
    "MAX_GRANTS",
    "MAX_TOPIC_LENGTH",
    "TOPIC_ALPHABET",
    "GrantError",
    "Grants",
    "topic_error",
]

MAX_TOPIC_LENGTH = 128
MAX_EVENT_TOPICS = 16  # topics one published event may name
MAX_GRANTS = 1024  # names and patterns one claim may list
TOPIC_ALPHABET = "letters, digits and _ - . : / @ ~"
_NAME = re.compile(r"[A-Za-z0-9_.:/@~-]{1,128}")
assert MAX_TOPIC_LENGTH == 128  # (the regex's bound)


def topic_error(name: object) -> str | None:
    """Why `name` is not a topic name, or None if it is one."""
    if type(name) is not str:
        return "a topic name must be a string"
    if _NAME.fullmatch(name) is None:
        if not name:
            return "a topic name must not be empty"
        if len(name) > MAX_TOPIC_LENGTH:
            return f"a topic name is at most {MAX_TOPIC_LENGTH} characters"
        return f"a topic name is made of {TOPIC_ALPHABET}"
    return None


class GrantError(ValueError):
    """A claim that is not a list of topic names and patterns; the message says why."""


class Grants:
    """The topics a claim grants: exact names, and prefixes (a pattern's part before its `*`).
    `everything` when `*` alone is listed."""

    __slots__ = ("everything", "exact", "lengths", "prefixes", "source")

    def __init__(self, exact: frozenset[str], prefixes: frozenset[str]) -> None:
        self.exact = exact
        self.prefixes = prefixes
        self.everything = "" in prefixes
        self.lengths = tuple(sorted({len(p) for p in prefixes}))
        self.source = tuple(sorted(exact)) + tuple(sorted(p + "*" for p in prefixes))

    @classmethod
    def parse(cls, claim: object) -> Grants:
        """The grants of a claim's value: a list of names and patterns (GrantError if not)."""
        if type(claim) is not list:
            raise GrantError("must be a list of topic names and patterns")
        if len(claim) > MAX_GRANTS:
            raise GrantError(f"lists at most {MAX_GRANTS} names and patterns")
        exact: set[str] = set()
        prefixes: set[str] = set()
        for item in claim:
            if type(item) is not str:
                raise GrantError("must be a list of strings")
            if item.endswith("*"):
                prefix = item[:-1]
                if prefix and topic_error(prefix) is not None:
                    raise GrantError(
                        f"pattern {item[: MAX_TOPIC_LENGTH + 1]!r}: a pattern is a topic name's "
                        "beginning then one `*`, at the end"
                    )
                prefixes.add(prefix)
            else:
                error = topic_error(item)
                if error is not None:
                    raise GrantError(f"{item[: MAX_TOPIC_LENGTH + 1]!r}: {error}")
                exact.add(item)
        return cls(frozenset(exact), frozenset(prefixes))

    @classmethod
    def of(cls, items: Iterable[str]) -> Grants:
        return cls.parse(list(items))

    def __contains__(self, topic: str) -> bool:
        if self.everything or topic in self.exact:
            return True
        prefixes = self.prefixes
        for length in self.lengths:
            if length > len(topic):
                return False
            if topic[:length] in prefixes:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grants) and self.source == other.source

    def __hash__(self) -> int:
        return hash(self.source)

    def __repr__(self) -> str:
        return f"Grants({list(self.source)!r})"


NO_GRANTS = Grants(frozenset(), frozenset())
