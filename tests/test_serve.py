"""``manage.py serve``: several daphne processes on one port, through real processes.

The launcher opens the socket once and keeps ``--processes`` daphne children
on it; Redis (a throwaway server) is what they share.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway_client.signing import signed_headers
from jobs.management.commands.serve import _next_delay
from testkit.servers import (
    LOOPBACK,
    REPO_ROOT,
    ManagedProcess,
    free_port,
    wait_for_http,
)
from tests.conftest import process_env
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("transactional_db")]

CLIENTS = 24
MAX_CLIENTS = 400
DEADLINE = 30.0


class Launcher(ManagedProcess):
    """``manage.py serve`` on a free loopback port, ready once ``/healthz`` answers."""

    def __init__(self, processes: int, env: dict[str, str]) -> None:
        self.port = free_port()
        argv = [
            sys.executable, "manage.py", "serve",
            "--processes", str(processes),
            "--bind", LOOPBACK, "--port", str(self.port),
            "--", "-v", "1",
        ]  # fmt: skip
        super().__init__(
            argv,
            env=env,
            cwd=REPO_ROOT,
            name="serve",
        )

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self) -> None:
        wait_for_http(self.base_url + "/healthz", DEADLINE, process=self)

    def children(self) -> list[int]:
        """The daphne processes the launcher runs now."""
        assert self.pid is not None
        text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        return sorted(int(pid) for pid in text.split())


@pytest.fixture
def launcher(clean_redis: str) -> Iterator[Launcher]:
    with Launcher(2, process_env(REDIS_URL=clean_redis)) as running:
        until(lambda: len(running.children()) == 2)
        # Both serving, not only started: each has taken the socket.
        until(lambda: running.output().count("Listening on TCP address") >= 2)
        yield running


def until(check: object, deadline: float = DEADLINE) -> None:
    """Wait for ``check()`` to hold, polling, up to a generous deadline."""
    assert callable(check)
    give_up = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < give_up, "gave up waiting"
        time.sleep(0.05)


def connections_of(pid: int, port: int) -> int:
    """Established TCP connections process ``pid`` holds on local ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            established = fields[3] == "01"
            if local_port == port and established and fields[9] in inodes:
                count += 1
    return count


def signed() -> dict[str, str]:
    return signed_headers(API_KEY, HMAC_SECRET)


async def ws_client(base_url: str) -> ClientConnection:
    client = await connect(
        base_url.replace("http", "ws", 1) + "/ws",
        additional_headers={"X-API-KEY": API_KEY},
        proxy=None,
        open_timeout=DEADLINE,
    )
    assert json.loads(await client.recv())["type"] == "hello"
    return client


def test_the_delay_before_a_restart_grows_only_for_children_that_die_young() -> None:
    assert _next_delay(0.0, lived=60) == 0
    assert _next_delay(0.0, lived=1) == 0.5
    assert _next_delay(0.5, lived=1) == 1.0
    assert _next_delay(16.0, lived=1) == 30.0
    assert _next_delay(30.0, lived=60) == 0


