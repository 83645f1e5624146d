"""The API's ASGI handler: what a request leaves behind once answered."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

import httpx
import pytest
from django.core.exceptions import RequestAborted
from django.db.backends.base.base import BaseDatabaseWrapper

from gateway_project.server.api_handler import _unexpected_error

Sign = Callable[..., dict[str, str]]


@pytest.mark.backends
@pytest.mark.parametrize("signed", [True, False], ids=["valid", "forged"])
async def test_an_answered_request_leaves_no_cycle_for_the_collector(
    api: httpx.AsyncClient, sign: Sign, signed: bool
) -> None:
    headers = sign() if signed else sign(secret="forged")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            response = await api.get("/job/next", headers=headers)
            assert response.status_code == (204 if signed else 401)
        # The client left after each answer: Django's watch for it raised
        # RequestAborted, read, not raised through the handler's frame. And
        # the SQLite peek at the queue built no connection object per request.
        gc.collect()
        kinds = (RequestAborted, BaseDatabaseWrapper)
        left = [o for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


async def test_the_error_a_task_ended_with_is_read_unless_expected() -> None:
    async def fail(error: BaseException) -> None:
        raise error

    async def wait() -> None:
        await asyncio.Event().wait()

    aborted = asyncio.create_task(fail(RequestAborted()))
    broken = asyncio.create_task(fail(ValueError("a bug")))
    cancelled = asyncio.create_task(wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait([aborted, broken, cancelled])

    assert _unexpected_error(aborted) is None
    assert _unexpected_error(cancelled) is None
    error = _unexpected_error(broken)
    assert isinstance(error, ValueError) and str(error) == "a bug"
