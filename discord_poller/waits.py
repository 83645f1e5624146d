"""Waits that end the moment the poller is told to stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def wait_for_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile; True if it was."""
    if stop.is_set():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def run_until(
    stop: asyncio.Event, *work: Awaitable[Any], timeout: float | None = None
) -> bool:
    """Run ``work`` until it is all done, ``stop`` is set, or ``timeout`` passes.

    What is unfinished then is cancelled. Returns True if all of it finished;
    the first exception raised by the work is raised here.
    """
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(item) for item in work]
    together: asyncio.Future[list[Any]] = asyncio.gather(*tasks)
    halted: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    try:
        waiting: set[asyncio.Future[Any]] = {together, halted}
        done, _ = await asyncio.wait(
            waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if together in done:
            together.result()  # raises the work's first exception
            return True
        return False
    finally:
        futures: list[asyncio.Future[Any]] = [together, halted, *tasks]
        for future in futures:
            future.cancel()  # a no-op on what has finished
        await asyncio.gather(*futures, return_exceptions=True)
