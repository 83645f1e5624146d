"""The ``/ws`` push stream (contract section 3), resumed across reconnects.

A dropped connection is reopened with ``since=`` the last job id seen, so the
gateway replays exactly what was missed. Jobs come out in id order, each once.
The stream asks for batched frames (``batch=1``): when several jobs are ready at
once the gateway sends them in one frame, and they come out one by one here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeGuard
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway_client.backoff import Backoff
from gateway_client.errors import (
    BadFilter,
    BadRequest,
    GatewayError,
    GatewayUnreachable,
    RateLimited,
    Unavailable,
    parse_retry_after,
)
from gateway_client.filters import NO_FILTER, JobFilter

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# A stopped stream should not hang on a peer that never answers the close.
CLOSE_TIMEOUT = 2.0


async def stream_jobs(
    ws_url: str,
    *,
    authorise: Callable[[str], Awaitable[tuple[str, dict[str, str]]]],
    check_credentials: Callable[[], Awaitable[object]],
    job_filter: JobFilter = NO_FILTER,
    since: int | None = None,
    backoff: Backoff,
    retries: int = 0,
    open_timeout: float = 10.0,
    sleep: Sleep = asyncio.sleep,
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield each job pushed on ``ws_url``, reconnecting until closed.

    ``authorise`` turns each handshake's URL into the URL and headers that open
    it (a fresh ticket, or freshly signed headers). ``check_credentials`` is a signed
    HTTP request, made only to tell why a handshake was refused: the gateway
    answers 403 for a bad key, a rate limit and a bad parameter alike.
    ``job_filter`` goes on every handshake, so replays are filtered too.
    ``retries`` consecutive failures raise the last one (0: never give up).
    """
    # Ids already yielded, so a replay after a reconnect repeats none of them.
    # The gateway sends jobs in id order (docs/realtime.md), so the newest id
    # seen is where a reconnect resumes; a job arriving out of order from an
    # older gateway is still yielded: losing it would be worse.
    seen: dict[int, None] = {}
    floor = -1 if since is None else since  # asked to start after this id
    resume = since
    while True:
        retry_after: float | None = None
        try:
            url, headers = await authorise(_url(ws_url, job_filter, resume))
            async with connect(
                url,
                additional_headers=headers,
                open_timeout=open_timeout,
                close_timeout=CLOSE_TIMEOUT,
            ) as websocket:
                async for raw in websocket:
                    frame = _decode(raw)
                    kind = frame.get("type")
                    if kind == "hello":
                        backoff.reset()
                        if resume is None:
                            # Asked for "from now": on a reconnect, replay
                            # everything newer than the gateway's newest job
                            # at the first connect.
                            newest = frame.get("last_id")
                            resume = newest if _is_id(newest) else 0
                    elif kind in ("job", "jobs"):
                        for job in _jobs(frame):
                            job_id = job["id"]
                            if job_id in seen or job_id <= floor:
                                continue
                            seen[job_id] = None
                            if len(seen) > SEEN_LIMIT:
                                del seen[next(iter(seen))]
                            resume = job_id if resume is None else max(resume, job_id)
                            yield job
                    elif kind == "error":
                        logger.warning(
                            "the gateway sent an error frame: %s: %s",
                            frame.get("error"),
                            frame.get("detail"),
                        )
            error: GatewayError = GatewayUnreachable(
                "connection_closed", None, "the gateway closed the stream"
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 403:
                error = await _why_refused(check_credentials, job_filter)
            elif status == 429 or status >= 500:
                error = (RateLimited if status == 429 else Unavailable)(
                    f"http_{status}",
                    status,
                    "the WebSocket handshake was refused",
                    parse_retry_after(exc.response.headers.get("Retry-After")),
                )
            else:
                raise BadRequest(
                    f"http_{status}", status, "the WebSocket handshake was refused"
                ) from None
            retry_after = error.retry_after
        except (RateLimited, Unavailable, GatewayUnreachable) as exc:
            # Getting a ticket failed in a way worth retrying.
            error, retry_after = exc, exc.retry_after
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            reason = str(exc) or type(exc).__name__
            error = GatewayUnreachable(
                "unreachable", None, f"stream connection failed: {reason}"
            )
        delay = backoff.next_delay(retry_after)
        if retries and backoff.failures >= retries:
            raise error
        logger.warning(
            "stream: %s; reconnecting in %.2fs (since=%s)", error, delay, resume
        )
        await sleep(delay)


async def _why_refused(
    check_credentials: Callable[[], Awaitable[object]],
    job_filter: JobFilter,
) -> GatewayError:
    """Raise the fatal reason for a 403 handshake, or return one worth retrying."""
    try:
        await check_credentials()
    except (RateLimited, Unavailable, GatewayUnreachable) as exc:
        return exc
    # An AuthError (or any other refusal) from the check propagates: fatal.
    if job_filter.where or job_filter.tier is not None:
        # The gateway gives no reason on a handshake; its log names the bad
        # part. The clauses' shape was checked here, so what is left is a
        # value that is not a number, an unknown tier, or the channels.
        raise BadFilter(
            "bad_filter",
            403,
            "the gateway refused the WebSocket handshake although the "
            f"credentials are valid; check the filter ({job_filter}): a "
            "comparison needs a number or a numbers key, and a tier must be "
            "one the gateway configures (its log names the bad part)",
        )
    raise BadRequest(
        "handshake_refused",
        403,
        "the gateway refused the WebSocket handshake although the credentials "
        "are valid; check the channels and since parameters",
    )


SEEN_LIMIT = 10_000


def _url(ws_url: str, job_filter: JobFilter, since: int | None) -> str:
    query = job_filter.params()
    if since is not None:
        query.append(("since", str(since)))
    query.append(("batch", "1"))
    # Every value percent-encoded (">=" as %3E%3D, "+" as %2B, a space as
    # "+"), so the URL is ASCII and websockets sends it unchanged: a signed
    # handshake signs exactly this target.
    return f"{ws_url}?{urlencode(query, safe=',')}"


def _jobs(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs of a ``job`` or ``jobs`` frame, each with an id; the rest dropped."""
    found = [frame.get("job")] if frame["type"] == "job" else frame.get("jobs")
    if not isinstance(found, list):
        logger.warning("ignoring a jobs frame without a list of jobs")
        return []
    jobs = [job for job in found if isinstance(job, dict) and _is_id(job.get("id"))]
    if len(jobs) < len(found):
        logger.warning("ignoring a job without an id")
    return jobs


def _decode(raw: str | bytes) -> dict[str, Any]:
    if isinstance(raw, bytes):
        logger.warning("ignoring a binary frame")
        return {}
    try:
        frame = json.loads(raw)
    except ValueError:
        logger.warning("ignoring a frame that is not JSON")
        return {}
    return frame if isinstance(frame, dict) else {}


def _is_id(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
