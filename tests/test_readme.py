"""The README's recipes, run as written against real hubs: its shell and Python examples cannot
drift from the code. Each `<!-- readme-test: NAME -->` block runs verbatim; the port is the
reader's `PORT` (and `PORT2`), which the harness sets to a free one, as a reader who moved
`make run` would. Blocks a reader pastes into one terminal are sent, one after the other, to
one shell, so what one leaves behind (background jobs, exported variables) meets the next."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import free_port, wait_until
from redis_support import redis_url  # noqa: F401  (a fixture)
from test_process import healthy

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
FENCED = re.compile(r"^```(sh|python)\n(.*?)^```", re.S | re.M)
# `make run` as a reader types it, but never installing: the suite runs in that venv, and
# whether `make run` installs what it needs is the Makefile's business, not this test's.
MAKE_RUN = "make --no-print-directory -o .venv/bin/.installed-run run"


def blocks() -> dict[str, tuple[str, str]]:
    """name -> (language, code) of every tested block of the README."""
    return {m[1]: (m[2], m[3]) for m in BLOCK.finditer((ROOT / "README.md").read_text())}


class Run:
    """A process in a session of its own (its background jobs too), ended by its group: one
    block run whole (`Run.block`), or a shell the blocks of one terminal are sent to
    (`Run.shell`, then `send`), as a reader pastes them."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin: int | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self.output = b""
        self.sent = 0

    @classmethod
    def block(cls, language: str, code: str, env: dict[str, str]) -> Run:
        argv = ["bash", "-c", code] if language == "sh" else [sys.executable, "-c", code]
        return cls(argv, env)

    @classmethod
    def shell(cls, env: dict[str, str]) -> Run:
        return cls(["bash", "-s"], env, stdin=subprocess.PIPE)

    def send(self, code: str, timeout: float = 30) -> str:
        """Run `code` in the shell (a block, or the harness's own line); wait until the shell
        has done it (the jobs it started may go on) and return what it printed meanwhile."""
        self.sent += 1
        mark = f"--- done {self.sent} ---"
        start = len(self.read())
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{code.rstrip()}\necho '{mark}'\n".encode())
        self.proc.stdin.flush()
        wait_until(
            lambda: mark in self.read() or self.proc.poll() is not None,
            timeout=timeout,
            what=f"the shell ran {code.splitlines()[0][:60]!r}",
        )
        out = self.read()
        assert mark in out, f"the shell exited with {self.proc.returncode}:\n{out}"
        return out[start : out.index(mark)]

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
        # what the session's other processes still hold (a hub shutting down) goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.stop()


def environment(**extra: str) -> dict[str, str]:
    """The test's environment without what would steer the recipes (HUB_*, the ports, the
    Redis URL, the `make test` this may run under), plus `extra`."""
    steering = ("PORT", "PORT2", "REDIS_URL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_") and k not in steering}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def two_free_ports() -> tuple[int, int]:
    first = free_port()
    second = wait_until(lambda: (port := free_port()) != first and port, what="another port")
    return first, second


def refused(port: int) -> bool:
    return not healthy(port)


