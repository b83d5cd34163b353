"""`hub token` and `hub publish`, as a user runs them: real processes against a real hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jwt
import pytest
from browser_support import free_port, wait_until
from test_process import SECRET, healthy, open_stream, read_until, start_hub  # noqa: F401

HUB = [sys.executable, "-m", "handlers.app"]


def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    full.update(env)
    return subprocess.run(
        [*HUB, *args], input=stdin, env=full, capture_output=True, text=True, timeout=30
    )


def test_hub_token_mints_what_the_hub_accepts_with_the_claims_asked_for():
    done = run(
        "token", "--sub", "alice", "--topics", "payments, presence", "--sid", "s1", "--ttl", "60",
        HUB_JWT_SECRET=SECRET,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["sid"] == "s1"
    assert claims["topics"] == ["payments", "presence"]
    assert 55 <= claims["exp"] - time.time() <= 61 and "publish" not in claims
    publisher = run("token", "--sub", "billing", "--publish", HUB_JWT_SECRET=SECRET)
    assert jwt.decode(publisher.stdout.strip(), SECRET, algorithms=["HS256"])["publish"] is True


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["token", "--sub", "a"], {}, "HUB_JWT_SECRET"),
        (["token", "--sub", "a"], {"HUB_JWT_SECRET": "short"}, "32+ bytes"),
        (["token", "--sub", "a", "--ttl", "0"], {"HUB_JWT_SECRET": SECRET}, "--ttl"),
        (["token", "--sub", "a", "--algorithm", "RS256"], {}, "--private-key"),
        (["publish", "{not json"], {"HUB_TOKEN": "x"}, "not JSON"),
        (["publish"], {}, "--token"),
    ],
)
def test_command_errors_are_one_line_and_no_traceback(args, env, says):
    done = run(*args, stdin="", **env)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_hub_publish_sends_arguments_or_ndjson_and_prints_the_ids(start_hub):  # noqa: F811
    port = free_port()
    start_hub("--port", str(port))
    wait_until(lambda: healthy(port), what="hub healthy")
    url = f"http://127.0.0.1:{port}"
    stream = open_stream(port, jwt.encode({"sub": "u1", "exp": time.time() + 60}, SECRET))
    read_until(stream, b"\n\n")
    token = run("token", "--sub", "billing", "--publish", HUB_JWT_SECRET=SECRET).stdout.strip()
    by_args = run(
        "publish", "--url", url, "--token", token, '{"type": "payment", "user": "u1"}',
        '[{"type": 5, "data": "a"}, {"type": 5, "data": "b"}]',
    )  # fmt: skip
    assert by_args.returncode == 0, by_args.stderr
    ndjson = '{"type": 5, "data": "c"}\n\n{"type": 5, "data": "d"}\n'
    by_stdin = run("publish", "--url", url, stdin=ndjson, HUB_JWT_SECRET=SECRET)
    assert by_stdin.returncode == 0, by_stdin.stderr
    ids = by_args.stdout.split() + by_stdin.stdout.split()
    assert len(ids) == 5
    got = read_until(stream, f"id: {ids[-1]}".encode())
    assert [line[4:] for line in got.decode().splitlines() if line.startswith("id: ")] == ids
    stream.close()
    refused = run("publish", "--url", url, "--token", token, '{"type": "nope"}')
    assert refused.returncode == 2 and "422" in refused.stderr
    assert json.dumps("nope") in refused.stderr or "nope" in refused.stderr
