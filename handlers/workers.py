"""`hub --workers N`: a small supervisor that forks N worker processes.

Each worker runs the whole hub (its own event loop, its own Hub) and binds its OWN listening
sockets with SO_REUSEPORT, so the kernel spreads new connections among them; what makes N
processes one hub is the shared broker (Redis), which `Config` insists on. The parent only
forks, waits and signals: it creates no event loop and no Tornado object, so nothing of one
is inherited half-made by a worker.

The parent
- forwards SIGTERM/SIGINT to the workers and waits for them, at most `grace` seconds (each
  worker bounds its own shutdown with --shutdown-timeout), then SIGKILLs what is left; exits 0;
- restarts a worker that died unexpectedly, with a log line; if workers keep dying within
  QUICK_DEATH seconds of their start (MAX_QUICK_DEATHS in a row), it gives up and exits 1;
- exits 1 with one line when a worker cannot start (CannotStart: a port it must listen on is
  taken): restarting it could not help. The worker sends the reason up a pipe, so the line the
  operator reads comes from the parent, once, whichever workers failed.

Workers die with the parent (PR_SET_PDEATHSIG on Linux): a parent that is SIGKILLed leaves no
workers holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

__all__ = ["EXIT_CANNOT_START", "MAX_QUICK_DEATHS", "QUICK_DEATH", "CannotStart", "supervise"]

log = logging.getLogger("hub.workers")

EXIT_CANNOT_START = 3  # a worker's exit status: it could not start, do not restart it
QUICK_DEATH = 10.0  # seconds: a worker that dies sooner after its start died "quickly"
MAX_QUICK_DEATHS = 5  # quick deaths in a row (any workers) after which the parent gives up
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1
_REPORT_MAX = 480  # bytes of one reason: under PIPE_BUF, so a write is never interleaved


class CannotStart(Exception):
    """Raised by a worker that cannot start (a port is taken): the message says why, in one
    line, and the supervisor stops instead of restarting it."""


@dataclass
class _Worker:
    index: int
    started: float


def supervise(workers: int, run: Callable[[int], None], grace: float) -> int:
    """Fork `workers` processes, each calling `run(index)`; watch them until SIGTERM/SIGINT.
    The process's exit status (0 after a normal shutdown)."""
    # Blocked here and waited for below (sigtimedwait): no handler runs in the middle of a
    # fork or a waitpid, and no signal is lost between two waits. Workers unblock them.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    reports, report_to = os.pipe()
    os.set_blocking(reports, False)
    alive: dict[int, _Worker] = {}

    def start(index: int) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(reports)
            _worker_main(index, run, report_to, parent)
        alive[pid] = _Worker(index, time.monotonic())
        return pid

    try:
        for index in range(workers):
            start(index)
        log.info(
            "started %d workers (pids %s)", workers, ", ".join(str(pid) for pid in sorted(alive))
        )
        quick_deaths = 0
        while True:
            info = signal.sigwaitinfo(SIGNALS)
            if info.si_signo != signal.SIGCHLD:
                log.info("%s: stopping %d workers", signal.Signals(info.si_signo).name, len(alive))
                _stop(alive, signal.Signals(info.si_signo), grace)
                log.info("workers stopped")
                return 0
            # Every worker that ended leaves `alive` before anything is signalled: a pid
            # reaped here is no longer ours to signal or wait for.
            ended = [(pid, code, alive.pop(pid)) for pid, code in _reap() if pid in alive]
            failed = [worker for _, code, worker in ended if code == EXIT_CANNOT_START]
            if failed:
                reasons = _read_reasons(reports)
                _stop(alive, signal.SIGTERM, grace)
                first = min(failed, key=lambda w: w.index)
                reason = reasons.get(first.index, "see the log above")
                print(f"hub: error: worker {first.index}: {reason}", file=sys.stderr)
                return 1
            for pid, code, worker in ended:
                lived = time.monotonic() - worker.started
                quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH else 0
                if quick_deaths >= MAX_QUICK_DEATHS:
                    _stop(alive, signal.SIGTERM, grace)
                    print(
                        f"hub: error: workers keep dying within {QUICK_DEATH:g} s of starting "
                        f"({quick_deaths} in a row, the last {_how(code)}): giving up",
                        file=sys.stderr,
                    )
                    return 1
                log.warning(
                    "worker %d (pid %d) %s after %.1f s: restarted as pid %d",
                    worker.index,
                    pid,
                    _how(code),
                    lived,
                    start(worker.index),
                )
    finally:
        # Whatever happened, no worker outlives the supervisor (they would hold the port).
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.close(reports)
        os.close(report_to)


def _stop(alive: dict[int, _Worker], sig: signal.Signals, grace: float) -> None:
    """Forward `sig` to every worker and reap them; SIGKILL those still there after `grace`
    seconds (their own --shutdown-timeout watchdog should have ended them first)."""
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while alive:
        for pid, code in _reap():
            worker = alive.pop(pid, None)
            # dying of the signal itself: a worker stopped before its loop took its signals
            if worker is not None and code not in (0, -sig, EXIT_CANNOT_START):
                log.warning("worker %d (pid %d) %s while stopping", worker.index, pid, _how(code))
        left = deadline - time.monotonic()
        if not alive:
            break
        if left <= 0:
            log.warning(
                "%d workers still running %g s after %s: killing them", len(alive), grace, sig.name
            )
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in list(alive):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            alive.clear()
            break
        # SIGCHLD wakes this; a second SIGTERM/SIGINT is taken and ignored (already stopping).
        signal.sigtimedwait(SIGNALS, left)


def _reap() -> list[tuple[int, int]]:
    """(pid, exit code) of every child that ended (negative: killed by that signal)."""
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        ended.append((pid, os.waitstatus_to_exitcode(status)))
    return ended


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _read_reasons(fd: int) -> dict[int, str]:
    """What failing workers sent up the pipe: `index reason` lines."""
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    reasons: dict[int, str] = {}
    for line in data.decode(errors="replace").splitlines():
        index, _, reason = line.partition(" ")
        if index.isdigit():
            reasons.setdefault(int(index), reason)
    return reasons


def _worker_main(index: int, run: Callable[[int], None], report_to: int, parent: int) -> NoReturn:
    """The forked child: undo the parent's signal set-up, run the hub, and exit without ever
    returning into the parent's stack."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        _die_with_parent(parent)
        run(index)
        code = 0
    except CannotStart as exc:
        message = " ".join(str(exc).split())
        line = f"{index} {message}".encode(errors="replace")[:_REPORT_MAX] + b"\n"
        with contextlib.suppress(OSError):
            os.write(report_to, line)
        code = EXIT_CANNOT_START
    except KeyboardInterrupt:
        code = 0  # SIGINT before the worker's loop took over its signals
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        raise SystemExit(0)