def demo_token_answers(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/demo/token?user=alice"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200 and "token" in json.loads(resp.read())
    except OSError:
        return False


def _streams(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return int(json.loads(resp.read())["streams"])


def test_the_readme_has_the_blocks_this_test_runs():
    assert set(blocks()) >= {
        "demo-subscribe",
        "demo-publish",
        "keyed",
        "python-subscribe",
        "python-publish",
        "keyed-end",
        "scale-out",
        "scale-out-end",
    }


def test_every_recipe_takes_the_port_from_PORT():
    """No shell or Python example names the port but through `PORT` (8080 where it is
    unset): a reader who moved `make run` moves every recipe with it."""
    readme = (ROOT / "README.md").read_text()
    recipes = FENCED.findall(readme)
    assert len(recipes) >= 10, recipes
    for language, code in recipes:
        # what a comment says (`make run    # the hub on http://127.0.0.1:8080`) runs nothing
        rest = re.sub(r"(^|\s)#.*", "", code.replace("${PORT:-8080}", "PORT"))
        assert "8080" not in rest, f"a {language} recipe hard-codes 8080:\n{code}"


def test_demo_mode_recipes_stream_and_publish_as_written(runs):
    """`make run` on the reader's PORT, then the two demo blocks (each in a terminal of its
    own) on the same PORT."""
    port = free_port()
    env = environment(PORT=str(port))
    hub = Run(["bash", "-c", MAKE_RUN], env)
    runs.append(hub)
    wait_until(lambda: healthy(port) or hub.proc.poll() is not None, 30, "make run listens")
    assert hub.proc.poll() is None, hub.read()
    readme = blocks()
    stream = Run.block(*readme["demo-subscribe"], env)
    runs.append(stream)
    wait_until(lambda: "hub stream open" in stream.read(), what="stream open", timeout=15)
    publish = Run.block(*readme["demo-publish"], env)
    runs.append(publish)
    assert publish.proc.wait(timeout=20) == 0
    assert '"ids"' in publish.read()
    wait_until(lambda: '"amount":42' in stream.read(), what="the event on the stream")
    assert "event: payment" in stream.read()


def test_first_steps_outside_demo_mode_in_one_terminal_then_make_run_again(runs):
    """The keyed block, the Python examples with what it exported, the block that ends it;
    then `make run` in the same shell starts (in demo mode, which refuses a configured key)
    on the port the keyed hub held."""
    port = free_port()
    readme = blocks()
    shell = Run.shell(environment(PORT=str(port)))
    runs.append(shell)
    shell.send(readme["keyed"][1])
    exported = shell.send("for v in HUB_URL TOKEN PUBLISHER_TOKEN; do echo ENV $v=${!v}; done")
    # not anchored at the line's start: the stream's curl writes its progress meter (no
    # terminal here) to the same output, lines without an end
    env = environment(**dict(re.findall(r"ENV (\w+)=(\S+)$", exported, re.M)))
    assert env["HUB_URL"] == f"http://127.0.0.1:{port}"
    assert '"ids"' in shell.read()  # the curl publish
    wait_until(lambda: '"data":"hello"' in shell.read(), what="the broadcast on the stream")
    assert '"amount":7' in shell.read()  # bob's payment, through the payments topic

    follower = Run.block(*readme["python-subscribe"], env)
    runs.append(follower)
    # curl's stream and the Python one
    wait_until(lambda: _streams(port) >= 2 or follower.proc.poll() is not None, what="follower")
    assert follower.proc.poll() is None, follower.read()
    publisher = Run.block(*readme["python-publish"], env)
    runs.append(publisher)
    assert publisher.proc.wait(timeout=20) == 0, publisher.read()
    printed = publisher.read().split("\n")
    payment_id = printed[0].strip()
    wait_until(lambda: f"{payment_id} payment alice" in follower.read(), what="python follower")
    wait_until(lambda: "broadcast None hi" in follower.read(), what="the broadcast")
    follower.stop()

    shell.send(readme["keyed-end"][1])
    shell.send("wait")  # for every job of the shell: the hub and the stream ended
    assert refused(port)
    shell.send(f"{MAKE_RUN} &")
    wait_until(
        lambda: demo_token_answers(port) or "hub: error" in shell.read(),
        30,
        "make run, after the keyed recipe, serves demo tokens",
    )
    assert "hub: error" not in shell.read(), shell.read()


def test_scale_out_two_hubs_on_one_redis_and_two_workers(runs, redis_url):  # noqa: F811
    """The scale-out block on the Redis of the Redis tests, under a prefix of this test's own:
    a stream on each hub, and the publish on the second reaches both, with one id."""
    ports = two_free_ports()
    env = environment(
        PORT=str(ports[0]),
        PORT2=str(ports[1]),
        REDIS_URL=redis_url.url,
        HUB_REDIS_PREFIX=redis_url.prefix,
    )
    readme = blocks()
    shell = Run.shell(env)
    runs.append(shell)
    shell.send(readme["scale-out"][1], timeout=60)

    def received() -> list[str]:
        return re.findall(r"id: (\S+)\nevent: payment\n.*\"amount\":3", shell.read())

    ids = wait_until(lambda: len(received()) >= 2 and received(), what="the event on both streams")
    assert len(ids) == 2 and ids[0] == ids[1], shell.read()
    out = shell.read()
    # the two streams' `id:` lines, and `hub publish` printing it
    assert out.count(ids[0]) == 3, out
    # the start-up lines: the first hub's come from its two workers, each saying which
    for said in ("worker 0 hub: listening on", "worker 1 hub: listening on", "broker redis://"):
        assert said in out, out

    shell.send(readme["scale-out-end"][1])
    shell.send("wait")  # for every job of the shell: the hubs (the workers too) and the streams
    assert "workers stopped" in shell.read()
    assert "Traceback" not in shell.read(), shell.read()
    assert refused(ports[0]) and refused(ports[1])
    assert shell.send('echo "key: ${HUB_JWT_SECRET:-none}"').splitlines()[-1] == "key: none"
