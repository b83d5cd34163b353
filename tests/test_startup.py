"""Starting the hub: `make run PORT=...`, every start-up error in one line, `hub --help` and
the README's Configuration table saying what hub.config declares, operator text (numbers,
sizes, booleans) parsed the same from flags, variables and Python, and --trusted-proxies, on
real processes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import math
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from test_process import HUB, SECRET, healthy, start_hub  # noqa: F401 (start_hub: a fixture)
from tornado.httputil import HTTPHeaders

from handlers import app
from handlers.server import MAX_FORWARDED_HOPS, client_address
from hub.config import (
    COMMANDS,
    SETTINGS,
    SIZE_UNITS,
    Config,
    ConfigError,
    Setting,
    help_line,
    parse_bool,
    parse_config,
    shown_size,
    size,
)

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
        (["--port", "http"], "--port 'http' is not a valid value (a whole number)"),
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


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"HUB_LOG_LEVEL": "verbose"},
            "--log-level must be one of debug, info, warning, error, critical, not 'verbose'",
        ),
        # read as false, it would quietly turn off what the operator meant to turn on
        ({"HUB_DEMO": "ture"}, "HUB_DEMO must be true or false (or 1/0, yes/no), not 'ture'"),
        ({"HUB_MAX_BODY": "2 MB"}, "HUB_MAX_BODY='2 MB' is not a valid value (bytes: a whole"),
    ],
)
def test_a_bad_value_in_a_variable_is_one_line_too(start_hub, env, says):  # noqa: F811
    proc = start_hub(env={"HUB_JWT_SECRET": SECRET, **env})
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "Traceback" not in out
    assert out.strip().startswith(f"hub: error: {says}") and "\n" not in out.strip()


def run_hub(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return subprocess.run(
        [*HUB, *args],
        env={**env, "HUB_JWT_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # what argparse refuses itself: one line too, never its usage block
        (["--bogus"], "unknown flag --bogus (see hub --help)"),
        (["--max-bdy=2MiB"], "unknown flag --max-bdy: did you mean --max-body?"),
        (["--work", "2"], "unknown flag --work: did you mean --workers?"),  # no abbreviations
        (["--port"], "--port: expected one argument (see hub --help)"),
        (["--demo=1"], "--demo takes no value, not '1'"),
        (["tokn", "--sub", "a"], "unknown command 'tokn': did you mean hub token?"),
        (["serve"], "unexpected argument 'serve': hub takes flags, or a command first"),
        # the README's "1 MiB" typed as it reads
        (["--max-body", "1", "MiB"], "--max-body 1 MiB: a size is one word, --max-body 1MiB"),
        # a flag's text is read as its variable's: the same message, naming the flag
        (["--port", "http"], "--port 'http' is not a valid value (a whole number)"),
        (["--max-body", "2 MB"], "--max-body '2 MB' is not a valid value (bytes: a whole"),
        (["--port="], "--port was given an empty value (an unset variable, as in --port=$PORT?)"),
    ],
)
def test_a_flag_argparse_cannot_take_is_one_line_and_exit_2_without_the_usage_block(args, says):
    done = run_hub(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"hub: error: {says}"), done.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """PEM files: rsa / ec (P-256) private keys, and rsa.pub / ec.pub their public halves."""
    folder = tmp_path_factory.mktemp("keys")
    made = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
    }
    paths = {}
    for name, key in made.items():
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (folder / f"{name}.pem").write_bytes(private)
        (folder / f"{name}.pub").write_bytes(public)
        paths[name], paths[f"{name}.pub"] = str(folder / f"{name}.pem"), str(folder / f"{name}.pub")
    return paths


@pytest.mark.parametrize(
    ("algorithm", "key", "says"),
    [
        # the process that faces subscribers must not hold the key that mints tokens
        ("RS256", "rsa", "{path}: a PRIVATE key: give the hub only the public half"),
        ("ES256", "ec", "{path}: a PRIVATE key: give the hub only the public half"),
        (
            "ES256",
            "rsa.pub",
            "{path}: an RSA key, and --jwt-algorithm ES256 needs an EC key on P-256; an RSA "
            "key is for RS256",
        ),
        (
            "RS256",
            "ec.pub",
            "{path}: an EC key on P-256, and --jwt-algorithm RS256 needs an RSA key",
        ),
    ],
)
def test_the_hub_refuses_a_private_key_or_one_of_the_other_kind_in_one_line(
    start_hub,  # noqa: F811
    keys,
    algorithm,
    key,
    says,
):
    args = ["--jwt-algorithm", algorithm, "--jwt-public-key", keys[key]]
    code, line = one_line_error(start_hub, "--port", str(free_port()), *args)
    assert code == 2
    assert line.startswith(f"hub: error: --jwt-public-key {says.format(path=keys[key])}"), line
    assert "generator object" not in line


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_the_hub_starts_with_the_public_key_of_its_algorithm(start_hub, keys, algorithm):  # noqa: F811
    port = free_port()
    public = keys["rsa.pub" if algorithm == "RS256" else "ec.pub"]
    start_hub("--port", str(port), "--jwt-algorithm", algorithm, "--jwt-public-key", public, env={})
    wait_until(lambda: healthy(port), what="hub healthy")


def test_hub_version_prints_the_package_version():
    done = run_hub("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"hub {importlib.metadata.version('hub')}\n"
    assert re.fullmatch(r"hub \d+\.\d+\.\d+\n", done.stdout)


def test_the_commands_hub_help_names_are_the_commands_hub_runs():
    assert set(COMMANDS) == set(app.COMMANDS)


# hub --help and the README's Configuration table, from hub.config's declarations


@pytest.fixture(scope="module")
def help_entries() -> list[str]:
    """`hub --help` of a real process, one string per option (argparse puts a long flag's
    help on the next line) and per paragraph of the text around them."""
    out = subprocess.run(
        [*HUB, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
        env={**os.environ, "COLUMNS": "1000"},
    ).stdout
    entries: list[str] = []
    new = True
    for line in out.splitlines():
        if not line.strip():
            new = True
            continue
        option = re.match(r"  -", line) is not None
        after_option = entries and entries[-1].startswith("-") and not line.startswith("    ")
        if new or option or after_option:
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
        new = False
    return entries


FLAGGED = [s for s in SETTINGS if s.flag is not None]


def readme_rows() -> dict[str, tuple[str, str]]:
    """The Configuration table: {flag or variable: (default cell, meaning cell)}, a row of two
    flags (`--host`, `--port` | 127.0.0.1, 8080) giving each its own default."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(",")] if len(names) > 1 else [cells[1]]
        assert len(names) == len(defaults), line
        for name, default in zip(names, defaults, strict=True):
            assert name not in rows, f"{name} is in the table twice"
            rows[name] = (default, cells[2])
    return rows


