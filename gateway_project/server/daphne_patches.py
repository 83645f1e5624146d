"""What the gateway changes in how daphne and Twisted serve requests.

Bodies over their limit are refused before they are read (a protection); form
bodies are left to the application; WebSocket frames are sent at once; a job's
frame is framed once for all of a process's clients (for speed). Each has a
``*_problems`` function: what it relies on, checked.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import io
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote


def refuse_large_bodies_unread(limit_for: Callable[[bytes], int | None]) -> None:
    """Answer a body over its limit with 413 ``too_large`` without reading it.

    Twisted reads a request's whole body, into a temporary file past 100 kB,
    before daphne hands the request to the application: an unsigned 100 MB
    ``POST /job`` cost the disk, memory and CPU of reading 100 MB only to be
    refused. ``limit_for(raw_path)`` gives the largest body a path takes
    (``None``: no limit). Twisted's channel tells the request the body's length
    once the headers are in (``gotLength``) and hands it the body as it comes
    (``handleContentChunk``): a ``Content-Length`` over the limit is refused
    there, before a byte of the body is read, and a chunked body the moment it
    passes the limit. The refusal is a complete JSON answer written to the
    connection, which then closes: Twisted stops reading at once, what the
    client goes on sending is never read, and the request never reaches the
    application.
    """
    from daphne.http_protocol import WebRequest

    original_length = WebRequest.gotLength
    if getattr(original_length, "limits_bodies", False):
        return
    original_chunk = WebRequest.handleContentChunk
    original_received = WebRequest.requestReceived

    def gotLength(self: WebRequest, length: int | None) -> None:
        raw_path = self.channel._path.partition(b"?")[0]
        limit = self.body_limit = limit_for(raw_path)
        self.body_started = time.monotonic()
        if limit is not None and length is not None and length > limit:
            self.content = io.BytesIO()
            _refuse(self, limit)
            return
        # Counted only when no length is declared (chunked): Twisted hands on
        # no more than a declared length.
        self.body_left = limit if length is None else None
        # A chunked body is at most the limit, so it is kept as a body of that
        # length is: in memory under 100 kB, not in a temporary file.
        original_length(self, limit if length is None else length)

    def handleContentChunk(self: WebRequest, data: bytes) -> None:
        if self.refused_unread:
            return  # the connection is closing
        left = self.body_left
        if left is not None:
            left = self.body_left = left - len(data)
            if left < 0:
                _refuse(self, self.body_limit)
                return
        original_chunk(self, data)

    def requestReceived(
        self: WebRequest, command: bytes, path: bytes, version: bytes
    ) -> None:
        if self.refused_unread:
            return  # answered already: the application never sees it
        original_received(self, command, path, version)

    for patched in (gotLength, handleContentChunk, requestReceived):
        patched.limits_bodies = True  # type: ignore[union-attr]
    WebRequest.body_started = 0.0
    WebRequest.body_limit = None
    WebRequest.body_left = None
    WebRequest.refused_unread = False
    WebRequest.gotLength = gotLength
    WebRequest.handleContentChunk = handleContentChunk
    WebRequest.requestReceived = requestReceived


def body_limit_problems() -> list[str]:
    """Why ``refuse_large_bodies_unread`` cannot be applied here; empty if it can.

    It relies on Twisted's channel calling the request's ``gotLength`` once
    the headers are in and ``handleContentChunk`` for the body, keeping the
    request line's target and method in ``_path`` and ``_command``, calling
    ``requestReceived`` once the body is in, and parsing no further once its
    connection is closing; and on daphne's request not overriding those three methods.
    """
    from daphne.http_protocol import WebRequest
    from twisted.protocols.basic import LineReceiver
    from twisted.web.http import HTTPChannel, Request

    problems = []
    uses = [
        (HTTPChannel, "lineReceived", ("_path", "_command")),
        (HTTPChannel, "allHeadersReceived", ("gotLength",)),
        (HTTPChannel, "_maybeChooseTransferDecoder", ("handleContentChunk",)),
        (HTTPChannel, "allContentReceived", ("requestReceived", "_path")),
        (LineReceiver, "dataReceived", ("disconnecting",)),
    ]
    for owner, method, names in uses:
        used = _names_used(getattr(owner, method, None))
        if missing := [name for name in names if name not in used]:
            problems.append(f"{owner.__name__}.{method} no longer uses {missing}")
    for name in ("gotLength", "handleContentChunk", "requestReceived"):
        if not hasattr(Request, name):
            problems.append(f"Twisted's Request has no {name}")
        own = vars(WebRequest).get(name)
        if own is not None and not getattr(own, "limits_bodies", False):
            problems.append(f"daphne's WebRequest overrides {name}")
    return problems


def _names_used(function: Any) -> tuple[str, ...]:
    """The global and attribute names a function's code refers to."""
    code = getattr(function, "__code__", None)
    names: tuple[str, ...] = code.co_names if code is not None else ()
    return names


