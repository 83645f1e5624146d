"""``manage.py runpoller`` as a command and as a process: start-up checks,
``--once``, a rejected token, and stopping on SIGTERM or SIGINT.

The process tests run the fake Discord as a process of its own
(``python -m testkit.fakes.discord``) and the gateway as daphne (``live_gateway``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command

from discord_poller.models import PollerStatus
from gateway_client.signing import signed_headers
from jobs.models import Job
from testkit.fakes.discord import DEFAULT_TOKEN
from testkit.servers import REPO_ROOT, ManagedProcess, free_port
from tests.conftest import LiveGateway, process_env

CHANNEL = "1390012345678901234"
OTHER = "1390012345678901235"
COMMAND = [sys.executable, "manage.py", "runpoller"]


# --- Helpers shared with test_runpoller_e2e.py -----------------------------------


@dataclass
class FakeDiscordProcess:
    """The fake Discord running as a process, steered over its control API."""

    process: ManagedProcess
    api_base: str

    @property
    def control(self) -> str:
        return self.api_base.removesuffix("/api/v10") + "/_control"

    def post(self, channel_id: str, **message: Any) -> dict[str, Any]:
        # Escaped JSON, as Discord sends it: text may hold a lone surrogate
        # half, which httpx's json= (raw UTF-8) cannot encode.
        response = httpx.post(
            f"{self.control}/messages",
            content=json.dumps({"channel_id": channel_id, **message}),
            headers={"Content-Type": "application/json"},
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def behave(self, **behaviour: Any) -> None:
        httpx.post(f"{self.control}/behaviour", json=behaviour).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = httpx.get(f"{self.control}/requests").json()[
            "requests"
        ]
        return log


def start_fake_discord(mode: str = "lenient") -> FakeDiscordProcess:
    """Start ``python -m testkit.fakes.discord``; the caller closes its process."""
    process = ManagedProcess(
        [sys.executable, "-m", "testkit.fakes.discord", "--port", "0", "--mode", mode],
        cwd=REPO_ROOT,
        name="fake-discord",
        ready=lambda p: p.wait_for_output("READY", 20),
    )
    process.start()
    found = re.search(r"READY (\S+)", process.output())
    assert found is not None
    return FakeDiscordProcess(process, found[1])


def poller_env(
    fake: FakeDiscordProcess, gateway_url: str, channels: str = CHANNEL, **extra: str
) -> dict[str, str]:
    return process_env(
        CHANNEL_ID=channels,
        DISCORD_TOKEN=DEFAULT_TOKEN,
        DISCORD_API_BASE=fake.api_base,
        SERVICE_BASE_URL=gateway_url,
        **extra,
    )


def poller_process(env: dict[str, str], **kw: Any) -> ManagedProcess:
    """``manage.py runpoller``, ready once it has said what it polls."""
    return ManagedProcess(
        COMMAND,
        env=env,
        cwd=REPO_ROOT,
        name="runpoller",
        ready=lambda p: p.wait_for_output("polling channel", 30),
        **kw,
    )


def job_embed(job_id: str) -> list[dict[str, Any]]:
    return [{"title": "Server", "fields": [{"name": "Job ID", "value": job_id}]}]


@pytest.fixture
def fake_discord() -> Iterator[FakeDiscordProcess]:
    fake = start_fake_discord()
    try:
        yield fake
    finally:
        fake.process.close()


# --- Start-up checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        ("API_KEYS", "API_KEY"),
        ("HMAC_SECRETS", "HMAC_SECRET"),
        ("CHANNEL_IDS", "CHANNEL_ID"),
        ("DISCORD_TOKEN", "DISCORD_TOKEN"),
    ],
)
def test_refuses_to_start_naming_the_missing_setting(
    settings: Any, setting: str, name: str
) -> None:
    settings.CHANNEL_IDS = [CHANNEL]
    settings.DISCORD_TOKEN = DEFAULT_TOKEN
    setattr(settings, setting, None if setting == "DISCORD_TOKEN" else [])
    with pytest.raises(CommandError, match=rf"^Refusing to start: {name} not set\.$"):
        call_command("runpoller")


def test_refuses_a_channel_id_that_is_not_a_snowflake(settings: Any) -> None:
    settings.CHANNEL_IDS = [CHANNEL, "general"]
    settings.DISCORD_TOKEN = DEFAULT_TOKEN
    with pytest.raises(CommandError, match=r"CHANNEL_ID .* not 'general'"):
        call_command("runpoller")


@pytest.mark.parametrize(
    "url",
    [
        "example.com",
        "https://bots.example/a, b",
        "https://bots.example/(x)",
        "https://bots.example/café",
    ],
)
def test_refuses_a_bot_url_that_would_garble_its_user_agent(
    settings: Any, url: str
) -> None:
    settings.CHANNEL_IDS = [CHANNEL]
    settings.DISCORD_TOKEN = DEFAULT_TOKEN
    settings.DISCORD_BOT_URL = url
    with pytest.raises(
        CommandError, match=r"^DISCORD_BOT_URL must be an http\(s\) URL"
    ):
        call_command("runpoller")


def test_the_refusal_is_one_line_and_a_failure() -> None:
    result = subprocess.run(
        COMMAND, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "CommandError: Refusing to start: CHANNEL_ID, DISCORD_TOKEN not set."
    ]


# --- As a process -------------------------------------------------------------------


@pytest.mark.backends
@pytest.mark.processes
def test_once_publishes_one_cycle_and_reports_it(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess
) -> None:
    posted = [
        fake_discord.post(CHANNEL, embeds=job_embed(f"once-{i}")) for i in range(2)
    ]
    fake_discord.post(CHANNEL, content="nothing to join here")
    env = poller_env(
        fake_discord, live_gateway.base_url, DISCORD_BOT_URL="https://bots.example/jobs"
    )
    result = subprocess.run(
        [*COMMAND, "--once"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Discord sees the bot's page and version in every request's User-Agent.
    agents = {request["headers"]["User-Agent"] for request in fake_discord.requests()}
    assert agents == {"DiscordBot (https://bots.example/jobs, 1.0.0)"}
    stored = Job.objects.filter(source="discord").order_by("id")
    assert [job.message_id for job in stored] == [m["id"] for m in posted]
    assert [job.channel for job in stored] == [CHANNEL, CHANNEL]
    assert result.stderr.count("published job once-") == 2
    report = PollerStatus.objects.get().report
    assert report["state"] == "stopped"
    assert report["jobs"]["published"] == 2
    assert report["jobs"]["skipped_no_job_id"] == 1
    # The gateway's /health shows the same report.
    health = httpx.get(
        live_gateway.base_url + "/health",
        headers=signed_headers(live_gateway.api_key, live_gateway.hmac_secret),
    ).json()
    assert health["poller"]["jobs"]["published"] == 2
    assert health["poller"]["report_age_seconds"] >= 0


@pytest.mark.backends
@pytest.mark.processes
def test_a_bare_host_and_port_is_the_gateway_over_plain_http(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess
) -> None:
    # What render.yaml hands the poller: the web service's <host>:<port>.
    hostport = live_gateway.base_url.removeprefix("http://")
    posted = fake_discord.post(CHANNEL, embeds=job_embed("over-the-private-network"))
    result = run_once(poller_env(fake_discord, hostport))
    assert result.returncode == 0, result.stderr
    assert f"publishing to http://{hostport}" in result.stderr
    (job,) = Job.objects.filter(source="discord")
    assert (job.job_id, job.message_id) == ("over-the-private-network", posted["id"])


@pytest.mark.backends
@pytest.mark.processes
def test_a_rejected_token_exits_nonzero_without_showing_it(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess
) -> None:
    secret = "MTM5MDAxMjM0NTY3ODkw.Gabcde.not-the-right-token"
    env = poller_env(fake_discord, live_gateway.base_url, f"{CHANNEL},{OTHER}")
    env["DISCORD_TOKEN"] = f"Bot {secret}"
    result = subprocess.run(
        COMMAND,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Discord rejected DISCORD_TOKEN (401 Unauthorized)" in output
    assert "not-the-right-token" not in output
    assert "MTM5MDAx" not in output
    assert len(fake_discord.requests()) <= 2  # one per channel, then nothing
    assert PollerStatus.objects.get().report["state"] == "failed"


@pytest.mark.backends
@pytest.mark.processes
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_it_at_once_even_mid_backoff(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess, signum: int
) -> None:
    # One channel the bot may not read: a 60 s back-off is under way.
    fake_discord.behave(faults=[{"kind": "forbidden", "channel_id": OTHER}])
    env = poller_env(fake_discord, live_gateway.base_url, f"{CHANNEL},{OTHER}")
    with poller_process(env, stop_signal=signum) as poller:
        poller.wait_for_output(f"channel {OTHER}: 403", 20)
        fake_discord.post(CHANNEL, embeds=job_embed("before-the-signal"))
        poller.wait_for_output("published job before-the-signal", 20)
        started = time.monotonic()
        code = poller.stop(timeout=5)
        elapsed = time.monotonic() - started
        output = poller.output()
    assert code == 0, output
    assert elapsed < 4  # not the 60 s back-off, nor stop()'s SIGKILL at 5 s
    assert "the poller has stopped" in output
    assert PollerStatus.objects.get().report["state"] == "stopped"


# --- --once: every channel read, or a failure ---------------------------------------


def run_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "--once"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.backends
@pytest.mark.processes
def test_once_fails_naming_the_url_when_discord_is_unreachable(
    transactional_db: None,
) -> None:
    api_base = f"http://127.0.0.1:{free_port()}/api/v10"  # nothing listens
    env = process_env(
        CHANNEL_ID=CHANNEL,
        DISCORD_TOKEN=DEFAULT_TOKEN,
        DISCORD_API_BASE=api_base,
        SERVICE_BASE_URL="http://127.0.0.1:1",
    )
    result = run_once(env)
    assert result.returncode == 1, result.stderr
    url = f"{api_base}/channels/{CHANNEL}/messages"
    # The log line and the exit line both say which address was tried.
    assert f"could not reach GET {url}: ConnectError" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"CommandError: channel {CHANNEL} could not be read (")
    assert url in last
    assert "trying again" not in result.stderr  # --once tries each channel once
    assert f"channel {CHANNEL}: DiscordUnavailable: could not reach" in result.stderr
    assert "Not read this run." in result.stderr
    assert DEFAULT_TOKEN not in result.stderr
    assert PollerStatus.objects.get().report["state"] == "failed"


@pytest.mark.backends
@pytest.mark.processes
def test_once_fails_when_one_channel_of_two_cannot_be_read(
    transactional_db: None, fake_discord: FakeDiscordProcess
) -> None:
    fake_discord.behave(faults=[{"kind": "forbidden", "channel_id": OTHER}])
    env = poller_env(fake_discord, "http://127.0.0.1:1", f"{CHANNEL},{OTHER}")
    result = run_once(env)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"CommandError: channel {OTHER} could not be read (")
    assert "403" in last
    assert f"channel {CHANNEL} could not" not in last  # that one was read
    # The log says what to check, and that this run is over for the channel.
    assert "Does the bot have View Channel and Read Message History there? " in (
        result.stderr
    )
    assert "Trying it again" not in result.stderr
    report = PollerStatus.objects.get().report
    assert report["state"] == "failed"
    assert report["discord"]["channels"][CHANNEL]["failures"] == 0
    assert report["discord"]["channels"][OTHER]["failures"] == 1
