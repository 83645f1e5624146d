"""Signed requests, as the wire contract's section 1 defines them.

One implementation for the gateway, the Discord poller and the reference
clients, so they can never disagree. It imports nothing from Django on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

API_KEY_HEADER = "X-API-KEY"
TIMESTAMP_HEADER = "X-TIMESTAMP"
SIGNATURE_HEADER = "X-SIGNATURE"

DEFAULT_TOLERANCE = 60

# Whole seconds as a decimal string; the length cap keeps int() cheap.
_TIMESTAMP_RE = re.compile(r"-?[0-9]{1,15}")


class SignatureError(Exception):
    """A signing check failed; ``code`` is the contract's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def sign(secret: str, timestamp: str) -> str:
    """Return the lowercase hex HMAC-SHA256 of ``timestamp`` under ``secret``."""
    return hmac.new(secret.encode(), timestamp.encode(), hashlib.sha256).hexdigest()


def signed_headers(
    api_key: str, secret: str, *, now: float | None = None
) -> dict[str, str]:
    """Return the three headers that sign a request made at ``now``."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        API_KEY_HEADER: api_key,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp),
    }


def _matches_any(given: str, allowed: Sequence[str]) -> bool:
    # compare_digest on bytes: it refuses non-ASCII str, which clients may send.
    # Every allowed value is compared, so the time taken says nothing either.
    given_bytes = given.encode()
    found = False
    for value in allowed:
        found |= hmac.compare_digest(given_bytes, value.encode())
    return found


def check_api_key(api_key: str | None, api_keys: Sequence[str]) -> None:
    """Raise ``SignatureError`` unless ``api_key`` is one of ``api_keys``."""
    if not api_key:
        raise SignatureError("missing_api_key", "The X-API-KEY header is missing.")
    if not _matches_any(api_key, api_keys):
        raise SignatureError("bad_api_key", "The API key is not valid.")


def check_signature(
    timestamp: str | None,
    signature: str | None,
    secrets: Sequence[str],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise ``SignatureError`` unless ``signature`` signs a fresh ``timestamp``."""
    if not timestamp or not signature:
        raise SignatureError(
            "missing_signature", "X-TIMESTAMP and X-SIGNATURE are both required."
        )
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        raise SignatureError("bad_timestamp", "X-TIMESTAMP must be whole unix seconds.")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise SignatureError(
            "stale_timestamp",
            f"X-TIMESTAMP is more than {tolerance} seconds from the server's clock.",
        )
    expected = [sign(secret, timestamp) for secret in secrets]
    if not _matches_any(signature.lower(), expected):
        raise SignatureError("bad_signature", "The signature does not match.")


def verify(
    api_key: str | None,
    timestamp: str | None,
    signature: str | None,
    *,
    api_keys: Sequence[str],
    secrets: Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Run every check of section 1 in the contract's order; raise the first failure."""
    check_api_key(api_key, api_keys)
    check_signature(timestamp, signature, secrets, tolerance=tolerance, now=now)


def _curl_arguments() -> str:
    """``-H`` options signing a request now, from API_KEY and HMAC_SECRET."""
    import os

    # The first of a comma-separated (rotating) list is the one to sign with.
    api_key = os.environ["API_KEY"].split(",")[0].strip()
    secret = os.environ["HMAC_SECRET"].split(",")[0].strip()
    return " ".join(
        f"-H {name}:{value}" for name, value in signed_headers(api_key, secret).items()
    )


if __name__ == "__main__":
    print(_curl_arguments())