def _refuse(request: Any, limit: int | None) -> None:
    """Answer 413 on ``request``'s connection and close it, reading no more."""
    from jobs import logs

    request.refused_unread = True
    # Twisted would answer "Expect: 100-continue" right after this refusal.
    request.requestHeaders.removeHeader(b"Expect")
    channel = request.channel
    offered = request.requestHeaders.getRawHeaders(b"X-Request-ID", [b""])[0]
    rid = logs.new_request_id(offered.decode("latin-1"))
    body = json.dumps(
        {"error": "too_large", "detail": f"The body is over {limit} bytes."},
        separators=(",", ":"),
    ).encode()
    channel.transport.write(
        b"HTTP/1.1 413 Content Too Large\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"X-Request-ID: %s\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), rid.encode(), body)
    )
    channel.loseConnection()
    # In a context of its own: the connection's callbacks share one context,
    # which must not keep this request's id.
    contextvars.Context().run(_log_refusal, request, rid)


def _log_refusal(request: Any, rid: str) -> None:
    from jobs import logs
    from jobs.auth import client_ip

    logs.request_id.set(rid)
    target = request.channel._path.decode("latin-1")
    path, _, query = target.partition("?")
    peer = request.channel.getPeer()
    forwarded = b",".join(request.requestHeaders.getRawHeaders(b"X-Forwarded-For", []))
    logs.access(
        method=request.channel._command.decode("latin-1"),
        path=unquote(path),
        query=query,
        status=413,
        started=request.body_started,
        client=client_ip(getattr(peer, "host", None), forwarded.decode("latin-1")),
    )


