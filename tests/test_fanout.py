"""The per-process fan-out hub (``jobs.fanout``) through the configured layer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from channels.layers import get_channel_layer

from jobs import fanout, services

# Far past the channel layers' default capacity of 100 messages per channel.
BURST = 500


@pytest.fixture(autouse=True)
async def fresh_layer() -> AsyncIterator[None]:
    yield
    await get_channel_layer().flush()


class StuckClient:
    """Holds the hub on its first job until released, then records every id."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.all_arrived = asyncio.Event()
        self.ids: list[int] = []

    async def deliver(self, batch: fanout.Batch) -> None:
        self.holding.set()
        await self.release.wait()
        self.ids.extend(job["id"] for job in batch.jobs)
        if len(self.ids) == BURST:
            self.all_arrived.set()


async def test_a_hub_behind_on_a_burst_loses_none_of_it() -> None:
    hub = fanout.Hub()
    client = StuckClient()
    await hub.attach(client)
    try:
        await services.broadcast({"id": 1, "channel": "api"})
        await asyncio.wait_for(client.holding.wait(), 10)
        # The hub is stuck on job 1: the rest of the burst waits in the layer.
        for job_id in range(2, BURST + 1):
            await services.broadcast({"id": job_id, "channel": "api"})
        client.release.set()
        await asyncio.wait_for(client.all_arrived.wait(), 30)
        assert client.ids == list(range(1, BURST + 1))
    finally:
        assert hub._task is not None
        hub._task.cancel()


class Recorder:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.arrived = asyncio.Event()

    async def deliver(self, batch: fanout.Batch) -> None:
        self.ids.extend(job["id"] for job in batch.jobs)
        self.arrived.set()


class Noted(logging.Handler):
    """Sets ``seen`` once a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_a_job_the_hub_cannot_dispatch_does_not_stop_the_next() -> None:
    hub = fanout.Hub()
    client = Recorder()
    noted = Noted("could not dispatch")
    fanout.logger.addHandler(noted)
    await hub.attach(client)
    try:
        await services.broadcast({"channel": "api"})  # no id: cannot be framed
        await asyncio.wait_for(noted.seen.wait(), 10)
        await services.broadcast({"id": 7, "channel": "api"})
        await asyncio.wait_for(client.arrived.wait(), 10)
        assert client.ids == [7]
    finally:
        fanout.logger.removeHandler(noted)
        assert hub._task is not None
        hub._task.cancel()
