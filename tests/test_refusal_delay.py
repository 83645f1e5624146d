"""Refused credentials wait about ``AUTH_FAILURE_DELAY_SECONDS``; valid ones never do.

In process for each kind of credential, then through a real daphne: refusals
held there must not hold up the valid requests it serves meanwhile. An address
refused again and again is held longer, up to
``AUTH_FAILURE_MAX_DELAY_SECONDS``, a handshake never past daphne's timeout.
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
from jobs.consumers import HANDSHAKE_HOLD_CEILING
from testkit.servers import DaphneProcess
from tests.conftest import assert_error, process_env
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [
    pytest.mark.backends,
    pytest.mark.usefixtures("empty_redis", "transactional_db"),
]

Sign = Callable[..., dict[str, str]]
T = TypeVar("T")

DELAY = 1.0  # long beside a request served, even on a busy host


@pytest.fixture(autouse=True)
def no_earlier_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no address refused before (they are per process)."""
    monkeypatch.setattr(auth, "repeat_refusals", auth.RepeatRefusals())


@pytest.fixture
def delay(settings: Settings) -> float:
    """The shortest a refusal is held: the delay, less its jitter."""
    settings.AUTH_FAILURE_DELAY_SECONDS = DELAY
    return DELAY * (1 - REFUSAL_JITTER)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The holds asked of the event loop, which then does not wait."""
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr(auth, "asyncio", SimpleNamespace(sleep=sleep))
    return asked


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


def forged(sign: Sign) -> dict[str, str]:
    return {**sign(), "X-SIGNATURE": "0" * 64}


# --- In process -----------------------------------------------------------------


async def test_holds_spread_around_the_delay(
    settings: Settings, waits: list[float]
) -> None:
    # Held exactly as long, a flood's connections would come back in waves.
    settings.AUTH_FAILURE_DELAY_SECONDS = DELAY
    settings.AUTH_FAILURE_MAX_DELAY_SECONDS = DELAY  # no growth here
    for _ in range(200):
        await auth.hold_refusal("192.0.2.1")
    shortest, longest = DELAY * (1 - REFUSAL_JITTER), DELAY * (1 + REFUSAL_JITTER)
    assert all(shortest <= wait <= longest for wait in waits)
    assert max(waits) - min(waits) > DELAY * REFUSAL_JITTER  # spread, not one value
    # As many refusals a second as without the spread.
    assert statistics.mean(waits) == pytest.approx(DELAY, rel=0.05)


# --- Repeated refusals to one address -------------------------------------------


async def test_each_run_of_refusals_to_one_address_doubles_its_hold(
    settings: Settings, waits: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.AUTH_FAILURE_DELAY_SECONDS = DELAY
    settings.AUTH_FAILURE_MAX_DELAY_SECONDS = 6 * DELAY
    monkeypatch.setattr(auth, "random", SimpleNamespace(uniform=lambda a, b: 0.0))
    run = auth.DOUBLE_EVERY
    for _ in range(5 * run):
        await auth.hold_refusal("192.0.2.1")
    await auth.hold_refusal("192.0.2.2")
    held = [wait / DELAY for wait in waits]
    assert held[: 4 * run] == [1] * run + [2] * run + [4] * run + [6] * run
    assert held[4 * run : 5 * run] == [6] * run  # the ceiling
    assert held[-1] == 1  # another address is held the delay


def test_the_ceiling_is_never_below_the_delay(settings: Settings) -> None:
    settings.AUTH_FAILURE_DELAY_SECONDS = DELAY
    settings.AUTH_FAILURE_MAX_DELAY_SECONDS = 0
    assert auth.hold_seconds(1_000_000) == DELAY
    settings.AUTH_FAILURE_MAX_DELAY_SECONDS = 60
    assert auth.hold_seconds(1_000_000) == 60


def test_a_quiet_spell_forgives_an_address() -> None:
    repeats = auth.RepeatRefusals()
    quiet = auth.FORGET_AFTER_SECONDS
    assert [repeats.count("192.0.2.1", now=n) for n in range(3)] == [0, 1, 2]
    # Refused again just within the spell: the run goes on.
    assert repeats.count("192.0.2.1", now=2 + quiet) == 3
    # Past it: a fresh start.
    assert repeats.count("192.0.2.1", now=3 + 2 * quiet) == 0


def test_it_remembers_a_bounded_number_of_addresses() -> None:
    repeats = auth.RepeatRefusals(max_tracked=3)
    for ip in ("a", "b", "c", "a", "d"):  # "a" refused again, then "d" is new
        repeats.count(ip, now=0)
    assert len(repeats) == 3
    assert repeats.count("b", now=0) == 0  # the least recently refused went
    assert repeats.count("a", now=0) == 2


async def test_nothing_is_counted_when_refusals_are_not_held(
    settings: Settings, waits: list[float]
) -> None:
    settings.AUTH_FAILURE_DELAY_SECONDS = 0
    for _ in range(3):
        await auth.hold_refusal("192.0.2.1")
    assert waits == []
    assert len(auth.repeat_refusals) == 0


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


async def test_a_refused_handshake_is_answered_before_daphne_drops_it(
    settings: Settings, waits: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held longer, the handshake would be cut off (autobahn's open-handshake
    # timeout, 5 s) instead of refused.
    settings.AUTH_FAILURE_DELAY_SECONDS = 8
    monkeypatch.setattr(auth, "random", SimpleNamespace(uniform=lambda a, b: 0.25))
    assert not await _handshake("?api_key=not-the-key", [])
    assert not await _handshake("?ticket=never-issued", [])
    assert waits == [HANDSHAKE_HOLD_CEILING * 1.25] * 2
    assert max(waits) < 5 - 1


async def test_a_handshake_refused_for_anything_else_does_not_wait(
    delay: float,
) -> None:
    # The key is right; the batch value is not: refused, but not held.
    connected, took = await timed(_handshake(f"?api_key={API_KEY}&batch=7", []))
    assert not connected
    assert took < delay


# --- Through daphne -------------------------------------------------------------

REPEAT_DELAY, REPEAT_CEILING = 0.2, 1.6


async def test_an_address_refused_again_and_again_is_held_longer(
    sign: Sign,
) -> None:
    env = process_env(
        AUTH_FAILURE_DELAY_SECONDS=str(REPEAT_DELAY),
        AUTH_FAILURE_MAX_DELAY_SECONDS=str(REPEAT_CEILING),
        TRUSTED_PROXY_COUNT="1",
    )
    flooder, other = (
        {"X-Forwarded-For": "203.0.113.7"},
        {"X-Forwarded-For": "203.0.113.8"},
    )
    shortest_last_hold = REPEAT_CEILING * (1 - REFUSAL_JITTER)
    with DaphneProcess(env=env) as process:
        async with httpx.AsyncClient(
            base_url=process.base_url, trust_env=False, timeout=10
        ) as client:

            async def refused(address: dict[str, str]) -> float:
                headers = {**forged(sign), **address}
                response, held = await timed(client.get("/job/next", headers=headers))
                assert_error(response, 401, "bad_signature")
                return held

            first = await refused(flooder)
            run = auth.DOUBLE_EVERY
            for _ in range(3):  # three runs: held 0.2, 0.4 and 0.8 s
                await asyncio.gather(*(refused(flooder) for _ in range(run)))
            assert await refused(flooder) >= shortest_last_hold
            # Another address is held the delay (0.2 s), far from 1.6.
            assert await refused(other) < shortest_last_hold / 2
            # The flooding address's valid requests are not held at all.
            served, took = await timed(
                client.get("/job/next", headers={**sign(), **flooder})
            )
            assert served.status_code == 204
            assert took < shortest_last_hold
        # Its handshakes share its count.
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as handshake:
            async with connect(
                f"{process.ws_url}/ws",
                additional_headers={"X-API-KEY": "not-the-key", **flooder},
                proxy=None,
                open_timeout=10,
            ):
                pass
        assert handshake.value.response.status_code == 403
        assert time.monotonic() - started >= shortest_last_hold
    assert first < shortest_last_hold / 2


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
