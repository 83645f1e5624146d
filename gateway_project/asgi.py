"""ASGI entry point: ``daphne gateway_project.asgi:application``.

HTTP under ``/admin/`` and ``/static/`` goes through Django's full stack; every
other path is the signed API, served by a lean handler. WebSockets at ``/ws``.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from typing import Any
from urllib.parse import unquote

import django
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import ImproperlyConfigured

from gateway_project import server
from gateway_project.config import exit_on_bad_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")


def missing_secrets() -> list[str]:
    """The settings that serving cannot do without."""
    required = {"API_KEY": settings.API_KEYS, "HMAC_SECRET": settings.HMAC_SECRETS}
    if not settings.DEBUG:
        try:
            secret_key = settings.SECRET_KEY
        except ImproperlyConfigured:  # Django refuses to even read an empty one
            secret_key = ""
        required["DJANGO_SECRET_KEY"] = [secret_key] if secret_key else []
    return [name for name, value in required.items() if not value]


# A value that does not parse, or serving without the secrets (which would admit
# nobody, or anybody): refuse in one line, before Django's set-up can print
# anything else. (migrate, createsuperuser and the like never import this
# module; manage.py makes the same check.)
exit_on_bad_settings("Refusing to serve")
if _missing := missing_secrets():
    sys.exit(f"Refusing to serve: {', '.join(_missing)} not set.")

Scope = dict[str, Any]

_FULL_STACK_PREFIXES = ("/admin/", "/" + settings.STATIC_URL.lstrip("/"))
_ENCODED_SLASH = re.compile(r"%2f", re.IGNORECASE)


def routing_path(raw_path: bytes) -> str:
    """The path a request is routed by: decoded, except that ``%2F`` stays.

    daphne decodes the whole path, so ``/job%2fnext`` would be served as
    ``/job/next`` and ``/admin%2f`` as the admin, past any proxy rule written
    for those paths. An encoded slash is part of a segment, never a separator
    (RFC 3986, 2.2): those paths are unknown, the API's 404.
    """
    text = raw_path.decode("latin-1")
    if "%" not in text:
        return text
    return "%2F".join(unquote(part) for part in _ENCODED_SLASH.split(text))


def body_limit(raw_path: bytes) -> int | None:
    """The largest request body a path takes (docs/security.md, "Request bodies").

    The signed API takes no body over ``MAX_JOB_BYTES``; the admin's forms
    are bounded by Django's own ``DATA_UPLOAD_MAX_MEMORY_SIZE``.
    """
    if routing_path(raw_path).startswith(_FULL_STACK_PREFIXES):
        limit: int | None = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return limit
    return int(settings.MAX_JOB_BYTES)


# The server seam (gateway_project/server): bodies over their limit refused
# unread, daphne's access log redacted, and the speed patches that earn their
# keep (docs/benchmarks.md). A protection that cannot be applied stops the
# server here, in one line, rather than serve unprotected. Django's set-up
# comes first, for the log lines of what is left out (LOGGING); its handler,
# which may warn about a missing static folder, comes after.
django.setup(set_prefix=False)
try:
    server.apply(body_limit)
except server.ServerPatchError as exc:
    sys.exit(f"Refusing to serve: {exc}.")

# Consumers import models: Django's application is made first.
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from jobs.consumers import JobConsumer, NoSuchPathConsumer  # noqa: E402
from jobs.logs import hint_at_ports_in_use  # noqa: E402

# A port in use: daphne's one line also says how to pick another.
hint_at_ports_in_use()


def _http_router(api: Any, full_stack: Any) -> Any:
    async def route(scope: Scope, receive: Any, send: Any) -> None:
        raw_path = scope.get("raw_path")
        if raw_path and b"%" in raw_path and b"%2f" in raw_path.lower():
            scope = {**scope, "path": routing_path(raw_path)}
        if scope["path"].startswith(_FULL_STACK_PREFIXES):
            await full_stack(scope, receive, send)
        else:
            await api(scope, receive, send)

    return route


# A young collection every this many objects allocated, net (CPython: 700).
YOUNG_COLLECTION_EVERY = 10_000


def collect_garbage_less_often() -> None:
    """Trace what start-up loaded never again, and the rest less often.

    A serving process allocates without pause (tasks, futures, requests), so
    under load CPython's defaults ran a young collection every few
    milliseconds and a full one, tracing all 200,000 objects of a process
    (Django, its modules and settings included), every 8 seconds, each
    stopping the event loop for about 200 ms: 13 s of each process's time in
    the load test's 4 minutes, 4.7 s since (docs/benchmarks.md). What is loaded
    by now lives as long as the process: frozen, no collection traces it.
    """
    gc.collect()
    gc.freeze()
    _, *older = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *older)


application = ProtocolTypeRouter(
    {
        "http": _http_router(server.api_application(), django_application),
        # No origin check: game clients send no Origin header, and the API key
        # (checked by the consumer before accepting) is what admits a client.
        "websocket": URLRouter(
            [
                path("ws", server.websocket_consumer(JobConsumer).as_asgi()),
                re_path("", NoSuchPathConsumer.as_asgi()),
            ]
        ),
    }
)

# Last: what the lines above loaded is frozen with the rest.
collect_garbage_less_often()
