"""``/metrics``: its auth in-process, and its counters from a real daphne."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from gateway_client.signing import signed_headers
from testkit.servers import DaphneProcess
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET

Sign = Callable[..., dict[str, str]]


pytestmark = pytest.mark.backends


def samples(text: str) -> dict[str, float]:
    """``name`` or ``name{label="v"}`` -> value, for every sample scraped."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            found[key] = sample.value
    return found


async def test_metrics_need_credentials(api: httpx.AsyncClient) -> None:
    response = await api.get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"] == "missing_api_key"


async def test_metrics_accept_a_signed_request(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    response = await api.get("/metrics", headers=sign())
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "gateway_jobs_published_total" in response.text
    assert "gateway_queue_depth" in response.text


async def test_metrics_accept_the_bearer_token(
    api: httpx.AsyncClient, settings: Any
) -> None:
    settings.METRICS_TOKEN = "scrape-token"
    good = await api.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
    bad = await api.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert good.status_code == 200
    assert bad.status_code == 401
    assert bad.json()["error"] == "bad_token"


async def test_metrics_refuse_other_methods(api: httpx.AsyncClient, sign: Sign) -> None:
    response = await api.post("/metrics", headers=sign())
    assert response.status_code == 405


async def test_poller_numbers_come_from_its_status_row(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    from asgiref.sync import sync_to_async

    from discord_poller.status import save_report

    report = {
        "discord": {
            "requests": 42,
            "responses": {"200": 38, "429": 3, "503": 1},
            "rate_limited": 3,
            "rate_limit_wait_seconds": 1.5,
        },
        "jobs": {"published": 7, "duplicates": 1, "buffered": 0},
    }
    await sync_to_async(save_report)(report, timezone.now())
    values = samples((await api.get("/metrics", headers=sign())).text)
    assert values["gateway_poller_discord_requests"] == 42
    assert values['gateway_poller_discord_responses{status="200"}'] == 38
    assert values['gateway_poller_discord_responses{status="429"}'] == 3
    assert values['gateway_poller_discord_responses{status="503"}'] == 1
    assert values["gateway_poller_discord_rate_limited"] == 3
    assert values["gateway_poller_discord_rate_limit_wait_seconds"] == 1.5
    assert values["gateway_poller_jobs_published"] == 7
    assert values["gateway_poller_report_age_seconds"] >= 0


@pytest.fixture(params=["one-process", "multiprocess"])
def gateway(
    request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path
) -> Iterator[DaphneProcess]:
    """A daphne process, without and with ``PROMETHEUS_MULTIPROC_DIR``."""
    env = process_env()
    if request.param == "multiprocess":
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    with DaphneProcess(env=env) as process:
        yield process


@pytest.mark.processes
async def test_counters_follow_traffic(gateway: DaphneProcess) -> None:
    def headers() -> dict[str, str]:
        return signed_headers(API_KEY, HMAC_SECRET)

    async with (
        httpx.AsyncClient(base_url=gateway.base_url, trust_env=False) as http,
        connect(
            f"{gateway.ws_url}/ws",
            additional_headers={"X-API-KEY": API_KEY},
            proxy=None,
            open_timeout=5,
        ) as ws,
    ):
        assert json.loads(await ws.recv())["type"] == "hello"
        for n in range(3):
            response = await http.post(
                "/job", json={"job_id": f"metrics-{n}"}, headers=headers()
            )
            assert response.status_code == 201
        duplicate = await http.post(
            "/job", json={"job_id": "metrics-0"}, headers=headers()
        )
        assert duplicate.status_code == 200
        for _ in range(3):
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame["type"] == "job"
        for _ in range(2):
            claim = await http.get("/job/next", headers=headers())
            assert claim.status_code == 200
        scraped = await http.get("/metrics", headers=headers())
    assert scraped.status_code == 200
    values = samples(scraped.text)
    assert values["gateway_jobs_published_total"] == 3
    assert values["gateway_jobs_duplicates_total"] == 1
    assert values["gateway_jobs_claimed_total"] == 2
    assert values["gateway_jobs_expired_total"] == 0
    assert values["gateway_queue_depth"] == 1
    assert values["gateway_websocket_clients"] == 1
    # Three first deliveries, all pushes; the claims came after, so not again.
    assert values["gateway_delivery_latency_seconds_count"] == 3
    assert values['gateway_delivery_latency_seconds_bucket{le="+Inf"}'] == 3
