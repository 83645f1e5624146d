"""One value per event loop: made once in each, dropped with it, copied safely."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from jobs.per_loop import PerLoop


class Thing:
    """A value of its own for each loop."""


def test_each_loop_has_its_own_value_made_once() -> None:
    things: PerLoop[Thing] = PerLoop(Thing)

    async def twice() -> tuple[Thing, Thing]:
        return things.get(), things.get()

    first, again = asyncio.run(twice())
    assert first is again
    other, _ = asyncio.run(twice())
    assert other is not first


def test_a_value_goes_with_its_loop() -> None:
    things: PerLoop[Thing] = PerLoop(Thing)
    loop = asyncio.new_event_loop()
    thing = weakref.ref(loop.run_until_complete(_get(things)))
    assert [value for _, value in things.items()] == [thing()]
    loop.close()
    del loop
    gc.collect()
    assert thing() is None
    assert things.items() == []


def test_clear_forgets_every_value() -> None:
    things: PerLoop[Thing] = PerLoop(Thing)

    async def check() -> None:
        first = things.get()
        things.clear()
        assert things.items() == []
        assert things.get() is not first

    asyncio.run(check())


class _Guarded(weakref.WeakKeyDictionary[Any, Any]):
    """Fails an insert or a copy made without the lock held.

    Loops add their values from their own threads while a thread without a
    loop copies them (an operator's requeue waking every loop): unlocked, a
    copy can meet an insert ("dictionary changed size during iteration").
    """

    def __init__(self, lock: Any) -> None:
        super().__init__()
        self.lock = lock

    def __setitem__(self, key: Any, value: Any) -> None:
        assert self.lock.locked(), "a value added without the lock"
        super().__setitem__(key, value)

    def items(self) -> Any:
        assert self.lock.locked(), "the values copied without the lock"
        return super().items()


def test_values_are_added_and_copied_under_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    things: PerLoop[Thing] = PerLoop(Thing)
    monkeypatch.setattr(things, "_values", _Guarded(things._lock))
    loop = asyncio.new_event_loop()
    try:
        thing = loop.run_until_complete(_get(things))
        assert things.items() == [(loop, thing)]
    finally:
        loop.close()


async def _get(things: PerLoop[Thing]) -> Thing:
    return things.get()
