"""The API's only middleware: contract-shaped errors, whatever went wrong."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from django.core.exceptions import DisallowedHost
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from redis.exceptions import RedisError

from jobs import logs
from jobs.auth import request_ip
from jobs.responses import ApiError, unavailable

logger = logging.getLogger(__name__)

# Answers that carry no body, and so no Content-Length (RFC 9110, 8.6).
_NO_BODY = frozenset({204, 304})


class ApiMiddleware:
    """Turn exceptions into the contract's JSON errors; never an HTML page.

    Async only, so a request never hops to a thread just to pass through it.
    """

    sync_capable = False
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], Awaitable[HttpResponse]]
    ) -> None:
        self.get_response = get_response

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.monotonic()
        rid = logs.begin(request.headers.get("X-Request-ID"))
        status = 499  # the client left (or the server stopped) before an answer
        try:
            response = await self._respond(request)
            status = response.status_code
        finally:
            logs.access(
                method=request.method or "",
                path=request.path,
                query=request.META.get("QUERY_STRING", ""),
                status=status,
                started=started,
                client=request_ip(request),
            )
        response["X-Request-ID"] = rid
        # Every answer says what it is; no browser is to guess another type.
        response["X-Content-Type-Options"] = "nosniff"
        if not response.streaming and response.status_code not in _NO_BODY:
            # As Django's CommonMiddleware does: without it, daphne sends
            # every answer chunked.
            response["Content-Length"] = str(len(response.content))
        return response

    async def _respond(self, request: HttpRequest) -> HttpResponse:
        try:
            request.get_host()
        except DisallowedHost:
            return ApiError(
                400, "bad_host", "The Host header is not allowed."
            ).response()
        return await self.get_response(request)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponse:
        if isinstance(exception, ApiError):
            return exception.response()
        if isinstance(exception, DatabaseError | RedisError | OSError):
            logger.warning(
                "%s %s: backing service unavailable: %s",
                request.method,
                request.path,
                exception,
            )
            return unavailable().response()
        logger.exception("%s %s failed", request.method, request.path)
        return ApiError(
            500, "internal_error", "The gateway failed; the error is logged."
        ).response()
