"""Leases (``GET /job/next?lease=S``, ack, release) on both queue backends.

In process, through the ASGI application; tests/test_leases_live.py runs them
through real daphne processes, two replicas and a killed worker.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from prometheus_client import REGISTRY

from jobs import leases, queues, redis_clients
from jobs.models import Job
from tests.conftest import assert_error

Sign = Callable[..., dict[str, str]]

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("queue_backend")]


async def publish(api: httpx.AsyncClient, sign: Sign, **job: Any) -> dict[str, Any]:
    job.setdefault("job_id", uuid.uuid4().hex)
    response = await api.post("/job", json=job, headers=sign())
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["job"]
    return result


async def lease(
    api: httpx.AsyncClient, sign: Sign, seconds: Any = 30
) -> dict[str, Any]:
    response = await api.get(f"/job/next?lease={seconds}", headers=sign())
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


async def settle(
    api: httpx.AsyncClient, sign: Sign, how: str, pk: Any, token: Any
) -> httpx.Response:
    return await api.post(f"/job/{pk}/{how}", json={"lease": token}, headers=sign())


async def row(pk: int) -> Job:
    return await Job.objects.aget(pk=pk)


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total") or 0.0


async def test_a_lease_hands_out_the_job_with_a_token_and_its_end(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign)
    before = counted("gateway_leases_granted")
    body = await lease(api, sign, 30)
    assert set(body) == {"job", "lease"}
    assert body["job"] == job
    assert set(body["lease"]) == {"token", "expires_at"}
    assert len(body["lease"]["token"]) >= 32
    ends = datetime.fromisoformat(body["lease"]["expires_at"])
    assert 25 < ends.timestamp() - time.time() <= 30
    stored = await row(job["id"])
    assert stored.status == Job.Status.LEASED
    assert stored.lease_token == body["lease"]["token"]
    assert stored.lease_expires_at is not None
    assert abs(stored.lease_expires_at.timestamp() - ends.timestamp()) < 0.01
    assert counted("gateway_leases_granted") == before + 1
    # Held: nobody else gets it.
    assert (await api.get("/job/next", headers=sign())).status_code == 204


async def test_a_lease_never_outlives_its_job(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign, ttl=20)
    body = await lease(api, sign, 300)
    assert body["lease"]["expires_at"] == job["expires_at"]


@pytest.mark.parametrize("value", ["0", "301", "-1", "1.5", "abc", "", "1e2", "²"])
async def test_a_lease_out_of_range_is_bad_field(
    api: httpx.AsyncClient, sign: Sign, value: str
) -> None:
    await publish(api, sign)
    response = await api.get("/job/next", params={"lease": value}, headers=sign())
    assert "1 to 300" in assert_error(response, 400, "bad_field")
    assert await Job.objects.filter(status=Job.Status.QUEUED).acount() == 1


async def test_an_ack_finishes_the_job_for_good(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign)
    token = (await lease(api, sign))["lease"]["token"]
    before = counted("gateway_leases_acked")
    response = await settle(api, sign, "ack", job["id"], token)
    assert response.status_code == 200, response.text
    assert response.json() == {"acked": True, "id": job["id"]}
    stored = await row(job["id"])
    assert stored.status == Job.Status.CLAIMED
    assert stored.lease_token is None
    assert counted("gateway_leases_acked") == before + 1
    # Used: both a second ack and a release are lease_lost.
    for how in ("ack", "release"):
        assert_error(await settle(api, sign, how, job["id"], token), 409, "lease_lost")
    assert (await api.get("/job/next", headers=sign())).status_code == 204


async def test_a_release_puts_the_job_back_at_the_head(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    first, second, third = [await publish(api, sign) for _ in range(3)]
    await lease(api, sign)
    held = await lease(api, sign)
    assert held["job"]["id"] == second["id"]
    before = counted("gateway_leases_released")
    response = await settle(api, sign, "release", second["id"], held["lease"]["token"])
    assert response.status_code == 200, response.text
    assert response.json() == {"released": True, "id": second["id"]}
    assert counted("gateway_leases_released") == before + 1
    assert (await row(second["id"])).status == Job.Status.QUEUED
    again = (await api.get("/job/next", headers=sign())).json()["job"]
    assert again["id"] == second["id"]  # ahead of the third
    assert (await api.get("/job/next", headers=sign())).json()["job"]["id"] == third[
        "id"
    ]
    assert_error(
        await settle(api, sign, "release", second["id"], held["lease"]["token"]),
        409,
        "lease_lost",
    )
    assert first["id"] < second["id"]


async def test_a_release_wakes_a_long_poll(api: httpx.AsyncClient, sign: Sign) -> None:
    job = await publish(api, sign)
    held = await lease(api, sign)
    waiting = asyncio.create_task(api.get("/job/next?wait=20", headers=sign()))
    await asyncio.sleep(0.2)  # let it start waiting; a late start is fine too
    await settle(api, sign, "release", job["id"], held["lease"]["token"])
    response = await asyncio.wait_for(waiting, 20)
    assert response.status_code == 200
    assert response.json()["job"]["id"] == job["id"]


async def test_unknown_jobs_and_tokens(api: httpx.AsyncClient, sign: Sign) -> None:
    job = await publish(api, sign)
    token = (await lease(api, sign))["lease"]["token"]
    for how in ("ack", "release"):
        assert_error(await settle(api, sign, how, 999999, token), 404, "not_found")
        assert_error(await settle(api, sign, how, 2**70, token), 404, "not_found")
        assert_error(await settle(api, sign, how, job["id"], "nope"), 409, "lease_lost")
    # A token is its job's only: another job's token is lost on this one.
    other = await publish(api, sign)
    other_token = (await lease(api, sign))["lease"]["token"]
    assert_error(
        await settle(api, sign, "ack", job["id"], other_token), 409, "lease_lost"
    )
    assert (await settle(api, sign, "ack", other["id"], other_token)).status_code == 200
    assert (await settle(api, sign, "ack", job["id"], token)).status_code == 200


@pytest.mark.parametrize("token", ["a\x00b", "tok en", "é" * 10, "../x", "a\nb"])
async def test_a_token_no_lease_could_have_is_lost_not_an_error(
    api: httpx.AsyncClient, sign: Sign, token: str
) -> None:
    # A NUL reached PostgreSQL, which refused it: a 503 "backing service down".
    job = await publish(api, sign)
    await lease(api, sign)
    for how in ("ack", "release"):
        assert_error(await settle(api, sign, how, job["id"], token), 409, "lease_lost")
        assert_error(await settle(api, sign, how, 999999, token), 404, "not_found")
    assert (await row(job["id"])).status == Job.Status.LEASED


async def test_a_body_nested_too_deep_is_bad_json(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign)
    headers = {**sign(), "content-type": "application/json"}
    body = b'{"lease": ' + b"[" * 100 + b"]" * 100 + b"}"
    response = await api.post(f"/job/{job['id']}/ack", content=body, headers=headers)
    assert "more than 64 levels deep" in assert_error(response, 400, "bad_json")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "bad_field"),
        ({"lease": 5}, 400, "bad_field"),
        ({"lease": ""}, 400, "bad_field"),
        ({"lease": "x" * 65}, 400, "bad_field"),
        (["lease"], 400, "bad_field"),
    ],
)
async def test_a_bad_body_is_refused(
    api: httpx.AsyncClient, sign: Sign, body: Any, status: int, code: str
) -> None:
    job = await publish(api, sign)
    response = await api.post(f"/job/{job['id']}/ack", json=body, headers=sign())
    assert_error(response, status, code)


async def test_a_body_not_json_is_refused(api: httpx.AsyncClient, sign: Sign) -> None:
    job = await publish(api, sign)
    headers = {**sign(), "content-type": "application/json"}
    response = await api.post(f"/job/{job['id']}/ack", content=b"{", headers=headers)
    assert_error(response, 400, "bad_json")
    response = await api.post(
        f"/job/{job['id']}/ack", content=b"lease=x", headers=sign()
    )
    assert_error(response, 415, "unsupported_media_type")
    response = await api.get(f"/job/{job['id']}/ack", headers=sign())
    assert response.status_code == 405


async def test_a_lease_that_runs_out_comes_back_by_itself(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign)
    held = await lease(api, sign, 1)
    before = counted("gateway_leases_expired")
    # Nobody sweeps for it: the long poll's own process does, within a second.
    response = await api.get("/job/next?wait=20&lease=30", headers=sign())
    assert response.status_code == 200, response.text
    assert response.json()["job"]["id"] == job["id"]
    assert response.json()["lease"]["token"] != held["lease"]["token"]
    assert counted("gateway_leases_expired") == before + 1
    assert_error(
        await settle(api, sign, "ack", job["id"], held["lease"]["token"]),
        409,
        "lease_lost",
    )


async def test_a_lease_that_runs_out_with_its_job_expires_it(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign, ttl=1)
    await lease(api, sign, 300)
    deadline = time.monotonic() + 20
    while (await row(job["id"])).status != Job.Status.EXPIRED:
        assert time.monotonic() < deadline, "the lease was not swept"
        await leases.sweep()
        await asyncio.sleep(0.1)
    assert (await api.get("/job/next", headers=sign())).status_code == 204


async def test_two_sweeps_at_once_put_a_job_back_once(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    job = await publish(api, sign)
    await lease(api, sign, 1)
    await sync_to_async(
        lambda: Job.objects.filter(pk=job["id"]).update(
            lease_expires_at=datetime.fromisoformat("2000-01-01T00:00:00+00:00")
        )
    )()
    swept = await asyncio.gather(*(leases.sweep() for _ in range(4)))
    assert sum(swept) == 1
    assert (await api.get("/job/next", headers=sign())).json()["job"]["id"] == job["id"]
    assert (await api.get("/job/next", headers=sign())).status_code == 204
    if queue_backend == "redis":
        client = redis_clients.async_client()
        assert await client.llen(queues.QUEUE_KEY) == 0
        assert await client.zcard(queues.CLAIMING_KEY) == 0


async def test_a_redis_put_back_cut_off_after_the_table_is_pushed_later(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    if queue_backend != "redis":
        return  # the database queue is the table: nothing to push
    job = await publish(api, sign)
    await lease(api, sign, 1)
    stored = await row(job["id"])
    client = redis_clients.async_client()
    raw = leases._entry(stored)
    # The sweep's first two steps, then the process dies before the push.
    await client.zadd(queues.CLAIMING_KEY, {raw: time.time() - 3600})
    stale = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
    await sync_to_async(
        lambda: Job.objects.filter(pk=job["id"]).update(lease_expires_at=stale)
    )()
    from django.utils import timezone

    assert await leases._lapse([job["id"]], timezone.now()) == {job["id"]: "queued"}
    assert await client.llen(queues.QUEUE_KEY) == 0
    assert await queues.restore_unfinished_claims(client) == 1
    again = await api.get("/job/next", headers=sign())
    assert again.json()["job"]["id"] == job["id"]
    assert json.loads(raw)["job"]["id"] == job["id"]


async def test_metrics_list_the_lease_counters(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    job = await publish(api, sign)
    token = (await lease(api, sign))["lease"]["token"]
    await settle(api, sign, "ack", job["id"], token)
    page = (await api.get("/metrics", headers=sign())).text
    for name in ("granted", "acked", "released", "expired"):
        assert f"gateway_leases_{name}_total" in page
    acked = re.search(r"^gateway_leases_acked_total ([0-9.e+]+)$", page, re.M)
    assert acked is not None and float(acked.group(1)) >= 1
