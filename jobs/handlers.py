"""The API's ASGI handler: Django's request handling without the admin's stack."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.utils.module_loading import import_string


class ApiHandler(ASGIHandler):
    """Serves the API paths through ``API_MIDDLEWARE`` only.

    Django's own middleware (sessions, CSRF, messages...) runs each hook in a
    worker thread under ASGI; the signed API needs none of it, and a request
    that skips those thread hops is served several times faster.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        # The stubs omit BaseHandler's async core, which this is built on.
        get_response = self._get_response_async  # type: ignore[attr-defined]
        handler = convert_exception_to_response(get_response)
        for path in reversed(settings.API_MIDDLEWARE):
            middleware = import_string(path)(handler)
            if hasattr(middleware, "process_exception"):
                self._exception_middleware.append(middleware.process_exception)
            handler = convert_exception_to_response(middleware)
        self._middleware_chain = handler
