"""How a stream ends: one Disconnect (code, reason, reconnect), as centrifuge's.

Every end the hub starts is written as the stream's last frame, after what the stream is owed:

    event: end
    data: {"code": 4003, "reason": "logout", "reconnect": false, "detail": "..."}

It has no `id:` line, so the client's last event id stays that of the last real event and a
reconnect with Last-Event-ID loses nothing. Clients act on `reconnect` (hub.js, hub.client),
never on event names. The same values label the disconnect metric and the logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import ujson

__all__ = ["ENDS", "EXPIRED", "GONE", "LOGOUT", "SHUTDOWN", "SLOW", "Disconnect"]


@dataclass(frozen=True, slots=True)
class Disconnect:
    code: int
    reason: str
    reconnect: bool
    detail: str

    def frame(self, retry_ms: int | None = None) -> bytes:
        """The stream's last bytes: a `retry:` first where one is given (the shutdown's
        jittered delay), then the `end` event."""
        body = ujson.dumps(
            {
                "code": self.code,
                "reason": self.reason,
                "reconnect": self.reconnect,
                "detail": self.detail,
            },
            escape_forward_slashes=False,
        )
        retry = b"" if retry_ms is None else b"retry: %d\n\n" % retry_ms
        return retry + b"event: end\ndata: " + body.encode() + b"\n\n"


# The client left (or its socket failed): there is no one to tell, so no frame is written.
GONE = Disconnect(0, "gone", True, "the connection closed")
SHUTDOWN = Disconnect(4000, "shutdown", True, "the hub is stopping: reconnect, with Last-Event-ID")
SLOW = Disconnect(
    4001, "slow", True, "the stream fell behind or stopped draining: reconnect, with Last-Event-ID"
)
EXPIRED = Disconnect(4002, "expired", True, "token expired: reconnect with a fresh token")
LOGOUT = Disconnect(4003, "logout", False, "this session logged out")
ENDS = (GONE, SHUTDOWN, SLOW, EXPIRED, LOGOUT)
