"""Filters on ``/ws``: live frames, replay, refused handshakes, the hub's groups.

Jobs are published through ``jobs.services.publish``, the one write path, so
the numbers filtered on are the service layer's. Each test runs once per queue
backend: pushing must not depend on it, and the jobs are queued all the same.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from gateway_project.asgi import application
from jobs import fanout, services
from jobs.filters import JobFilter, parse_filter_query
from jobs.payloads import JobDraft
from tests.filter_cases import BAD_FILTERS, CASE_IDS, CASES, JOBS, TIER_CASES, TIERS
from tests.stack import API_KEY

pytestmark = [
    pytest.mark.backends,
    pytest.mark.usefixtures("transactional_db", "queue_backend"),
]

KEY_HEADER = [(b"x-api-key", API_KEY.encode())]


@pytest.fixture(autouse=True)
async def fresh_layer() -> AsyncIterator[None]:
    yield
    await get_channel_layer().flush()


@asynccontextmanager
async def ws(query: str = "") -> AsyncIterator[WebsocketCommunicator]:
    communicator = WebsocketCommunicator(application, f"/ws?{query}", KEY_HEADER)
    connected, _ = await communicator.connect()
    assert connected
    try:
        assert (await communicator.receive_json_from())["type"] == "hello"
        yield communicator
    finally:
        await communicator.disconnect()


async def publish(channel: str = "api", **job: Any) -> dict[str, Any]:
    draft = JobDraft(job_id=uuid.uuid4().hex, channel=channel, **job)
    published = await services.publish(draft)
    assert published.created
    return published.job


async def publish_cases() -> list[dict[str, Any]]:
    return [await publish(**job) for job in JOBS]


async def received(communicator: WebsocketCommunicator, count: int) -> list[int]:
    frames = [await communicator.receive_json_from() for _ in range(count)]
    assert all(frame["type"] == "job" for frame in frames), frames
    return [frame["job"]["id"] for frame in frames]


@pytest.mark.parametrize(("query", "wanted"), CASES, ids=CASE_IDS)
async def test_live_frames_are_the_matching_jobs_only(
    query: str, wanted: list[int]
) -> None:
    async with ws(query) as filtered, ws() as everything:
        jobs = await publish_cases()
        assert await received(filtered, len(wanted)) == [jobs[n]["id"] for n in wanted]
        assert await filtered.receive_nothing()
        assert await received(everything, len(JOBS)) == [job["id"] for job in jobs]


@pytest.mark.parametrize(("query", "wanted"), CASES, ids=CASE_IDS)
async def test_the_replay_is_filtered_too(query: str, wanted: list[int]) -> None:
    jobs = await publish_cases()
    async with ws(f"since=0&{query}") as communicator:
        assert await received(communicator, len(wanted)) == [
            jobs[n]["id"] for n in wanted
        ]
        assert await communicator.receive_nothing()
        # Then live, through the same filter.
        again = await publish_cases()
        assert await received(communicator, len(wanted)) == [
            again[n]["id"] for n in wanted
        ]
        assert await communicator.receive_nothing()


async def test_a_filtered_replay_reads_past_a_batch_without_a_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jobs import consumers

    monkeypatch.setattr(consumers, "REPLAY_BATCH", 2)
    for _ in range(5):
        await publish(fields={"Money": "1M"})
    wanted = await publish(fields={"Money": "20M"})
    async with ws("since=0&where=money>=10M") as communicator:
        assert await received(communicator, 1) == [wanted["id"]]
        assert await communicator.receive_nothing()


@pytest.mark.parametrize(("query", "wanted"), TIER_CASES)
async def test_tiers_on_the_websocket(
    settings: Any, query: str, wanted: list[int]
) -> None:
    settings.TIERS = TIERS
    async with ws(query) as communicator:
        jobs = await publish_cases()
        assert await received(communicator, len(wanted)) == [
            jobs[n]["id"] for n in wanted
        ]
        assert await communicator.receive_nothing()


async def test_channels_and_where_together() -> None:
    async with ws("channels=111,222&where=money>=10M") as communicator:
        await publish(channel="111", fields={"Money": "1M"})
        wanted = await publish(channel="222", fields={"Money": "10M"})
        await publish(channel="333", fields={"Money": "10M"})
        assert await received(communicator, 1) == [wanted["id"]]
        assert await communicator.receive_nothing()


@pytest.mark.parametrize(("query", "named"), BAD_FILTERS)
async def test_a_bad_filter_refuses_the_handshake_and_logs_why(
    caplog: pytest.LogCaptureFixture, query: str, named: str
) -> None:
    communicator = WebsocketCommunicator(application, f"/ws?{query}", KEY_HEADER)
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    assert not connected
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and named in refusals[0], refusals


async def test_twenty_clauses_fit_in_a_handshake() -> None:
    query = "&".join(f"where=k{n}>={n}" for n in range(20))
    async with ws(f"since=0&{query}") as communicator:
        assert await communicator.receive_nothing()


# --- The hub: one match per job per distinct filter ----------------------------


class Recorder:
    def __init__(self) -> None:
        self.frames: list[str] = []

    async def deliver(self, batch: fanout.Batch) -> None:
        self.frames.append(batch.frame())


async def test_the_hub_matches_once_per_distinct_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queries = [f"where=money>={n}M" for n in range(1, 6)]
    hub = fanout.Hub()
    clients: dict[str, list[Recorder]] = {query: [] for query in queries}
    for n in range(1000):
        query = queries[n % 5]
        client = Recorder()
        clients[query].append(client)
        # A fresh, equal JobFilter each time: equal filters share one group.
        await hub.attach(client, parse_filter_query(query))
    everything = Recorder()
    await hub.attach(everything)
    assert len(hub.groups) == 6

    calls = 0
    real_matches = JobFilter.matches

    def counted(self: JobFilter, job: Any) -> bool:
        nonlocal calls
        calls += 1
        return real_matches(self, job)

    monkeypatch.setattr(JobFilter, "matches", counted)
    job = {"id": 1, "channel": "api", "numbers": {"money": 3_000_000}}
    await hub.dispatch([job])
    assert calls == 5  # not 1,000: once per distinct filter (the empty one free)
    for query in queries[:3]:
        assert all(len(client.frames) == 1 for client in clients[query])
    for query in queries[3:]:
        assert all(client.frames == [] for client in clients[query])
    assert len(everything.frames) == 1
    # One frame, serialised once, shared by every receiver.
    frames = {id(c.frames[0]) for q in queries[:3] for c in clients[q]}
    assert len(frames) == 1

    for client in clients[queries[0]]:
        hub.detach(client)
    assert len(hub.groups) == 5  # an emptied group is dropped
    assert len(hub.clients) == 801
    assert hub._task is not None
    hub._task.cancel()