def test_every_setting_is_a_declared_field_of_config():
    assert [s.name for s in SETTINGS] == list(Config.__dataclass_fields__)
    assert Config() == Config(**{s.name: s.default for s in SETTINGS})  # type: ignore[arg-type]


@pytest.mark.parametrize("setting", FLAGGED, ids=lambda s: s.name)
def test_help_says_each_flag_its_values_variable_and_default(help_entries, setting: Setting):
    (line,) = [line for line in help_entries if re.match(rf"{setting.flag}\b(?!-)", line)]
    assert line.endswith(help_line(setting)), line
    assert f"(${setting.var}" in line and f"default: {setting.shown_default})" in line
    assert setting.bounds in line


def test_help_says_first_what_a_newcomer_needs(help_entries):
    """Before the 40 flags: the key outside demo mode, the commands, --version."""
    before = " ".join(help_entries[: help_entries.index("options:")])
    assert "HUB_JWT_SECRET" in before and "32+ bytes" in before and "--demo" in before
    assert "--jwt-public-key" in before
    for command in ("hub token", "hub publish", "hub --version"):
        assert command in before
    assert any(entry.startswith("--version ") for entry in help_entries)


def test_help_names_the_variable_only_settings_too(help_entries):
    text = " ".join(" ".join(help_entries).split())
    for setting in SETTINGS:
        if setting.flag is None:
            assert f"{setting.var}: {setting.help}" in text


def test_the_readme_table_lists_every_setting_with_the_default_of_the_code():
    table = readme_rows()
    names = {s.label: s for s in SETTINGS}
    assert set(table) == set(names), (
        f"only in the README: {sorted(set(table) - set(names))}; "
        f"only in the code: {sorted(set(names) - set(table))}"
    )
    for name, setting in names.items():
        assert table[name][0] == setting.shown_default, (name, table[name][0])


