"""``python -m bench.flood``: half-open connections at the descriptor limit, loopback only.

A hub process with 256 descriptors and `--header-timeout 1` gets `--connections` (2,000)
connections that never send a byte. Reported: whether and when /healthz answers during the
flood, the hub's CPU over it (an EMFILE spin would be ~100%), its log lines and tracebacks,
and when the last flood connection was closed by the hub. Every process it starts is ended by
its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.churn import REPO, SECRET, free_port


def healthz(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.settimeout(1)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def closed(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below: the hub is stopped

    signal.signal(signal.SIGTERM, on_term)
    port = free_port()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "hub"), "--port", str(port), "--header-timeout", "1"],
        env={**os.environ, "HUB_JWT_SECRET": SECRET},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
        start_new_session=True,
    )
    flood: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while not healthz(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        for _ in range(args.connections):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            flood.append(sock)
        answered_at = None
        while time.monotonic() - t0 < 60:
            if answered_at is None and healthz(port):
                answered_at = time.monotonic() - t0
            if answered_at is not None and all(closed(s) for s in flood):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        cpu = 100 * (cpu_seconds(proc.pid) - cpu0) / elapsed
        all_closed = all(closed(s) for s in flood)
    finally:
        for sock in flood:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    print(
        f"flood: {args.connections} half-open connections, 256 descriptors: /healthz answered "
        f"after {answered_at if answered_at is None else round(answered_at, 1)} s, "
        f"{'all' if all_closed else 'NOT all'} closed by the hub in {elapsed:.1f} s, "
        f"hub CPU {cpu:.0f}%, {len(out.splitlines())} log lines, "
        f"{out.count('Traceback')} tracebacks"
    )
    ok = answered_at is not None and all_closed and cpu < 50 and "Traceback" not in out
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
