"""WebSocket tickets: a signed ``POST /ws/ticket`` buys one ``/ws?ticket=`` handshake.

A ticket lets a client open ``/ws`` without its API key in the URL, where
proxies and access logs would keep it. It is 32 random bytes, valid for
``WS_TICKET_TTL`` seconds (default 30) and good for one handshake. The store
keeps only its SHA-256, so a copy of the store (or of Redis's memory) holds no
usable ticket, and nothing here ever logs a ticket.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from django.conf import settings

from jobs import single_use

# token_urlsafe(32) gives 43 characters; anything much longer is not ours.
TICKET_BYTES = 32
_TICKET_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
# Redis forgets a ticket this long after it expired: by then it is refused
# anyway (the expiry is checked from the stored time), so this only frees memory.
_FORGET_AFTER = 5


class TicketRefused(ValueError):
    """The ticket is unknown, used or expired; the message says which."""


def _key(ticket: str) -> str:
    return "ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


async def issue(now: float | None = None) -> tuple[str, int]:
    """A new ticket and the seconds it is valid for."""
    ttl: int = settings.WS_TICKET_TTL
    ticket = secrets.token_urlsafe(TICKET_BYTES)
    expires = (time.time() if now is None else now) + ttl
    # 256 random bits: a collision is not a case to handle.
    await single_use.add(_key(ticket), repr(expires), ttl + _FORGET_AFTER)
    return ticket, ttl


async def redeem(ticket: str, now: float | None = None) -> None:
    """Use ``ticket`` up; raise ``TicketRefused`` if it cannot admit anyone.

    The ticket is removed in the same step that reads it, so of two
    handshakes racing with one ticket, on one replica or two, one gets in.
    """
    if not _TICKET_RE.fullmatch(ticket):
        raise TicketRefused("malformed ticket")
    stored = await single_use.take(_key(ticket))
    if stored is None:
        raise TicketRefused("unknown or already used ticket")
    current = time.time() if now is None else now
    if current > float(stored):
        raise TicketRefused("expired ticket")
