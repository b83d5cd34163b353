"""The Procfile as a platform runs it: its `web:` line through `sh -c`, with the platform's
PORT and WEB_CONCURRENCY and no broker (the one-process deployment), or with a Redis broker
(WEB_CONCURRENCY workers); and where the platform's WEB_CONCURRENCY is honoured, set aside, or
named in an error."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import free_port, wait_until
from redis_support import PrivateRedis
from test_process import SECRET, get, healthy

from hub.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's, where the console script `hub` is


def web_line() -> str:
    """The command of the Procfile's `web:` process, as the platform hands it to a shell."""
    (line,) = [
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")
    ]
    return line.removeprefix("web:").strip()


def platform_env(**extra: str) -> dict[str, str]:
    """A platform's environment: none of the HUB_* variables a developer may have, the
    secret, and `extra` (PORT, WEB_CONCURRENCY, ...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    for name in ("PORT", "WEB_CONCURRENCY"):
        env.pop(name, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return {**env, "HUB_JWT_SECRET": SECRET, **extra}


class Running:
    """The web line running under `sh -c`, in a process group of its own (as a platform runs
    it); its output read line by line as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["sh", "-c", web_line()],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def line_with(self, text: str) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output}")
            return next((line for line in self.lines if text in line), None)

        return wait_until(found, 20, what=text)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        """SIGTERM, as the platform sends it, and the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return code


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for run in started:
        # the group: a hub that outlived its shell too (a line without `exec`)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=10)
        run._reader.join(timeout=10)
        if run.proc.stdout and not run._reader.is_alive():
            run.proc.stdout.close()


def listening_port(line: str) -> int:
    found = re.search(r"listening on http://0\.0\.0\.0:(\d+)", line)
    assert found, line
    return int(found[1])


@pytest.mark.parametrize("port", ["free", "0"])
def test_the_procfile_starts_one_process_where_a_platform_sets_port_and_web_concurrency(
    running, port
):
    chosen = str(free_port()) if port == "free" else "0"
    run = Running(platform_env(PORT=chosen, WEB_CONCURRENCY="4"))
    running.append(run)
    started = run.line_with("listening on")
    bound = listening_port(started)
    if port == "free":
        assert bound == int(chosen)
    assert "broker memory, 1 worker;" in started
    # said once, at INFO, naming what the platform set and nothing nobody typed
    (note,) = [line for line in run.lines if "WEB_CONCURRENCY" in line]
    assert " INFO " in note and "WEB_CONCURRENCY=4 ignored: one process" in note
    assert "--workers" not in run.output
    status, health = get(f"http://127.0.0.1:{bound}/healthz")
    assert status == 200 and health["pid"] == run.proc.pid  # `exec`: the hub is the process
    assert run.stop() == 0
    assert "Traceback" not in run.output and " ERROR " not in run.output


@pytest.mark.parametrize("port", [None, ""], ids=["unset", "empty"])
def test_the_procfile_listens_on_8080_when_port_is_unset_or_empty(tmp_path: Path, port):
    # A `hub` ahead on PATH that prints its arguments, one a line: the line as the shell
    # expands it, without binding 8080 (which a developer's `make run` may hold).
    shim = tmp_path / "hub"
    shim.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    shim.chmod(0o755)
    env = platform_env(WEB_CONCURRENCY="4")
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    if port is not None:
        env["PORT"] = port
    done = subprocess.run(
        ["sh", "-c", web_line()], env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["--host=0.0.0.0", "--port=8080"]


def test_an_empty_port_given_as_a_flag_is_one_line_saying_so():
    env = platform_env(PORT="")
    done = subprocess.run(
        ["sh", "-c", "exec hub --port=$PORT"], env=env, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("hub: error: --port was given an empty value")


def test_the_procfile_runs_web_concurrency_workers_on_a_redis_broker_and_hides_its_password(
    tmp_path: Path, running
):
    server = PrivateRedis(tmp_path / "redis", appendonly=False, extra_args=["--requirepass", "pw9"])
    server.url = f"redis://:pw9@127.0.0.1:{server.port}/0"
    server.start()
    try:
        port = free_port()
        env = platform_env(PORT=str(port), WEB_CONCURRENCY="2", HUB_BROKER=server.url)
        run = Running(env)
        running.append(run)
        for worker in (0, 1):
            started = run.line_with(f"worker {worker} hub: listening on")
            assert f"broker redis://:***@127.0.0.1:{server.port}/0, 2 workers;" in started
        wait_until(lambda: healthy(port), what="hub healthy")
        assert run.stop() == 0
        # its one warning names the variable the platform set
        assert "WEB_CONCURRENCY=2 without --metrics-port" in run.output
        assert "pw9" not in run.output and "--workers" not in run.output
        assert "Traceback" not in run.output
    finally:
        server.close()


# Where WEB_CONCURRENCY is read, and how it is named


REDIS = {"HUB_BROKER": "redis://127.0.0.1:6379/0"}


def test_web_concurrency_is_set_aside_without_a_redis_broker_and_read_with_one():
    config = parse_config([], {"WEB_CONCURRENCY": "4"})
    assert config.workers == 1
    assert config.notes() == (
        "WEB_CONCURRENCY=4 ignored: one process, as the memory broker needs "
        "(several workers need --broker redis://...)",
    )
    # nonsense it never reads does not stop it; 1 is no news
    assert parse_config([], {"WEB_CONCURRENCY": "lots"}).workers == 1
    assert parse_config([], {"WEB_CONCURRENCY": "1"}).notes() == ()
    assert parse_config([], {"WEB_CONCURRENCY": "4", **REDIS}).workers == 4
    assert parse_config(["--broker", REDIS["HUB_BROKER"]], {"WEB_CONCURRENCY": "3"}).workers == 3
    assert parse_config(["--port", "9000"], {"WEB_CONCURRENCY": "4", **REDIS}).notes() == ()


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        # a count asked of the hub itself still stops it without a Redis broker
        (["--workers", "4"], {}, "--workers 4 needs --broker redis://..."),
        (
            ["--port", "0"],
            {"WEB_CONCURRENCY": "4", **REDIS},
            "WEB_CONCURRENCY=4 asks for 4 workers, which need a fixed --port, not 0",
        ),
        ([], {"WEB_CONCURRENCY": "0", **REDIS}, "WEB_CONCURRENCY must be at least 1, not 0"),
        ([], {"WEB_CONCURRENCY": "x", **REDIS}, "WEB_CONCURRENCY='x' is not a valid value"),
        (
            ["--metrics-port", "65534"],
            {"WEB_CONCURRENCY": "4", **REDIS},
            "--metrics-port must be 1 to 65532 with WEB_CONCURRENCY=4, not 65534",
        ),
    ],
)
def test_an_error_names_what_was_set_never_a_flag_nobody_typed(args, env, says):
    with pytest.raises(ConfigError) as refused:
        parse_config(args, env)
    assert str(refused.value).startswith(says), str(refused.value)
    if "WEB_CONCURRENCY" in says:
        assert "--workers" not in str(refused.value)


def test_the_broker_is_shown_without_its_password():
    shown = {
        "memory": "memory",
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
        "redis://:s3cret@db:6379/1": "redis://:***@db:6379/1",
        "redis://me:s3cret@db:6379/1": "redis://me:***@db:6379/1",
        "redis://db:6379/1?password=s3cret&db=2": "redis://db:6379/1?password=***&db=2",
    }
    for broker, expected in shown.items():
        assert parse_config(["--broker", broker], {"HUB_JWT_SECRET": SECRET}).broker_shown() == (
            expected
        )
