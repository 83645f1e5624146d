"""Signed requests: the wire contract's v1 (section 1) and the gateway's v2.

One implementation for the gateway, the Discord poller and the reference
clients, so they can never disagree. It imports nothing from Django on purpose.

v1 signs the timestamp alone. v2 (``X-SIGNATURE-VERSION: 2``) signs

    timestamp \n nonce \n METHOD \n target \n hex(sha256(body))

where ``target`` is the request target exactly as sent on the request line: the
raw path, then ``?`` and the raw query string when there is one, with no
decoding or re-encoding. The nonce (``X-NONCE``, 16 or more random bytes in
hex) is remembered by the gateway for the tolerance window, so a v2 request is
accepted once (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as _secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

API_KEY_HEADER = "X-API-KEY"
TIMESTAMP_HEADER = "X-TIMESTAMP"
SIGNATURE_HEADER = "X-SIGNATURE"
VERSION_HEADER = "X-SIGNATURE-VERSION"
NONCE_HEADER = "X-NONCE"

DEFAULT_TOLERANCE = 60
# 16 random bytes (32 hex digits) at least; 64 bytes at most keeps keys small.
NONCE_BYTES = 16
MIN_NONCE_DIGITS = 2 * NONCE_BYTES
MAX_NONCE_DIGITS = 128

# Whole seconds as a decimal string; the length cap keeps int() cheap.
_TIMESTAMP_RE = re.compile(r"-?[0-9]{1,15}")
_NONCE_RE = re.compile(r"[0-9a-fA-F]+")


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
    """Return the three v1 headers that sign a request made at ``now``."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        API_KEY_HEADER: api_key,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp),
    }


def new_nonce() -> str:
    """A fresh v2 nonce: 16 random bytes from the OS, in lowercase hex."""
    return _secrets.token_hex(NONCE_BYTES)


