"""The poller against the fake Discord's limits and errors, timed by the fake.

Each test runs the real poll loop and reads the fake's request log: when each
request arrived, and whether the fake counted it as a violation of its limits.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from discord_poller.client import DiscordClient, Unauthorized, discord_user_agent
from discord_poller.publisher import Publisher
from discord_poller.runner import Poller
from testkit.fakes.discord import FakeDiscord

CHANNEL = "1390012345678901234"
OTHER = "1390012345678901235"
UA = discord_user_agent("https://example.com/job-gateway", "1.0")
# The fake stamps arrivals a little after the client's clock says it sent them.
SLACK = 0.01


def job_embed(job_id: str) -> list[dict[str, Any]]:
    return [{"title": "Server", "fields": [{"name": "Job ID", "value": job_id}]}]


class CountingTransport(httpx.AsyncHTTPTransport):
    """The real transport; tests await the n-th answered request (of a channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str | None, int] = defaultdict(int)
        self.answered: dict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._waiters: list[tuple[str | None, int, asyncio.Event]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
            self.answered[response.status_code].set()
            return response
        finally:
            channel = request.url.path.split("/")[-2]
            self.counts[None] += 1
            self.counts[channel] += 1
            for key, count, event in self._waiters:
                if self.counts[key] >= count:
                    event.set()

    async def reached(
        self, count: int, channel: str | None = None, timeout: float = 15
    ) -> None:
        event = asyncio.Event()
        self._waiters.append((channel, count, event))
        if self.counts[channel] < count:
            await asyncio.wait_for(event.wait(), timeout)


class Gateway:
    """Stands in for ``POST /job``; tests await a job id's arrival."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        job_id = json.loads(request.content)["job_id"]
        self.arrived.setdefault(job_id, time.monotonic())
        self._events[job_id].set()
        return httpx.Response(201, json={"job": {"id": 1}})

    async def posted(self, job_id: str, timeout: float = 15) -> float:
        await asyncio.wait_for(self._events[job_id].wait(), timeout)
        return self.arrived[job_id]


@dataclass
class Running:
    poller: Poller
    discord: CountingTransport
    gateway: Gateway
    stop: asyncio.Event
    task: asyncio.Task[None]


@asynccontextmanager
async def running(
    fake: FakeDiscord,
    channels: tuple[str, ...] = (CHANNEL,),
    client: dict[str, Any] | None = None,
    **kw: Any,
) -> AsyncIterator[Running]:
    """The poll loop over ``channels``, stopped on leaving the block."""
    transport, gateway = CountingTransport(), Gateway()
    discord = DiscordClient(
        fake.state.token,
        fake.base_url,
        user_agent=UA,
        transport=transport,
        **(client or {}),
    )
    publisher = Publisher(
        "http://gateway.test",
        "key",
        "secret",
        ttl_seconds=300,
        transport=httpx.MockTransport(gateway),
    )
    kw.setdefault("poll_seconds", 0.05)
    kw.setdefault("burst_poll_seconds", 0.01)
    async with discord, publisher:
        poller = Poller(discord, publisher, channels, ttl_seconds=300, **kw)
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        try:
            yield Running(poller, transport, gateway, stop, task)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.shield(task), 5)


def arrivals(fake: FakeDiscord, channel: str | None = None) -> list[float]:
    return [
        r.monotonic for r in fake.requests if channel is None or r.channel_id == channel
    ]


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def statuses(fake: FakeDiscord) -> set[int | None]:
    return {r.status for r in fake.requests}


# --- Keeping to the limits -------------------------------------------------------


async def test_no_request_lands_inside_a_reset_after_of_one_second() -> None:
    async with FakeDiscord(limit=1, window=1.0) as fake, running(fake) as run:
        await run.discord.reached(4)
    assert min(gaps(arrivals(fake))) >= 1.0 - SLACK
    assert fake.state.violations == 0
    assert statuses(fake) == {200}


async def test_polls_spread_evenly_over_the_bucket_even_in_a_burst() -> None:
    # 5 requests a second: one every 0.2 s, not five at once and a long wait.
    async with FakeDiscord(limit=5, window=1.0) as fake:
        for i in range(3):
            fake.post_message(CHANNEL, embeds=job_embed(f"burst-{i}"))
        async with running(fake) as run:
            await run.gateway.posted("burst-2")
            await run.discord.reached(12)
    times = arrivals(fake)
    spaced = gaps(times)
    # Any five in a row span four gaps: 0.8 s when paced, about none in a burst.
    # A busy host may hold one arrival back and not the next, so single gaps
    # may shrink; a span loses at most its two ends' delays.
    spans = [times[n + 4] - times[n] for n in range(len(times) - 4)]
    assert min(spans) >= 0.6
    # And the allowance is used: 0.2 s apart on average, give or take a busy host.
    assert sum(spaced) / len(spaced) <= 0.3
    assert fake.state.violations == 0
    assert statuses(fake) == {200}


async def test_two_channels_poll_concurrently_within_their_buckets() -> None:
    fake = FakeDiscord(limit=2, window=1.0)
    async with fake, running(fake, (CHANNEL, OTHER)) as run:
        await run.discord.reached(3, CHANNEL)
        await run.discord.reached(3, OTHER)
    first = [arrivals(fake, channel)[0] for channel in (CHANNEL, OTHER)]
    # Neither waited for the other: a wait would be the bucket's 0.5 s.
    assert abs(first[0] - first[1]) < 0.4
    # Six requests in one bucket of two a second would take over two seconds.
    assert arrivals(fake)[5] - arrivals(fake)[0] < 1.5
    assert fake.state.violations == 0


# --- Rate limited and banned ---------------------------------------------------------


async def test_a_429_is_waited_out_before_the_next_request() -> None:
    async with FakeDiscord() as fake:
        fake.add_fault("user_429", channel_id=CHANNEL, times=1, retry_after=1.0)
        async with running(fake) as run:
            await run.discord.reached(3)
            report = run.poller.report()
    first, second = arrivals(fake)[:2]
    assert second - first >= 1.0
    assert fake.requests[0].status == 429
    assert report["discord"]["rate_limited"] == 1
    assert report["discord"]["rate_limit_wait_seconds"] >= 0.9
    responses = report["discord"]["responses"]
    assert responses["429"] == 1 and responses["200"] >= 2


async def test_a_global_429_holds_every_channel() -> None:
    fake = FakeDiscord()
    async with fake, running(fake, (CHANNEL, OTHER), poll_seconds=0.2) as run:
        await run.discord.reached(2)
        fake.add_fault("global_429", times=1, retry_after=1.0)
        await run.discord.reached(2 + 4)
    limited = next(r for r in fake.requests if r.status == 429)
    during = [
        t for t in arrivals(fake) if limited.monotonic < t < limited.monotonic + 1.0
    ]
    # At most the other channel's request, already on its way.
    assert len(during) <= 1


async def test_a_ban_stops_every_channel_for_the_cooldown() -> None:
    fake = FakeDiscord()
    cooldown = {"ban_cooldown": 1.0}
    async with fake, running(fake, (CHANNEL, OTHER), client=cooldown) as run:
        await run.discord.reached(2)
        fake.add_fault("ban_json", times=1)
        await asyncio.wait_for(run.discord.answered[429].wait(), 5)
        ban = next(r for r in fake.requests if r.status == 429)
        # Posted on the channel whose request was refused: its next request
        # can only come after the cool-down.
        fake.post_message(ban.channel_id, embeds=job_embed("after-the-ban"))
        published_at = await run.gateway.posted("after-the-ban")
        report = run.poller.report()
    during = [t for t in arrivals(fake) if ban.monotonic < t < ban.monotonic + 1.0]
    assert len(during) <= 1  # at most the other channel's, already on its way
    assert published_at >= ban.monotonic + 1.0
    assert report["discord"]["bans"] == 1
    assert "Banned" in report["discord"]["last_error"]


# --- Errors -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forbidden", "not_found"])
async def test_a_channel_the_bot_cannot_read_is_backed_off_alone(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="discord_poller")
    async with FakeDiscord() as fake:
        fake.add_fault(kind, channel_id=OTHER)
        fake.post_message(CHANNEL, embeds=job_embed("still-published"))
        async with running(fake, (CHANNEL, OTHER), access_backoff=0.3) as run:
            await run.gateway.posted("still-published")
            await run.discord.reached(3, OTHER)
            report = run.poller.report()
    backed_off = gaps(arrivals(fake, OTHER))
    assert backed_off[0] >= 0.3
    assert backed_off[1] >= 0.6  # growing
    assert len(arrivals(fake, CHANNEL)) > 3 * len(arrivals(fake, OTHER))
    assert f"channel {OTHER}" in caplog.text
    channels = report["discord"]["channels"]
    assert channels[OTHER]["failures"] >= 2
    assert channels[CHANNEL]["last_error"] is None


@pytest.mark.parametrize("kind", ["server_error", "drop"])
async def test_discord_failing_is_retried_with_backoff(kind: str) -> None:
    async with FakeDiscord() as fake:
        fake.add_fault(kind, times=2)
        fake.post_message(CHANNEL, embeds=job_embed("after-the-failures"))
        async with running(fake, error_backoff=0.2) as run:
            await run.gateway.posted("after-the-failures")
    backed_off = gaps(arrivals(fake))
    assert backed_off[0] >= 0.2
    assert backed_off[1] >= 0.4


async def test_a_rejected_token_stops_every_channel() -> None:
    async with FakeDiscord(token="Bot the-right-token") as fake:
        stop = asyncio.Event()
        async with DiscordClient(
            "Bot a-wrong-token", fake.base_url, user_agent=UA
        ) as d:
            publisher = Publisher("http://gateway.test", "k", "s", ttl_seconds=300)
            async with publisher:
                poller = Poller(
                    d,
                    publisher,
                    (CHANNEL, OTHER),
                    ttl_seconds=300,
                    poll_seconds=0.05,
                    burst_poll_seconds=0.01,
                )
                with pytest.raises(Unauthorized):
                    await asyncio.wait_for(poller.run(stop), 5)
        assert stop.is_set()
        assert len(fake.requests) <= 2  # one per channel at most, then nothing
