"""Log records that are safe to write whatever a client sent: no token, no forged line.

Every record the process emits (the hub's, Tornado's access and error logs, tracebacks) goes
through `SafeFormatter`, installed on the root handler by `hub`'s main(): a JWT-shaped string
or a token/ticket query value is blanked (also percent-encoded, and in any case of the
parameter name), and control characters and Unicode line breaks from clients (a `sub` with a
newline, a URI, a topic) are escaped, so one record is one line. A traceback keeps its lines,
each prefixed with `  | `, so none of them can pass for a record of its own.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

__all__ = ["SafeFormatter", "escape", "redact"]

# A dotted chain of base64url runs, matched only where a run begins (the lookbehind), and
# searched for the token shape by _blank_jwts: a pattern starting at "eyJ" scanned from every
# "eyJ" inside a run to its end, and a 60 KB URI of "eyJeyJ..." cost 0.6 s a log line.
_DOTTED = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)+")
_TOKEN_PARAM = re.compile(r"(?i)((?:^|[?&;\s])(?:access_token|token|ticket)=)[^&#\s]*")
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def redact(text: str) -> str:
    """`text` with tokens blanked. A percent-encoded token (or parameter name) is read
    decoded, up to three times (clients that encode an encoded URL exist): then the decoded
    text, redacted, is what is kept."""
    clean = _blank(text)
    decoded = text
    for _ in range(3):
        if "%" not in decoded:
            break
        decoded = unquote(decoded)
        clean_decoded = _blank(decoded)
        if clean_decoded != decoded:
            return clean_decoded
    return clean


def _blank(text: str) -> str:
    return _TOKEN_PARAM.sub(r"\1***", _DOTTED.sub(_blank_jwts, text))


def _blank_jwts(match: re.Match[str]) -> str:
    """A chain with a JWT in it (`eyJ` + 2 or more characters, a part of 2 or more, a third
    part) blanked from the token's start to the chain's end; any other chain as it was."""
    chain = match.group()
    if "eyJ" not in chain:
        return chain
    parts = chain.split(".")
    for i in range(len(parts) - 2):
        at = parts[i].find("eyJ")
        if at >= 0 and len(parts[i]) - at >= 5 and len(parts[i + 1]) >= 2:
            return "".join(part + "." for part in parts[:i]) + parts[i][:at] + "***"
    return chain


def escape(text: str) -> str:
    """Control characters and line breaks as visible escapes: one record, one line."""
    return _UNSAFE.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


class SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args, record.exc_info, record.exc_text, record.stack_info
        try:
            message = record.getMessage()
        except Exception:
            # A call whose arguments do not fit its format: written here, redacted, rather
            # than by logging's own error report, which prints the raw arguments to stderr.
            message = f"{record.msg!r} % {record.args!r} (arguments do not fit the format)"
        try:
            record.msg = escape(redact(message))
            record.args = None
            record.exc_info = record.exc_text = record.stack_info = None
            line = super().format(record)
        finally:
            record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = saved
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:
            for part in redact(block).splitlines():
                line += "\n  | " + escape(part)
        return line
