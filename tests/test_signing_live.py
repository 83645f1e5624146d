"""Signature v2, key rotation and WebSocket tickets through real daphne processes.

One gateway that takes v2 only, with two keys and two secrets configured; then
two replicas sharing Redis, where a nonce or a ticket used on one must be
refused on the other, even when both see it at the same moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from discord_poller.cursor import snowflake_at
from discord_poller.embeds import ParsedJob
from discord_poller.publisher import PendingJob, Publisher
from gateway_client import AuthError, GatewayClient, signing
from testkit.servers import DaphneProcess
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]

SECOND_KEY, SECOND_SECRET = "second-api-key", "second-hmac-secret"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        yield client


def v2(
    method: str, target: str, body: bytes = b"", key: str = API_KEY, secret: str = ""
) -> dict[str, str]:
    return signing.signed_headers_v2(
        key, secret or HMAC_SECRET, method=method, target=target, body=body
    )


def job_body(job_id: str | None = None) -> bytes:
    return json.dumps({"job_id": job_id or uuid.uuid4().hex}).encode()


async def post_job(
    http: httpx.AsyncClient, base: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return await http.post(
        f"{base}/job",
        content=body,
        headers={**headers, "Content-Type": "application/json"},
    )


async def handshake(ws_base: str, query: str, headers: dict[str, str]) -> bool:
    try:
        async with connect(
            f"{ws_base}/ws{query}",
            additional_headers=headers,
            proxy=None,
            open_timeout=5,
        ) as websocket:
            hello = json.loads(await websocket.recv())
            assert hello["type"] == "hello"
            return True
    except InvalidStatus as refused:
        status = refused.response.status_code
    assert status == 403
    return False


# --- One gateway: v2 only, two keys, two secrets --------------------------------


@pytest.fixture
def v2_gateway(transactional_db: None) -> Iterator[DaphneProcess]:
    env = process_env(
        API_KEY=f"{API_KEY},{SECOND_KEY}",
        HMAC_SECRET=f"{HMAC_SECRET},{SECOND_SECRET}",
        REQUIRE_SIGNATURE_V2="true",
        WS_REQUIRE_SIGNATURE="true",
    )
    with DaphneProcess(env=env) as process:
        yield process


async def test_a_v2_mismatch_says_what_is_signed_and_what_was_checked(
    v2_gateway: DaphneProcess, http: httpx.AsyncClient
) -> None:
    base = v2_gateway.base_url
    # The usual mistake: the path signed without the query it is sent with.
    headers = v2("GET", "/job/next")
    refused = await http.get(f"{base}/job/next?wait=1", headers=headers)
    assert refused.status_code == 401
    assert refused.json()["error"] == "bad_signature"
    detail = refused.json()["detail"]
    assert "X-TIMESTAMP, X-NONCE, the method, the path with its query" in detail
    assert "method GET, path and query /job/next?wait=1, body SHA-256 " in detail
    assert f"{hashlib.sha256(b'').hexdigest()} (0 bytes)" in detail
    # Never a secret, nor the signature the gateway expected.
    expected = signing.sign_v2(
        HMAC_SECRET,
        headers["X-TIMESTAMP"],
        headers["X-NONCE"],
        "GET",
        "/job/next?wait=1",
    )
    for secret in (HMAC_SECRET, SECOND_SECRET, expected):
        assert secret not in refused.text

    # A body other than the one signed: its hash and length as received.
    body = job_body()
    sent = job_body()
    refused = await post_job(http, base, sent, v2("POST", "/job", body))
    detail = refused.json()["detail"]
    assert "method POST, path and query /job," in detail
    assert f"{hashlib.sha256(sent).hexdigest()} ({len(sent)} bytes)" in detail


async def test_v2_rotation_and_replays_through_daphne(
    v2_gateway: DaphneProcess, http: httpx.AsyncClient
) -> None:
    base = v2_gateway.base_url
    v1 = signing.signed_headers(API_KEY, HMAC_SECRET)
    refused = await http.get(f"{base}/health", headers=v1)
    assert refused.status_code == 401
    assert refused.json()["error"] == "signature_v2_required"

    # Rotation: the second key with the second secret is accepted.
    body = job_body()
    headers = v2("POST", "/job", body, SECOND_KEY, SECOND_SECRET)
    first = await post_job(http, base, body, headers)
    assert first.status_code == 201, first.text
    replay = await post_job(http, base, body, headers)
    assert replay.status_code == 401
    assert replay.json()["error"] == "replayed_nonce"
    # The same signature on another body, path or query: refused.
    forged = await post_job(http, base, job_body(), {**headers, "X-NONCE": "0" * 32})
    assert forged.json()["error"] == "bad_signature"
    signed_for = v2("GET", "/job/next?wait=0")
    moved = await http.get(f"{base}/job/next?wait=1", headers=signed_for)
    assert moved.json()["error"] == "bad_signature"
    # The raw target, percent-encoding and all, is what is signed.
    raw = await http.get(
        f"{base}/job/next?wait=%30", headers=v2("GET", "/job/next?wait=%30")
    )
    assert (
        raw.status_code == 200 and raw.json()["job"]["id"] == first.json()["job"]["id"]
    )

    # The WebSocket handshake: v2 over GET, its target and an empty body.
    assert await handshake(v2_gateway.ws_url, "?since=0", v2("GET", "/ws?since=0"))
    once = v2("GET", "/ws")
    assert await handshake(v2_gateway.ws_url, "", once)
    assert not await handshake(v2_gateway.ws_url, "", once)  # replayed
    assert not await handshake(v2_gateway.ws_url, "", v1)


async def test_clients_and_poller_sign_v2_with_the_first_of_a_list(
    v2_gateway: DaphneProcess,
) -> None:
    base = v2_gateway.base_url
    # The gateway takes only v2, so every success below was signed with v2.
    async with GatewayClient(
        base, api_key=f"{API_KEY},not-listed", hmac_secret=f"{HMAC_SECRET},nope"
    ) as client:
        published = await client.publish({"job_id": uuid.uuid4().hex})
        assert published.queued
        pulled = await client.next_job()
        assert pulled is not None and pulled["id"] == published.job["id"]
        # The stream takes a ticket by default: no key on the handshake.
        pushed = await client.publish({"job_id": uuid.uuid4().hex})
        since = published.job["id"]
        async with aclosing(client.stream(since=since, retries=1)) as jobs:
            received = await asyncio.wait_for(anext(jobs), 10)
        assert received["id"] == pushed.job["id"]
    # Listed second, the known key and secret are not used: the first signs.
    async with GatewayClient(
        base, api_key=f"not-listed,{API_KEY}", hmac_secret=HMAC_SECRET
    ) as wrong_first:
        with pytest.raises(AuthError) as caught:
            await wrong_first.health()
    assert caught.value.code == "bad_api_key"

    channel = "1390012345678901234"
    message_id = str(snowflake_at(time.time() * 1000) + uuid.uuid4().int % 4096)
    job_id = uuid.uuid4().hex
    parsed = ParsedJob(job_id, 42, "Title", {}, message_id, channel)
    async with Publisher(base, API_KEY, HMAC_SECRET, ttl_seconds=300) as publisher:
        publisher.submit(PendingJob.from_message(parsed, channel, message_id))
        assert await publisher.publish_next(channel) == 0.0
    assert publisher.stats.published == 1, publisher.stats.last_error

    output = v2_gateway.output()
    assert f"WS /ws?since={since}&batch=1&ticket=[redacted] 101" in output
    assert "POST /ws/ticket 200" in output


async def test_a_ticket_through_daphne_once_and_never_logged(
    v2_gateway: DaphneProcess, http: httpx.AsyncClient
) -> None:
    base, ws_base = v2_gateway.base_url, v2_gateway.ws_url
    response = await http.post(f"{base}/ws/ticket", headers=v2("POST", "/ws/ticket"))
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 30
    ticket = response.json()["ticket"]
    # No key, no signature: the ticket alone admits, once.
    assert await handshake(ws_base, f"?ticket={ticket}&since=0", {})
    assert not await handshake(ws_base, f"?ticket={ticket}", {})
    v2_gateway.wait_for_output("unknown or already used ticket")
    output = v2_gateway.output()
    assert ticket not in output
    assert "ticket=[redacted]" in output
    assert "WS /ws?ticket=[redacted]&since=0 101" in output
    assert "WS /ws?ticket=[redacted] 403" in output


# --- Two replicas sharing Redis ---------------------------------------------------


@pytest.fixture
def replicas(transactional_db: None, redis_url: str) -> Iterator[list[DaphneProcess]]:
    redis.Redis.from_url(redis_url).flushdb()
    env = process_env(REDIS_URL=redis_url)
    with DaphneProcess(env=env) as first, DaphneProcess(env=env) as second:
        yield [first, second]


async def test_replicas_share_nonces_and_tickets(
    replicas: list[DaphneProcess], http: httpx.AsyncClient
) -> None:
    one, two = replicas
    # A nonce used on one replica is refused on the other.
    headers = v2("GET", "/health")
    assert (
        await http.get(f"{one.base_url}/health", headers=headers)
    ).status_code == 200
    again = await http.get(f"{two.base_url}/health", headers=headers)
    assert again.status_code == 401 and again.json()["error"] == "replayed_nonce"

    # The same signed request at the same moment on both: exactly one passes.
    for _ in range(10):
        body = job_body()
        headers = v2("POST", "/job", body)
        answers = await asyncio.gather(
            *(post_job(http, replica.base_url, body, headers) for replica in replicas)
        )
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [201, 401], [a.text for a in answers]

    # A ticket from one replica admits once, on either, never twice.
    async def ticket_from(replica: DaphneProcess) -> str:
        answer = await http.post(
            f"{replica.base_url}/ws/ticket", headers=v2("POST", "/ws/ticket")
        )
        assert answer.status_code == 200, answer.text
        value: str = answer.json()["ticket"]
        return value

    ticket = await ticket_from(one)
    assert await handshake(two.ws_url, f"?ticket={ticket}", {})
    assert not await handshake(one.ws_url, f"?ticket={ticket}", {})
    for _ in range(10):
        ticket = await ticket_from(two)
        admitted = await asyncio.gather(
            *(handshake(r.ws_url, f"?ticket={ticket}", {}) for r in replicas * 2)
        )
        assert sorted(admitted) == [False, False, False, True]
