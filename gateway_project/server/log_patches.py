"""The server's own log lines: daphne's access log redacted and escaped, no
Twisted request log, autobahn's debug lines formatted only when written.

The first two are protections (a credential or a forged line must never reach
a log); the third is for speed.
"""

from __future__ import annotations

import importlib
import inspect
import pprint
from collections.abc import Callable
from datetime import datetime
from typing import Any

from jobs.logs import escaped, redact_text


def redact_daphne_access_log() -> None:
    """Make daphne's own access log redact credentials in the URIs it writes.

    daphne writes the full URI, query string included, at its default
    verbosity, straight to its stream, past the formatters: its lines are
    ``escaped`` here too. Wrapping its one writing method here covers every command line
    that serves this application, whatever ``--access-log`` says.
    """
    from daphne.access import AccessLogGenerator

    original = AccessLogGenerator.write_entry
    if getattr(original, "redacts", False):
        return

    def write_entry(
        self: AccessLogGenerator, host: str, date: datetime, request: str, **kw: Any
    ) -> None:
        original(self, escaped(str(host)), date, escaped(redact_text(request)), **kw)

    write_entry.redacts = True  # type: ignore[attr-defined]
    AccessLogGenerator.write_entry = write_entry


def drop_twisted_request_log() -> None:
    """Stop Twisted writing a request log line of its own for each HTTP request.

    daphne's HTTP factory inherits Twisted's request log: a combined-log line
    formatted for every request (about 5 % of a refused request's CPU) and
    handed to Twisted's log, which daphne throws away at its default verbosity
    and, at ``-v 2``, writes through the ``daphne.server`` logger with the
    whole URI, unredacted credentials included. daphne's own access log and
    the gateway's say all that line said.
    """
    from daphne.http_protocol import HTTPFactory

    HTTPFactory.log = _no_request_line


def _no_request_line(factory: Any, request: Any) -> None:
    """What Twisted's ``HTTPFactory.log`` does here: nothing."""


class _Later:
    """``func(*args, **kwargs)`` as text, worked out only if a log line is written."""

    __slots__ = ("_args", "_func", "_kwargs")

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._func = func
        self._args = args
        self._kwargs = kwargs

    def __str__(self) -> str:
        return str(self._func(*self._args, **self._kwargs))


def _later(func: Callable[..., Any]) -> Callable[..., _Later]:
    def deferred(*args: Any, **kwargs: Any) -> _Later:
        return _Later(func, *args, **kwargs)

    deferred.defers = func  # type: ignore[attr-defined]
    return deferred


def defer_autobahn_debug_formatting() -> None:
    """Stop autobahn formatting debug lines nobody reads, per connection and frame.

    autobahn works out its debug messages' arguments whether debug logging is
    on or not: ``WebSocketProtocol._connectionMade`` pretty-prints the
    connection's options (``pformat``, about 0.2 ms of CPU for every
    connection, refused handshakes included), and ``sendData`` colours its
    method's name, the peer and the length (``hltype``, ``hlval``: click
    styles) for every frame sent, a fifth of a frame's cost; its Twisted
    adapter colours the same for every connection made and lost and every read.
    Those names, in both modules, now format when a line is written;
    ``Timings``, the one caller that must return a string, gets it formatted at
    once.
    """
    from autobahn.twisted import websocket as adapter
    from autobahn.websocket import protocol

    if hasattr(protocol.pformat, "defers"):  # type: ignore[attr-defined]
        return

    def timings(self: Any) -> str:
        return pprint.pformat(self._timings)

    for module, names in (
        (protocol, ("pformat", "hltype", "hlval")),
        (adapter, ("hltype", "hlval")),
    ):
        for name in names:
            setattr(module, name, _later(getattr(module, name)))
    protocol.Timings.__str__ = timings  # type: ignore[method-assign]


def access_log_problems() -> list[str]:
    """Why ``redact_daphne_access_log`` cannot be applied here; empty if it can.

    It relies on daphne's ``AccessLogGenerator`` writing every line through
    ``write_entry(host, date, request, ...)``.
    """
    from daphne.access import AccessLogGenerator

    problems = []
    if "write_entry" not in _names_used(AccessLogGenerator.__call__):
        problems.append("AccessLogGenerator.__call__ no longer uses write_entry")
    written = getattr(AccessLogGenerator, "write_entry", None)
    if getattr(written, "redacts", False):
        return problems
    if written is None or list(inspect.signature(written).parameters)[:4] != [
        "self",
        "host",
        "date",
        "request",
    ]:
        problems.append("AccessLogGenerator.write_entry takes other arguments")
    return problems


def request_log_problems() -> list[str]:
    """Why ``drop_twisted_request_log`` cannot be applied here; empty if it can.

    It relies on Twisted's request calling its factory's ``log`` once done,
    and on daphne's HTTP factory being Twisted's.
    """
    from daphne.http_protocol import HTTPFactory
    from twisted.web.http import HTTPFactory as TwistedFactory
    from twisted.web.http import Request

    problems = []
    if "log" not in _names_used(Request.finish):
        problems.append("Twisted's Request.finish no longer calls its factory's log")
    if not issubclass(HTTPFactory, TwistedFactory):
        problems.append("daphne's HTTPFactory is no longer Twisted's")
    return problems


def autobahn_debug_problems() -> list[str]:
    """Why ``defer_autobahn_debug_formatting`` cannot be applied; empty if it can.

    It relies on autobahn's protocol module and its Twisted adapter naming
    ``pformat``, ``hltype`` and ``hlval`` as module globals, and on
    ``Timings`` keeping its figures in ``_timings``.
    """
    from autobahn.websocket import protocol

    problems = [
        f"{module} has no {name}"
        for module, names in _AUTOBAHN_NAMES
        for name in names
        if not callable(getattr(_module(module), name, None))
    ]
    timings = protocol.Timings()  # type: ignore[no-untyped-call]
    if not isinstance(getattr(timings, "_timings", None), dict):
        problems.append("autobahn's Timings keeps no _timings")
    return problems


_AUTOBAHN_NAMES = (
    ("autobahn.websocket.protocol", ("pformat", "hltype", "hlval")),
    ("autobahn.twisted.websocket", ("hltype", "hlval")),
)


def _module(name: str) -> Any:
    return importlib.import_module(name)


def _names_used(function: Any) -> tuple[str, ...]:
    """The global and attribute names a function's code refers to."""
    code = getattr(function, "__code__", None)
    names: tuple[str, ...] = code.co_names if code is not None else ()
    return names
