"""What the gateway changes in how daphne serves it (applied by the ASGI module).

Bodies over their limit are refused before they are read; form bodies are left
to the application; WebSocket frames and HTTP responses are sent at once; a
job's frame is framed once for all of a process's clients. (The logging
changes, redacted and escaped access lines, no Twisted request log and lazy
autobahn debug arguments, are in ``jobs.logging``.)
"""

from __future__ import annotations

import contextvars
import functools
import importlib.metadata
import io
import json
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote


class ServerPatchError(RuntimeError):
    """A protection cannot be applied to the server installed: do not serve."""


# The releases the body limit was written for and checked against (major.minor).
# On any other, the server refuses to start: a protection is never left out
# quietly. Check the internals ``body_limit_problems`` names, then add the
# release here.
BODY_LIMIT_WRITTEN_FOR: dict[str, tuple[str, ...]] = {
    "daphne": ("4.2",),
    "Twisted": ("26.10",),
}


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
    application. Raises ``ServerPatchError`` where it cannot be applied.
    """
    from daphne.http_protocol import WebRequest

    original_length = WebRequest.gotLength
    if getattr(original_length, "limits_bodies", False):
        return
    if problems := body_limit_problems():
        raise ServerPatchError(
            "the request body limit cannot be applied: " + "; ".join(problems)
        )
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

    It relies on the releases it was written for and, in them, on Twisted's
    channel calling the request's ``gotLength`` once the headers are in and
    ``handleContentChunk`` for the body, keeping the request line's target
    and method in ``_path`` and ``_command``, calling ``requestReceived`` once
    the body is in, and parsing no further once its connection is closing;
    and on daphne's request not overriding those three methods.
    """
    from daphne.http_protocol import WebRequest
    from twisted.protocols.basic import LineReceiver
    from twisted.web.http import HTTPChannel, Request

    problems = [
        f"{name} {found} (written for {' or '.join(series)})"
        for name, series in BODY_LIMIT_WRITTEN_FOR.items()
        if not _is_series(found := importlib.metadata.version(name), series)
    ]
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


def _is_series(version: str, series: Iterable[str]) -> bool:
    return any(version == one or version.startswith(one + ".") for one in series)


def _names_used(function: Any) -> tuple[str, ...]:
    """The global and attribute names a function's code refers to."""
    code = getattr(function, "__code__", None)
    names: tuple[str, ...] = code.co_names if code is not None else ()
    return names


def _refuse(request: Any, limit: int | None) -> None:
    """Answer 413 on ``request``'s connection and close it, reading no more."""
    from jobs import logging as logs

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
    from jobs import logging as logs
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
    process's CPU under the load test; a frame costs about 5 % less without
    them (docs/benchmarks.md). Once a WebSocket is open, its transport tries
    the socket first, as asyncio's own transports do, whenever nothing is
    buffered ahead of the frame. What the socket does not take (a full buffer,
    the part of a frame past Twisted's 128 KB per send, an error) goes through
    Twisted's buffer as before, which also reports a lost connection.
    """
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.onOpen
    if getattr(original, "writes_at_once", False):
        return

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


def send_responses_at_once() -> None:
    """Send each HTTP response in one piece as soon as it is complete.

    Twisted writes a response's head and body separately into its buffer and
    sends them on the event loop's next turn, registering and unregistering
    the connection with the loop for it: about 5 % of a short request's CPU,
    refused ones included. While daphne handles a response's last body message
    (most responses have one), what Twisted writes is held, and then sent in
    one piece, at once when nothing is buffered ahead of it, through Twisted's
    buffer otherwise, in order either way. A body sent in parts (Django sends
    those over 64 KB in 64 KB messages; files are streamed) keeps Twisted's
    buffering for all but its last part.
    """
    from daphne.http_protocol import WebRequest

    original = WebRequest.handle_reply
    if getattr(original, "sends_at_once", False):
        return

    def handle_reply(self: WebRequest, message: dict[str, Any]) -> None:
        transport: Any = getattr(self.channel, "transport", None)
        if (
            message.get("type") != "http.response.body"
            or message.get("more_body", False)
            or not _can_send_at_once(transport)
            # Held already: a response daphne writes while handling another.
            or "write" in vars(transport)
        ):
            original(self, message)
            return
        held: list[bytes] = []
        transport.write = held.append
        transport.writeSequence = held.extend
        try:
            original(self, message)
        finally:
            del transport.write, transport.writeSequence
            if held:
                _send_at_once(transport, b"".join(held), transport.write)

    handle_reply.sends_at_once = True  # type: ignore[attr-defined]
    WebRequest.handle_reply = handle_reply


# The ASGI scope extension through which a WebSocket consumer sends frames
# made by prepare(): a callable taking one. Absent under other servers.
PREPARED_FRAMES = "gateway.prepared_frames"


def offer_prepared_frames() -> None:
    """Let WebSocket consumers send one framed copy of a frame to every client.

    Through ASGI, each client's copy of a job's frame passes daphne's reply
    checks, is encoded and framed by autobahn and written: the same work for
    each of 1,000 clients. autobahn's own broadcast support frames a message
    once (``PreparedMessage``) and sends the framed bytes to each connection
    (``sendPreparedMessage``). Each WebSocket scope gets a sender for it under
    ``extensions``, keyed ``PREPARED_FRAMES``; a frame sent through it goes
    the way daphne would send it (its transport, in order with what was sent
    through ASGI) and is dropped once the connection is closing or closed,
    where autobahn would refuse it, or daphne drop it.
    """
    from daphne.server import Server

    original = Server.create_application
    if getattr(original, "offers_prepared_frames", False):
        return

    @functools.wraps(original)
    def create_application(self: Server, protocol: Any, scope: dict[str, Any]) -> Any:
        if scope.get("type") == "websocket":
            extensions = scope.setdefault("extensions", {})
            extensions[PREPARED_FRAMES] = functools.partial(_send_prepared, protocol)
        return original(self, protocol, scope)

    create_application.offers_prepared_frames = True  # type: ignore[attr-defined]
    Server.create_application = create_application


def prepare(frame: str) -> Any:
    """A text frame framed once, for the senders ``offer_prepared_frames`` makes."""
    from autobahn.websocket.protocol import PreparedMessage

    # A server's frames are not masked; daphne negotiates no compression.
    return PreparedMessage(
        frame.encode(), isBinary=False, applyMask=False, doNotCompress=False
    )


def _send_prepared(protocol: Any, message: Any) -> None:
    if protocol.state == protocol.STATE_OPEN:
        protocol.sendPreparedMessage(message)


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
