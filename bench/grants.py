"""What checking a stream's topics against its token's grants costs (issue 19: "a stream
asking for 64 topics against a token of 64 patterns stays cheap: measure it").

`python -m bench.grants` times, per stream open, the check the hub does (hub.topics.Grants:
a set lookup per distinct pattern length) against the plain one (every pattern tried on every
topic), for tokens of 1 to 1,024 patterns, and the parse of the claim itself (paid once per
token: the verifier caches tokens). `--quick` runs each case briefly (the test's run).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from hub.topics import Grants


def _plain(items: list[str], topic: str) -> bool:
    return any(
        topic.startswith(item[:-1]) if item.endswith("*") else topic == item for item in items
    )


def _per_call(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call of `fn`, over about `seconds` (the best of three runs)."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        took = time.perf_counter() - start
        if took >= seconds / 3:
            break
        calls *= 4
    best = took
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def cases() -> list[tuple[str, list[str], list[str]]]:
    """(label, the token's grants, the stream's topics). The topics are granted by the last
    pattern only (or by none): the worst case for the plain check."""
    out = []
    for patterns in (1, 64, 1024):
        grants = [f"org:{i}:team:*" for i in range(patterns - 1)] + ["room:*"]
        granted = [f"room:{i}" for i in range(64)]
        out.append((f"{patterns} patterns, 64 topics granted", grants, granted))
        refused = [f"zone:{i}" for i in range(64)]
        out.append((f"{patterns} patterns, 64 topics refused", grants, refused))
    exact = [f"org:{i}" for i in range(64)]
    out.append(("64 exact names, 64 topics granted", exact, list(exact)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    seconds = 0.02 if args.quick else 0.5
    print(f"{'case':<36} {'hub us/stream':>14} {'plain us/stream':>16} {'parse us/token':>15}")
    for label, items, topics in cases():
        grants = Grants.parse(items)
        assert all((t in grants) == _plain(items, t) for t in topics)
        hub = _per_call(lambda: [t in grants for t in topics], seconds)  # noqa: B023
        plain = _per_call(lambda: [_plain(items, t) for t in topics], seconds)  # noqa: B023
        parse = _per_call(lambda: Grants.parse(items), seconds)  # noqa: B023
        print(f"{label:<36} {hub:>14.1f} {plain:>16.1f} {parse:>15.1f}")


if __name__ == "__main__":
    main()
