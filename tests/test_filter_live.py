"""Filters through real daphne processes: ``/ws``, ``GET /job/next``, ``TIERS``.

Clients are the ``websockets`` library and httpx; jobs go in through signed
``POST /job``. ``TIERS`` is set in the processes' environment, as a deploy
sets it, and a bad one stops the process at start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway_client.signing import signed_headers
from testkit.servers import REPO_ROOT, DaphneProcess
from tests.conftest import process_env
from tests.filter_cases import JOBS, TIERS
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = pytest.mark.processes


def sign() -> dict[str, str]:
    return signed_headers(API_KEY, HMAC_SECRET)


def ws_connect(base: str, query: str) -> connect:
    return connect(
        f"{base}/ws?{query}",
        additional_headers={"X-API-KEY": API_KEY},
        proxy=None,
        open_timeout=5,
    )


@pytest.fixture
def gateway(transactional_db: None) -> Iterator[DaphneProcess]:
    with DaphneProcess(env=process_env(TIERS=json.dumps(TIERS))) as process:
        yield process


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
        yield client


async def post(http: httpx.AsyncClient, base: str, **job: Any) -> dict[str, Any]:
    body = {"job_id": uuid.uuid4().hex, **job}
    response = await http.post(f"{base}/job", json=body, headers=sign())
    assert response.status_code == 201, response.text
    posted: dict[str, Any] = response.json()["job"]
    return posted


async def frames(client: Any, count: int) -> list[dict[str, Any]]:
    jobs = []
    for _ in range(count):
        frame = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert frame["type"] == "job", frame
        jobs.append(frame["job"])
    return jobs


@pytest.mark.backends
async def test_filters_on_both_interfaces_of_a_real_process(
    gateway: DaphneProcess, http: httpx.AsyncClient
) -> None:
    base = gateway.base_url
    async with (
        ws_connect(gateway.ws_url, "where=money_per_sec>=10M") as rich,
        ws_connect(gateway.ws_url, "tier=open-10m%2B") as open_rich,
        ws_connect(gateway.ws_url, "where=name~grande&where=players<4") as grande,
    ):
        for client in (rich, open_rich, grande):
            assert json.loads(await client.recv())["type"] == "hello"
        jobs = [await post(http, base, **job) for job in JOBS]
        # The last job of all matches every client: it ends each one's stream.
        last = await post(
            http,
            base,
            fields={"Money per sec": "2B", "Players": "0/8", "Name": "Grande"},
        )
        assert await frames(rich, 4) == [jobs[0], jobs[1], jobs[2], last]
        assert await frames(open_rich, 3) == [jobs[0], jobs[2], last]
        assert await frames(grande, 3) == [jobs[0], jobs[2], last]
        assert jobs[0]["numbers"] == {
            "money_per_sec": 10_000_000,
            "players": 3,
            "players_max": 8,
        }

    async def claim(query: str) -> httpx.Response:
        return await http.get(f"{base}/job/next?{query}", headers=sign())

    taken = await claim("tier=open-10m%2B&where=money_per_sec>=1B")
    assert taken.status_code == 200
    assert taken.json()["job"] == jobs[2]
    assert (await claim("where=players>=players_max")).json()["job"] == jobs[1]
    assert (await claim("where=money_per_sec<1M")).json()["job"] == jobs[3]
    assert (await claim("where=money_per_sec<1M")).status_code == 204
    # Unfiltered, the rest in order.
    assert (await claim("")).json()["job"] == jobs[0]

    bad = await claim("where=money_per_sec>=10%25")
    assert bad.status_code == 400
    assert bad.json() == {
        "error": "bad_filter",
        "detail": "where='money_per_sec>=10%': >= compares numbers, and '10%' "
        "is not one.",
    }
    for query in ("where=money_per_sec>=10%25", "tier=gold"):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(gateway.ws_url, query):
                pass
        assert refused.value.response.status_code == 403
    assert "tier='gold' is not a tier" in gateway.output()


@pytest.mark.backends
async def test_a_filtered_long_poll_on_a_real_process(
    gateway: DaphneProcess, http: httpx.AsyncClient
) -> None:
    base = gateway.base_url
    waiting = asyncio.create_task(
        http.get(f"{base}/job/next?wait=15&where=money>=10M", headers=sign())
    )
    await _until_waiting(http, base)
    poor = await post(http, base, fields={"Money": "1M"})
    wanted = await post(http, base, fields={"Money": "10M"})
    answer = await waiting
    assert answer.status_code == 200
    assert answer.json()["job"] == wanted
    rest = await http.get(f"{base}/job/next", headers=sign())
    assert rest.json()["job"] == poor


async def _until_waiting(http: httpx.AsyncClient, base: str) -> None:
    # Another process: its /health says when the long-poll is parked.
    for _ in range(1000):
        health = (await http.get(f"{base}/health", headers=sign())).json()
        if health["queue"]["long_polls_waiting"] >= 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the long-poll never started waiting")


@pytest.fixture
def two_replicas(
    transactional_db: None, redis_url: str
) -> Iterator[tuple[DaphneProcess, DaphneProcess]]:
    env = process_env(REDIS_URL=redis_url)
    with DaphneProcess(env=env) as first, DaphneProcess(env=env) as second:
        yield first, second


@pytest.mark.backends
async def test_a_filtered_long_poll_is_woken_across_replicas(
    two_replicas: tuple[DaphneProcess, DaphneProcess], http: httpx.AsyncClient
) -> None:
    waiter, publisher = two_replicas
    waiting = asyncio.create_task(
        http.get(f"{waiter.base_url}/job/next?wait=15&where=money>=10M", headers=sign())
    )
    await _until_waiting(http, waiter.base_url)
    await post(http, publisher.base_url, fields={"Money": "1M"})
    wanted = await post(http, publisher.base_url, fields={"Money": "10M"})
    answer = await waiting
    assert answer.status_code == 200
    assert answer.json()["job"] == wanted


@pytest.mark.parametrize(
    ("tiers", "named"),
    [
        ('{"10m+": "where=money_per_sec>>1"}', "Tier '10m+'"),
        ('{"x": 5}', "Tier 'x'"),
        ("not json", "TIERS must be a JSON object"),
        ('["where=a>1"]', "TIERS must be a JSON object"),
    ],
)
def test_a_bad_tiers_setting_stops_the_process(tiers: str, named: str) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO_ROOT,
        env={**os.environ, "TIERS": tiers},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    # One line, no traceback.
    (line,) = result.stderr.splitlines()
    assert line.startswith("Refusing to start: ")
    assert named in line