async def test_clients_on_every_process_get_every_job_and_totals_add_up(
    launcher: Launcher,
) -> None:
    async with (
        AsyncExitStack() as stack,
        httpx.AsyncClient(base_url=launcher.base_url, timeout=DEADLINE) as http,
    ):
        # Whichever process accepts first takes a connection: connect until
        # both hold clients (a busy one may take none of the first few).
        clients: list[ClientConnection] = []
        per_child: dict[int, int] = {}
        while len(clients) < CLIENTS or not all(per_child.values()):
            assert len(clients) < MAX_CLIENTS, f"a process got no client: {per_child}"
            client = await ws_client(launcher.base_url)
            stack.push_async_callback(client.close)
            clients.append(client)
            per_child = {
                pid: connections_of(pid, launcher.port) for pid in launcher.children()
            }
        assert sum(per_child.values()) == len(clients)

        posted = []
        for number in range(5):
            response = await http.post(
                "/job", json={"job_id": f"every-{number}"}, headers=signed()
            )
            assert response.status_code == 201, response.text
            posted.append(response.json()["job"]["id"])
        for client in clients:
            received: list[int] = []
            while len(received) < len(posted):
                frame = json.loads(await asyncio.wait_for(client.recv(), DEADLINE))
                if frame["type"] == "job":
                    received.append(frame["job"]["id"])
            assert received == posted

        async def totals() -> tuple[int, str]:
            health = (await http.get("/health", headers=signed())).json()
            metrics = (await http.get("/metrics", headers=signed())).text
            return health["websocket_clients"]["total"], metrics

        give_up = time.monotonic() + DEADLINE
        while True:
            total, metrics = await totals()
            connected = len(clients)
            if (
                total == connected
                and f"gateway_websocket_clients {connected}.0" in metrics
            ):
                break
            assert time.monotonic() < give_up, (total, metrics)
            await asyncio.sleep(0.1)
        # Published by one process or the other, counted once in the sum.
        assert "gateway_jobs_published_total 5.0" in metrics


async def test_pulls_across_processes_take_each_job_once(launcher: Launcher) -> None:
    jobs = 120
    async with httpx.AsyncClient(base_url=launcher.base_url, timeout=DEADLINE) as http:
        for number in range(jobs):
            response = await http.post(
                "/job", json={"job_id": f"pull-{number}"}, headers=signed()
            )
            assert response.status_code == 201

        async def worker() -> list[str]:
            # A connection of its own, so that pulls spread over both processes.
            async with httpx.AsyncClient(
                base_url=launcher.base_url, timeout=DEADLINE
            ) as own:
                taken = []
                while (
                    response := await own.get("/job/next", headers=signed())
                ).status_code == 200:
                    taken.append(response.json()["job"]["job_id"])
                assert response.status_code == 204
                return taken

        taken = [
            job
            for pulls in await asyncio.gather(*(worker() for _ in range(12)))
            for job in pulls
        ]
    counts = Counter(taken)
    assert len(counts) == jobs
    assert set(counts.values()) == {1}


def test_a_killed_process_is_replaced_and_sigterm_stops_them_all(
    launcher: Launcher,
) -> None:
    first, second = launcher.children()
    os.kill(first, signal.SIGKILL)
    until(lambda: len(launcher.children()) == 2 and first not in launcher.children())
    replacement = next(pid for pid in launcher.children() if pid != second)
    until(lambda: "Listening on TCP address" in launcher.output())
    with httpx.Client(base_url=launcher.base_url, timeout=DEADLINE) as http:
        # Many connections, so that the replacement answers some of them.
        for _ in range(20):
            assert http.get("/health", headers=signed()).status_code == 200
    assert f"daphne process {first} exited with SIGKILL" in launcher.output()

    assert launcher.pid is not None
    os.kill(launcher.pid, signal.SIGTERM)
    until(lambda: not launcher.running)
    assert launcher.returncode == 0
    for pid in (second, replacement):
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert "Every daphne process has stopped." in launcher.output()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def run_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "serve", "--bind", LOOPBACK, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )


def test_several_processes_without_redis_are_refused_in_one_line() -> None:
    done = run_serve("--processes", "2", env=process_env(REDIS_URL=""))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "CommandError: 2 processes need REDIS_URL: without Redis the queue, channel "
        "layer and counters are each process's own. Set REDIS_URL, or "
        "WEB_CONCURRENCY=1."
    ]


def test_a_port_in_use_is_one_line_naming_it() -> None:
    with socket.create_server((LOOPBACK, 0)) as taken:
        port = taken.getsockname()[1]
        done = run_serve("--port", str(port), env=process_env(REDIS_URL=""))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{LOOPBACK}:{port}" in lines[0]
    assert "PORT=" in lines[0]
