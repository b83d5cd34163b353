"""The walk of one published event (python -m bench.walk) runs one way: every call between
two modules goes down the import graph, but for the broker's feed into Hub.deliver (the one
way every event, local or from Redis, reaches the node's streams), and none is between two
modules that import each other."""

from __future__ import annotations

import asyncio

from bench.walk import ALLOWED_UP, Walk, walk


def test_the_walk_of_one_event_runs_down_the_import_graph():
    result = asyncio.run(walk())
    assert result.path[-2:] == ["hub.transport", "hub.flusher"]  # it reached the socket
    assert result.event_path[0] == "handlers.publish"
    assert result.against() == []
    up = [(caller.rpartition(":")[0], callee) for d, caller, callee in result.calls if d == "up"]
    assert set(up) <= ALLOWED_UP


def test_a_call_up_the_graph_or_in_a_circle_is_caught():
    """The check can fail: a call back into a layer already passed, or between two modules
    that import each other, is reported."""
    back = Walk(calls=[("up", "hub.flusher:Flusher.deliver", "hub.core.Hub.deliver")])
    circle = Walk(calls=[("circle", "hub.core:Hub.publish", "hub.metrics.Metrics.count")])
    allowed = Walk(calls=[("up", "hub.broker:MemoryBroker.publish", "hub.core.Hub.deliver")])
    assert back.against() and circle.against() and not allowed.against()
    assert Walk.count(["a", "b", "a", "c"]) == (3, 1, 3)
