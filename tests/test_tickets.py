"""WebSocket tickets: ``POST /ws/ticket``, then ``/ws?ticket=`` once, in-process.

Real daphne processes (one, and two replicas sharing Redis) are in
tests/test_tickets_live.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis
import time_machine
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from pytest_django import Settings

from gateway_client import GatewayClient, signing
from gateway_project.asgi import application
from jobs import redis_clients, tickets
from testkit.servers import free_port
from tests.stack import API_KEY, HMAC_SECRET, STACK

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("transactional_db")]


@pytest.fixture(autouse=True)
async def fresh_layer(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    yield
    await get_channel_layer().flush()


async def get_ticket(api: httpx.AsyncClient) -> str:
    headers = signing.signed_headers_v2(
        API_KEY, HMAC_SECRET, method="POST", target="/ws/ticket"
    )
    response = await api.post("/ws/ticket", headers=headers)
    assert response.status_code == 200, response.text
    ticket: str = response.json()["ticket"]
    return ticket


async def handshake(query: str) -> bool:
    communicator = WebsocketCommunicator(application, f"/ws{query}")
    connected, _ = await communicator.connect()
    if connected:
        hello = await communicator.receive_json_from()
        assert hello["type"] == "hello"
    await communicator.disconnect()
    return bool(connected)


# --- POST /ws/ticket ----------------------------------------------------------------


async def test_a_signed_post_gets_a_ticket(api: httpx.AsyncClient) -> None:
    headers = signing.signed_headers_v2(
        API_KEY, HMAC_SECRET, method="POST", target="/ws/ticket"
    )
    response = await api.post("/ws/ticket", headers=headers)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert set(body) == {"ticket", "expires_in"}
    assert body["expires_in"] == 30
    assert len(body["ticket"]) >= 43  # 32 random bytes, URL-safe base64
    # v1 works too, as on every signed endpoint.
    v1 = signing.signed_headers(API_KEY, HMAC_SECRET)
    assert (await api.post("/ws/ticket", headers=v1)).status_code == 200


async def test_the_ticket_endpoint_is_signed_post_only_and_rate_limited(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    unsigned = await api.post("/ws/ticket")
    assert unsigned.status_code == 401
    assert unsigned.json()["error"] == "missing_api_key"
    wrong = await api.get("/ws/ticket", headers=signing.signed_headers(API_KEY, "x"))
    assert wrong.json()["error"] == "bad_signature"  # the signature comes first
    get = await api.get(
        "/ws/ticket", headers=signing.signed_headers(API_KEY, HMAC_SECRET)
    )
    assert get.status_code == 405 and get.headers["Allow"] == "POST"
    settings.RATE_LIMIT_PER_MINUTE = 1
    await get_ticket(api)
    limited = await api.post(
        "/ws/ticket", headers=signing.signed_headers(API_KEY, HMAC_SECRET)
    )
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"


async def test_tickets_are_stored_hashed(
    api: httpx.AsyncClient, settings: Settings, clean_redis: str
) -> None:
    settings.REDIS_URL = clean_redis
    ticket = await get_ticket(api)
    store = redis.Redis.from_url(clean_redis)
    keys = store.keys("gateway:once:ticket:*")
    assert len(keys) == 1
    assert ticket.encode() not in keys[0]
    assert ticket.encode() not in (store.get(keys[0]) or b"")
    assert 30 <= store.ttl(keys[0]) <= 35


# --- /ws?ticket= ------------------------------------------------------------------


async def test_a_ticket_admits_one_handshake(
    api: httpx.AsyncClient, store: str
) -> None:
    ticket = await get_ticket(api)
    assert await handshake(f"?ticket={ticket}")
    assert not await handshake(f"?ticket={ticket}")
    # With the other query parameters, and no key anywhere.
    assert await handshake(f"?since=0&ticket={await get_ticket(api)}")


async def test_of_simultaneous_uses_exactly_one_wins(
    api: httpx.AsyncClient, store: str
) -> None:
    ticket = await get_ticket(api)
    outcomes = await asyncio.gather(
        *(tickets.redeem(ticket) for _ in range(20)), return_exceptions=True
    )
    assert outcomes.count(None) == 1
    refused = [o for o in outcomes if o is not None]
    assert len(refused) == 19
    assert all(isinstance(o, tickets.TicketRefused) for o in refused)


async def test_of_simultaneous_handshakes_exactly_one_is_admitted(
    api: httpx.AsyncClient, store: str
) -> None:
    ticket = await get_ticket(api)
    admitted = await asyncio.gather(*(handshake(f"?ticket={ticket}") for _ in range(8)))
    assert sorted(admitted) == [False] * 7 + [True]


async def test_a_ticket_expires_after_its_ttl(
    api: httpx.AsyncClient, store: str, settings: Settings
) -> None:
    now = time.time()
    with time_machine.travel(now, tick=False):
        late, in_time = await get_ticket(api), await get_ticket(api)
    with time_machine.travel(now + 30, tick=False):
        await tickets.redeem(in_time)
    with (
        time_machine.travel(now + 30.5, tick=False),
        pytest.raises(tickets.TicketRefused, match="expired"),
    ):
        await tickets.redeem(late)
    # The TTL is a setting.
    settings.WS_TICKET_TTL = 5
    with time_machine.travel(now, tick=False):
        ticket, ttl = await tickets.issue()
    assert ttl == 5
    with time_machine.travel(now + 6, tick=True):
        assert not await handshake(f"?ticket={ticket}")


@pytest.mark.parametrize(
    "ticket", ["", "short", "x" * 129, "é" * 43, "a b" * 20, "%00" * 20]
)
async def test_unknown_and_malformed_tickets_are_refused(
    store: str, ticket: str
) -> None:
    assert not await handshake(f"?ticket={ticket}")
    with pytest.raises(tickets.TicketRefused):
        await tickets.redeem(ticket)


async def test_a_ticket_never_reaches_the_logs(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ticket = await get_ticket(api)
    assert await handshake(f"?ticket={ticket}")
    assert not await handshake(f"?ticket={ticket}")  # refused: reason logged
    text = caplog.text
    assert ticket not in text
    assert "ticket=[redacted]" in text
    assert "unknown or already used ticket" in text


async def test_a_refused_ticket_store_refuses_the_handshake(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    ticket = await get_ticket(api)
    # Redis unreachable: no crash, a refusal (403), the reason logged.
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    redis_clients.forget()
    try:
        assert not await handshake(f"?ticket={ticket}")
    finally:
        redis_clients.forget()


# --- The Python client ------------------------------------------------------------


async def test_the_client_opens_ws_with_a_ticket_or_falls_back_to_headers() -> None:
    answers = iter(
        [
            httpx.Response(200, json={"ticket": "T" * 43, "expires_in": 30}),
            httpx.Response(404, json={"error": "not_found", "detail": "No."}),
        ]
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(answers)

    async with GatewayClient(
        "http://gw.test",
        api_key="k",
        hmac_secret="s",
        transport=httpx.MockTransport(handler),
    ) as client:
        url, headers = await client._authorise_handshake("ws://gw.test/ws?since=4")
        assert (url, headers) == (f"ws://gw.test/ws?since=4&ticket={'T' * 43}", {})
        # A gateway from before tickets: the key goes in signed headers instead.
        url, headers = await client._authorise_handshake("ws://gw.test/ws")
        assert url == "ws://gw.test/ws" and client.ws_auth == "headers"
    assert [(r.method, r.url.path) for r in seen] == [("POST", "/ws/ticket")] * 2
    signing.verify_request(
        headers,
        method="GET",
        target="/ws",
        api_keys=["k"],
        secrets=["s"],
        require_v2=True,
    )
