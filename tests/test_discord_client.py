"""The Discord client against the fake Discord: paging, headers, rate limits, bans."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from discord_poller.client import (
    Banned,
    BucketState,
    DiscordClient,
    DiscordUnavailable,
    Forbidden,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    discord_user_agent,
)
from testkit.fakes.discord import DISCORD_EPOCH_MS, FakeDiscord

CHANNEL = "1390012345678901234"
OTHER = "1390012345678901235"
UA = discord_user_agent("https://example.com/job-gateway", "1.0")
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A lenient fake Discord on a free loopback port."""
    async with FakeDiscord() as server:
        yield server


def client_for(fake: FakeDiscord, **kw: Any) -> DiscordClient:
    kw.setdefault("user_agent", UA)
    return DiscordClient(fake.state.token, fake.base_url, **kw)


def arrivals(fake: FakeDiscord, channel_id: str | None = None) -> list[float]:
    return [
        r.monotonic
        for r in fake.requests
        if channel_id is None or r.channel_id == channel_id
    ]


# --- The fake itself ------------------------------------------------------------


@pytest.mark.asyncio
async def test_fake_pages_like_discord(fake: FakeDiscord) -> None:
    ids = [int(fake.post_message(CHANNEL)["id"]) for _ in range(5)]
    auth = {"Authorization": fake.state.token}
    url = f"{fake.base_url}/channels/{CHANNEL}/messages"

    async with httpx.AsyncClient(headers=auth) as http:

        async def page(**params: Any) -> list[int]:
            response = await http.get(url, params=params)
            assert response.status_code == 200
            return [int(m["id"]) for m in response.json()]

        assert await page(limit=2) == [ids[4], ids[3]]
        assert await page(after=ids[0], limit=2) == [ids[2], ids[1]]
        assert await page(before=ids[4], limit=2) == [ids[3], ids[2]]
        assert await page(after=ids[4]) == []
        assert await page() == ids[::-1]
        bad = await http.get(url, params={"limit": 101})
        assert bad.status_code == 400
        assert bad.json()["code"] == 50035
        denied = await http.get(url, headers={"Authorization": "Bot wrong"})
        assert denied.status_code == 401
        assert denied.json() == {"message": "401: Unauthorized", "code": 0}

    assert ids == sorted(set(ids))
    now_ms = time.time() * 1000
    assert abs((ids[0] >> 22) + DISCORD_EPOCH_MS - now_ms) < 5000


@pytest.mark.asyncio
async def test_fake_runs_as_a_process_steered_over_http() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testkit.fakes.discord",
        "--port",
        "0",
        "--mode",
        "discord-like",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        base_url = line.decode().split()[1]
        control = base_url.removesuffix("/api/v10") + "/_control"
        async with httpx.AsyncClient() as http:
            posted = await http.post(
                f"{control}/messages", json={"channel_id": CHANNEL, "content": "hi"}
            )
            async with DiscordClient(
                "Bot fake-discord-token", base_url, user_agent=UA
            ) as client:
                messages = await client.fetch_messages(CHANNEL)
            log = (await http.get(f"{control}/requests")).json()["requests"]
    finally:
        proc.terminate()
        await proc.wait()
    assert [m["id"] for m in messages] == [posted.json()["id"]]
    assert log[0]["status"] == 200
    assert log[0]["headers"]["User-Agent"] == UA


# --- Requests -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pages_through_a_channel_with_after_and_limit(fake: FakeDiscord) -> None:
    posted = [fake.post_message(CHANNEL, content=str(i))["id"] for i in range(7)]
    seen: list[str] = []
    async with client_for(fake) as client:
        cursor = "0"
        while page := await client.fetch_messages(CHANNEL, after=cursor, limit=3):
            ids = [m["id"] for m in page]
            assert ids == sorted(ids, key=int, reverse=True)  # newest first
            seen.extend(reversed(ids))
            cursor = ids[0]
    assert seen == posted
    assert fake.requests[1].query == {"after": posted[2], "limit": "3"}


@pytest.mark.asyncio
async def test_sends_the_token_verbatim_and_a_discordbot_user_agent(
    fake: FakeDiscord,
) -> None:
    async with client_for(fake) as client:
        await client.fetch_messages(CHANNEL)
    headers = fake.requests[0].headers
    assert headers["Authorization"] == fake.state.token
    assert headers["User-Agent"] == "DiscordBot (https://example.com/job-gateway, 1.0)"


@pytest.mark.asyncio
async def test_reuses_one_connection(fake: FakeDiscord) -> None:
    async with client_for(fake) as client:
        for channel in (CHANNEL, OTHER, CHANNEL, OTHER, CHANNEL):
            await client.fetch_messages(channel)
    assert len(fake.requests) == 5
    assert len(fake.state.connections) == 1


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="DiscordBot"):
        DiscordClient("Bot x", user_agent="python-httpx")
    with pytest.raises(ValueError, match="token is empty"):
        DiscordClient(" ", user_agent=UA)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("channel_id", "params", "match"),
    [
        ("../users/@me", {}, "channel_id"),
        (CHANNEL, {"after": "1; x"}, "after"),
        (CHANNEL, {"limit": 101}, "limit"),
    ],
)
async def test_refuses_bad_ids_and_limits_without_sending(
    fake: FakeDiscord, channel_id: str, params: dict[str, Any], match: str
) -> None:
    async with client_for(fake) as client:
        with pytest.raises(ValueError, match=match):
            await client.fetch_messages(channel_id, **params)
    assert fake.requests == []


