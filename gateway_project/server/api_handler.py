"""The API's ASGI handler: Django's request handling without the admin's stack.

Built on Django's private handler internals (``_get_response_async``,
``_middleware_chain`` and the middleware lists, ``_resource_closers``) and on
the steps of ``ASGIHandler.handle``: ``api_handler_problems`` checks them.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import CodeType
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import BaseHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponseBase
from django.urls import Resolver404, ResolverMatch, set_script_prefix, set_urlconf
from django.utils.module_loading import import_string


class ApiHandler(ASGIHandler):
    """Serves the API paths through ``API_MIDDLEWARE`` only, with no thread hops.

    Under ASGI, Django runs each hook of its own middleware (sessions, CSRF,
    messages...), the ``request_started`` and ``request_finished`` signals and
    ``response.close()`` in worker threads, inside a per-request thread context
    that starts (and joins) a thread of its own. The signed API needs none of
    it: its views are async, and its database work runs in pooled threads that
    keep their connections (``jobs.db``). Skipping all that serves a request in
    about a third of the CPU time (docs/benchmarks.md).
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

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Django's ASGIHandler.handle(), less its thread-bound steps (above).
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            # A request Django cannot even build (a bad Host, say).
            assert error_response is not None
            body_file.close()
            await self.send_response(error_response, send)
            _close(error_response)
            return
        # Django's own watch for a client that leaves: the view is cancelled,
        # and a long-poll's claim in flight is put back (jobs.views).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(self._respond(request, send)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the server cancels this request (a shutdown): the view
            # is cancelled with it, rather than answering a closed connection.
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        body_file.close()
        for task in tasks:
            if error := _unexpected_error(task):
                raise error

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        """Django's, less its ``django.request`` warning for every 4xx and 5xx.

        Django writes that line from a worker thread, one thread hop per error
        response: refusing a forged request cost about twice what serving a
        valid one did, and a flood of them became a flood of log lines. The
        access log already has a line per request with its status, and the
        API middleware logs every 5xx with its cause.
        """
        set_urlconf(settings.ROOT_URLCONF)
        response: HttpResponseBase = await self._middleware_chain(request)  # type: ignore[misc]
        response._resource_closers.append(request.close)  # type: ignore[attr-defined]
        return response

    def resolve_request(self, request: HttpRequest) -> ResolverMatch:
        """Django's, except that a path no URL pattern can match is the API's 404.

        The URLconf's catch-all answers every path it can match in JSON, but
        a path that is not a URL path at all (``OPTIONS *``) or holds a
        newline (``%0a``) matches no pattern, and Django answered those with
        its own HTML 404 page.
        """
        from jobs.views import not_found

        try:
            return super().resolve_request(request)
        except Resolver404:
            match = ResolverMatch(not_found, (), {})
            request.resolver_match = match
            return match

    async def _respond(self, request: HttpRequest, send: Any) -> None:
        response: HttpResponseBase = await self.run_get_response(request)
        try:
            await self.send_response(response, send)
        except asyncio.CancelledError:
            pass  # the client left while the answer was being sent
        finally:
            _close(response)


def _unexpected_error(task: asyncio.Task[None]) -> BaseException | None:
    """What a finished task raised, other than a cancellation or the client leaving.

    Read, not raised out of the task (``await task``): the client's leaving,
    raised in the handler's frame, would carry that frame in its traceback,
    and the frame holds the task that holds the exception. That cycle, with
    the request's objects, was left to the garbage collector once per request,
    a forged one's included, making the young collections under a flood twice
    as long (docs/benchmarks.md).
    """
    if task.cancelled():
        return None
    error = task.exception()
    return None if isinstance(error, RequestAborted) else error


def _close(response: HttpResponseBase) -> None:
    """``response.close()`` less its ``request_finished`` signal.

    The signal's receivers close the calling thread's database connections and
    caches, and the event loop's thread has none (``jobs.db``): about 50 µs of
    every request, forged ones included, for nothing.
    """
    closers = response._resource_closers  # type: ignore[attr-defined]
    for closer in closers:
        with contextlib.suppress(Exception):
            closer()
    closers.clear()
    response.closed = True


# What ApiHandler re-implements: the steps of Django's ASGIHandler.handle, and
# the attributes BaseHandler.load_middleware sets.
HANDLE_STEPS = (
    "read_body",
    "create_request",
    "send_response",
    "listen_for_disconnect",
    "run_get_response",
)
MIDDLEWARE_ATTRIBUTES = (
    "_view_middleware",
    "_template_response_middleware",
    "_exception_middleware",
    "_middleware_chain",
)


def api_handler_problems() -> list[str]:
    """Why ``ApiHandler`` cannot serve on the Django installed; empty if it can."""
    problems = []
    used = _names_used(ASGIHandler.handle.__code__)
    if missing := [step for step in HANDLE_STEPS if step not in used]:
        problems.append(f"ASGIHandler.handle no longer uses {missing}")
    used = set(BaseHandler.load_middleware.__code__.co_names)
    if missing := [name for name in MIDDLEWARE_ATTRIBUTES if name not in used]:
        problems.append(f"BaseHandler.load_middleware no longer sets {missing}")
    for name in ("_get_response_async", "resolve_request", "get_response_async"):
        if not callable(getattr(BaseHandler, name, None)):
            problems.append(f"Django's BaseHandler has no {name}")
    if not isinstance(getattr(HttpResponseBase(), "_resource_closers", None), list):
        problems.append("Django's responses keep no _resource_closers")
    return problems


def _names_used(code: CodeType) -> set[str]:
    """The names ``code`` and the functions defined in it refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names_used(const)
    return names
