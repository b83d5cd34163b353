"""Starting the hub: `make run PORT=...`, every start-up error in one line, `hub --help` and
the README's Configuration table saying the same, and --trusted-proxies, on real processes."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from browser_support import free_port, wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_process import HUB, SECRET, healthy, start_hub  # noqa: F401 (start_hub: a fixture)
from tornado.httputil import HTTPHeaders

from handlers.server import MAX_FORWARDED_HOPS, client_address
from hub.config import HELP, Config

ROOT = Path(__file__).resolve().parent.parent


# make run


@pytest.mark.parametrize(
    ("args", "env", "port"),
    [
        ([], {}, "8080"),
        (["PORT=9000"], {}, "9000"),
        ([], {"HUB_PORT": "9001"}, "9001"),
        (["PORT=9002"], {"HUB_PORT": "9001"}, "9002"),
    ],
)
def test_make_run_listens_on_port_or_hub_port_else_8080(args, env, port):
    clean = {k: v for k, v in os.environ.items() if k not in ("PORT", "HUB_PORT")}
    out = subprocess.run(
        ["make", "-n", "run", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (command,) = [line for line in out.splitlines() if "/hub " in line]
    assert command.endswith(f"/hub --host 127.0.0.1 --port {port} --demo")


# Start-up errors: one line, no traceback, a non-zero exit


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def one_line_error(start_hub, *args: str) -> tuple[int, str]:  # noqa: F811
    proc = start_hub(*args)
    out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hub: error: "), out
    assert out.rstrip().splitlines()[-1] == errors[0], out
    return proc.returncode, errors[0]


def test_a_busy_port_is_one_line_and_exit_1(start_hub, busy_port):  # noqa: F811
    code, line = one_line_error(start_hub, "--port", str(busy_port))
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{busy_port} (--port): Address already in use" in line


@pytest.mark.parametrize("flag", ["--internal-port", "--metrics-port"])
def test_a_busy_internal_or_metrics_port_is_one_line_and_exit_1(start_hub, busy_port, flag):  # noqa: F811
    code, line = one_line_error(start_hub, "--port", str(free_port()), flag, str(busy_port))
    assert code == 1
    assert f"127.0.0.1:{busy_port} ({flag}): Address already in use" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--log-level", "loud"],
            "--log-level must be one of debug, info, warning, error, critical",
        ),
        (["--loop", "trio"], "--loop must be asyncio or uvloop"),
        (["--port", "99999"], "--port must be 0 to 65535, not 99999"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--jwt-algorithm", "none"], "--jwt-algorithm must be one of HS256, HS384, HS512"),
        (
            ["--jwt-algorithm", "RS256", "--jwt-public-key", "/nonexistent/key.pem"],
            "--jwt-public-key /nonexistent/key.pem: cannot read it (No such file or directory)",
        ),
        (
            ["--jwt-algorithm", "ES256", "--jwt-public-key", __file__],
            "not a PEM public key for ES256",
        ),
        (["--static-dir", "/nonexistent/static"], "--static-dir /nonexistent/static: no such"),
        (["--static-dir", __file__], "not a directory"),
        (["--broker", "redis://localhost:sixthousand/0"], "is not a Redis URL: Port could not"),
        (["--broker", "postgres://db"], "--broker must be memory or a Redis URL"),
        (["--broker", "postgres://me:pw@db/x"], "not 'postgres://***@db/x'"),  # no password
        (
            ["--broker", "redis+sentinel://:pw@127.0.0.1:26379"],
            "'redis+sentinel://:***@127.0.0.1:26379' is not a Sentinel URL",
        ),
        (["--trusted-proxies", "10.0.0.0/8,proxy.lan"], "'proxy.lan' is not an IP address or"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(start_hub, args, says):  # noqa: F811
    code, line = one_line_error(start_hub, "--port", str(free_port()), *args)
    assert code == 2
    assert says in line


def test_a_bad_value_in_a_variable_is_one_line_too(start_hub):  # noqa: F811
    proc = start_hub(env={"HUB_JWT_SECRET": SECRET, "HUB_LOG_LEVEL": "verbose"})
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "Traceback" not in out
    assert out.strip() == (
        "hub: error: --log-level must be one of debug, info, warning, error, critical, "
        "not 'verbose'"
    )


# hub --help and the README's Configuration table


@pytest.fixture(scope="module")
def help_text() -> str:
    out = subprocess.run(
        [*HUB, "--help"], capture_output=True, text=True, check=True, timeout=20
    ).stdout
    return " ".join(out.split())  # argparse wraps lines


SETTINGS = [f for f in dataclasses.fields(Config)]
FLAGGED = [f for f in SETTINGS if f.name != "jwt_secret"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def readme_defaults() -> dict[str, str]:
    """The Configuration table: {flag or variable: default cell}, a row of two flags
    (`--host`, `--port` | 127.0.0.1, 8080) giving each its own."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(",")] if len(names) > 1 else [cells[1]]
        assert len(names) == len(defaults), line
        for name, default in zip(names, defaults, strict=True):
            assert name not in rows, f"{name} is in the table twice"
            rows[name] = default
    return rows


