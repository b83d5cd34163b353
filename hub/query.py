"""A stream's query, read as hostile input: every rule is checked before any work that grows
with the input (a request with 16,000 comma-separated topics once cost 1.4 s of the event loop
in a quadratic de-duplication before it was refused)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from hub.topics import MAX_TOPIC_LENGTH, topic_error

__all__ = ["MAX_TOPICS", "MAX_TOPIC_LENGTH", "QueryError", "check_names", "parse_topics"]

MAX_TOPICS = 64


class QueryError(Exception):
    """A query value the hub refuses; `extra` goes into the JSON answer."""

    def __init__(self, message: str, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


def parse_topics(args: Sequence[str]) -> tuple[str, ...]:
    """The topics of `?topic=a&topic=b,c`: stripped, empty ones dropped, each once, in order.
    At most MAX_TOPICS names, each a topic name (hub.topics: its alphabet and length)."""
    if len(args) > MAX_TOPICS or sum(arg.count(",") + 1 for arg in args) > 4 * MAX_TOPICS:
        # more names than could ever be allowed, even counting empty ones and repeats
        raise QueryError(f"too many topics: at most {MAX_TOPICS}")
    topics: dict[str, None] = {}  # ordered, O(1) membership
    for arg in args:
        for raw in arg.split(","):
            topic = raw.strip()
            if not topic:
                continue
            error = topic_error(topic)
            if error is not None:
                raise QueryError(f"invalid topic name: {error}", topic=topic[:MAX_TOPIC_LENGTH])
            topics[topic] = None
            if len(topics) > MAX_TOPICS:
                raise QueryError(f"too many topics: at most {MAX_TOPICS}")
    return tuple(topics)


# An unknown parameter's answer names at most this many of them, each cut to this length: a
# query of thousands of made-up names is refused in one pass and answered in a few hundred
# bytes.
MAX_UNKNOWN_SHOWN = 5
MAX_NAME_SHOWN = 64


def check_names(names: Iterable[str], allowed: Collection[str]) -> None:
    """Refuse a query that names a parameter outside `allowed` (QueryError, whose extra keys
    are `unknown`, the first MAX_UNKNOWN_SHOWN such names cut to MAX_NAME_SHOWN characters, and
    `allowed`, sorted). A misspelt parameter (`topics=` for `topic=`) is a 400 that says so,
    not a stream that silently lacks what was asked for. One pass over the names: `allowed`
    is a set (or a short sequence), and nothing is kept per unknown name past the few shown."""
    unknown: list[str] = []
    count = 0
    for name in names:
        if name not in allowed:
            count += 1
            if len(unknown) < MAX_UNKNOWN_SHOWN:
                unknown.append(name[:MAX_NAME_SHOWN])
    if not count:
        return
    shown = ", ".join(f'"{name}"' for name in unknown)
    more = f" and {count - len(unknown)} more" if count > len(unknown) else ""
    known = sorted(allowed)
    plural = "s" if count > 1 else ""
    raise QueryError(
        f"unknown query parameter{plural} {shown}{more}: the stream reads {', '.join(known)}",
        unknown=unknown,
        allowed=known,
    )