def string_to_sign_v2(
    timestamp: str, nonce: str, method: str, target: str, body: bytes
) -> bytes:
    """The exact bytes v2 signs (see the module docstring)."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{timestamp}\n{nonce}\n{method.upper()}\n{target}\n{digest}".encode()


def sign_v2(
    secret: str,
    timestamp: str,
    nonce: str,
    method: str,
    target: str,
    body: bytes = b"",
) -> str:
    """Return the lowercase hex v2 signature of one request."""
    message = string_to_sign_v2(timestamp, nonce, method, target, body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers_v2(
    api_key: str,
    secret: str,
    *,
    method: str,
    target: str,
    body: bytes = b"",
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the five headers that sign one request with v2.

    ``target`` is the path and query exactly as they will be sent
    (``/job/next?wait=5``). Each call draws a new nonce: a v2 request is
    accepted once, so every request, retries included, is signed afresh.
    """
    timestamp = str(int(time.time() if now is None else now))
    nonce = new_nonce() if nonce is None else nonce
    return {
        API_KEY_HEADER: api_key,
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        VERSION_HEADER: "2",
        SIGNATURE_HEADER: sign_v2(secret, timestamp, nonce, method, target, body),
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
    _check_timestamp(timestamp, signature, tolerance, now)
    assert timestamp is not None and signature is not None
    expected = [sign(secret, timestamp) for secret in secrets]
    if not _matches_any(signature.lower(), expected):
        raise SignatureError(
            "bad_signature",
            "The signature does not match. Signature v1 signs the X-TIMESTAMP "
            "value alone, HMAC-SHA256 with HMAC_SECRET, in lowercase hex.",
        )


def _check_timestamp(
    timestamp: str | None, signature: str | None, tolerance: int, now: float | None
) -> None:
    if not timestamp or not signature:
        raise _missing_signature()
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        raise SignatureError("bad_timestamp", "X-TIMESTAMP must be whole unix seconds.")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise SignatureError(
            "stale_timestamp",
            f"X-TIMESTAMP is more than {tolerance} seconds from the server's clock.",
        )


def _missing_signature() -> SignatureError:
    return SignatureError(
        "missing_signature", "X-TIMESTAMP and X-SIGNATURE are both required."
    )


def check_nonce(nonce: str | None) -> None:
    """Raise ``SignatureError`` unless ``nonce`` is 32 to 128 hex digits."""
    if not nonce:
        raise SignatureError("missing_nonce", "Signature v2 needs an X-NONCE header.")
    if not (
        MIN_NONCE_DIGITS <= len(nonce) <= MAX_NONCE_DIGITS
        and nonce.isascii()
        and _NONCE_RE.fullmatch(nonce)
    ):
        raise SignatureError(
            "bad_nonce",
            f"X-NONCE must be {MIN_NONCE_DIGITS} to {MAX_NONCE_DIGITS} hex digits "
            f"({NONCE_BYTES} or more random bytes).",
        )


def check_signature_v2(
    timestamp: str | None,
    nonce: str | None,
    signature: str | None,
    secrets: Sequence[str],
    *,
    method: str,
    target: str,
    body: bytes | Callable[[], bytes] = b"",
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise ``SignatureError`` unless ``signature`` is a valid v2 signature.

    ``body`` may be a callable, read only once the cheaper checks have passed.
    Whether the nonce was seen before is the caller's check: it needs a store.
    """
    if not timestamp or not signature:
        raise _missing_signature()
    check_nonce(nonce)
    _check_timestamp(timestamp, signature, tolerance, now)
    assert timestamp is not None and nonce is not None and signature is not None
    content = body() if callable(body) else body
    message = string_to_sign_v2(timestamp, nonce, method, target, content)
    expected = [
        hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
        for secret in secrets
    ]
    if not _matches_any(signature.lower(), expected):
        raise SignatureError(
            "bad_signature", mismatch_detail_v2(method, target, content)
        )


# A target longer than this is cut in a refusal's detail.
DETAIL_TARGET_CHARS = 300


def mismatch_detail_v2(method: str, target: str, body: bytes) -> str:
    """What a v2 signature signs, and what the gateway took for this request.

    All of it comes from the request itself: never a secret, nor the signature
    that was expected. The usual mistake, signing a path without the query
    it is sent with, shows at a glance.
    """
    shown = target
    if len(shown) > DETAIL_TARGET_CHARS:
        shown = shown[:DETAIL_TARGET_CHARS] + "…"
    digest = hashlib.sha256(body).hexdigest()
    return (
        "The signature does not match. Signature v2 signs five lines, HMAC-SHA256 "
        "with HMAC_SECRET: X-TIMESTAMP, X-NONCE, the method, the path with its "
        "query exactly as sent, and the hex SHA-256 of the body. This request "
        f"was checked as method {method.upper()}, path and query {shown}, body "
        f"SHA-256 {digest} ({len(body)} bytes)."
    )


def signature_version(value: str | None, *, require_v2: bool = False) -> int:
    """The version ``X-SIGNATURE-VERSION`` asks for; absent means 1."""
    if value is None or value.strip() == "1":
        if require_v2:
            raise SignatureError(
                "signature_v2_required",
                "This gateway accepts only signature v2 (X-SIGNATURE-VERSION: 2).",
            )
        return 1
    if value.strip() == "2":
        return 2
    raise SignatureError("bad_signature_version", "X-SIGNATURE-VERSION must be 1 or 2.")


@dataclass(frozen=True)
class Verified:
    """A request whose signature checked out; v2 leaves a nonce to remember."""

    version: int
    timestamp: int
    nonce: str | None = None

    def nonce_lifetime(self, tolerance: int, now: float | None = None) -> int:
        """Seconds the nonce must be remembered: until its timestamp goes stale."""
        current = time.time() if now is None else now
        return max(1, int(self.timestamp + tolerance - current) + 1)


def verify_request(
    headers: Mapping[str, str],
    *,
    method: str,
    target: str,
    body: bytes | Callable[[], bytes] = b"",
    api_keys: Sequence[str],
    secrets: Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE,
    require_v2: bool = False,
    now: float | None = None,
) -> Verified:
    """Check a request signed with v1 or v2; raise the first failure.

    Order: the key (``missing_api_key``, ``bad_api_key``), the version
    (``bad_signature_version``, ``signature_v2_required``), then
    ``missing_signature``, for v2 ``missing_nonce`` and ``bad_nonce``, then
    ``bad_timestamp``, ``stale_timestamp`` and ``bad_signature``. ``headers``
    may use any letter case in its names.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    check_api_key(lowered.get("x-api-key"), api_keys)
    version = signature_version(
        lowered.get("x-signature-version"), require_v2=require_v2
    )
    timestamp = lowered.get("x-timestamp")
    signature = lowered.get("x-signature")
    if version == 1:
        check_signature(timestamp, signature, secrets, tolerance=tolerance, now=now)
        return Verified(1, int(timestamp or 0))
    nonce = lowered.get("x-nonce")
    check_signature_v2(
        timestamp,
        nonce,
        signature,
        secrets,
        method=method,
        target=target,
        body=body,
        tolerance=tolerance,
        now=now,
    )
    return Verified(2, int(timestamp or 0), (nonce or "").lower())


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


def curl_arguments(
    argv: Sequence[str], env: Mapping[str, str], *, now: float | None = None
) -> str:
    """``-H`` options for curl signing one request now, from API_KEY and HMAC_SECRET.

    ``METHOD TARGET [BODY_FILE]`` signs with v2 (``-`` reads the body from
    stdin); no arguments, or ``--v1``, prints the v1 headers.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m gateway_client.signing",
        description="Print curl -H options that sign one request to the gateway.",
    )
    parser.add_argument("--v1", action="store_true", help="sign with v1 instead")
    parser.add_argument("method", nargs="?", help="GET or POST (v2)")
    parser.add_argument("target", nargs="?", help="path and query as sent (v2)")
    parser.add_argument("body", nargs="?", help="a file holding the body, - stdin")
    args = parser.parse_args(argv)
    # The first of a comma-separated (rotating) list is the one to sign with.
    api_key = env.get("API_KEY", "").split(",")[0].strip()
    secret = env.get("HMAC_SECRET", "").split(",")[0].strip()
    if not api_key or not secret:
        parser.error("API_KEY and HMAC_SECRET must be set")
    for name, value in (("API_KEY", api_key), ("HMAC_SECRET", secret)):
        # A header cannot carry anything else; never print the value itself.
        if not (value.isascii() and value.isprintable()):
            parser.error(f"{name} must be printable ASCII (a placeholder left in?)")
    if args.v1 or args.method is None:
        headers = signed_headers(api_key, secret, now=now)
    else:
        if args.target is None or not args.target.startswith("/"):
            parser.error("TARGET must be the path and query, starting with /")
        body = b""
        if args.body == "-":
            body = sys.stdin.buffer.read()
        elif args.body is not None:
            with open(args.body, "rb") as file:
                body = file.read()
        headers = signed_headers_v2(
            api_key,
            secret,
            method=args.method,
            target=args.target,
            body=body,
            now=now,
        )
    # No spaces and no quotes: the output is meant for curl $(...), where the
    # shell splits words but does not parse quotes.
    return " ".join(f"-H {name}:{value}" for name, value in headers.items())


if __name__ == "__main__":
    import os
    import sys

    print(curl_arguments(sys.argv[1:], os.environ))
