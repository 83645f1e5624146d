"""``GatewayClient`` against a real daphne process: publish, pull, and a stream
that outlives the gateway being killed and restarted."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from typing import Any

import pytest

from gateway_client import AuthError, GatewayClient, GatewayError, PublishResult
from tests.conftest import LiveGateway

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]


def client_for(gateway: LiveGateway, **kwargs: Any) -> GatewayClient:
    options: dict[str, Any] = {
        "api_key": gateway.api_key,
        "hmac_secret": gateway.hmac_secret,
        "timeout": 10,
    }
    options.update(kwargs)
    return GatewayClient(gateway.base_url, **options)


async def publish_until_accepted(
    client: GatewayClient, job: dict[str, Any]
) -> PublishResult:
    """Publish, retrying while the gateway is down (bounded: about 30 s)."""
    for _ in range(300):
        try:
            return await client.publish(job)
        except GatewayError as exc:
            if not exc.retryable:
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"could not publish {job['job_id']}")


async def test_publish_then_pull(live_gateway: LiveGateway) -> None:
    job_id = f"live-{uuid.uuid4().hex[:12]}"
    async with client_for(live_gateway) as client:
        first = await client.publish({"job_id": job_id, "title": "T"})
        again = await client.publish({"job_id": job_id})
        pulled = await client.next_job(wait=1)
        empty = await client.next_job()
        health = await client.health()
    assert first.queued and not first.duplicate and first.status == 201
    assert again.duplicate and not again.queued and again.job == first.job
    assert pulled == first.job
    assert empty is None
    assert health["ok"] is True


async def test_refused_credentials_over_http_and_ws(live_gateway: LiveGateway) -> None:
    async with client_for(live_gateway, hmac_secret="wrong-secret") as client:
        with pytest.raises(AuthError) as caught:
            await client.next_job()
    assert (caught.value.code, caught.value.status) == ("bad_signature", 401)

    async with client_for(live_gateway, api_key="wrong-key") as client:
        stream = client.stream()
        with pytest.raises(AuthError) as caught:
            await asyncio.wait_for(anext(stream), 10)
        await stream.aclose()
    assert caught.value.code == "bad_api_key"


async def test_stream_survives_a_killed_gateway(live_gateway: LiveGateway) -> None:
    total, kill_after = 40, 15
    names = [f"ws-{n:03d}-{uuid.uuid4().hex[:8]}" for n in range(total)]
    received: list[dict[str, Any]] = []
    seen_first_batch = asyncio.Event()

    async with client_for(live_gateway) as publisher, client_for(live_gateway) as c:
        # The stream starts just before the first job, so it must replay it.
        first = await publisher.publish({"job_id": names[0]})

        async def consume() -> None:
            stream = c.stream(
                since=first.job["id"] - 1, initial_backoff=0.05, max_backoff=0.5
            )
            async with aclosing(stream) as jobs:
                async for item in jobs:
                    received.append(item)
                    if len(received) == kill_after:
                        seen_first_batch.set()
                    if len(received) == total:
                        return

        consumer = asyncio.create_task(consume())
        try:
            for name in names[1:kill_after]:
                await publisher.publish({"job_id": name})
            async with asyncio.timeout(20):
                await seen_first_batch.wait()
            live_gateway.process.kill()
            # Restart in a thread while the publishing goes on: the jobs
            # published during the outage wait for the gateway, the stream
            # reconnects on its own.
            restarted = asyncio.create_task(
                asyncio.to_thread(live_gateway.process.restart)
            )
            for name in names[kill_after:]:
                await publish_until_accepted(publisher, {"job_id": name})
            await restarted
            async with asyncio.timeout(30):
                await consumer
        finally:
            consumer.cancel()

    assert [item["job_id"] for item in received] == names
    ordered = [item["id"] for item in received]
    assert ordered == sorted(set(ordered))
