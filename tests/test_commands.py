"""`hub token`, `hub publish` and `hub outbox`, as a user runs them: real processes, a real hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jwt
import pytest
from browser_support import free_port, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from test_process import SECRET, healthy, open_stream, read_until, start_hub  # noqa: F401
from test_startup import keys  # noqa: F401 (a fixture)

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
    limited = run(
        "token", "--sub", "o42", "--publish", "--publish-topics", "org:42:*", HUB_JWT_SECRET=SECRET
    )  # fmt: skip
    claims = jwt.decode(limited.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["publish_topics"] == ["org:42:*"] and claims["publish"] is True


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["token", "--sub", "a"], {}, "HUB_JWT_SECRET"),
        (["token", "--sub", "a"], {"HUB_JWT_SECRET": "short"}, "32+ bytes"),
        (["token", "--sub", "a", "--ttl", "0"], {"HUB_JWT_SECRET": SECRET}, "--ttl"),
        (["token", "--sub", "a", "--algorithm", "RS256"], {}, "--private-key"),
        (["token", "--sub", "a", "--topics", "org 42"], {"HUB_JWT_SECRET": SECRET}, "--topics"),
        (["token", "--sub", "a", "--publish-topics", "x"], {"HUB_JWT_SECRET": SECRET}, "--publish"),
        (["publish", "{not json"], {"HUB_TOKEN": "x"}, "not JSON"),
        (["publish"], {}, "--token"),
        (["outbox", "init"], {}, "give the source URL"),
        (["outbox", "init", "postgres://x@h/d?table=a;b"], {}, "table must be a plain name"),
        (["outbox", "init", "postgres://x@h/d?batch=0"], {}, "batch must be positive"),
        (["outbox", "init", "postgres:///d"], {}, "names no host"),
        (["outbox", "drop", "postgres://x@h/d"], {}, "invalid choice"),
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


# Arguments: argparse's own errors are one line too, and --help says what a newcomer needs


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["token"], "hub token: error: the following arguments are required: --sub"),
        (["token", "--sub", "a", "--bogus"], "hub token: error: unknown flag --bogus"),
        (["token", "--sub", "a", "--tll", "5"], "hub token: error: unknown flag --tll: did you"),
        (["token", "--sub", "a", "--ttl", "x"], "hub token: error: --ttl: invalid float value"),
        (["token", "--sub", "a", "--jwt-algorithm", "none"], "invalid choice: 'none'"),
        (["token", "--sub"], "hub token: error: --sub: expected one argument"),
        (["publish", "--bogus", "{}"], "hub publish: error: unknown flag --bogus"),
        (["publish", "--url"], "hub publish: error: --url: expected one argument"),
    ],
)
def test_command_argument_errors_are_one_line_without_the_usage_block(args, says):
    done = run(*args, stdin="", HUB_JWT_SECRET=SECRET)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_command_help_says_where_publish_goes_and_what_signs_a_token():
    publish = run("publish", "--help", COLUMNS="200")
    assert publish.returncode == 0
    (url,) = [line for line in publish.stdout.splitlines() if line.strip().startswith("--url")]
    assert "$HUB_URL" in url and "http://127.0.0.1:8080" in url
    token = " ".join(run("token", "--help", COLUMNS="200").stdout.split())
    assert "--jwt-algorithm ALGORITHM, --algorithm ALGORITHM" in token
    assert "HUB_JWT_SECRET" in token and "--private-key" in token


# Keys: RS256 and ES256


@pytest.mark.parametrize(("key", "algorithm"), [("rsa", "RS256"), ("ec", "ES256")])
def test_hub_token_signs_with_a_private_key_what_the_hub_with_its_public_half_accepts(
    start_hub,  # noqa: F811
    keys,  # noqa: F811
    key,
    algorithm,
):
    # no algorithm given: the key's kind says it
    done = run("token", "--sub", "alice", "--private-key", keys[key])
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    for flag in ("--jwt-algorithm", "--algorithm"):  # the server's name, and the old one
        same = run("token", "--sub", "alice", flag, algorithm, "--private-key", keys[key])
        assert jwt.get_unverified_header(same.stdout.strip())["alg"] == algorithm, same.stderr
    port = free_port()
    public = ["--jwt-algorithm", algorithm, "--jwt-public-key", keys[f"{key}.pub"]]
    start_hub("--port", str(port), *public, env={})
    wait_until(lambda: healthy(port), what="hub healthy")
    stream = open_stream(port, token)
    try:
        assert read_until(stream, b"\n\n").startswith(b"HTTP/1.1 200 ")
    finally:
        stream.close()


@pytest.fixture(scope="module")
def odd_keys(tmp_path_factory) -> dict[str, str]:
    """Keys the hub takes none of: EC on P-384, Ed25519, and an encrypted RSA key."""
    folder = tmp_path_factory.mktemp("odd-keys")
    made = {
        "p384": (ec.generate_private_key(ec.SECP384R1()), serialization.NoEncryption()),
        "ed25519": (ed25519.Ed25519PrivateKey.generate(), serialization.NoEncryption()),
        "encrypted": (
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            serialization.BestAvailableEncryption(b"pw"),
        ),
    }
    paths = {}
    for name, (key, encryption) in made.items():
        path = folder / f"{name}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        paths[name] = str(path)
    return paths


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--private-key", "rsa.pub"], {}, "--private-key {rsa.pub}: a public key: tokens are"),
        (
            ["--jwt-algorithm", "ES256", "--private-key", "rsa"],
            {},
            "--private-key {rsa}: an RSA key, and --jwt-algorithm ES256 needs an EC key on P-256",
        ),
        (
            ["--algorithm", "RS256", "--private-key", "ec"],
            {},
            "--private-key {ec}: an EC key on P-256, and --algorithm RS256 needs an RSA key",
        ),
        (
            ["--private-key", "rsa"],
            {"HUB_JWT_ALGORITHM": "ES256"},
            "an RSA key, and HUB_JWT_ALGORITHM=ES256 needs an EC key on P-256",
        ),
        (
            ["--jwt-algorithm", "HS256", "--private-key", "rsa"],
            {},
            "--private-key signs RS256 or ES256, and --jwt-algorithm HS256 signs with "
            "HUB_JWT_SECRET",
        ),
        (["--private-key", "p384"], {}, "an EC key on secp384r1: the hub verifies RS256"),
        (["--private-key", "ed25519"], {}, "an Ed25519 key: the hub verifies RS256"),
        (["--private-key", "encrypted"], {}, "encrypted: give an unencrypted PEM"),
        (["--private-key", "/nonexistent.pem"], {}, "cannot read it (No such file"),
        (["--jwt-algorithm", "ES256"], {}, "--jwt-algorithm ES256 needs --private-key PEM"),
        ([], {"HUB_JWT_ALGORITHM": "RS256"}, "HUB_JWT_ALGORITHM=RS256 needs --private-key PEM"),
        ([], {"HUB_JWT_ALGORITHM": "none"}, "HUB_JWT_ALGORITHM must be one of HS256"),
    ],
)
def test_hub_token_says_what_is_wrong_with_a_key_in_one_line(keys, odd_keys, args, env, says):  # noqa: F811
    files = {**keys, **odd_keys}
    args = [files.get(arg, arg) for arg in args]
    done = run("token", "--sub", "a", *args, **env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and "generator object" not in done.stderr
    assert done.stderr.startswith("hub token: error: ")
    for name, path in files.items():
        says = says.replace(f"{{{name}}}", path)
    assert says in done.stderr, done.stderr


def test_hub_outbox_init_print_shows_the_sql_without_a_connection():
    done = run("outbox", "init", "--print", "postgres://nobody@192.0.2.1:1/x?table=app.notes")
    assert done.returncode == 0, done.stderr
    assert 'CREATE TABLE IF NOT EXISTS "app"."notes" (' in done.stdout
    assert 'CREATE TABLE IF NOT EXISTS "app"."notes_dead" (' in done.stdout
    assert "pg_notify('app.notes', '')" in done.stdout
    assert 'AFTER INSERT ON "app"."notes" FOR EACH STATEMENT' in done.stdout


def test_hub_outbox_init_against_a_server_that_does_not_answer_is_one_line_without_the_password():
    port = free_port()
    done = run("outbox", "init", f"postgres://app:s3cret@127.0.0.1:{port}/shop")
    assert done.returncode == 2
    assert done.stderr.startswith("hub outbox: error: postgres://app:***@127.0.0.1:"), done.stderr
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