@pytest.mark.parametrize("unit", ["seconds", "bytes"])
def test_the_readme_and_help_say_the_unit_of_every_duration_and_size(unit):
    table = readme_rows()
    for setting in SETTINGS:
        if setting.unit == unit:
            assert unit in setting.help, setting.name
            assert unit in table[setting.label][1], setting.label


# Each setting's bounds, from its declaration alike from Python, flags and variables


def outside_and_inside(setting: Setting) -> tuple[float, float] | None:
    """A value just outside the setting's bounds and one on them, or None if it has none."""
    if setting.positive:
        return 0, 0.001
    if setting.at_least is not None:
        return setting.at_least - 1, setting.at_least
    return None


BOUNDED = [s for s in SETTINGS if outside_and_inside(s) is not None]


@pytest.mark.parametrize("setting", BOUNDED, ids=lambda s: s.name)
def test_a_value_outside_the_declared_bounds_is_refused_with_them(setting: Setting):
    bounds = outside_and_inside(setting)
    assert bounds is not None
    outside, inside = (setting.kind(v) for v in bounds)
    with pytest.raises(ConfigError) as refused:
        Config(**{setting.name: outside})
    assert str(refused.value).startswith(f"{setting.label} must be {setting.bounds}, not ")
    assert getattr(Config(**{setting.name: inside}), setting.name) == inside
    if setting.at_most is not None:
        with pytest.raises(ConfigError, match=re.escape(f"must be {setting.bounds}, not ")):
            Config(**{setting.name: setting.kind(setting.at_most + 1)})
    says = re.escape(f"{setting.label} must be {setting.bounds}, not ")
    with pytest.raises(ConfigError, match=says):
        parse_config([f"{setting.flag}={outside}"], {})
    with pytest.raises(ConfigError, match=says):
        parse_config([], {setting.var: str(outside)})


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.choices], ids=lambda s: s.name)
def test_a_value_outside_the_declared_choices_is_refused_with_them(setting: Setting):
    says = re.escape(f"{setting.label} must be {setting.bounds}, not 'x'")
    with pytest.raises(ConfigError, match=says):
        Config(**{setting.name: "x"})
    for choice in setting.choices:
        given = choice.upper() if setting.ignore_case else choice
        try:
            assert getattr(parse_config([], {setting.var: given}), setting.name) == given
        except ConfigError as refused:  # another check's: RS256 needs --jwt-public-key
            assert "must be" not in str(refused)


def test_a_value_of_the_wrong_type_from_python_is_refused():
    with pytest.raises(ConfigError, match="--port must be int, not str"):
        Config(port="8080")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--demo must be bool, not int"):
        Config(demo=1)  # type: ignore[arg-type]
    assert Config(ticket_ttl=12).ticket_ttl == 12  # an int is a number of seconds too


# Operator text: booleans, sizes and numbers


# parse_config builds its argparse parser each call: a few ms, far more on a loaded machine
PARSES = settings(deadline=None)


@PARSES
@given(st.text(max_size=12))
def test_an_environment_boolean_is_one_of_six_words_or_refused(text):
    word = text.strip().lower()
    if word in ("true", "1", "yes", "false", "0", "no"):
        assert parse_bool(text) is (word in ("true", "1", "yes"))
    else:
        with pytest.raises(ValueError):
            parse_bool(text)
    try:
        demo = parse_config([], {"HUB_DEMO": text}).demo
    except ConfigError as refused:
        assert str(refused) == f"HUB_DEMO must be true or false (or 1/0, yes/no), not {text!r}"
    else:
        assert demo is (word in ("true", "1", "yes"))  # "" is unset: the default, off


