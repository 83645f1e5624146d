"""What the gateway changes in how daphne serves it (applied by the ASGI module).

Form bodies are left to the application, and WebSocket frames are sent at once.
(The two logging changes, redacted access lines and lazy autobahn debug
arguments, are in ``jobs.logging``.)
"""

from __future__ import annotations

import functools
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
    Twisted's buffer as before, which also reports a lost connection. HTTP
    keeps Twisted's buffering, which joins a response's head and body.
    """
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.onOpen
    if getattr(original, "writes_at_once", False):
        return

    def onOpen(self: WebSocketProtocol) -> None:
        _write_at_once(self.transport)
        original(self)

    onOpen.writes_at_once = True  # type: ignore[attr-defined]
    WebSocketProtocol.onOpen = onOpen


def _write_at_once(transport: Any) -> None:
    """Give ``transport`` a ``write`` that sends at once what it can.

    Reads ``FileDescriptor``'s buffer attributes (check them on Twisted
    upgrades); anything but a plain TCP connection is left as it is.
    """
    buffered_write = transport.write
    send = getattr(transport, "writeSomeData", None)
    if send is None or getattr(transport, "TLS", False):
        return

    def write(data: bytes) -> None:
        if (
            transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
            and type(data) is bytes
        ):
            sent = send(data)
            if not isinstance(sent, int) or sent <= 0:
                sent = 0  # the buffered write below meets the error again
            elif sent == len(data):
                return
            data = data[sent:]
        buffered_write(data)

    transport.write = write
