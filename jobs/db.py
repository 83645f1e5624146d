"""Running ORM work from async code."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import connections

P = ParamSpec("P")
R = TypeVar("R")


def _close_broken_connections() -> None:
    # Threads of the pool outlive requests, so nothing else gives them
    # Django's per-request clean-up: a connection that failed (the database
    # restarted) is dropped here and reopened by the next query.
    for connection in connections.all(initialized_only=True):
        connection.close_if_unusable_or_obsolete()


def in_db_thread(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ``func`` in a worker thread that keeps its database connection.

    Each call is a whole unit of work (its transaction begins and ends inside),
    so it does not need the request's thread; reusing pool threads keeps their
    connections open between requests instead of opening one per request.
    """

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        _close_broken_connections()
        return func(*args, **kwargs)

    return functools.wraps(func)(sync_to_async(run, thread_sensitive=False))
