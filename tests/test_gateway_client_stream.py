"""``GatewayClient.stream()`` against a scripted WebSocket server on 127.0.0.1.

Each connection the client opens plays the next step of a script, so resuming,
de-duplication and the handling of refused handshakes are exact. The real
gateway is exercised by tests/test_gateway_client_live.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway_client import (
    AuthError,
    BadFilter,
    BadRequest,
    GatewayClient,
    Unavailable,
    signing,
)

# A step plays one connection; an int, or (int, headers), refuses the handshake.
Step = Callable[[ServerConnection], Awaitable[None]] | int | tuple[int, dict[str, str]]
Health = Callable[[httpx.Request], httpx.Response]


def hello(last_id: int | None = None) -> str:
    return json.dumps({"type": "hello", "server_time": 0.0, "last_id": last_id})


def job(job_id: int) -> str:
    return json.dumps({"type": "job", "job": {"id": job_id, "job_id": f"j{job_id}"}})


def frames(*texts: str, then: str = "hold") -> Callable[[ServerConnection], Any]:
    """A connection that sends ``texts``, then holds, closes or drops the line."""

    async def play(connection: ServerConnection) -> None:
        for text in texts:
            await connection.send(text)
        if then == "close":
            return
        if then == "drop":
            connection.transport.abort()  # no close frame: like a crash
            return
        await connection.wait_closed()

    return play


class ScriptedGateway:
    """Plays one step per handshake; an int step refuses it with that status."""

    def __init__(self, script: list[Step]) -> None:
        self.script = list(script)
        self.requests: list[Request] = []

    def _refuse(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        self.requests.append(request)
        step = self.script[0] if self.script else None
        if isinstance(step, int):
            step = (step, {})
        if isinstance(step, tuple):
            self.script.pop(0)
            status, headers = step
            response = connection.respond(status, "refused\n")
            response.headers.update(headers)
            return response
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        step = self.script.pop(0) if self.script else frames()
        assert callable(step)
        await step(connection)

    @asynccontextmanager
    async def running(
        self, health: Health | None = None
    ) -> AsyncIterator[GatewayClient]:
        """A client for this server; its HTTP requests go to ``health``."""
        answer = health or (lambda request: httpx.Response(200, json={"ok": True}))
        async with serve(
            self._handle, "127.0.0.1", 0, process_request=self._refuse
        ) as server:
            port = server.sockets[0].getsockname()[1]
            async with GatewayClient(
                f"http://127.0.0.1:{port}",
                api_key="key-one",
                hmac_secret="secret-one",
                timeout=5,
                transport=httpx.MockTransport(answer),
                # Tickets have tests of their own (tests/test_tickets*.py).
                ws_auth="headers",
            ) as client:
                yield client

    @property
    def targets(self) -> list[str]:
        return [request.path for request in self.requests]


async def take(
    client: GatewayClient, count: int, **kwargs: Any
) -> list[dict[str, Any]]:
    """The first ``count`` jobs of a stream with quick retries, then close it."""
    kwargs.setdefault("initial_backoff", 0.01)
    kwargs.setdefault("max_backoff", 0.05)
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(10), aclosing(client.stream(**kwargs)) as jobs:
        async for item in jobs:
            received.append(item)
            if len(received) == count:
                break
    return received


def ids(jobs: list[dict[str, Any]]) -> list[int]:
    return [item["id"] for item in jobs]


async def test_a_dropped_stream_resumes_after_the_last_id() -> None:
    fake = ScriptedGateway(
        [
            frames(hello(), job(1), job(2), job(3), then="drop"),
            frames(hello(3), job(3), job(4), then="close"),
            frames(hello(4), job(5)),
        ]
    )
    async with fake.running() as client:
        received = await take(client, 5)
    assert ids(received) == [1, 2, 3, 4, 5]
    # A drop and a clean close are both resumed after the newest job seen.
    assert fake.targets == ["/ws?batch=1", "/ws?since=3&batch=1", "/ws?since=4&batch=1"]


async def test_the_key_goes_in_signed_headers_not_the_url() -> None:
    fake = ScriptedGateway([frames(hello(), job(1))])
    async with fake.running() as client:
        await take(client, 1)
    request = fake.requests[0]
    assert "key-one" not in request.path
    headers: Headers = request.headers
    assert headers["X-API-KEY"] == "key-one"
    # Signature v2 of the handshake: GET, its target, an empty body.
    signing.verify_request(
        dict(headers.raw_items()),
        method="GET",
        target=request.path,
        api_keys=["key-one"],
        secrets=["secret-one"],
        require_v2=True,
    )


async def test_from_now_resumes_after_the_newest_job_at_connect() -> None:
    fake = ScriptedGateway(
        [frames(hello(41), then="close"), frames(hello(41), job(42))]
    )
    async with fake.running() as client:
        assert ids(await take(client, 1)) == [42]
    assert fake.targets == ["/ws?batch=1", "/ws?since=41&batch=1"]


async def test_channels_and_since_are_sent() -> None:
    fake = ScriptedGateway([frames(hello(9), job(8))])
    async with fake.running() as client:
        assert ids(await take(client, 1, channels="A,B", since=7)) == [8]
    assert fake.targets == ["/ws?channels=A,B&since=7&batch=1"]


async def test_the_filter_is_sent_on_every_handshake_and_signed() -> None:
    where = ["money_per_sec>=10M", "players<players_max", "name~la grande"]
    fake = ScriptedGateway(
        [frames(hello(9), job(10), then="drop"), frames(hello(10), job(11))]
    )
    async with fake.running() as client:
        received = await take(
            client, 2, where=where, channels="A,B", tier="10m+", since=9
        )
    assert ids(received) == [10, 11]
    queries = [parse_qs(target.partition("?")[2]) for target in fake.targets]
    # The reconnect keeps the filter and resumes after the last job seen.
    for query, since in zip(queries, ["9", "10"], strict=True):
        assert query == {
            "where": where,
            "channels": ["A,B"],
            "tier": ["10m+"],
            "since": [since],
            "batch": ["1"],
        }
    for request in fake.requests:
        assert " " not in request.path and ">" not in request.path
        signing.verify_request(
            dict(request.headers.raw_items()),
            method="GET",
            target=request.path,
            api_keys=["key-one"],
            secrets=["secret-one"],
            require_v2=True,
        )


async def test_nothing_is_yielded_twice_and_late_jobs_are_not_lost() -> None:
    # Job 2 committed after job 3: it arrives late, and is still yielded.
    fake = ScriptedGateway([frames(hello(), job(1), job(3), job(1), job(2), job(4))])
    async with fake.running() as client:
        received = await take(client, 4)
    assert ids(received) == [1, 3, 2, 4]


def jobs(*job_ids: int) -> str:
    batch = [{"id": job_id, "job_id": f"j{job_id}"} for job_id in job_ids]
    return json.dumps({"type": "jobs", "jobs": batch})


async def test_batched_frames_come_out_one_job_at_a_time() -> None:
    # A batch may overlap what was already seen, like a replay after a drop.
    fake = ScriptedGateway(
        [frames(hello(), jobs(1, 2, 3), then="drop"), frames(hello(3), jobs(2, 4, 5))]
    )
    async with fake.running() as client:
        received = await take(client, 5)
    assert ids(received) == [1, 2, 3, 4, 5]
    assert fake.targets[1] == "/ws?since=3&batch=1"


async def test_other_frames_are_not_jobs() -> None:
    noise = [
        json.dumps({"type": "pong", "server_time": 1.0}),
        json.dumps({"type": "error", "error": "unknown_type", "detail": "x"}),
        "not json",
        json.dumps({"type": "job", "job": {"job_id": "no id"}}),
        json.dumps({"type": "jobs", "jobs": [{"job_id": "no id"}, "x", None]}),
        json.dumps({"type": "jobs", "jobs": {"id": 4}}),
    ]
    fake = ScriptedGateway([frames(hello(), *noise, job(5))])
    async with fake.running() as client:
        assert ids(await take(client, 1)) == [5]


def health_answer(status: int, **headers: str) -> Health:
    body = {"ok": True} if status == 200 else {"error": "e", "detail": "d."}
    if status == 401:
        body = {"error": "bad_api_key", "detail": "The API key is not valid."}
    return lambda request: httpx.Response(status, json=body, headers=headers)


async def test_refused_credentials_raise_at_once() -> None:
    fake = ScriptedGateway([403, frames(hello(), job(1))])
    async with fake.running(health_answer(401)) as client:
        with pytest.raises(AuthError) as caught:
            await take(client, 1)
    assert caught.value.code == "bad_api_key"
    assert len(fake.requests) == 1


async def test_a_refusal_with_good_credentials_is_a_bad_request() -> None:
    fake = ScriptedGateway([403, frames(hello(), job(1))])
    async with fake.running(health_answer(200)) as client:
        with pytest.raises(BadRequest) as caught:
            await take(client, 1, channels="no such")
    assert caught.value.code == "handshake_refused"
    assert len(fake.requests) == 1


async def test_a_refused_filter_with_good_credentials_is_a_bad_filter() -> None:
    fake = ScriptedGateway([403, frames(hello(), job(1))])
    async with fake.running(health_answer(200)) as client:
        with pytest.raises(BadFilter) as caught:
            await take(client, 1, where="money_per_sec>=10%", tier="gold")
    assert (caught.value.code, caught.value.status) == ("bad_filter", 403)
    assert "where=money_per_sec>=10%&tier=gold" in caught.value.detail
    assert len(fake.requests) == 1  # not retried: it cannot get better


async def test_a_rate_limited_handshake_is_retried() -> None:
    fake = ScriptedGateway([403, frames(hello(), job(1))])
    async with fake.running(health_answer(429, **{"Retry-After": "0"})) as client:
        assert ids(await take(client, 1)) == [1]
    assert len(fake.requests) == 2


async def test_server_errors_are_retried_then_given_up() -> None:
    fake = ScriptedGateway([503, 500, frames(hello(), job(1))])
    async with fake.running() as client:
        assert ids(await take(client, 1)) == [1]
    assert len(fake.requests) == 3

    failing = ScriptedGateway([503] * 5)
    async with failing.running() as client:
        with pytest.raises(Unavailable):
            await take(client, 1, retries=3)
    assert len(failing.requests) == 3


async def test_a_handshake_retry_after_is_honoured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ScriptedGateway([(429, {"Retry-After": "0.3"}), frames(hello(), job(1))])
    async with fake.running() as client:
        with caplog.at_level(logging.WARNING, logger="gateway_client.stream"):
            assert ids(await take(client, 1)) == [1]
    assert "http_429 (HTTP 429)" in caplog.text
    assert "reconnecting in 0.30s" in caplog.text


async def test_a_wrong_path_is_not_retried() -> None:
    fake = ScriptedGateway([404])
    async with fake.running() as client:
        with pytest.raises(BadRequest) as caught:
            await take(client, 1)
    assert caught.value.status == 404
    assert len(fake.requests) == 1


async def test_reconnects_are_logged_with_their_resume_point(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = ScriptedGateway([frames(hello(), job(6), then="drop"), frames(job(7))])
    async with fake.running() as client:
        with caplog.at_level(logging.WARNING, logger="gateway_client.stream"):
            assert ids(await take(client, 2)) == [6, 7]
    assert "reconnecting in" in caplog.text and "since=6" in caplog.text
