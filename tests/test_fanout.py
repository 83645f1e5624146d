"""The per-process fan-out hub (``jobs.fanout``) through the configured layer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

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

    async def deliver(self, job: dict[str, Any], frame: str) -> None:
        self.holding.set()
        await self.release.wait()
        self.ids.append(job["id"])
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
