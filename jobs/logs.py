"""Log lines: JSON or plain, request and job ids, access lines without secrets,
and nothing a request sent written raw.

Django-free on purpose: ``LOGGING`` names the formatters here, so this module is
imported while the settings are being read.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote

# Set per API request and per WebSocket connection; every line logged in that
# context carries it.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

# Query parameters whose values are credentials.
SECRET_PARAMS = frozenset({"api_key", "sig", "ticket"})
REDACTED = "[redacted]"

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
_SECRET_IN_URI = re.compile(
    r"(?i)((?:^|[?&;])(?:" + "|".join(sorted(SECRET_PARAMS)) + r")=)[^&;\s\"]*"
)

access_logger = logging.getLogger("gateway.access")


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escaped(text: str) -> str:
    """``text`` with every character that is not printable written as an escape.

    Newlines, carriage returns, NULs, ANSI escape sequences, Unicode line
    separators and direction overrides from a request (a ``%0a`` in a path, a
    header, a job's title) would otherwise start a forged log line, or redraw
    the terminal that shows the log. They are written ``\\n``, ``\\r``,
    ``\\t``, ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``; a backslash is left
    as it is. Printable text, nearly every line, is returned untouched.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escaped_lines(text: str) -> str:
    """A traceback's text with its lines kept, each line ``escaped``."""
    return "\n".join(escaped(line) for line in text.split("\n"))


def new_request_id(offered: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    if offered and _SANE_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def redact_query(query: str) -> str:
    """``query`` with the values of credential parameters replaced."""
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    return "&".join(
        f"{quote(name, safe='')}="
        + (REDACTED if name.lower() in SECRET_PARAMS else quote(value, safe=""))
        for name, value in pairs
    )


def redact_text(text: str) -> str:
    """Any ``api_key=``/``sig=``/``ticket=`` value in a URI or log text, replaced."""
    return _SECRET_IN_URI.sub(lambda match: match.group(1) + REDACTED, text)


def access(
    *,
    method: str,
    path: str,
    query: str,
    status: int,
    started: float,
    client: str,
    refused: str | None = None,
) -> None:
    """Log one access line (the gateway's own, in place of daphne's raw URI).

    ``refused`` says why a WebSocket handshake was refused, in the same line.
    """
    target = path + ("?" + redact_query(query) if query else "")
    duration_ms = (time.monotonic() - started) * 1000
    fields: dict[str, Any] = {
        "http_method": method,
        "path": target,
        "status": status,
        "duration_ms": round(duration_ms, 1),
        "client_ip": client,
    }
    message = "%s %s %d %.1fms %s"
    args: list[Any] = [method, target, status, duration_ms, client]
    if refused is not None:
        message += " refused: %s"
        args.append(refused)
        fields["refused"] = refused
    access_logger.info(message, *args, extra=fields)


def begin(offered: str | None) -> str:
    """Set (and return) the request id of the request or connection starting."""
    rid = new_request_id(offered)
    request_id.set(rid)
    return rid


def scope_header(scope: dict[str, Any], name: bytes) -> str | None:
    """An ASGI scope's header ``name`` (lowercase), if sent."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def websocket_access(
    scope: dict[str, Any], status: int, started: float, refused: str | None = None
) -> None:
    """The access line of a WebSocket handshake: 101 accepted, 403 ``refused``."""
    client = scope.get("client") or ("unknown", None)
    access(
        method="WS",
        path=scope.get("path", ""),
        query=scope.get("query_string", b"").decode("latin-1"),
        status=status,
        started=started,
        client=str(client[0]),
        refused=refused,
    )


_LISTEN_IN_USE = re.compile(
    r"Couldn't listen on (?P<host>.*):(?P<port>[0-9]+): .*in use"
)


class PortInUseHint(logging.Filter):
    """Add to daphne's "Listen failure" line for a port in use the way out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        found = _LISTEN_IN_USE.search(message)
        if message.startswith("Listen failure") and found:
            port = int(found["port"])
            other = port + 1 if port < 65535 else 8001
            record.msg = (
                f"{message} Another process holds port {port}, perhaps another "
                f"gateway: stop it, or serve on another port (PORT={other} "
                f"scripts/run, or daphne -p {other})."
            )
            record.args = None
        return True


def hint_at_ports_in_use() -> None:
    """Make daphne's failure to listen on a port in use say what to do."""
    server = logging.getLogger("daphne.server")
    if not any(isinstance(f, PortInUseHint) for f in server.filters):
        server.addFilter(PortInUseHint())


class ContextFilter(logging.Filter):
    """Puts the current request id and job id on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "job_id"):
            record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids when known.

    JSON escapes control characters itself; values are ``escaped`` first all
    the same, so that a line, once decoded, holds none either.
    """

    # Extra fields that access lines (and any other caller) may add.
    EXTRA = ("http_method", "path", "status", "duration_ms", "client_ip", "refused")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": escaped(record.getMessage()),
        }
        for key in ("request_id", "job_id", *self.EXTRA):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = escaped(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exception"] = escaped_lines(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = escaped_lines(self.formatStack(record.stack_info))
        return json.dumps(line, default=str)


class PlainFormatter(logging.Formatter):
    """``time level logger message`` plus ``request_id=``/``job_id=`` when known.

    One line per record, its message ``escaped``; a traceback follows on lines
    of its own, each indented, so that no line a request wrote into an
    exception's message can pass for a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = escaped(record.message)
        return f"{record.asctime} {record.levelname} {record.name} {message}"

    def formatException(self, ei: Any) -> str:
        return _indented(escaped_lines(super().formatException(ei)))

    def formatStack(self, stack_info: str) -> str:
        return _indented(escaped_lines(super().formatStack(stack_info)))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{key}={escaped(str(value))}"
            for key in ("request_id", "job_id")
            if (value := getattr(record, key, None)) is not None
        ]
        if not ids:
            return text
        # After the first line, so a traceback stays readable.
        first, sep, rest = text.partition("\n")
        return f"{first} {' '.join(ids)}{sep}{rest}"


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))
