"""Publishing to ``POST /job``: signing, TTL, retries, expiry, the buffer, order."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from discord_poller.cursor import snowflake_at
from discord_poller.embeds import ParsedJob
from discord_poller.publisher import PendingJob, Publisher
from gateway_client.signing import verify_request

CHANNEL = "1390012345678901234"
OTHER = "1390012345678901235"
TTL = 300
KEY, SECRET = "poller-key", "poller-secret"

Handler = Callable[[httpx.Request], httpx.Response]


def pending(job_id: str, age: float = 1.0, channel: str = CHANNEL) -> PendingJob:
    """A job whose message was posted ``age`` seconds ago."""
    message_id = str(snowflake_at((time.time() - age) * 1000) + len(job_id))
    parsed = ParsedJob(job_id, 42, "Title", {"Name": "x"}, message_id, channel)
    return PendingJob.from_message(parsed, channel, message_id)


class Gateway:
    """Stands in for ``POST /job``: answers from a script, then 201."""

    def __init__(self, *answers: int | Exception | httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    @property
    def job_ids(self) -> list[str]:
        return [json.loads(r.content)["job_id"] for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else 201
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        body = json.loads(request.content)
        return httpx.Response(answer, json={"job": {"id": 7, **body}})


def publisher_for(handler: Handler, **kw: Any) -> Publisher:
    kw.setdefault("ttl_seconds", TTL)
    return Publisher(
        "http://gateway.test", KEY, SECRET, transport=httpx.MockTransport(handler), **kw
    )


async def test_posts_a_signed_job_whose_ttl_counts_from_the_message() -> None:
    gateway = Gateway()
    async with publisher_for(gateway) as publisher:
        job = pending("abc", age=100)
        publisher.submit(job)
        assert await publisher.publish_next(CHANNEL) == 0.0
        assert await publisher.publish_next(CHANNEL) is None
    (request,) = gateway.requests
    assert (request.method, request.url.path) == ("POST", "/job")
    assert request.headers["content-type"] == "application/json"
    # Signature v2: method, path and body bound, with a nonce.
    verified = verify_request(
        request.headers,
        method=request.method,
        target=request.url.raw_path.decode(),
        body=request.content,
        api_keys=[KEY],
        secrets=[SECRET],
        require_v2=True,
    )
    assert verified.version == 2 and verified.nonce
    body = json.loads(request.content)
    assert 195 <= body.pop("ttl") <= 200
    assert body == {
        "job_id": "abc",
        "place_id": 42,
        "channel": CHANNEL,
        "message_id": job.message_id,
        "title": "Title",
        "fields": {"Name": "x"},
        "source": "discord",
    }
    assert publisher.stats.published == 1
    assert publisher.size == 0


@pytest.mark.parametrize(
    "failure",
    [503, 500, 429, httpx.ConnectError("refused"), httpx.ReadTimeout("slow")],
    ids=["503", "500", "429", "connect", "timeout"],
)
async def test_keeps_the_job_and_backs_off_while_the_gateway_fails(
    failure: int | Exception,
) -> None:
    gateway = Gateway(failure, failure, failure)
    async with publisher_for(gateway, retry_initial=0.1, retry_max=0.3) as publisher:
        publisher.submit(pending("abc"))
        delays = [await publisher.publish_next(CHANNEL) for _ in range(4)]
        assert publisher.size == 0
    waits = [d for d in delays[:3] if d is not None]
    assert len(waits) == 3 and all(w > 0 for w in waits)
    assert waits[2] > waits[0]  # growing,
    assert max(waits) <= 0.3  # up to the cap
    assert delays[3] == 0.0
    assert gateway.job_ids == ["abc"] * 4
    assert publisher.stats.retries == 3
    assert publisher.stats.published == 1


async def test_honours_retry_after() -> None:
    busy = httpx.Response(429, headers={"Retry-After": "7"}, json={})
    async with publisher_for(Gateway(busy)) as publisher:
        publisher.submit(pending("abc"))
        assert await publisher.publish_next(CHANNEL) == 7.0


@pytest.mark.parametrize("status", [400, 401, 413])
async def test_a_refused_job_is_dropped_and_counted(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = httpx.Response(status, json={"error": "bad_field", "detail": "No."})
    gateway = Gateway(refusal)
    async with publisher_for(gateway) as publisher:
        publisher.submit(pending("bad"))
        publisher.submit(pending("good"))
        assert await publisher.publish_next(CHANNEL) == 0.0
        assert await publisher.publish_next(CHANNEL) == 0.0
    assert gateway.job_ids == ["bad", "good"]
    assert publisher.stats.dropped_rejected == 1
    assert publisher.stats.published == 1
    assert "bad_field: No." in caplog.text


async def test_a_duplicate_counts_as_done_not_as_published() -> None:
    async with publisher_for(Gateway(200)) as publisher:
        publisher.submit(pending("abc"))
        assert await publisher.publish_next(CHANNEL) == 0.0
    assert (publisher.stats.duplicates, publisher.stats.published) == (1, 0)
    assert publisher.size == 0


async def test_an_expired_job_is_dropped_without_a_request() -> None:
    gateway = Gateway(503)
    offset = [0.0]
    clock = lambda: time.time() + offset[0]  # noqa: E731
    async with publisher_for(gateway, clock=clock) as publisher:
        publisher.submit(pending("late", age=TTL - 2))
        publisher.submit(pending("fresh", age=1))
        delay = await publisher.publish_next(CHANNEL)
        assert delay is not None and delay > 0  # 503: kept
        offset[0] = 3.0
        assert await publisher.publish_next(CHANNEL) == 0.0
    assert gateway.job_ids == ["late", "fresh"]
    assert publisher.stats.dropped_expired == 1
    assert publisher.stats.published == 1
    # What was left of its life, however late it went.
    assert json.loads(gateway.requests[1].content)["ttl"] >= TTL - 5


async def test_a_job_sent_with_little_life_left_gets_ttl_one() -> None:
    gateway = Gateway()
    async with publisher_for(gateway) as publisher:
        publisher.submit(pending("close", age=TTL - 0.5))
        await publisher.publish_next(CHANNEL)
    assert json.loads(gateway.requests[0].content)["ttl"] == 1


async def test_a_full_buffer_drops_the_oldest_job() -> None:
    gateway = Gateway()
    async with publisher_for(gateway, capacity=3) as publisher:
        for job_id, age, channel in [
            ("a1", 50, CHANNEL),
            ("b1", 60, OTHER),
            ("a2", 40, CHANNEL),
            ("a3", 30, CHANNEL),
            ("b2", 20, OTHER),
        ]:
            publisher.submit(pending(job_id, age, channel))
        assert publisher.size == 3
        assert publisher.stats.dropped_overflow == 2
        await publisher.drain(5)
    assert sorted(gateway.job_ids) == ["a2", "a3", "b2"]


async def test_each_channel_publishes_in_message_order_around_failures() -> None:
    gateway = Gateway(503, 201, 503)
    async with publisher_for(gateway, retry_initial=0.01) as publisher:
        for i in range(3):
            publisher.submit(pending(f"a{i}", age=10 - i))
        assert await publisher.drain(5) == 0
    assert gateway.job_ids == ["a0", "a0", "a1", "a1", "a2"]


async def test_a_stuck_channel_does_not_hold_up_another() -> None:
    release, other_posted = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["channel"] == CHANNEL:
            await release.wait()
        else:
            other_posted.set()
        return httpx.Response(201, json={"job": {}})

    publisher = Publisher(
        "http://gateway.test",
        KEY,
        SECRET,
        ttl_seconds=TTL,
        transport=httpx.MockTransport(handler),
    )
    async with publisher:
        workers = [
            asyncio.create_task(publisher.run_channel(channel))
            for channel in (CHANNEL, OTHER)
        ]
        try:
            publisher.submit(pending("stuck", channel=CHANNEL))
            publisher.submit(pending("other", channel=OTHER))
            await asyncio.wait_for(other_posted.wait(), 5)
            assert publisher.pending(CHANNEL) == 1  # still being sent
        finally:
            release.set()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


async def test_drain_gives_up_after_its_timeout_and_keeps_the_count() -> None:
    async with publisher_for(Gateway(*[503] * 100), retry_max=0.05) as publisher:
        publisher.submit(pending("abc"))
        started = time.monotonic()
        assert await publisher.drain(0.3) == 1
        assert time.monotonic() - started < 1.0


async def test_keeps_one_connection_to_the_gateway() -> None:
    peers: list[int] = []

    async def post_job(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"job": await request.json()}, status=201)

    app = web.Application()
    app.router.add_post("/job", post_job)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with Publisher(
            f"http://127.0.0.1:{port}", KEY, SECRET, ttl_seconds=TTL
        ) as publisher:
            for i in range(5):
                publisher.submit(pending(f"j{i}"))
            assert await publisher.drain(5) == 0
    finally:
        await runner.cleanup()
    assert len(peers) == 5
    assert len(set(peers)) == 1
