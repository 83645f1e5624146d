"""The admin login's throttle: django-axes' hooks, in the gateway's terms.

django-axes (``AUTHENTICATION_BACKENDS``, ``AxesMiddleware``) counts failed
logins in the database and refuses further attempts for one account or from
one address once ``ADMIN_LOGIN_FAILURE_LIMIT`` is reached, for
``ADMIN_LOGIN_COOLOFF_MINUTES``. This module gives it the client's address, by
the API's own rule, and answers a refused attempt with our page
(docs/security.md, "The admin login").
"""

from __future__ import annotations

import ipaddress
import math
from datetime import datetime, timedelta
from typing import Any

from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off, get_failure_limit
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from jobs.auth import request_ip

LOCKED_STATUS = 429
LOCKED_TEMPLATE = "admin/login_locked.html"


def client_address(request: HttpRequest) -> str | None:
    """The address a login attempt counts against (``AXES_CLIENT_IP_CALLABLE``).

    ``jobs.auth.request_ip``, as the API's rate limits and held refusals use:
    the connection's address, or the one ``TRUSTED_PROXY_COUNT`` proxies
    vouch for. axes stores it in an address column (PostgreSQL's ``inet``),
    so anything else (no connection address: a Unix socket) is None, one
    bucket for all such clients, rather than a failed insert and a 500.
    """
    try:
        address = ipaddress.ip_address(request_ip(request))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # A zone (fe80::1%eth0) is no part of who the client is, and inet
        # refuses it.
        address = ipaddress.IPv6Address(int(address))
    return str(address)


def locked_until(request: HttpRequest, credentials: dict[str, Any] | None) -> datetime:
    """When the lockout on this request's account or address lifts.

    axes counts, per account and per address, the failures of its attempt rows
    (one per account, address and user agent, stamped with their latest
    failure) stamped within the cool-off. The newest rows that reach the limit
    keep the lock until the oldest of them is a cool-off old; of the account's
    and the address's locks, the later one counts.
    """
    limit = get_failure_limit(request, credentials)
    cool_off: timedelta = get_cool_off(request) or timedelta(0)
    ends: list[datetime] = []
    handler = AxesProxyHandler.get_implementation()
    for attempts in handler.get_user_attempts(request, credentials):
        counted = 0
        rows = attempts.order_by("-attempt_time").values_list(
            "attempt_time", "failures_since_start"
        )
        for attempt_time, failures in rows:
            counted += failures
            if counted >= limit:
                ends.append(attempt_time + cool_off)
                break
    return max(ends, default=timezone.now() + cool_off)


def lockout_response(request: HttpRequest, *_args: Any, **_kwargs: Any) -> HttpResponse:
    """The answer to a refused attempt (``AXES_LOCKOUT_CALLABLE``): 429, our page.

    The credentials are read from the request, where axes keeps them, not from
    the arguments: axes 8.3.1's middleware passes them in different orders on
    its sync and async paths, and the admin is served on the async one.
    """
    credentials = getattr(request, "axes_credentials", None)
    until = locked_until(request, credentials)
    cool_off = get_cool_off(request) or timedelta(0)
    context = {
        **admin.site.each_context(request),
        "title": "Sign-in paused",
        "failure_limit": get_failure_limit(request, credentials),
        "cool_off_minutes": math.ceil(cool_off.total_seconds() / 60),
        "locked_until": until,
    }
    response = render(request, LOCKED_TEMPLATE, context, status=LOCKED_STATUS)
    wait = (until - timezone.now()).total_seconds()
    response["Retry-After"] = str(max(1, math.ceil(wait)))
    response["Cache-Control"] = "no-store"
    return response
