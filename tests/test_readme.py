"""The README's First steps, run as written against real hubs: its shell and Python examples
cannot drift from the code. Each `<!-- readme-test: NAME -->` block runs verbatim, but for the
port (8080 becomes a free one); what a stream prints is checked for the events published."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import free_port, wait_until
from test_process import healthy, start_hub  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)


def blocks() -> dict[str, tuple[str, str]]:
    """name -> (language, code) of every tested block of the README."""
    return {m[1]: (m[2], m[3]) for m in BLOCK.finditer((ROOT / "README.md").read_text())}


class Run:
    """One block running in its own session (its background jobs too), ended by its group."""

    def __init__(self, language: str, code: str, port: int, env: dict[str, str]) -> None:
        code = code.replace("8080", str(port))
        argv = ["bash", "-c", code] if language == "sh" else [sys.executable, "-c", code]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self.output = b""

    def read(self) -> str:
        try:
            chunk = self.proc.stdout.read()  # type: ignore[union-attr]
        except BlockingIOError:
            chunk = None
        if chunk:
            self.output += chunk
        return self.output.decode(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.stop()


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_the_readme_has_the_blocks_this_test_runs():
    assert set(blocks()) >= {
        "demo-subscribe",
        "demo-publish",
        "keyed",
        "python-subscribe",
        "python-publish",
    }


def test_demo_mode_recipes_stream_and_publish_as_written(start_hub, runs):  # noqa: F811
    port = free_port()
    start_hub("--demo", "--port", str(port), env={})
    wait_until(lambda: healthy(port), what="demo hub healthy")
    readme = blocks()
    stream = Run(*readme["demo-subscribe"], port, environment())
    runs.append(stream)
    wait_until(lambda: "hub stream open" in stream.read(), what="stream open", timeout=15)
    publish = Run(*readme["demo-publish"], port, environment())
    runs.append(publish)
    assert publish.proc.wait(timeout=20) == 0
    assert '"ids"' in publish.read()
    wait_until(lambda: '"amount":42' in stream.read(), what="the event on the stream")
    assert "event: payment" in stream.read()


def test_the_keyed_recipe_and_the_python_client_work_as_written(runs):
    port = free_port()
    readme = blocks()
    language, code = readme["keyed"]
    # the block leaves the hub and the stream running; their tokens are needed below
    keyed = Run(language, code + "\nenv | grep -E '^(PUBLISHER_)?TOKEN=' | sed 's/^/ENV /'\n",
                port, environment())  # fmt: skip
    runs.append(keyed)
    # both lines: `env` prints them in any order, and a read may end between them
    wait_until(
        lambda: all(f"ENV {n}=" in keyed.read() for n in ("TOKEN", "PUBLISHER_TOKEN")),
        what="the block ran",
        timeout=30,
    )
    out = keyed.read()
    assert '"ids"' in out  # the curl publish
    wait_until(lambda: '"data":"hello"' in keyed.read(), what="the broadcast on the stream")
    assert '"amount":7' in keyed.read()  # bob's payment, through the payments topic
    tokens = dict(re.findall(r"^ENV ((?:PUBLISHER_)?TOKEN)=(\S+)$", keyed.read(), re.M))
    env = environment(**tokens)
    follower = Run(*readme["python-subscribe"], port, env)
    runs.append(follower)
    # curl's stream and the Python one
    wait_until(lambda: _streams(port) >= 2 or follower.proc.poll() is not None, what="follower")
    assert follower.proc.poll() is None, follower.read()
    publisher = Run(*readme["python-publish"], port, env)
    runs.append(publisher)
    assert publisher.proc.wait(timeout=20) == 0, publisher.read()
    printed = publisher.read().split("\n")
    payment_id = printed[0].strip()
    wait_until(lambda: f"{payment_id} payment alice" in follower.read(), what="python follower")
    wait_until(lambda: "broadcast None hi" in follower.read(), what="the broadcast")


def _streams(port: int) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return int(json.loads(resp.read())["streams"])
