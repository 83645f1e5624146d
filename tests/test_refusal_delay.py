"""Refused credentials wait about ``AUTH_FAILURE_DELAY_SECONDS``; valid ones never do.

In process for each kind of credential, then through a real daphne: refusals
held there must not hold up the valid requests it serves meanwhile.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import TypeVar

import httpx
import pytest
from channels.testing import WebsocketCommunicator
from pytest_django import Settings
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway_client import signing
from gateway_project.asgi import application
from jobs import auth
from jobs.auth import REFUSAL_JITTER
from tests.conftest import assert_error, process_env
from tests.servers import DaphneProcess
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = pytest.mark.usefixtures("empty_redis", "transactional_db")

Sign = Callable[..., dict[str, str]]
T = TypeVar("T")

DELAY = 0.5


@pytest.fixture
def delay(settings: Settings) -> float:
    """The shortest a refusal is held: the delay, less its jitter."""
    settings.AUTH_FAILURE_DELAY_SECONDS = DELAY
    return DELAY * (1 - REFUSAL_JITTER)


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


def forged(sign: Sign) -> dict[str, str]:
    return {**sign(), "X-SIGNATURE": "0" * 64}


# --- In process -----------------------------------------------------------------


async def test_holds_spread_around_the_delay(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held exactly as long, a flood's connections would come back in waves.
    settings.AUTH_FAILURE_DELAY_SECONDS = DELAY
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(auth, "asyncio", SimpleNamespace(sleep=sleep))
    for _ in range(200):
        await auth.hold_refusal()
    shortest, longest = DELAY * (1 - REFUSAL_JITTER), DELAY * (1 + REFUSAL_JITTER)
    assert all(shortest <= wait <= longest for wait in waits)
    assert max(waits) - min(waits) > DELAY * REFUSAL_JITTER  # spread, not one value
    # As many refusals a second as without the spread.
    assert statistics.mean(waits) == pytest.approx(DELAY, rel=0.05)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        (forged, "bad_signature"),
        (lambda sign: sign(api_key="not-the-key"), "bad_api_key"),
        (lambda sign: sign(now=time.time() - 3600), "stale_timestamp"),
        (lambda sign: {}, "missing_api_key"),
    ],
    ids=["signature", "key", "timestamp", "nothing"],
)
async def test_a_refused_signature_waits_and_a_valid_one_does_not(
    api: httpx.AsyncClient,
    sign: Sign,
    delay: float,
    headers: Callable[[Sign], dict[str, str]],
    code: str,
) -> None:
    refused, held = await timed(api.get("/job/next", headers=headers(sign)))
    assert_error(refused, 401, code)
    assert held >= delay
    served, took = await timed(api.get("/job/next", headers=sign()))
    assert served.status_code == 204
    assert took < delay


async def test_a_replayed_nonce_waits(api: httpx.AsyncClient, delay: float) -> None:
    headers = signing.signed_headers_v2(
        API_KEY, HMAC_SECRET, method="GET", target="/job/next", body=b""
    )
    first, took = await timed(api.get("/job/next", headers=headers))
    assert first.status_code == 204
    assert took < delay
    replay, held = await timed(api.get("/job/next", headers=headers))
    assert_error(replay, 401, "replayed_nonce")
    assert held >= delay


async def test_a_wrong_metrics_token_waits(
    api: httpx.AsyncClient, delay: float, settings: Settings
) -> None:
    settings.METRICS_TOKEN = "the-scraper-token"
    wrong = {"Authorization": "Bearer not-the-token"}
    refused, held = await timed(api.get("/metrics", headers=wrong))
    assert_error(refused, 401, "bad_token")
    assert held >= delay
    right = {"Authorization": "Bearer the-scraper-token"}
    served, took = await timed(api.get("/metrics", headers=right))
    assert served.status_code == 200
    assert took < delay


async def _handshake(query: str, headers: list[tuple[bytes, bytes]]) -> bool:
    communicator = WebsocketCommunicator(application, f"/ws{query}", headers=headers)
    connected, _ = await communicator.connect(timeout=10)
    await communicator.disconnect()
    return bool(connected)


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", [(b"x-api-key", b"not-the-key")]),
        ("?api_key=not-the-key", []),
        ("?ticket=never-issued", []),
    ],
    ids=["header-key", "query-key", "ticket"],
)
async def test_a_refused_websocket_credential_waits(
    delay: float, query: str, headers: list[tuple[bytes, bytes]]
) -> None:
    connected, held = await timed(_handshake(query, headers))
    assert not connected
    assert held >= delay


async def test_a_handshake_refused_for_anything_else_does_not_wait(
    delay: float,
) -> None:
    # The key is right; the batch value is not: refused, but not held.
    connected, took = await timed(_handshake(f"?api_key={API_KEY}&batch=7", []))
    assert not connected
    assert took < delay


# --- Through daphne -------------------------------------------------------------

LIVE_DELAY = 1.0
LIVE_SHORTEST_HOLD = LIVE_DELAY * (1 - REFUSAL_JITTER)
FORGED = 12


@pytest.fixture
def slow_refusals() -> Iterator[DaphneProcess]:
    env = process_env(AUTH_FAILURE_DELAY_SECONDS=str(LIVE_DELAY))
    with DaphneProcess(env=env) as process:
        yield process


async def test_held_refusals_do_not_hold_up_valid_requests(
    slow_refusals: DaphneProcess, sign: Sign
) -> None:
    base, ws_base = slow_refusals.base_url, slow_refusals.ws_url

    async def forged_http(client: httpx.AsyncClient, n: int) -> tuple[int, float]:
        if n % 2:
            call = client.get(f"{base}/job/next", headers=forged(sign))
        else:
            call = client.post(
                f"{base}/job", json={"job_id": "x"}, headers=forged(sign)
            )
        response, held = await timed(call)
        return response.status_code, held

    async def forged_ws() -> tuple[int, float]:
        started = time.monotonic()
        try:
            async with connect(
                f"{ws_base}/ws",
                additional_headers={"X-API-KEY": "not-the-key"},
                proxy=None,
                open_timeout=10,
            ):
                return 101, time.monotonic() - started
        except InvalidStatus as refused:
            return refused.response.status_code, time.monotonic() - started

    limits = httpx.Limits(max_connections=FORGED + 4)
    async with httpx.AsyncClient(trust_env=False, timeout=10, limits=limits) as client:
        attacks: list[asyncio.Task[tuple[int, float]]] = [
            asyncio.create_task(forged_http(client, n)) for n in range(FORGED)
        ]
        attacks += [asyncio.create_task(forged_ws()) for _ in range(FORGED // 3)]
        served: list[float] = []
        while not all(attack.done() for attack in attacks):
            response, took = await timed(client.get(f"{base}/job/next", headers=sign()))
            assert response.status_code == 204
            served.append(took)
        answers = [attack.result() for attack in attacks]
    assert sorted({status for status, _ in answers}) == [401, 403]
    assert min(held for _, held in answers) >= LIVE_SHORTEST_HOLD
    # Valid polls went on being answered while the refusals were held.
    assert len(served) >= 2
    assert max(served) < LIVE_SHORTEST_HOLD
