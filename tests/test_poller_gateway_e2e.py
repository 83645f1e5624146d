"""Gateway mode end to end through real processes: the fake Discord Gateway,
``manage.py runpoller`` (``DISCORD_MODE=gateway``), daphne and a WebSocket
client; then the same under chaos.

The chaos test drops, refuses, zombifies and closes the Gateway connection
every few seconds while messages are posted, for ``GATEWAY_CHAOS_SECONDS``
(15 s by default, to keep the suite short; set it to 60 for the full minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from jobs.models import Job
from tests.conftest import LiveGateway
from tests.test_poller_gateway import (
    FAST_HEARTBEAT_MS,
    FakeGateway,
    gateway_env,
    gateway_poller,
)
from tests.test_runpoller import CHANNEL, start_fake_discord
from tests.test_runpoller_e2e import (
    FIXTURES,
    assert_silence,
    next_jobs,
    post_fixture,
    websocket,
    with_own_guid,
)

pytestmark = [pytest.mark.backends, pytest.mark.processes]

CHAOS_SECONDS = float(os.environ.get("GATEWAY_CHAOS_SECONDS", "15"))
FAULT_GAP = (2.0, 3.5)  # seconds between two faults
POST_GAP = (0.05, 0.3)  # seconds between two messages
# Each fault, and how often it is drawn. "refuse" makes the next Resume fail
# (op 9 d=false) before dropping: the poller must identify anew and catch up
# over REST on what the lost session held.
FAULTS = ["drop"] * 4 + ["refuse", "reconnect", "stop_acks", "close", "invalid"]


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    discord = start_fake_discord()
    try:
        gateway = FakeGateway(discord)
        gateway.behave(heartbeat_interval=FAST_HEARTBEAT_MS)
        yield gateway
    finally:
        discord.process.close()


async def test_jobs_reach_websocket_clients_over_the_gateway(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    cases = [with_own_guid(fixture) for fixture in FIXTURES]
    expected = [case["expected"] for case in cases if case["expected"] is not None]
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        async with websocket(live_gateway) as ws:
            posted = [post_fixture(fake.discord, case) for case in cases]
            jobs = await next_jobs(ws, len(expected))
            await assert_silence(ws)
        polls = [r for r in fake.discord.requests() if "/messages" in r["path"]]
        output = poller.output()
    assert [job["job_id"] for job in jobs] == [e["job_id"] for e in expected]
    for job, want in zip(jobs, expected, strict=True):
        assert job["place_id"] == want["place_id"]
        assert job["title"] == want["title"]
        assert job["fields"] == want["fields"]
        assert job["channel"] == CHANNEL
    with_jobs = [m["id"] for m, c in zip(posted, cases, strict=True) if c["expected"]]
    assert [job["message_id"] for job in jobs] == with_jobs
    assert len(polls) == 1  # the catch-up at start; every job came as an event
    assert output.count("published job ") == len(expected)


@pytest.mark.timeout(CHAOS_SECONDS + 120)
async def test_chaos_every_message_becomes_exactly_one_job(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    rng = random.Random(7)
    control = fake.discord.control
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        async with (
            websocket(live_gateway) as ws,
            httpx.AsyncClient(base_url=control, timeout=10) as http,
        ):
            seen: Counter[str] = Counter()
            news = asyncio.Event()
            reading = asyncio.create_task(_collect(ws, seen, news))
            posted: list[str] = []
            faults: list[str] = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            next_fault = started + rng.uniform(*FAULT_GAP)
            while loop.time() - started < CHAOS_SECONDS:
                posted.append(await _post(http, str(uuid.uuid4())))
                if loop.time() >= next_fault:
                    faults.append(await _fault(http, rng.choice(FAULTS)))
                    next_fault = loop.time() + rng.uniform(*FAULT_GAP)
                await asyncio.sleep(rng.uniform(*POST_GAP))  # the posting pace
            try:
                async with asyncio.timeout(60):
                    while not set(posted) <= seen.keys():
                        news.clear()
                        await news.wait()
            except TimeoutError:
                missing = sorted(set(posted) - seen.keys())
                raise AssertionError(
                    f"{len(missing)} message(s) never became a job: {missing[:5]}; "
                    f"faults {faults}; the poller said:\n{poller.output()[-6000:]}"
                ) from None
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            await assert_silence(ws)  # no job twice
        stats = fake.stats()
        output = poller.output()
    # Every message once on the WebSocket, and once in the database.
    assert sorted(seen) == sorted(posted)
    assert set(seen.values()) == {1}
    assert await Job.objects.filter(source="discord").acount() == len(posted)
    # The chaos did happen: reconnects, resumes, fresh sessions and catch-ups.
    assert len(faults) >= CHAOS_SECONDS / FAULT_GAP[1] - 1
    assert stats["connections"] > len(faults) // 2
    assert stats["resumes"] >= 1
    if "refuse" in faults:
        assert stats["identifies"] >= 2
        assert output.count("caught up over REST") >= 2
    assert stats["violations"] == 0
    print(f"chaos: {len(posted)} messages, faults {Counter(faults)}, {stats}")


async def _collect(ws: ClientConnection, seen: Counter[str], news: Any) -> None:
    async for raw in ws:
        frame = json.loads(raw)
        if frame["type"] == "job":
            seen[frame["job"]["message_id"]] += 1
            news.set()


async def _post(http: httpx.AsyncClient, job_id: str) -> str:
    embeds = [{"title": "Server", "fields": [{"name": "Job ID", "value": job_id}]}]
    response = await http.post(
        "/messages", json={"channel_id": CHANNEL, "embeds": embeds}
    )
    response.raise_for_status()
    message_id: str = response.json()["id"]
    return message_id


async def _fault(http: httpx.AsyncClient, fault: str) -> str:
    async def act(action: str, **options: Any) -> None:
        response = await http.post(
            "/gateway/actions", json={"action": action, **options}
        )
        response.raise_for_status()

    if fault == "refuse":
        response = await http.post("/gateway/behaviour", json={"refuse_resumes": 1})
        response.raise_for_status()
        await act("drop")
    elif fault == "close":
        await act("close", code=4000)
    elif fault == "invalid":
        await act("invalid_session", resumable=True)
    else:
        await act(fault)
    return fault
