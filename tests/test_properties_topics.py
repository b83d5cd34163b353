"""The parsers of topic names, grants and an event's named topics, held by hypothesis to
plain reference definitions: what is a name, what a grant of names and `name*` patterns
allows, and that a publish body's `topics`/`topic` is either refused with Rejected or gives
names only, each once, in order."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from hub.decode import build_event
from hub.message import Rejected
from hub.query import QueryError, parse_topics
from hub.topics import MAX_EVENT_TOPICS, MAX_GRANTS, GrantError, Grants, topic_error

PROPERTY = settings(max_examples=400, deadline=None)
ALPHABET = set(string.ascii_letters + string.digits + "_-.:/@~")
names = st.text(alphabet=sorted(ALPHABET), min_size=1, max_size=12)
anything = st.text(max_size=20) | names
patterns = st.lists(names | names.map(lambda n: n + "*") | st.just("*"), max_size=12)


def is_name(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 128 and all(c in ALPHABET for c in value)


def granted(items: list[str], topic: str) -> bool:
    return any(
        topic.startswith(item[:-1]) if item.endswith("*") else topic == item for item in items
    )


@PROPERTY
@given(st.one_of(anything, st.text(alphabet=sorted(ALPHABET), min_size=120, max_size=140)))
def test_a_name_is_what_the_alphabet_and_length_say(value):
    assert (topic_error(value) is None) == is_name(value)


@PROPERTY
@given(patterns, st.lists(names | anything, max_size=8))
def test_a_grant_allows_exactly_the_names_and_prefixes_it_lists(items, topics):
    grants = Grants.parse(items)
    for topic in topics:
        assert (topic in grants) == granted(items, topic), (items, topic)
    assert Grants.parse(list(grants.source)) == grants  # what a ticket stores reads back


@PROPERTY
@given(st.lists(anything | st.integers() | st.none(), max_size=6))
def test_a_claim_that_is_not_names_and_patterns_is_refused(items):
    valid = all(
        isinstance(i, str) and (is_name(i) or (i.endswith("*") and (i == "*" or is_name(i[:-1]))))
        for i in items
    )
    try:
        Grants.parse(items)
    except GrantError:
        assert not valid
    else:
        assert valid


def test_a_claim_of_more_than_the_most_grants_is_refused():
    Grants.parse([f"t{i}" for i in range(MAX_GRANTS)])
    try:
        Grants.parse([f"t{i}" for i in range(MAX_GRANTS + 1)])
    except GrantError as exc:
        assert str(MAX_GRANTS) in str(exc)
    else:
        raise AssertionError("accepted")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | anything | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(anything, inner, max_size=3),
    max_leaves=20,
)


@PROPERTY
@given(
    st.sampled_from(["broadcast", "payment", "login", "log"]),
    st.dictionaries(
        st.sampled_from(["topics", "topic"]), json_values | st.lists(names, max_size=20)
    ),
)
def test_an_events_named_topics_are_refused_or_names_each_once(name, fields):
    obj = {"type": name, "user": "u1", **fields}
    try:
        event = build_event(obj, 0, 0)
    except Rejected:
        return
    named = fields.get("topics", [fields["topic"]] if "topic" in fields else [])
    assert name in ("broadcast", "payment") or not named
    assert len(fields) < 2 and len(named) <= MAX_EVENT_TOPICS
    assert all(is_name(t) for t in named)
    assert event.topics == tuple(dict.fromkeys(named))
    route = event.route
    assert route is not None
    assert len(set(route.topics)) == len(route.topics)
    if name == "broadcast":
        assert route.everyone == (not named) and route.topics == event.topics


@PROPERTY
@given(st.lists(st.text(max_size=30) | names, max_size=6))
def test_the_streams_topic_query_gives_names_or_a_query_error(args):
    try:
        topics = parse_topics(args)
    except QueryError:
        return
    assert all(is_name(t) for t in topics)
    assert len(set(topics)) == len(topics)