def as_value(text: str) -> object:
    """A default as the README writes it ("64 MiB", "none", "off", "0.005") as a value."""
    units = {"KiB": 1024, "MiB": 1024 * 1024}
    if text in ("none", "off"):
        return {"none": None, "off": False}[text]
    number, _, unit = text.partition(" ")
    if unit in units:
        return int(number) * units[unit]
    try:
        return float(number)
    except ValueError:
        return text


def test_every_setting_has_help_that_says_its_variable_and_default(help_text):
    assert set(HELP) == {f.name for f in SETTINGS}
    for field in FLAGGED:
        var = "HUB_" + field.name.upper()
        shown = re.search(
            rf"{flag(field.name)}(?: [A-Z_]+)? .+? \(\${var}; default: ([^)]*)\)", help_text
        )
        assert shown, f"{flag(field.name)} has no help with its variable and default"
        assert as_value(shown.group(1)) == as_value(str(field.default)) or (
            shown.group(1) == {None: "none", False: "off"}.get(field.default)  # type: ignore[call-overload]
        ), (field.name, shown.group(1))


def test_the_readme_table_lists_every_setting_with_the_default_of_the_code():
    table = readme_defaults()
    names = {("HUB_JWT_SECRET" if f.name == "jwt_secret" else flag(f.name)): f for f in SETTINGS}
    assert set(table) == set(names), (
        f"only in the README: {sorted(set(table) - set(names))}; "
        f"only in the code: {sorted(set(names) - set(table))}"
    )
    for name, field in names.items():
        expected = field.default
        if isinstance(expected, int | float) and not isinstance(expected, bool):
            expected = float(expected)
        assert as_value(table[name]) == expected, (name, table[name], field.default)


# --trusted-proxies


def headers(**values: str) -> HTTPHeaders:
    return HTTPHeaders({name.replace("_", "-"): value for name, value in values.items()})


def test_client_address_believes_only_trusted_peers_and_skips_trusted_hops():
    proxies = Config(trusted_proxies="10.0.0.0/8, 192.0.2.1").trusted_networks()
    forwarded = headers(X_Forwarded_For="198.51.100.9")
    assert client_address("203.0.113.5", forwarded, proxies) == "203.0.113.5"
    assert client_address("192.0.2.1", forwarded, proxies) == "198.51.100.9"
    assert client_address("::ffff:10.1.2.3", forwarded, proxies) == "198.51.100.9"
    # what the client wrote itself is on the left: the nearest untrusted hop is the client
    chain = headers(X_Forwarded_For="1.1.1.1, 198.51.100.9, 10.0.0.7")
    assert client_address("10.0.0.2", chain, proxies) == "198.51.100.9"
    assert client_address("10.0.0.2", headers(X_Real_IP="198.51.100.8"), proxies) == "198.51.100.8"
    assert (
        client_address("10.0.0.2", headers(X_Forwarded_For="evil, 10.0.0.9"), proxies) == "10.0.0.9"
    )
    assert client_address("10.0.0.2", headers(X_Real_IP="not an address"), proxies) == "10.0.0.2"
    assert client_address("10.0.0.2", headers(), proxies) == "10.0.0.2"


