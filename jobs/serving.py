"""How daphne writes WebSocket frames: at once, when the socket takes them."""

from __future__ import annotations

from typing import Any


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
