"""``python -m gateway_client`` as a real process against a real gateway.

It drains a thousand jobs through a gateway restart, follows the push stream,
stops cleanly on SIGTERM and SIGINT, and stops loudly on refused credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from gateway_client import GatewayClient
from jobs.models import Job
from jobs.queues import get_queue
from testkit.servers import REPO_ROOT
from tests.conftest import LiveGateway
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]


class WorkerProcess:
    """A running worker: its stdout read as jobs, its stderr kept for asserts."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.printed: list[dict[str, Any]] = []
        self.stderr = ""
        self.stderr_reader = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        # Drained as it comes, so a chatty worker never blocks on a full pipe.
        async for line in self.process.stderr:
            self.stderr += line.decode()

    async def jobs(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Read stdout until ``count`` more jobs were printed; return them."""
        assert self.process.stdout is not None
        start = len(self.printed)
        try:
            async with asyncio.timeout(timeout):
                while len(self.printed) < start + count:
                    line = await self.process.stdout.readline()
                    if not line:
                        break
                    self.printed.append(json.loads(line))
        except TimeoutError:
            pass
        received = self.printed[start:]
        if len(received) < count:
            raise AssertionError(
                f"{len(received)} of {count} jobs printed; stderr:\n{self.stderr}"
            )
        return received

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``signum``; return the exit code."""
        self.process.send_signal(signum)
        return await self.exit_code(timeout)

    async def exit_code(self, timeout: float = 10) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self.stderr_reader
        return code

    async def rest(self) -> tuple[str, str]:
        """What is left on stdout, and all of stderr, once the worker has exited."""
        assert self.process.stdout is not None
        await self.exit_code()
        return (await self.process.stdout.read()).decode(), self.stderr


@asynccontextmanager
async def worker(
    gateway: LiveGateway | None, *args: str, **env: str
) -> AsyncIterator[WorkerProcess]:
    """``python -m gateway_client ARGS`` with only the environment it is given."""
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "BASE_URL": gateway.base_url if gateway else "http://127.0.0.1:9",
        "API_KEY": gateway.api_key if gateway else API_KEY,
        "HMAC_SECRET": gateway.hmac_secret if gateway else HMAC_SECRET,
        # Quick retries: the gateway restarts in about a second.
        "INITIAL_BACKOFF": "0.05",
        "MAX_BACKOFF": "0.5",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_client",
        *args,
        cwd=REPO_ROOT,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = WorkerProcess(process)
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        running.stderr_reader.cancel()


def client_for(gateway: LiveGateway) -> GatewayClient:
    return GatewayClient(
        gateway.base_url,
        api_key=gateway.api_key,
        hmac_secret=gateway.hmac_secret,
        timeout=30,
    )


async def wait_for_long_polls(client: GatewayClient, count: int) -> None:
    """Until the gateway holds ``count`` long-polls (at most 15 s)."""
    # Another process's state: only its /health can tell, so it is polled.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        health = await client.health()
        if health["queue"]["long_polls_waiting"] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} long-polls waiting")