def test_only_the_nearest_forwarded_hops_are_read():
    # A client can write thousands of trusted addresses left of its own: they cost nothing
    # past MAX_FORWARDED_HOPS (the 17th hop from the right is never parsed, let alone believed).
    proxies = Config(trusted_proxies="10.0.0.0/8").trusted_networks()
    hops = ["198.51.100.1", *["10.0.0.1"] * 6000]
    assert client_address("10.0.0.2", headers(X_Forwarded_For=", ".join(hops)), proxies) == (
        "10.0.0.1"
    )
    near = ["198.51.100.1", *["10.0.0.1"] * (MAX_FORWARDED_HOPS - 1)]
    assert client_address("10.0.0.2", headers(X_Forwarded_For=", ".join(near)), proxies) == (
        "198.51.100.1"
    )


@given(
    peer=st.sampled_from(["10.0.0.2", "203.0.113.5", "::1", "::ffff:10.1.2.3"]),
    forwarded=st.none() | st.text(max_size=300),
    real=st.none() | st.text(max_size=60),
)
def test_any_forwarding_headers_give_an_address_and_never_raise(peer, forwarded, real):
    proxies = Config(trusted_proxies="10.0.0.0/8, ::1").trusted_networks()
    values = {}
    if forwarded is not None and "\n" not in forwarded and "\r" not in forwarded:
        values["X_Forwarded_For"] = forwarded
    if real is not None and "\n" not in real and "\r" not in real:
        values["X_Real_IP"] = real
    found = client_address(peer, headers(**values), proxies)
    ipaddress.ip_address(found)  # always an address: the peer's or one the headers named
    if peer == "203.0.113.5":
        assert found == peer  # an untrusted peer's headers are never read


class Output:
    """A hub process's output, read line by line as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    def line_with(self, text: str) -> str:
        return wait_until(
            lambda: next((line for line in self.lines if text in line), None), what=text
        )


def request(port: int, path: str, *head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        lines = [f"GET {path} HTTP/1.1", "Host: hub", "Connection: close", *head, "", ""]
        sock.sendall("\r\n".join(lines).encode())
        sock.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data or (b"text/event-stream" in data and b"retry:" not in data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [(None, "127.0.0.1"), ("10.0.0.0/8", "127.0.0.1"), ("127.0.0.1", "203.0.113.7")],
)
def test_x_forwarded_for_is_used_in_the_log_only_from_a_trusted_proxy(start_hub, trusted, expected):  # noqa: F811
    port = free_port()
    args = ["--port", str(port), "--log-level", "debug"]
    proc = start_hub(*args, *(["--trusted-proxies", trusted] if trusted else []))
    output = Output(proc)
    wait_until(lambda: healthy(port), what="hub healthy")
    assert b" 404 " in request(port, "/nowhere-1", "X-Forwarded-For: 203.0.113.7")
    assert f"404 GET /nowhere-1 ({expected})" in output.line_with("/nowhere-1")
    assert b" 404 " in request(port, "/nowhere-2", "X-Real-IP: 203.0.113.7")
    assert f"404 GET /nowhere-2 ({expected})" in output.line_with("/nowhere-2")
    # a stream's own log line too
    token = jwt.encode(
        {"sub": "u1", "topics": ["x"], "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    auth = f"Authorization: Bearer {token}"
    assert b"retry:" in request(port, "/events?topic=x", auth, "X-Forwarded-For: 203.0.113.7")
    assert f"({expected}) stream open" in output.line_with("/events?topic=x")
