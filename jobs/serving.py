"""What the gateway changes in how daphne serves it (applied by the ASGI module).

Form bodies are left to the application; WebSocket frames and HTTP responses
are sent at once; a job's frame is framed once for all of a process's clients.
(The logging changes, redacted access lines, no Twisted request log and lazy
autobahn debug arguments, are in ``jobs.logging``.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


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