def names(prefix: str, count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{prefix}-{run}-{n:04d}" for n in range(count)]


def _store_jobs(job_ids: list[str]) -> None:
    # Stored and queued as jobs.services does, minus broadcast and wake-up:
    # far faster than as many POSTs on a busy machine.
    now = timezone.now()
    jobs = Job.objects.bulk_create(
        Job(job_id=job_id, created_at=now, expires_at=now + timedelta(minutes=10))
        for job_id in job_ids
    )
    queue = get_queue()
    for job in jobs:
        queue.enqueue(job)


store_jobs = sync_to_async(_store_jobs)


async def test_drains_a_thousand_jobs_through_a_restart(
    live_gateway: LiveGateway,
) -> None:
    before, after = names("before", 600), names("after", 400)
    async with client_for(live_gateway) as client:
        await store_jobs(before)
        async with worker(live_gateway, CONCURRENCY="16") as running:
            await running.jobs(len(before))
            # The queue is empty and all 16 loops hold a long-poll: the restart
            # cuts every one. Restarting while jobs are being claimed could
            # lose one, as the gateway cancels a request whose claim has
            # committed: its at-most-once hand-out, not the worker's doing.
            await wait_for_long_polls(client, 16)
            await asyncio.to_thread(live_gateway.process.restart)
            await store_jobs(after[:-1])
            # A publish wakes the long-polls, which then drain the rest.
            await client.publish({"job_id": after[-1]})
            await running.jobs(len(after))
            assert await running.stop(signal.SIGTERM) == 0
            stdout, stderr = await running.rest()

    counts = Counter(job["job_id"] for job in running.printed)
    assert set(counts) == set(before + after)
    assert max(counts.values()) == 1
    assert stdout == ""
    assert "Traceback" not in stderr
    assert "retrying in" in stderr  # it did see the gateway go away


async def test_follows_the_stream_with_channels_and_since(
    live_gateway: LiveGateway,
) -> None:
    async with client_for(live_gateway) as client:
        marker = await client.publish({"job_id": names("marker", 1)[0]})
        a1, b1 = names("a", 1)[0], names("b", 1)[0]
        await client.publish({"job_id": a1, "channel": "A"})
        await client.publish({"job_id": b1, "channel": "B"})
        since = str(marker.job["id"])
        async with worker(
            live_gateway, "--ws", "--channels", "A,C", "--since", since
        ) as running:
            replayed = await running.jobs(1)
            a2 = names("a", 1)[0]
            await client.publish({"job_id": names("b", 1)[0], "channel": "B"})
            await client.publish({"job_id": a2, "channel": "A"})
            live = await running.jobs(1)
            assert await running.stop(signal.SIGTERM) == 0
            stdout, stderr = await running.rest()
    # Channel B was published before and during, and never printed.
    assert [job["job_id"] for job in replayed + live] == [a1, a2]
    assert stdout == "" and "Traceback" not in stderr


def server(job_id: str, money: str, players: str) -> dict[str, Any]:
    fields = {"Money per sec": money, "Players": players}
    return {"job_id": job_id, "title": "Brainrot Notify", "fields": fields}


async def test_pulls_only_the_jobs_its_filter_matches(
    live_gateway: LiveGateway,
) -> None:
    poor, full, rich = names("filtered", 3)
    async with client_for(live_gateway) as client:
        await client.publish(server(poor, "$2M/s", "3/8"))
        await client.publish(server(full, "$12M/s", "8/8"))
        await client.publish(server(rich, "$12M/s", "3/8"))
        # The environment's WHERE is replaced by the --where options.
        async with worker(
            live_gateway,
            "--where",
            "money_per_sec>=10M",
            "--where",
            "players<players_max",
            WHERE="money_per_sec<1",
        ) as running:
            printed = await running.jobs(1)
            assert await running.stop(signal.SIGTERM) == 0
            stdout, stderr = await running.rest()
        left = [await client.next_job(), await client.next_job()]
    assert [job["job_id"] for job in printed] == [rich]
    assert printed[0]["numbers"]["money_per_sec"] == 12_000_000
    # The others were never claimed: still queued, in order.
    assert [job["job_id"] for job in left if job] == [poor, full]
    assert stdout == "" and "Traceback" not in stderr


@pytest.mark.parametrize("mode", ["pull", "--ws"])
async def test_a_refused_filter_exits_naming_the_bad_part(
    live_gateway: LiveGateway, mode: str
) -> None:
    args = [mode] if mode != "pull" else []
    async with worker(live_gateway, *args, TIER="platinum") as running:
        assert await running.exit_code(timeout=15) == 1
        stdout, stderr = await running.rest()
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "bad_filter" in errors[0]
    assert "TIER" in errors[0]
    # Over HTTP the gateway's own detail names the tier; /ws says only 403.
    assert "platinum" in errors[0]
    assert live_gateway.hmac_secret not in stderr and live_gateway.api_key not in stderr
    assert stdout == "" and "Traceback" not in stderr


async def test_ctrl_c_stops_at_once_with_long_polls_in_flight(
    live_gateway: LiveGateway,
) -> None:
    async with (
        client_for(live_gateway) as client,
        worker(live_gateway, CONCURRENCY="4") as running,
    ):
        await wait_for_long_polls(client, 4)
        # Well inside the 25 s long-poll: the polls were cancelled.
        assert await running.stop(signal.SIGINT, timeout=5) == 0
        _, stderr = await running.rest()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


@pytest.mark.parametrize(
    ("mode", "setting", "value", "code"),
    [
        ("pull", "HMAC_SECRET", "not-the-secret-xyz", "bad_signature"),
        ("pull", "API_KEY", "not-the-key-xyz", "bad_api_key"),
        # /ws checks only the key unless WS_REQUIRE_SIGNATURE is on.
        ("--ws", "API_KEY", "not-the-key-xyz", "bad_api_key"),
    ],
)
async def test_refused_credentials_exit_non_zero(
    live_gateway: LiveGateway, mode: str, setting: str, value: str, code: str
) -> None:
    args = [mode] if mode != "pull" else []
    async with worker(live_gateway, *args, **{setting: value}) as running:
        assert await running.exit_code(timeout=15) == 1
        stdout, stderr = await running.rest()
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert code in errors[0] and "check API_KEY and HMAC_SECRET" in errors[0]
    assert value not in stderr and live_gateway.hmac_secret not in stderr
    assert stdout == "" and "Traceback" not in stderr


async def test_a_missing_setting_is_one_line() -> None:
    async with worker(None, HMAC_SECRET="") as running:
        assert await running.exit_code() == 2
        stdout, stderr = await running.rest()
    assert stdout == ""
    assert stderr == (
        "gateway_client: HMAC_SECRET is required (the gateway's HMAC_SECRET)\n"
    )
