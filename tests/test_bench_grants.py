"""bench.grants runs (briefly) and its two checks agree on every case it times."""

from __future__ import annotations

import pytest

from bench import grants


def test_the_grants_bench_runs_and_prints_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    grants.main(["--quick"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + len(grants.cases())
    assert all(len(line.split()) >= 4 for line in out[1:])