# --- Rate limits ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_request_before_the_bucket_resets() -> None:
    async with FakeDiscord(limit=2, window=1.0) as fake:
        async with client_for(fake) as client:
            assert client.bucket_state(CHANNEL) == BucketState(None, None, None)
            await client.fetch_messages(CHANNEL)
            state = client.bucket_state(CHANNEL)
            assert (state.limit, state.remaining) == (2, 1)
            assert state.reset_in is not None and 0.5 < state.reset_in <= 1.0
            await client.fetch_messages(CHANNEL)
            assert client.next_allowed_in(CHANNEL) > 0.5
            await client.fetch_messages(CHANNEL)
            await client.fetch_messages(CHANNEL)
        times = arrivals(fake)
        assert times[2] - times[0] >= 1.0
        assert fake.state.violations == 0
        assert client.stats.rate_limit_wait >= 0.5
        assert client.stats.requests == 4


@pytest.mark.asyncio
async def test_concurrent_requests_stay_within_the_bucket() -> None:
    async with FakeDiscord(limit=2, window=0.5) as fake:
        async with client_for(fake) as client:
            pages = await asyncio.gather(
                *(client.fetch_messages(CHANNEL) for _ in range(6))
            )
        assert len(pages) == 6
        assert fake.state.violations == 0
        assert client.stats.rate_limited == 0
        times = arrivals(fake)
        assert max(times) - min(times) >= 1.0  # three windows of two


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "invalid"), [("user_429", 1), ("shared_429", 0)])
async def test_a_429_waits_retry_after_then_retries(
    fake: FakeDiscord, kind: str, invalid: int
) -> None:
    fake.post_message(CHANNEL)
    fake.add_fault(kind, channel_id=CHANNEL, times=1, retry_after=0.3)
    async with client_for(fake) as client:
        messages = await client.fetch_messages(CHANNEL)
    assert len(messages) == 1
    first, second = arrivals(fake)
    assert second - first >= 0.3
    assert [r.status for r in fake.requests] == [429, 200]
    assert fake.state.violations == 0
    assert client.stats.rate_limited == 1
    assert client.invalid_requests == invalid


@pytest.mark.asyncio
async def test_a_global_429_holds_every_channel(fake: FakeDiscord) -> None:
    fake.add_fault("global_429", channel_id=CHANNEL, times=1, retry_after=0.4)
    async with client_for(fake, max_retries=0) as client:
        with pytest.raises(RateLimited) as caught:
            await client.fetch_messages(CHANNEL)
        assert caught.value.retry_after == pytest.approx(0.4)
        hit = fake.requests[-1].monotonic
        assert client.next_allowed_in(OTHER) > 0.2
        await client.fetch_messages(OTHER)
    assert fake.requests[-1].monotonic - hit >= 0.4
    assert fake.state.violations == 0


@pytest.mark.asyncio
async def test_a_shared_429_is_not_an_invalid_request(fake: FakeDiscord) -> None:
    async with client_for(fake, max_retries=0) as client:
        fake.add_fault("forbidden", channel_id=CHANNEL, times=1)
        with pytest.raises(Forbidden):
            await client.fetch_messages(CHANNEL)
        assert client.invalid_requests == 1
        fake.add_fault("not_found", channel_id=CHANNEL, times=1)
        with pytest.raises(NotFound):
            await client.fetch_messages(CHANNEL)
        assert client.invalid_requests == 1
        fake.add_fault("user_429", channel_id=CHANNEL, times=1, retry_after=0.05)
        with pytest.raises(RateLimited):
            await client.fetch_messages(CHANNEL)
        assert client.invalid_requests == 2
        fake.add_fault("shared_429", channel_id=OTHER, times=1, retry_after=0.05)
        with pytest.raises(RateLimited):
            await client.fetch_messages(OTHER)
        assert client.invalid_requests == 2
        assert client.stats.rate_limited == 2
    assert fake.state.invalid_requests == 2


