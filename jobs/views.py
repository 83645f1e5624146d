"""The HTTP API (contract section 2). Every answer is JSON, errors included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse

from jobs import deliveries, leases, metrics, services, tickets, wakeups
from jobs.auth import authenticate, request_ip
from jobs.filters import FilterError, JobFilter, requested_filter
from jobs.health import health_report
from jobs.models import Job
from jobs.payloads import PayloadError, load_json, parse_job
from jobs.queues import Lease, Queue, get_queue
from jobs.ratelimits import check_rate_limit
from jobs.responses import ApiError, json_response, require_method

MAX_WAIT_SECONDS = 30
# Job ids are 64-bit: a larger one in a path is no job, not a database error.
MAX_JOB_PK = 2**63 - 1

View = Callable[..., Coroutine[Any, Any, HttpResponse]]


def signed_endpoint(*methods: str) -> Callable[[View], View]:
    """Check the signature, then the rate limit, then the method (contract order)."""

    def decorate(view: View) -> View:
        @wraps(view)
        async def wrapper(request: HttpRequest, **kwargs: Any) -> HttpResponse:
            try:
                await authenticate(request)
                await check_rate_limit(request, request_ip(request))
                require_method(request, *methods)
                return await view(request, **kwargs)
            except ApiError as exc:
                # Answered here: an exception leaving the view makes Django
                # run the middleware's process_exception in its sync thread,
                # a thread hop for every refused request.
                return exc.response()

        return wrapper

    return decorate


@signed_endpoint("POST")
async def post_job(request: HttpRequest) -> HttpResponse:
    """Publish one job."""
    body = _json_body(request)
    try:
        draft = parse_job(body)
    except PayloadError as exc:
        raise ApiError(400, exc.code, exc.detail) from None
    result = await services.publish(draft)
    if result.created:
        return json_response({"queued": True, "job": result.job}, status=201)
    return json_response({"queued": False, "duplicate": True, "job": result.job})


def _too_large() -> ApiError:
    return ApiError(
        413, "too_large", f"The body is over {settings.MAX_JOB_BYTES} bytes."
    )


@signed_endpoint("GET")
async def next_job(request: HttpRequest) -> HttpResponse:
    """Claim the oldest job; with ``?wait=S`` hold the request until one arrives.

    ``where=``, ``channels=`` and ``tier=`` (docs/filters.md) claim the oldest
    job that matches instead, and only a matching job ends the wait.
    ``lease=S`` hands the job out under a lease of S seconds (jobs.leases).
    """
    wait = _wait_seconds(request.GET.get("wait"))
    lease_seconds = _lease_seconds(request.GET.get("lease"))
    job_filter = _filter(request)
    leases.keep_sweeping()
    queue = get_queue()
    claimer = request_ip(request)
    deadline = time.monotonic() + wait
    if wait:
        await wakeups.listen()  # before the first look: no publish falls between
    signal = wakeups.signal()
    woken: wakeups.Woken | None = None
    try:
        while True:
            generation = signal.generation()
            lease = _new_lease(lease_seconds)
            job = await _claim_or_release(queue, claimer, job_filter, lease)
            if job is not None:
                deliveries.claimed(job)
                if woken is not None and woken.job_id == job["id"]:
                    woken = None  # it took the job it was woken for
                if lease is None:
                    return json_response({"job": job})
                metrics.LEASES_GRANTED.inc()
                return json_response(
                    {"job": job, "lease": _lease_wire(lease, job)},
                    headers={"Cache-Control": "no-store"},
                )
            woken = None  # the queue was empty: this wake-up ends here
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _empty()
            woken = await signal.wait(generation, remaining, job_filter)
            if woken is None:
                return _empty()
    finally:
        if woken is not None:
            # It took an older job than the one it was woken for, or left
            # before looking: the next waiter looks (jobs.wakeups).
            signal.wake_one(woken)


def _filter(request: HttpRequest) -> JobFilter:
    try:
        return requested_filter(
            request.GET.getlist("where"),
            request.GET.get("channels"),
            request.GET.get("tier"),
        )
    except FilterError as exc:
        raise ApiError(400, "bad_filter", str(exc)) from None


async def _claim_or_release(
    queue: Queue, claimer: str, job_filter: JobFilter, lease: Lease | None
) -> dict[str, Any] | None:
    """Claim a job; if this request is cancelled meanwhile, put the job back.

    The client left, or the server is stopping: the claim may still commit in
    its thread, and the answer carrying the job would then never be sent.
    """
    claim = asyncio.ensure_future(queue.claim(claimer, job_filter, lease))
    try:
        return await asyncio.shield(claim)
    except asyncio.CancelledError:
        job = await claim
        if job is not None:
            await queue.release(job)
            await wakeups.announce(job)  # back in the queue: a waiter looks
        raise


def _empty() -> HttpResponse:
    response = HttpResponse(status=204)
    del response["Content-Type"]  # no body, so no type
    return response


def _lease_seconds(raw: str | None) -> int | None:
    if raw is None:
        return None
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not (
        leases.MIN_LEASE_SECONDS <= int(raw) <= leases.MAX_LEASE_SECONDS
    ):
        raise ApiError(
            400,
            "bad_field",
            f"lease must be a whole number of seconds from "
            f"{leases.MIN_LEASE_SECONDS} to {leases.MAX_LEASE_SECONDS}.",
        )
    return int(raw)


def _new_lease(seconds: int | None) -> Lease | None:
    """A fresh lease for each claim: a token is never offered twice."""
    if seconds is None:
        return None
    until = datetime.now(UTC) + timedelta(seconds=seconds)
    return Lease(leases.new_token(), until)


def _lease_wire(lease: Lease, job: dict[str, Any]) -> dict[str, str]:
    """The lease as the worker receives it: ending with the job at the latest."""
    expires = datetime.fromisoformat(job["expires_at"])
    until = min(lease.until, expires)
    text = until.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {"token": lease.token, "expires_at": text}


def _wait_seconds(raw: str | None) -> float:
    if raw is None or raw == "":
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise ApiError(
            400, "bad_field", f"wait must be a number from 0 to {MAX_WAIT_SECONDS}."
        )
    return wait


@signed_endpoint("POST")
async def ack_job(request: HttpRequest, pk: int) -> HttpResponse:
    """Finish a leased job: it is never handed out again."""
    job_pk = await _settle_lease(request, pk, leases.ack)
    return json_response({"acked": True, "id": job_pk})


@signed_endpoint("POST")
async def release_job(request: HttpRequest, pk: int) -> HttpResponse:
    """Give a leased job back: at the head of the queue, at once."""
    job_pk = await _settle_lease(request, pk, leases.release)
    return json_response({"released": True, "id": job_pk})


async def _settle_lease(
    request: HttpRequest, pk: int, settle: Callable[[int, str], Awaitable[None]]
) -> int:
    """Ack or release job ``pk`` under the request's lease token; 404 or 409 if not."""
    token = _lease_token(request)
    job_pk = _job_pk(pk)
    if not leases.could_be_a_token(token):
        # Never one this gateway gave out (and a NUL PostgreSQL would refuse):
        # not held, whatever the job, once the job is known to exist.
        if not await Job.objects.filter(pk=job_pk).aexists():
            raise _no_such_job(pk)
        raise _lease_lost(pk)
    leases.keep_sweeping()
    try:
        await settle(job_pk, token)
    except leases.UnknownJob:
        raise _no_such_job(pk) from None
    except leases.LeaseLost:
        raise _lease_lost(pk) from None
    return job_pk