def leave_form_bodies_to_the_application() -> None:
    """Stop Twisted parsing form bodies, which daphne never reads.

    Twisted's ``Request`` parses every POST's ``Content-Type`` through the
    ``email`` package (about 0.1 ms, a thirtieth of the gateway's CPU under
    load) to fill ``request.args`` with form fields, and answers a multipart
    body it cannot parse with a bare 400 and a closed connection, before the
    application sees it. daphne hands the raw body to the application, which
    parses what it accepts itself (Django, for the admin's forms). Twisted's
    switch for it is ``Request``'s ``parsePOSTFormSubmission`` argument, which
    daphne's ``WebRequest`` passes on but never sets: it is set here.
    """
    from daphne.http_protocol import WebRequest

    original = WebRequest.__init__
    if getattr(original, "leaves_form_bodies", False):
        return

    @functools.wraps(original)
    def __init__(self: WebRequest, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    __init__.leaves_form_bodies = True  # type: ignore[attr-defined]
    WebRequest.__init__ = __init__


def write_frames_at_once() -> None:
    """Send each WebSocket frame when it is written, not on the loop's next turn.

    Twisted buffers every write and registers the connection with the event
    loop to send it once the socket is writable, then unregisters it: two
    ``epoll_ctl`` calls and a loop callback per frame, about a tenth of a
    process's CPU under the load test; a frame costs about a quarter less CPU
    without them (docs/benchmarks.md, "Server patches"). Once a WebSocket is
    open, its transport tries the socket first, as asyncio's own transports
    do, whenever nothing is buffered ahead of the frame. What the socket does
    not take (a full buffer, the part of a frame past Twisted's 128 KB per
    send, an error) goes through Twisted's buffer as before, which also
    reports a lost connection.
    """
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.onOpen
    if getattr(original, "writes_at_once", False):
        return

    @functools.wraps(original)
    def onOpen(self: WebSocketProtocol) -> None:
        transport = self.transport
        if _can_send_at_once(transport):
            buffered_write = transport.write

            def write(data: bytes) -> None:
                if type(data) is bytes:
                    _send_at_once(transport, data, buffered_write)
                else:
                    buffered_write(data)

            transport.write = write
        original(self)

    onOpen.writes_at_once = True  # type: ignore[attr-defined]
    WebSocketProtocol.onOpen = onOpen


def offer_prepared_frames() -> None:
    """Let WebSocket consumers send one framed copy of a frame to every client.

    Through ASGI, each client's copy of a job's frame passes daphne's reply
    checks, is encoded and framed by autobahn and written: the same work for
    each of 1,000 clients. autobahn's own broadcast support frames a message
    once (``PreparedMessage``) and sends the framed bytes to each connection
    (``sendPreparedMessage``). Each WebSocket scope gets a ``PreparedFrames``
    under ``extensions``, keyed ``jobs.fanout.PREPARED_FRAMES``; a frame sent
    through it goes the way daphne would send it (its transport, in order with
    what was sent through ASGI) and is dropped once the connection is closing
    or closed, where autobahn would refuse it, or daphne drop it.
    """
    from daphne.server import Server

    from jobs.fanout import PREPARED_FRAMES

    original = Server.create_application
    if getattr(original, "offers_prepared_frames", False):
        return

    @functools.wraps(original)
    def create_application(self: Server, protocol: Any, scope: dict[str, Any]) -> Any:
        if scope.get("type") == "websocket":
            extensions = scope.setdefault("extensions", {})
            extensions[PREPARED_FRAMES] = PreparedFrames(protocol)
        return original(self, protocol, scope)

    create_application.offers_prepared_frames = True  # type: ignore[attr-defined]
    Server.create_application = create_application


class PreparedFrames:
    """One daphne WebSocket's sender of frames framed once for every client."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    @staticmethod
    def prepare(frame: str) -> Any:
        """A text frame, framed once, for any connection's ``send``."""
        from autobahn.websocket.protocol import PreparedMessage

        # A server's frames are not masked; daphne negotiates no compression.
        return PreparedMessage(
            frame.encode(), isBinary=False, applyMask=False, doNotCompress=False
        )

    def send(self, prepared: Any) -> None:
        """Send a frame ``prepare`` made, unless the connection is closing."""
        protocol = self._protocol
        if protocol.state == protocol.STATE_OPEN:
            protocol.sendPreparedMessage(prepared)


def form_bodies_problems() -> list[str]:
    """Why ``leave_form_bodies_to_the_application`` cannot be applied; empty if it can.

    It relies on Twisted's ``Request`` taking ``parsePOSTFormSubmission`` and
    daphne's ``WebRequest`` passing its arguments on to it.
    """
    from daphne.http_protocol import WebRequest
    from twisted.web.http import Request

    problems = []
    if "parsePOSTFormSubmission" not in inspect.signature(Request.__init__).parameters:
        problems.append("Twisted's Request takes no parsePOSTFormSubmission")
    init = inspect.unwrap(WebRequest.__init__)
    kinds = {p.kind for p in inspect.signature(init).parameters.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        problems.append("daphne's WebRequest takes no keyword arguments")
    return problems


def frames_at_once_problems() -> list[str]:
    """Why ``write_frames_at_once`` cannot be applied here; empty if it can.

    It relies on daphne's ``WebSocketProtocol.onOpen`` running once a socket
    is open, and on ``_send_at_once``'s reading of Twisted's buffer.
    """
    from daphne.ws_protocol import WebSocketProtocol

    problems = _buffer_problems()
    if not callable(vars(WebSocketProtocol).get("onOpen")):
        problems.append("daphne's WebSocketProtocol no longer defines onOpen")
    return problems


def prepared_frames_problems() -> list[str]:
    """Why ``offer_prepared_frames`` cannot be applied here; empty if it can.

    It relies on daphne's ``Server.create_application(protocol, scope)``
    creating each connection's application, and on autobahn's
    ``PreparedMessage`` and ``sendPreparedMessage``.
    """
    from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
    from daphne.server import Server

    problems = []
    create = inspect.unwrap(Server.create_application)
    if list(inspect.signature(create).parameters) != ["self", "protocol", "scope"]:
        problems.append("daphne's Server.create_application takes other arguments")
    wanted = ["self", "payload", "isBinary", "applyMask", "doNotCompress"]
    if list(inspect.signature(PreparedMessage.__init__).parameters) != wanted:
        problems.append("autobahn's PreparedMessage takes other arguments")
    for name in ("sendPreparedMessage", "STATE_OPEN"):
        if not hasattr(WebSocketProtocol, name):
            problems.append(f"autobahn's WebSocketProtocol has no {name}")
    return problems


def _buffer_problems() -> list[str]:
    """What ``_send_at_once`` reads of Twisted's ``FileDescriptor``, if missing."""
    from twisted.internet.abstract import FileDescriptor

    problems = [
        f"Twisted's FileDescriptor has no {name}"
        for name in (
            "writeSomeData",
            "dataBuffer",
            "offset",
            "connected",
            "disconnecting",
            "_writeDisconnected",
        )
        if not hasattr(FileDescriptor, name)
    ]
    if "_tempDataBuffer" not in _names_used(FileDescriptor.__init__):
        problems.append("Twisted's FileDescriptor keeps no _tempDataBuffer")
    return problems


def _can_send_at_once(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP connection (no TLS) Twisted buffers."""
    return hasattr(transport, "writeSomeData") and not getattr(transport, "TLS", False)


def _send_at_once(
    transport: Any, data: bytes, buffered_write: Callable[[bytes], None]
) -> None:
    """Send what the socket takes of ``data`` now, the rest through Twisted.

    Only when nothing is buffered ahead, so order is kept. Reads
    ``FileDescriptor``'s buffer attributes: check them on Twisted upgrades.
    """
    if (
        transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if not isinstance(sent, int) or sent <= 0:
            sent = 0  # the buffered write below meets the error again
        elif sent == len(data):
            return
        data = data[sent:]
    buffered_write(data)