@given(
    word=st.sampled_from(["true", "false", "1", "0", "yes", "no"]),
    upper=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_an_environment_boolean_is_read_in_any_case(word, upper):
    mixed = "".join(c.upper() if up else c for c, up in zip(word, upper, strict=False))
    assert parse_bool(f" {mixed} ") is (word in ("true", "1", "yes"))


@given(
    n=st.integers(-(2**40), 2**40),
    unit=st.sampled_from(sorted(SIZE_UNITS)),
    gap=st.sampled_from(["", " "]),
)
def test_a_size_is_bytes_or_a_whole_number_of_binary_units(n, unit, gap):
    assert size(str(n)) == n
    assert size(f"{n}{gap}{unit}") == n * SIZE_UNITS[unit]
    assert size(f"{n}{gap}{unit.lower()}") == n * SIZE_UNITS[unit]
    assert size(shown_size(n)) == n  # what --help and the README show parses back


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("1MiB", 2**20),
        ("1 MiB", 2**20),
        ("64KiB", 64 * 2**10),
        ("64 kib", 64 * 2**10),
        ("2GiB", 2 * 2**30),
        ("1048576", 2**20),
    ],
)
def test_a_size_from_a_flag_is_the_size_from_its_variable(text, n):
    assert parse_config(["--max-body-memory", "4GiB", "--max-body", text], {}).max_body == n
    assert parse_config(["--max-body-memory=4GiB"], {"HUB_MAX_BODY": text}).max_body == n
    assert parse_config([f"--max-event-bytes={text}"], {}).max_event_bytes == n


@PARSES
@given(
    setting=st.sampled_from([s for s in SETTINGS if s.kind in (int, float)]),
    text=st.text(min_size=1, max_size=12).filter(lambda t: t.strip()),
)
def test_any_text_from_a_flag_does_what_it_does_from_the_variable(setting: Setting, text):
    """Taken alike, or refused alike; the message names the flag, or the variable, as given."""

    def outcome(args: list[str], env: dict[str, str]) -> object:
        try:
            return getattr(parse_config(args, env), setting.name)
        except ConfigError as refused:
            return (
                str(refused)
                .replace(f"{setting.var}={text[:64]!r}", "GIVEN")
                .replace(f"{setting.flag} {text[:64]!r}", "GIVEN")
            )

    by_flag = outcome([f"{setting.flag}={text}"], {})
    by_var = outcome([], {setting.var: text})
    if isinstance(by_flag, float) and math.isnan(by_flag):  # pragma: no cover (refused)
        assert isinstance(by_var, float) and math.isnan(by_var)
    else:
        assert by_flag == by_var


@given(st.text(max_size=16))
def test_any_text_is_a_size_or_a_value_error(text):
    with contextlib.suppress(ValueError):
        assert isinstance(size(text), int)


NUMBERS = [s for s in SETTINGS if s.kind in (int, float)]


def same_outcome(make, name: str, value: object) -> None:
    """`make()` (from operator text) does what Config(name=value) does from Python."""
    try:
        expected: object = getattr(Config(**{name: value}), name)
    except ConfigError as refused:
        expected = str(refused)
    try:
        got: object = getattr(make(), name)
    except ConfigError as refused:
        got = str(refused)
    if isinstance(expected, float) and math.isnan(expected):  # pragma: no cover (refused)
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == expected, (name, value)


@PARSES
@given(data=st.data())
def test_a_number_from_a_flag_or_a_variable_is_the_number_from_python(data):
    setting = data.draw(st.sampled_from(NUMBERS), label="setting")
    if setting.kind is int:
        value: float = data.draw(st.integers(-(2**20), 2**32), label="value")
    else:
        value = data.draw(st.floats(), label="value")
    text = repr(value)
    same_outcome(lambda: parse_config([], {setting.var: text}), setting.name, value)
    same_outcome(lambda: parse_config([f"{setting.flag}={text}"], {}), setting.name, value)
    if setting.unit == "bytes":
        unit = data.draw(st.sampled_from(sorted(SIZE_UNITS)), label="unit")
        scaled = f"{value} {unit}"
        big = value * SIZE_UNITS[unit]
        same_outcome(lambda: parse_config([], {setting.var: scaled}), setting.name, big)


@PARSES
@given(data=st.data())
def test_any_text_in_a_number_variable_is_taken_or_refused_in_one_line(data):
    setting = data.draw(st.sampled_from(NUMBERS), label="setting")
    text = data.draw(st.text(max_size=12), label="text")
    try:
        parse_config([], {setting.var: text})
    except ConfigError as refused:
        assert "\n" not in str(refused) and str(refused).startswith((setting.var, setting.label))


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
