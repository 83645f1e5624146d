"""``runpoller`` in Gateway mode, one protocol path per test, through real
processes: the fake Discord (REST and Gateway, ``python -m testkit.fakes.discord``),
``manage.py runpoller`` with ``DISCORD_MODE=gateway``, and daphne.

The tests wait on what the fake records (``FakeGateway.wait_for``, a long poll
of its log) and on the poller's output, never on the clock.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command

from discord_poller.client import DiscordClient
from discord_poller.config import USER_AGENT
from discord_poller.discord_gateway import RESUME_CLOSE_CODE, DiscordGateway
from discord_poller.discord_gateway_protocol import INTENTS, GatewayInfo
from discord_poller.models import PollerStatus
from discord_poller.publisher import Publisher
from discord_poller.runner import Poller
from gateway_client.signing import signed_headers
from jobs.models import Job
from testkit.fakes.discord import DEFAULT_TOKEN, FakeDiscord
from testkit.servers import REPO_ROOT, ManagedProcess, _poll, free_port
from tests.conftest import LiveGateway
from tests.test_runpoller import (
    CHANNEL,
    COMMAND,
    OTHER,
    FakeDiscordProcess,
    job_embed,
    poller_env,
    start_fake_discord,
)

# A beat whose ack has not come by the next beat closes the link as dead. At
# 2 s, a busy host does not make a live link look dead halfway through a test.
HEARTBEAT_MS = 2000
# The tests of the heartbeat itself beat faster, to see several in seconds.
BEAT_MS = 300
# The chaos test (test_poller_gateway_e2e.py): spurious zombies are more chaos.
FAST_HEARTBEAT_MS = 40
Record = dict[str, Any]


@dataclass
class FakeGateway:
    """The Gateway side of a fake Discord process, over its control API."""

    discord: FakeDiscordProcess

    @property
    def control(self) -> str:
        return self.discord.control + "/gateway"

    def behave(self, **behaviour: Any) -> None:
        httpx.post(f"{self.control}/behaviour", json=behaviour).raise_for_status()

    def act(self, action: str, **options: Any) -> int:
        response = httpx.post(
            f"{self.control}/actions", json={"action": action, **options}
        )
        response.raise_for_status()
        count: int = response.json()["connections"]
        return count

    def log(self, since: int = 0, wait: float = 0.0) -> tuple[list[Record], int]:
        response = httpx.get(
            f"{self.control}/log",
            params={"since": since, "wait": wait},
            timeout=wait + 10,
        )
        response.raise_for_status()
        body = response.json()
        return body["log"], body["next"]

    def mark(self) -> int:
        """The log's length now: ``wait_for(since=mark())`` sees what comes next."""
        return self.log()[1]

    def wait_for(
        self, match: Callable[[Record], bool], since: int = 0, timeout: float = 20.0
    ) -> Record:
        """The first record from ``since`` on that ``match``es, waiting for it."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            records, next_index = self.log(since, wait=min(left, 5.0))
            for record in records:
                if match(record):
                    return record
            since = next_index
        raise AssertionError(f"no matching Gateway record in {timeout} s")

    def records(self, since: int = 0) -> list[Record]:
        return self.log(since)[0]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.control}/stats").json()
        return stats

    def edit(self, message_id: str, **fields: Any) -> None:
        httpx.post(
            f"{self.discord.control}/messages/{message_id}", json=fields
        ).raise_for_status()


def received(op: int) -> Callable[[Record], bool]:
    return lambda r: r["kind"] == "recv" and r["op"] == op


def sent_event(name: str) -> Callable[[Record], bool]:
    return lambda r: r["kind"] == "send" and r["t"] == name


def nth(count: int, match: Callable[[Record], bool]) -> Callable[[Record], bool]:
    """Matches the ``count``-th record that ``match``es."""
    seen = 0

    def check(record: Record) -> bool:
        nonlocal seen
        seen += match(record)
        return seen >= count

    return check


def closed(r: Record) -> bool:
    return bool(r["kind"] == "close")


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    discord = start_fake_discord()
    try:
        gateway = FakeGateway(discord)
        gateway.behave(heartbeat_interval=HEARTBEAT_MS)
        yield gateway
    finally:
        discord.process.close()


def gateway_env(fake: FakeGateway, service_url: str, **extra: str) -> dict[str, str]:
    return poller_env(fake.discord, service_url, DISCORD_MODE="gateway", **extra)


def gateway_poller(env: dict[str, str], **kw: Any) -> ManagedProcess:
    """``runpoller`` in Gateway mode, ready once its first catch-up is done."""
    return ManagedProcess(
        COMMAND,
        env=env,
        cwd=REPO_ROOT,
        name="runpoller-gateway",
        ready=lambda p: p.wait_for_output("caught up over REST", 30),
        **kw,
    )


def message_polls(fake: FakeGateway) -> list[Record]:
    return [r for r in fake.discord.requests() if r["path"].endswith("/messages")]


# --- Settings -------------------------------------------------------------------


def test_refuses_an_unknown_mode(settings: Any) -> None:
    settings.CHANNEL_IDS = [CHANNEL]
    settings.DISCORD_TOKEN = DEFAULT_TOKEN
    settings.DISCORD_MODE = "websocket"
    with pytest.raises(CommandError, match=r"DISCORD_MODE must be rest or gateway"):
        call_command("runpoller")


def test_gateway_mode_needs_a_bot_token(settings: Any) -> None:
    settings.CHANNEL_IDS = [CHANNEL]
    settings.DISCORD_TOKEN = "mfa.a-user-token"
    settings.DISCORD_MODE = "gateway"
    with pytest.raises(CommandError, match=r"needs a bot token") as caught:
        call_command("runpoller")
    assert "a-user-token" not in str(caught.value)


# --- Events and catch-up, in-process -------------------------------------------


async def test_an_event_during_a_catch_up_hides_none_of_the_messages_before_it() -> (
    None
):
    async with (
        FakeDiscord() as fake,
        DiscordClient(DEFAULT_TOKEN, fake.base_url, user_agent=USER_AGENT) as discord,
        Publisher("http://127.0.0.1:9", "key", "secret", ttl_seconds=300) as publisher,
    ):
        poller = Poller(
            discord,
            publisher,
            [CHANNEL],
            ttl_seconds=300,
            poll_seconds=1.0,
            burst_poll_seconds=1.0,
        )
        seen = fake.post_message(CHANNEL, embeds=job_embed("seen"))
        assert poller.take_event(CHANNEL, seen) == 1
        # The session is lost; three messages come meanwhile. A new session
        # starts (READY: a catch-up is due), and its first event arrives before
        # the catch-up's page does.
        missed = [
            fake.post_message(CHANNEL, embeds=job_embed(f"m{i}")) for i in range(3)
        ]
        poller.channels[CHANNEL].catching_up = True
        live = fake.post_message(CHANNEL, embeds=job_embed("live"))
        assert poller.take_event(CHANNEL, live) == 1
        await poller.catch_up(CHANNEL, asyncio.Event())
        # Every message once: the catch-up read from "seen", not from "live".
        assert fake.requests[-1].query["after"] == seen["id"]
        assert publisher.pending(CHANNEL) == 5
        assert poller.take_event(CHANNEL, missed[0]) == 0  # a replayed event
        assert poller.stats.jobs_found == 5


# --- The protocol ---------------------------------------------------------------


@pytest.mark.backends
@pytest.mark.processes
def test_identifies_heartbeats_and_publishes_without_polling(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    fake.behave(heartbeat_interval=BEAT_MS)
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        opened = fake.wait_for(lambda r: r["kind"] == "open")
        identify = fake.wait_for(received(2))
        ready = fake.wait_for(sent_event("READY"))
        hello = fake.wait_for(lambda r: r["kind"] == "send" and r["op"] == 10)
        fake.wait_for(nth(8, received(1)))
        beats = [r for r in fake.records() if received(1)(r)][:8]
        posted = fake.discord.post(CHANNEL, embeds=job_embed("over-the-gateway"))
        poller.wait_for_output("published job over-the-gateway", 20)
        polls = message_polls(fake)
        output = poller.output()
    # The URL and the Identify Discord documents.
    assert opened["path"] == "/gateway"
    assert opened["query"] == {"v": "10", "encoding": "json"}
    assert identify["d"]["intents"] == INTENTS == (1 << 9) | (1 << 15)
    assert identify["d"]["token"] == "[token]"  # the fake checked it, without Bot
    assert identify["d"]["properties"]["browser"] == "job-gateway"
    # The first beat comes within one interval of Hello, then one per interval,
    # each carrying the last sequence number (READY's); the bounds leave a busy
    # host room.
    first = (beats[0]["monotonic"] - hello["monotonic"]) * 1000
    assert 0 <= first <= BEAT_MS * 3
    gaps = [
        (b["monotonic"] - a["monotonic"]) * 1000 for a, b in itertools.pairwise(beats)
    ]
    assert BEAT_MS * 0.7 <= statistics.median(gaps) <= BEAT_MS * 2
    assert beats[-1]["d"] == ready["s"] == 1
    # One catch-up read per channel at start, then nothing over REST.
    assert len(polls) == 1
    assert Job.objects.get(message_id=posted["id"]).job_id == "over-the-gateway"
    assert "DISCORD_TOKEN" not in output and "fake-discord-token" not in output


@pytest.mark.backends
@pytest.mark.processes
def test_a_dropped_connection_resumes_and_gets_the_missed_events(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        ready = fake.wait_for(sent_event("READY"))
        fake.discord.post(CHANNEL, embeds=job_embed("seen-live"))
        poller.wait_for_output("published job seen-live", 20)
        # Events stop reaching the poller, as on a dead link; then it drops.
        fake.behave(deliver=False)
        missed = fake.discord.post(CHANNEL, embeds=job_embed("missed-then-replayed"))
        fake.behave(deliver=True)
        mark = fake.mark()
        assert fake.act("drop") == 1
        opened = fake.wait_for(lambda r: r["kind"] == "open", since=mark)
        resume = fake.wait_for(received(6), since=mark)
        poller.wait_for_output("published job missed-then-replayed", 20)
        polls = message_polls(fake)
        stats = fake.stats()
        output = poller.output()
    # Resumed where it left off: the session of READY, at the last event it
    # got, through resume_gateway_url; the missed event came in the replay.
    assert opened["path"] == "/resume-gateway"
    assert resume["d"]["session_id"] == ready["d"]["session_id"]
    assert resume["d"]["seq"] == ready["s"] + 1  # READY, then seen-live
    assert stats["identifies"] == 1
    assert len(polls) == 1  # no catch-up needed after a resume
    assert Job.objects.filter(message_id=missed["id"]).count() == 1
    assert "resumed the Discord Gateway session" in output


@pytest.mark.backends
@pytest.mark.processes
def test_a_refused_resume_identifies_anew_and_catches_up_over_rest(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        seen = fake.discord.post(CHANNEL, embeds=job_embed("seen-before"))
        poller.wait_for_output("published job seen-before", 20)
        fake.behave(deliver=False, refuse_resumes=1)
        lost = fake.discord.post(CHANNEL, embeds=job_embed("lost-with-the-session"))
        fake.behave(deliver=True)
        mark = fake.mark()
        fake.act("drop")
        fake.wait_for(received(6), since=mark)
        refused = fake.wait_for(lambda r: r["kind"] == "send" and r["op"] == 9, mark)
        identify = fake.wait_for(received(2), since=mark)
        poller.wait_for_output("published job lost-with-the-session", 30)
        polls = message_polls(fake)
        stats = fake.stats()
    assert refused["d"] is False
    # Discord's wait after op 9 d=false (1-5 s), and one Identify per 5 s.
    assert identify["monotonic"] - refused["monotonic"] >= 1.0
    assert stats["identifies"] == 2
    assert stats["violations"] == 0
    # The catch-up read from the last message the poller had seen.
    assert polls[-1]["query"]["after"] == seen["id"]
    assert Job.objects.filter(message_id=lost["id"]).count() == 1


@pytest.mark.backends
@pytest.mark.processes
@pytest.mark.parametrize(
    ("action", "options"),
    [("reconnect", {}), ("invalid_session", {"resumable": True})],
)
def test_reconnect_and_a_resumable_invalid_session_resume(
    live_gateway: LiveGateway, fake: FakeGateway, action: str, options: Any
) -> None:
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        ready = fake.wait_for(sent_event("READY"))
        mark = fake.mark()
        fake.act(action, **options)
        close = fake.wait_for(closed, since=mark)
        resume = fake.wait_for(received(6), since=mark)
        fake.wait_for(sent_event("RESUMED"), since=mark)
        fake.discord.post(CHANNEL, embeds=job_embed(f"after-{action}"))
        poller.wait_for_output(f"published job after-{action}", 20)
        stats = fake.stats()
    # Closed by the poller with a code that keeps the session, then resumed.
    assert close["by"] == "client"
    assert close["code"] == RESUME_CLOSE_CODE
    assert resume["d"]["session_id"] == ready["d"]["session_id"]
    assert stats["identifies"] == 1


@pytest.mark.backends
@pytest.mark.processes
def test_a_missing_heartbeat_ack_closes_the_zombie_and_resumes(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    fake.behave(heartbeat_interval=BEAT_MS)
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        fake.wait_for(sent_event("READY"))
        mark = fake.mark()
        fake.act("stop_acks")
        close = fake.wait_for(closed, since=mark)
        resume = fake.wait_for(received(6), since=mark)
        fake.discord.post(CHANNEL, embeds=job_embed("after-the-zombie"))
        poller.wait_for_output("published job after-the-zombie", 20)
        after = fake.records(mark)
        output = poller.output()
    assert close["by"] == "client"
    assert close["code"] not in (1000, 1001)
    assert resume["monotonic"] > close["monotonic"]
    # One unanswered beat, then the close: not a second beat into the void.
    before_close = [r for r in after if r["monotonic"] < close["monotonic"]]
    last_ack = max(
        (
            i
            for i, r in enumerate(before_close)
            if r["kind"] == "send" and r["op"] == 11
        ),
        default=-1,
    )
    unanswered = [r for r in before_close[last_ack + 1 :] if received(1)(r)]
    assert len(unanswered) == 1
    assert "zombie connection" in output


@pytest.mark.backends
@pytest.mark.processes
@pytest.mark.parametrize(("code", "next_op"), [(4000, 6), (1001, 6), (4009, 2)])
def test_other_close_codes_reconnect(
    live_gateway: LiveGateway, fake: FakeGateway, code: int, next_op: int
) -> None:
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        fake.wait_for(sent_event("READY"))
        mark = fake.mark()
        fake.act("close", code=code)
        close = fake.wait_for(closed, since=mark)
        after = fake.wait_for(
            lambda r: r["kind"] == "recv" and r["op"] in (2, 6), since=mark
        )
        fake.discord.post(CHANNEL, embeds=job_embed(f"after-{code}"))
        poller.wait_for_output(f"published job after-{code}", 30)
    assert (close["by"], close["code"]) == ("server", code)
    # 4009 (session timed out) ends the session: Identify; others: Resume.
    assert after["op"] == next_op


@pytest.mark.backends
@pytest.mark.processes
@pytest.mark.parametrize(
    ("code", "says"),
    [
        (4004, "Authentication failed"),
        (4010, "Invalid shard"),
        (4011, "Sharding required"),
        (4012, "Invalid API version"),
        (4013, "Invalid intent(s)"),
        (4014, "enable the Message Content Intent"),
    ],
)
def test_close_codes_that_must_not_be_retried_exit_with_a_message(
    transactional_db: None, fake: FakeGateway, code: int, says: str
) -> None:
    fake.behave(close_on_identify=code)
    result = subprocess.run(
        COMMAND,
        env=gateway_env(fake, "http://127.0.0.1:9"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"CommandError: Discord closed the Gateway with {code}" in output
    assert says in output
    assert "Not retrying." in output
    assert fake.stats()["connections"] == 1  # no second try
    assert "fake-discord-token" not in output
    report = PollerStatus.objects.get().report
    assert report["state"] == "failed"
    assert report["discord"]["gateway"]["last_close_code"] == code


@pytest.mark.backends
@pytest.mark.processes
def test_identify_waits_when_the_session_start_limit_is_used_up(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    fake.behave(
        session_start_limit={
            "total": 1000,
            "remaining": 0,
            "reset_after": 1500,
            "max_concurrency": 1,
        }
    )
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        identify = fake.wait_for(received(2))
        asked = next(
            r for r in fake.discord.requests() if r["path"].endswith("/gateway/bot")
        )
        output = poller.output()
    assert identify["monotonic"] - asked["monotonic"] >= 1.5
    assert "Discord allows no more sessions today" in output
    assert fake.stats()["violations"] == 0


@pytest.mark.backends
@pytest.mark.processes
def test_only_its_channels_and_embeds_that_arrive_late(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        elsewhere = fake.discord.post(OTHER, embeds=job_embed("another-channel"))
        plain = fake.discord.post(CHANNEL, content="a server, embed to follow")
        fake.edit(plain["id"], embeds=job_embed("late-embed"))
        poller.wait_for_output("published job late-embed", 20)
        # A second edit of a message whose job was taken publishes nothing.
        fake.edit(plain["id"], embeds=job_embed("late-embed"), content="edited")
        fake.discord.post(CHANNEL, embeds=job_embed("marker"))
        poller.wait_for_output("published job marker", 20)
        output = poller.output()
    assert not Job.objects.filter(message_id=elsewhere["id"]).exists()
    assert Job.objects.get(message_id=plain["id"]).job_id == "late-embed"
    assert output.count("published job late-embed") == 1
    assert "was published before" not in output


@pytest.mark.backends
@pytest.mark.processes
def test_health_shows_the_mode_and_a_stop_ends_the_session(
    live_gateway: LiveGateway, fake: FakeGateway
) -> None:
    with gateway_poller(gateway_env(fake, live_gateway.base_url)) as poller:
        fake.discord.post(CHANNEL, embeds=job_embed("before-health"))
        poller.wait_for_output("published job before-health", 20)
        health = _wait_for_health(live_gateway)
        mark = fake.mark()
        code = poller.stop(timeout=5)
        close = fake.wait_for(closed, since=mark)
    assert code == 0
    assert health["mode"] == "gateway"
    assert health["discord"]["gateway"]["state"] == "connected"
    assert health["discord"]["gateway"]["identifies"] == 1
    assert health["discord"]["gateway"]["heartbeat_interval_ms"] == HEARTBEAT_MS
    # A clean stop closes with 1000: Discord ends the session at once.
    assert (close["by"], close["code"]) == ("client", 1000)
    assert PollerStatus.objects.get().report["state"] == "stopped"


def _wait_for_health(gateway: LiveGateway) -> dict[str, Any]:
    """The poller section of ``/health`` once it reports a published job."""
    shown: dict[str, Any] = {}

    def check() -> str | None:
        poller = httpx.get(
            gateway.base_url + "/health",
            headers=signed_headers(gateway.api_key, gateway.hmac_secret),
        ).json()["poller"]
        if poller is None or poller["jobs"]["published"] < 1:
            return "no published job reported yet"
        shown.update(poller)
        return None

    _poll(check, 20, "the poller's report", None)
    return shown


async def test_a_gateway_that_cannot_be_reached_is_named_by_its_url() -> None:
    closed_port = free_port()  # nothing listens there

    async def fetch_info() -> GatewayInfo:
        return GatewayInfo.parse({"url": f"ws://127.0.0.1:{closed_port}"})

    gateway = DiscordGateway(
        "Bot not-a-real-token",
        fetch_info=fetch_info,
        on_dispatch=lambda name, data: None,
        on_session=lambda: None,
    )
    stop = asyncio.Event()
    stopper = asyncio.get_running_loop().call_later(30, stop.set)
    try:
        # One attempt: it fails, is noted, and the loop would reconnect.
        await gateway._connect_once(stop)
    finally:
        stopper.cancel()
    error = gateway.stats.last_error or ""
    assert error.startswith(
        f"could not connect to ws://127.0.0.1:{closed_port}/?v=10&encoding=json: "
    )
    assert "not-a-real-token" not in error
