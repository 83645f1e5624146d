"""``GatewayClient`` filters against a real daphne process.

A filtered ``next_job`` claims only the matching job and leaves the others
queued; a filtered stream receives only matching jobs, replayed and live, with
a ticket and with signed headers; a filter the gateway cannot read raises
``BadFilter``. The gateway checks every request's v2 signature over the target
as it arrived, so these tests also prove that the client signs the encoded
query string httpx and websockets send.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import pytest

from gateway_client import BadFilter, GatewayClient
from testkit.servers import DaphneProcess
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]

# Servers making at least 10M/s that are not full.
RICH_OPEN = ["money_per_sec>=10M", "players<players_max"]
# "+" in a tier's name must reach the gateway as %2B, not as a space.
TIERS = {"open-10m+": "where=money_per_sec>=10M&where=players<players_max"}


@pytest.fixture
def gateway(transactional_db: None) -> Iterator[DaphneProcess]:
    with DaphneProcess(env=process_env(TIERS=json.dumps(TIERS))) as process:
        yield process


def client_for(gateway: DaphneProcess, **kwargs: Any) -> GatewayClient:
    return GatewayClient(
        gateway.base_url, api_key=API_KEY, hmac_secret=HMAC_SECRET, timeout=10, **kwargs
    )


def server(money: str, players: str, name: str = "Server") -> dict[str, Any]:
    """A job as a notifier posts it: the gateway derives ``numbers`` from it."""
    return {
        "job_id": f"{name.replace(' ', '_')}-{uuid.uuid4().hex[:10]}",
        "title": "Brainrot Notify",
        "fields": {"Money per sec": money, "Players": players, "Name": name},
    }


async def publish(client: GatewayClient, *jobs: dict[str, Any]) -> list[str]:
    for job in jobs:
        await client.publish(job)
    return [job["job_id"] for job in jobs]


async def test_a_filtered_next_job_claims_only_the_matching_job(
    gateway: DaphneProcess,
) -> None:
    async with client_for(gateway) as client:
        poor, full, rich, nonna = await publish(
            client,
            server("$2M/s", "3/8"),
            server("$12M/s", "8/8"),
            server("$12M/s", "3/8", "La Grande Combinasion"),
            server("1.2B", "1/4", "Grande Nonna"),
        )
        first = await client.next_job(where=RICH_OPEN)
        # A space, "~" and a tier named with "+", encoded and signed as sent.
        second = await client.next_job(where="name~grande nonna", tier="open-10m+")
        none_left = await client.next_job(where=RICH_OPEN, wait=0.5)
        rest = [await client.next_job(), await client.next_job()]

    assert first is not None and first["job_id"] == rich
    assert first["numbers"] == {
        "money_per_sec": 12_000_000,
        "players": 3,
        "players_max": 8,
    }
    assert second is not None and second["job_id"] == nonna
    assert none_left is None
    # The jobs that did not match stayed queued, in their order.
    assert [job["job_id"] for job in rest if job] == [poor, full]


@pytest.mark.parametrize("ws_auth", ["ticket", "headers"])
async def test_a_filtered_stream_receives_only_matching_jobs(
    gateway: DaphneProcess, ws_auth: str
) -> None:
    async with (
        client_for(gateway) as publisher,
        client_for(gateway, ws_auth=ws_auth) as client,
    ):
        before = await publisher.publish(server("$2M/s", "3/8", "Before"))
        replayed = await publish(
            publisher, server("$12M/s", "8/8"), server("$12M/s", "3/8", "Replayed")
        )
        stream = client.stream(
            where=RICH_OPEN,
            channels="api",
            since=before.job["id"] - 1,
            initial_backoff=0.05,
            max_backoff=0.5,
        )
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(30), aclosing(stream) as jobs:
            async for job in jobs:
                received.append(job)
                if len(received) == 1:
                    # The replay is in: the stream is live, so what comes now
                    # is pushed. Non-matching jobs go first, the match last.
                    live = await publish(
                        publisher,
                        server("$9.9M/s", "1/8"),
                        server("$50M/s", "full"),
                        {"job_id": uuid.uuid4().hex, "fields": {}},
                        server("$10M/s", "7/8", "Live"),
                    )
                if len(received) == 2:
                    break

    assert [job["job_id"] for job in received] == [replayed[1], live[-1]]


async def test_a_bad_filter_raises_bad_filter_naming_the_part(
    gateway: DaphneProcess,
) -> None:
    async with client_for(gateway) as client:
        (queued,) = await publish(client, server("$12M/s", "3/8"))
        with pytest.raises(BadFilter) as not_a_number:
            await client.next_job(where=["players<players_max", "money_per_sec>=10%"])
        with pytest.raises(BadFilter) as no_such_tier:
            await client.next_job(tier="platinum")
        stream = client.stream(where="money_per_sec>=10%", retries=3)
        with pytest.raises(BadFilter) as refused:
            async with asyncio.timeout(30), aclosing(stream) as jobs:
                await anext(jobs)
        # Nothing was claimed by the refused requests.
        still_queued = await client.next_job()

    assert (not_a_number.value.status, not_a_number.value.code) == (400, "bad_filter")
    assert "money_per_sec>=10%" in not_a_number.value.detail
    assert "'10%' is not one" in str(not_a_number.value)
    assert "platinum" in no_such_tier.value.detail
    assert (refused.value.status, refused.value.code) == (403, "bad_filter")
    assert "where=money_per_sec>=10%" in refused.value.detail
    assert still_queued is not None and still_queued["job_id"] == queued
