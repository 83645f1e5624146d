"""What is kept once per event loop: a serving process runs one, tests many.

Each event loop needs its own bus subscription and publisher, hub, wake-up
signal and Redis client: their futures, tasks and connections belong to the
loop that made them. ``PerLoop`` makes each on first use in a loop, and
forgets it with the loop.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One value for each running event loop, made by ``factory`` when first asked.

    Keyed weakly by loop: once nothing else holds a loop, its value goes with
    it (a value holding its own loop keeps both, for the process's life,
    which is what a serving process's one loop does anyway). Adding a value
    and copying them all take a lock, so that a thread without a loop (an
    operator's requeue waking every loop) can copy them while loops add
    theirs from their own threads.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self) -> T:
        """The running loop's value, made now if it has none yet."""
        loop = asyncio.get_running_loop()
        found = self._values.get(loop)
        if found is None:
            with self._lock:
                found = self._values.get(loop)
                if found is None:
                    found = self._values[loop] = self._factory()
        return found

    def items(self) -> list[tuple[asyncio.AbstractEventLoop, T]]:
        """Every loop with its value, copied: safe from any thread."""
        with self._lock:
            return list(self._values.items())

    def clear(self) -> None:
        """Forget every value: each loop makes a new one when next asked."""
        with self._lock:
            self._values.clear()