@pytest.mark.asyncio
async def test_too_many_invalid_requests_slow_everything_down(
    fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_fault("forbidden", channel_id=CHANNEL, times=2)
    async with client_for(fake, invalid_soft_limit=2, slow_interval=0.3) as client:
        for _ in range(2):
            with pytest.raises(Forbidden):
                await client.fetch_messages(CHANNEL)
        await client.fetch_messages(OTHER)
        await client.fetch_messages(OTHER)
    # Paced on the client's side: arrivals jitter by the latency of each request.
    times = arrivals(fake)
    assert times[2] - times[1] >= 0.25
    assert times[3] - times[2] >= 0.25
    assert any("invalid Discord requests" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_a_wait_is_cancelled_at_once(fake: FakeDiscord) -> None:
    fake.add_fault("global_429", times=1, retry_after=30)
    async with client_for(fake, max_retries=0) as client:
        with pytest.raises(RateLimited):
            await client.fetch_messages(CHANNEL)
        task = asyncio.create_task(client.fetch_messages(OTHER))
        done, _ = await asyncio.wait({task}, timeout=0.1)
        assert not done  # held back by the global limit
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Not the 30 s the limit asked for; seconds of room for a busy host.
        assert time.monotonic() - started < 10
    assert len(fake.requests) == 1


# --- Bans and errors ------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["ban_html", "ban_json"])
async def test_a_ban_stops_every_request_for_the_cooldown(
    fake: FakeDiscord, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    fake.add_fault(kind, times=1)
    async with client_for(fake, ban_cooldown=0.3) as client:
        with pytest.raises(Banned) as caught:
            await client.fetch_messages(CHANNEL)
        assert caught.value.retry_after == pytest.approx(0.3)
        with pytest.raises(Banned):
            await client.fetch_messages(OTHER)
        assert len(fake.requests) == 1  # nothing sent during the cool-down
        await asyncio.sleep(client.next_allowed_in(OTHER))
        await client.fetch_messages(OTHER)
    first, second = arrivals(fake)
    assert second - first >= 0.3
    assert client.stats.bans == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("blocking this IP" in r.getMessage() for r in errors)


@pytest.mark.asyncio
async def test_a_ban_honours_a_longer_retry_after(fake: FakeDiscord) -> None:
    fake.add_fault("ban_json", times=1, retry_after_header=120)
    async with client_for(fake, ban_cooldown=0.1) as client:
        with pytest.raises(Banned) as caught:
            await client.fetch_messages(CHANNEL)
        assert caught.value.retry_after == 120
        assert client.next_allowed_in(OTHER) > 100


@pytest.mark.asyncio
async def test_401_raises_unauthorized_and_never_shows_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "MTM5MDAxMjM0NTY3ODkw.Gabcde.s3cr3t-t0ken-value"
    async with FakeDiscord(token="Bot another-token") as fake:
        client = DiscordClient(f"Bot {secret}", fake.base_url, user_agent=UA)
        async with client:
            with pytest.raises(Unauthorized) as caught:
                await client.fetch_messages(CHANNEL)
            with pytest.raises(Unauthorized) as again:
                await client.fetch_messages(CHANNEL)
        assert len(fake.requests) == 1  # a rejected token is not tried again
    assert caught.value.status == 401
    assert client.invalid_requests == 1
    shown = [str(caught.value), repr(caught.value), str(again.value), repr(client)]
    shown += [r.getMessage() for r in caplog.records]
    assert not [text for text in shown if secret in text]


@pytest.mark.asyncio
async def test_403_and_404_name_the_channel(fake: FakeDiscord) -> None:
    fake.add_fault("forbidden", channel_id=CHANNEL)
    fake.add_fault("not_found", channel_id=OTHER)
    async with client_for(fake) as client:
        with pytest.raises(Forbidden) as forbidden:
            await client.fetch_messages(CHANNEL)
        with pytest.raises(NotFound) as not_found:
            await client.fetch_messages(OTHER)
        assert await client.fetch_messages("1390012345678901236") == []
    assert (forbidden.value.channel_id, forbidden.value.status) == (CHANNEL, 403)
    assert forbidden.value.code == 50001
    assert (not_found.value.channel_id, not_found.value.status) == (OTHER, 404)
    assert not_found.value.code == 10003


@pytest.mark.asyncio
async def test_server_errors_and_dropped_connections_are_typed(
    fake: FakeDiscord,
) -> None:
    fake.add_fault("server_error", channel_id=CHANNEL, times=1, status=502)
    fake.add_fault("drop", channel_id=CHANNEL, times=1)
    async with client_for(fake) as client:
        with pytest.raises(ServerError) as caught:
            await client.fetch_messages(CHANNEL)
        assert caught.value.status == 502
        with pytest.raises(DiscordUnavailable) as dropped:
            await client.fetch_messages(CHANNEL)
        assert dropped.value.channel_id == CHANNEL
        # The failed requests gave their place in the bucket back.
        assert await asyncio.wait_for(client.fetch_messages(CHANNEL), 2) == []
    assert client.stats.last_latency is not None


@pytest.mark.asyncio
async def test_a_slow_answer_times_out_as_unavailable(fake: FakeDiscord) -> None:
    fake.add_fault("slow", delay=1.0, times=1)
    async with client_for(fake, timeout=0.2) as client:
        with pytest.raises(DiscordUnavailable):
            await client.fetch_messages(CHANNEL)
        assert await client.fetch_messages(CHANNEL) == []


def test_the_ban_page_is_html() -> None:
    # Guards the fake: a ban must look like Cloudflare's, not like JSON.
    from testkit.fakes.discord import BAN_PAGE

    with pytest.raises(json.JSONDecodeError):
        json.loads(BAN_PAGE)
    assert "error code: 1015" in BAN_PAGE
