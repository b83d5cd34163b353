"""Demo mode only: tokens for the demo page, and the hub's own logs as log events.

Never routed outside demo mode: these endpoints hand out tokens to anyone who asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt

from handlers.base import HubHandler
from hub.broker import BrokerUnavailable
from hub.core import Hub
from hub.decode import build_event
from hub.logs import escape, redact
from hub.message import Event
from hub.query import QueryError, parse_topics

__all__ = ["DemoTokenHandler", "LogPublisher", "start_demo"]

TOKEN_LIFETIME = 3600


class DemoTokenHandler(HubHandler):
    def get(self) -> None:
        config = self.hub.config
        secret = config.jwt_secret
        if secret is None:
            self.fail(501, "demo tokens need an HMAC secret (HUB_JWT_SECRET)")
            return
        # iat to the millisecond (NumericDate may be fractional): a sign-in right after a
        # logout must not be mistaken for a token issued before it.
        issued = round(time.time(), 3)
        now = int(issued)
        role = self.get_query_argument("role", "subscriber")
        claims: dict[str, Any]
        if role == "publisher":
            claims = {
                "sub": "demo-publisher",
                "iat": now,
                "exp": now + TOKEN_LIFETIME,
                "publish": True,
            }
        elif role == "subscriber":
            user = self.get_query_argument("user", "demo")[:64] or "demo"
            # The topics asked, read as a stream's query reads them (names of the topic
            # alphabet, commas between); none, or `*`, grants every topic.
            asked = self.get_query_argument("topics", "*")
            try:
                topics = ["*"] if asked.strip() == "*" else list(parse_topics([asked])) or ["*"]
            except QueryError as exc:
                self.fail(400, exc.message, **exc.extra)
                return
            claims = {
                "sub": user,
                "iat": issued,
                "exp": now + TOKEN_LIFETIME,
                "topics": topics,
                "sid": secrets.token_hex(8),
            }
        else:
            self.fail(400, "role must be subscriber or publisher")
            return
        token = jwt.encode(claims, secret, algorithm=config.jwt_algorithm)
        self.answer(200, {**claims, "token": token, "user": claims["sub"]})


# True while the log producer publishes, and in everything that publish runs or schedules
# (asyncio copies the context into tasks and callbacks): records from there are not published
# again, or one record would publish another without end.
_publishing: contextvars.ContextVar[bool] = contextvars.ContextVar("_publishing", default=False)

_LEVEL_NAMES = ((50, "critical"), (40, "error"), (30, "warning"), (20, "info"), (0, "debug"))


class LogPublisher(logging.Handler):
    """A logging handler that publishes the hub's own records as log events (topic `logs`).

    A token bucket (`rate` records a second, bursts of `burst`) keeps a flood of records from
    becoming a flood of events; what it drops is counted and reported in one record when
    there is room again. Safe to call from any thread: the publish runs on the hub's loop.
    """

    def __init__(
        self,
        hub: Hub,
        loop: asyncio.AbstractEventLoop,
        rate: float = 20.0,
        burst: int = 50,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.loop = loop
        self.rate = rate
        self.burst = burst
        self.dropped = 0
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if _publishing.get() or self.hub.stopping or self.loop.is_closed():
            return
        if not self._take():
            self.dropped += 1
            if self.dropped == 1:  # say so later, even if no record comes to carry it
                self._on_loop(self.loop.call_later, 1.0, self._report_dropped)
            return
        try:
            events = [*self._dropped_events(), self._event(record)]
        except Exception:
            self.handleError(record)
            return
        self._on_loop(self._schedule, events)

    def _on_loop(self, fn: Callable[..., object], *args: Any) -> None:
        if _running_loop() is self.loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(fn, *args)

    def _dropped_events(self) -> list[Event]:
        if not self.dropped:
            return []
        message = f"{self.dropped} log record(s) not published: over {self.rate:g} a second"
        self.dropped = 0
        return [self._event(logging.makeLogRecord({"name": "hub", "levelno": 30, "msg": message}))]

    def _report_dropped(self) -> None:
        if _publishing.get() or self.hub.stopping:
            return
        self.acquire()  # the handler's lock, which emit() runs under too
        try:
            events = self._dropped_events()
        finally:
            self.release()
        if events:
            self._schedule(events)

    def _take(self) -> bool:
        """One token from the bucket, if there is one (emit runs under the handler's lock)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    @staticmethod
    def _event(record: logging.LogRecord) -> Event:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        message = escape(redact(message))  # what the log would show, no more
        data = {
            "level": _level_name(record.levelno),
            "service": record.name,
            "message": message[:2000],
        }
        return build_event({"type": "log", "ts": int(record.created * 1000), "data": data}, 0, 0)

    def _schedule(self, events: list[Event]) -> None:
        token = _publishing.set(True)
        try:
            task = self.loop.create_task(self._publish(events))
        finally:
            _publishing.reset(token)
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, events: list[Event]) -> None:
        try:
            await self.hub.publish(events)
        except BrokerUnavailable:
            return  # the hub is stopping: the record is in the log, it need not be an event
        except Exception:
            # Logged with the guard set: this goes to the other handlers, not back here.
            logging.getLogger("hub").exception("demo log producer: publish failed")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without a loop
        return None


def _level_name(levelno: int) -> str:
    return next(name for floor, name in _LEVEL_NAMES if levelno >= floor)


def start_demo(hub: Hub) -> None:
    """Start what demo mode runs beside the hub: the log producer, which publishes the
    records of every logger (the hub's, Tornado's access log) as log events. Call from the
    hub's event loop; a second call replaces the first producer."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, LogPublisher):
            root.removeHandler(handler)
    root.addHandler(LogPublisher(hub, asyncio.get_running_loop()))
