"""The listen backlog the hub asks for (handlers.app.LISTEN_BACKLOG, 4,096) is capped by the
kernel at net.core.somaxconn: the hub says so at start, in one WARNING line with what to set,
when /proc/sys/net/core/somaxconn is below it, and says nothing where /proc cannot be read.
The start-up checks run real hub processes whose `SOMAXCONN` path points at a file of the
test's (the kernel's own value cannot be lowered here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser_support import free_port, wait_until
from test_workers import free_ports, redis_url, start_workers, stop  # noqa: F401 (a fixture)

from bench.flood import healthz
from handlers.app import LISTEN_BACKLOG, backlog_warning, read_somaxconn

SECRET = "backlog-tests-secret-0123456789-abcdefghij"
# A hub whose somaxconn file is the first argument; the rest are the hub's.
RUN = (
    "import pathlib, sys\n"
    "import handlers.app as app\n"
    "app.SOMAXCONN = pathlib.Path(sys.argv[1])\n"
    "app.main(sys.argv[2:])\n"
)
SAYS = "net.core.somaxconn = 128"


def test_the_warning_is_for_a_somaxconn_below_the_backlog_and_says_what_to_set():
    line = backlog_warning(4096, 128)
    assert line is not None
    assert SAYS in line and "below the 4096 the hub asks for" in line
    assert "sysctl -w net.core.somaxconn=4096" in line
    assert "net.ipv4.tcp_max_syn_backlog" in line and "1 s" in line
    assert backlog_warning(4096, 4095) is not None
    assert backlog_warning(4096, 4096) is None
    assert backlog_warning(4096, 65535) is None
    assert backlog_warning(4096, None) is None  # /proc unreadable: nothing said


def test_somaxconn_is_read_from_its_file_or_unknown(tmp_path):
    (tmp_path / "somaxconn").write_text("128\n")
    assert read_somaxconn(tmp_path / "somaxconn") == 128
    assert read_somaxconn(tmp_path / "absent") is None
    (tmp_path / "garbage").write_text("many\n")
    assert read_somaxconn(tmp_path / "garbage") is None
    real = Path("/proc/sys/net/core/somaxconn")
    if os.access(real, os.R_OK):
        assert read_somaxconn(real) == int(real.read_text())


def start(somaxconn: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(somaxconn), *args],
        env={"HUB_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"} if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_until_healthy(somaxconn: Path) -> str:
    """A hub started, healthy, stopped: its whole output."""
    port = free_port()
    proc = start(somaxconn, "--port", str(port))
    try:
        wait_until(lambda: proc.poll() is not None or healthz(port), 15, "hub healthy")
        assert proc.poll() is None, proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out
    return out


@pytest.mark.parametrize(
    ("content", "warned"),
    [("128\n", True), (f"{LISTEN_BACKLOG}\n", False), ("65535\n", False), (None, False)],
)
def test_the_hub_warns_at_start_once_when_somaxconn_caps_its_backlog(tmp_path, content, warned):
    somaxconn = tmp_path / "somaxconn"
    if content is not None:  # None: no such file, as where /proc cannot be read
        somaxconn.write_text(content)
    out = run_until_healthy(somaxconn)
    lines = [line for line in out.splitlines() if "somaxconn" in line]
    if warned:
        assert len(lines) == 1, out
        assert " WARNING " in lines[0] and SAYS in lines[0], lines
        assert "sysctl -w net.core.somaxconn=4096" in lines[0]
    else:
        assert lines == [], out


def test_with_workers_the_warning_is_one_line_for_the_hub(tmp_path, redis_url):  # noqa: F811
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("128\n")
    env = {"HUB_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}

    def start_with(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return start(somaxconn, *args, env=env)

    proc, _ = start_workers(start_with, redis_url, metrics=free_ports(2), env=env)
    out = stop(proc)
    lines = [line for line in out.splitlines() if SAYS in line]
    assert len(lines) == 1 and "worker 0" in lines[0], out