def _job_pk(pk: int) -> int:
    if pk > MAX_JOB_PK:
        raise _no_such_job(pk)
    return pk


def _no_such_job(pk: int) -> ApiError:
    return ApiError(404, "not_found", f"No job has the id {pk}.")


def _lease_lost(pk: int) -> ApiError:
    return ApiError(
        409,
        "lease_lost",
        f"This lease on job {pk} is not held: unknown, run out, "
        "or already acked or released.",
    )


def _json_body(request: HttpRequest) -> bytes:
    """A request's JSON body, at most ``MAX_JOB_BYTES``: 415 or 413 otherwise."""
    if (request.content_type or "") != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "The body must be application/json."
        )
    declared = request.META.get("CONTENT_LENGTH")
    if declared and declared.isdigit() and int(declared) > settings.MAX_JOB_BYTES:
        raise _too_large()
    try:
        body = request.body
    except RequestDataTooBig:
        # A body with no Content-Length (chunked) that is past even Django's cap.
        raise _too_large() from None
    if len(body) > settings.MAX_JOB_BYTES:
        raise _too_large()
    return body


def _lease_token(request: HttpRequest) -> str:
    """The token of ``{"lease": "<token>"}``, the body of an ack or a release.

    Bodies are capped as ``POST /job``'s are, at ``MAX_JOB_BYTES``.
    """
    body = _json_body(request)
    try:
        data = load_json(body, what="body")
    except PayloadError as exc:
        raise ApiError(400, exc.code, exc.detail) from None
    token = data.get("lease") if isinstance(data, dict) else None
    if not isinstance(token, str) or not token or len(token) > leases.MAX_TOKEN_LENGTH:
        raise ApiError(
            400,
            "bad_field",
            'The body must be {"lease": "<token>"}, the token GET /job/next gave.',
        )
    return token


@signed_endpoint("GET")
async def health(request: HttpRequest) -> HttpResponse:
    """Queue depth, backends in use and, when known, the poller's state."""
    return json_response(await health_report())


@signed_endpoint("POST")
async def ws_ticket(request: HttpRequest) -> HttpResponse:
    """A single-use ticket for one ``/ws`` handshake (docs/security.md)."""
    ticket, ttl = await tickets.issue()
    # A credential: no cache on the way may keep it.
    return json_response(
        {"ticket": ticket, "expires_in": ttl}, headers={"Cache-Control": "no-store"}
    )


async def healthz(request: HttpRequest) -> HttpResponse:
    """Unsigned liveness for load balancers; says nothing else."""
    require_method(request, "GET", "HEAD")
    return json_response({"ok": True})


async def not_found(request: HttpRequest, unknown: str = "") -> HttpResponse:
    """Any path the API does not know: 404, without a signature check."""
    return ApiError(404, "not_found", f"No such endpoint: {request.path}").response()
