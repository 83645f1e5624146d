"""The ``/ws`` consumer (contract section 3), driven through the real application.

Jobs are pushed through ``jobs.services.publish``, the one write path, so each
test covers store, broadcast and consumer together. The consumer reads the
database from worker threads, hence ``transactional_db``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import channels.consumer
import channels.generic.websocket
import httpx
import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.utils import timezone

from gateway_client import signing
from gateway_project.asgi import application
from gateway_project.server import daphne_patches
from jobs import consumers, fanout, filters, presence, services
from jobs.models import Job
from jobs.payloads import JobDraft
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("transactional_db")]

Headers = list[tuple[bytes, bytes]]
KEY_HEADER: Headers = [(b"x-api-key", API_KEY.encode())]


@pytest.fixture(autouse=True)
async def fresh_layer() -> AsyncIterator[None]:
    """Each test starts and ends with an empty channel layer on its own loop."""
    yield
    await get_channel_layer().flush()


@asynccontextmanager
async def ws(
    query: str = "", headers: Headers = KEY_HEADER
) -> AsyncIterator[WebsocketCommunicator]:
    """A connected client whose hello has been checked; disconnected on exit."""
    communicator = WebsocketCommunicator(application, f"/ws{query}", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    try:
        hello = await communicator.receive_json_from()
        assert hello["type"] == "hello"
        yield communicator
    finally:
        await communicator.disconnect()


async def handshake(query: str = "", headers: Headers = KEY_HEADER) -> bool:
    """Whether the handshake is accepted; a refusal is an HTTP 403 under daphne."""
    communicator = WebsocketCommunicator(application, f"/ws{query}", headers=headers)
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    return bool(connected)


async def publish(channel: str = "api", **fields: Any) -> dict[str, Any]:
    draft = JobDraft(job_id=uuid.uuid4().hex, channel=channel, **fields)
    published = await services.publish(draft)
    assert published.created
    return published.job


async def job_ids(communicator: WebsocketCommunicator, count: int) -> list[int]:
    frames = [await communicator.receive_json_from() for _ in range(count)]
    assert {frame["type"] for frame in frames} <= {"job"}, frames
    return [frame["job"]["id"] for frame in frames]


def signed_parts(
    now: float | None = None, secret: str = HMAC_SECRET
) -> tuple[str, str]:
    timestamp = str(int(time.time() if now is None else now))
    return timestamp, signing.sign(secret, timestamp)


# --- Frames ----------------------------------------------------------------------


async def test_hello_then_one_job_frame_per_publish() -> None:
    communicator = WebsocketCommunicator(application, "/ws", headers=KEY_HEADER)
    assert (await communicator.connect())[0]
    hello = await communicator.receive_json_from()
    assert hello["type"] == "hello"
    assert hello["last_id"] is None
    assert abs(hello["server_time"] - time.time()) < 5

    first, second = await publish(), await publish(place_id=42, title="t")
    assert await communicator.receive_json_from() == {"type": "job", "job": first}
    assert await communicator.receive_json_from() == {"type": "job", "job": second}
    assert await communicator.receive_nothing()
    await communicator.disconnect()


async def test_a_handshake_takes_the_newest_id_from_the_hub_not_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = WebsocketCommunicator(application, "/ws", headers=KEY_HEADER)
    assert (await first.connect())[0]
    assert (await first.receive_json_from())["last_id"] is None
    newest = await publish()
    # The hub has written it to the first client: it knows the newest id.
    assert (await first.receive_json_from())["job"]["id"] == newest["id"]

    async def no_query() -> int | None:
        raise AssertionError("the handshake read the store")

    monkeypatch.setattr(consumers, "_last_id", no_query)
    second = WebsocketCommunicator(application, "/ws", headers=KEY_HEADER)
    assert (await second.connect())[0]
    assert (await second.receive_json_from())["last_id"] == newest["id"]
    await second.disconnect()
    await first.disconnect()


async def test_hello_names_the_newest_job_and_replays_nothing_unasked() -> None:
    await publish()
    newest = await publish()
    communicator = WebsocketCommunicator(application, "/ws", headers=KEY_HEADER)
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from())["last_id"] == newest["id"]
    assert await communicator.receive_nothing()
    await communicator.disconnect()


async def test_ping_gets_pong() -> None:
    async with ws() as communicator:
        await communicator.send_json_to({"type": "ping"})
        pong = await communicator.receive_json_from()
        assert pong["type"] == "pong"
        assert abs(pong["server_time"] - time.time()) < 5
        assert await communicator.receive_nothing()


async def test_messages_are_handled_without_a_hop_to_the_sync_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No hop where Channels would tidy its sync thread's connections.

    Channels does so before each message, and after each disconnect (a
    refused handshake's too).
    """
    hops: list[None] = []

    async def counted() -> None:
        hops.append(None)

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counted)
    monkeypatch.setattr(channels.generic.websocket, "aclose_old_connections", counted)
    async with ws() as communicator:
        await communicator.send_json_to({"type": "ping"})
        assert (await communicator.receive_json_from())["type"] == "pong"
    assert not await handshake(headers=[(b"x-api-key", b"wrong")])
    assert hops == []


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"text_data": "{not json"}, "bad_json"),
        ({"text_data": "[" * 2000 + "]" * 2000}, "bad_json"),
        ({"text_data": '{"type": "subscribe"}'}, "unknown_type"),
        ({"text_data": '["ping"]'}, "unknown_type"),
        ({"text_data": '{"type": "ping", "pad": "' + "x" * 5000 + '"}'}, "too_large"),
        ({"bytes_data": b'{"type": "ping"}'}, "bad_frame"),
    ],
)
async def test_anything_else_gets_an_error_and_the_connection_stays_up(
    frame: dict[str, Any], code: str
) -> None:
    async with ws() as communicator:
        await communicator.send_to(**frame)
        error = await communicator.receive_json_from()
        assert error["type"] == "error"
        assert error["error"] == code
        assert error["detail"]
        await communicator.send_json_to({"type": "ping"})
        assert (await communicator.receive_json_from())["type"] == "pong"
        job = await publish()
        assert await communicator.receive_json_from() == {"type": "job", "job": job}


# --- Authorisation, before accept ------------------------------------------------


KEY = {"x-api-key": "{key}"}
SIGNED = {**KEY, "x-timestamp": "{ts}", "x-signature": "{sig}"}


def _fill(query: str, headers: dict[str, str]) -> tuple[str, Headers]:
    """Put fresh, stale, future and wrong timestamps and signatures in templates."""
    ts, sig = signed_parts()
    stale, stale_sig = signed_parts(time.time() - 120)
    future, future_sig = signed_parts(time.time() + 120)
    values = {
        "key": API_KEY,
        "ts": ts,
        "sig": sig,
        "SIG": sig.upper(),
        "stale": stale,
        "stale_sig": stale_sig,
        "future": future,
        "future_sig": future_sig,
        "bad_sig": signed_parts(secret="another-secret")[1],
    }
    return query.format(**values), [
        (name.encode(), value.format(**values).encode())
        for name, value in headers.items()
    ]


@pytest.mark.parametrize(
    ("require_signature", "query", "headers"),
    [
        pytest.param(False, "", KEY, id="header-key"),
        pytest.param(False, "?api_key={key}", {}, id="query-key"),
        pytest.param(True, "", SIGNED, id="signed-headers"),
        pytest.param(True, "?ts={ts}&sig={sig}", KEY, id="signed-query"),
        pytest.param(True, "?api_key={key}&ts={ts}&sig={SIG}", {}, id="query-upper"),
    ],
)
async def test_handshake_accepted(
    settings: Any, require_signature: bool, query: str, headers: dict[str, str]
) -> None:
    settings.WS_REQUIRE_SIGNATURE = require_signature
    async with ws(*_fill(query, headers)) as communicator:
        job = await publish()
        assert await communicator.receive_json_from() == {"type": "job", "job": job}


@pytest.mark.parametrize(
    ("require_signature", "query", "headers"),
    [
        pytest.param(False, "", {}, id="no-key"),
        pytest.param(False, "", {"x-api-key": "wrong"}, id="bad-header-key"),
        pytest.param(False, "?api_key=wrong", {}, id="bad-query-key"),
        pytest.param(True, "", KEY, id="signature-missing"),
        pytest.param(True, "?ts={ts}", KEY, id="signature-half-missing"),
        pytest.param(True, "?ts={stale}&sig={stale_sig}", KEY, id="stale"),
        pytest.param(True, "?ts={future}&sig={future_sig}", KEY, id="future"),
        pytest.param(True, "", {**SIGNED, "x-signature": "{bad_sig}"}, id="bad-sig"),
        pytest.param(True, "?ts={ts}&sig={bad_sig}", KEY, id="bad-query-sig"),
        pytest.param(True, "?ts=1e9&sig={sig}", KEY, id="bad-timestamp"),
        pytest.param(True, "", {**SIGNED, "x-api-key": "wrong"}, id="signed-bad-key"),
    ],
)
async def test_handshake_refused(
    settings: Any, require_signature: bool, query: str, headers: dict[str, str]
) -> None:
    settings.WS_REQUIRE_SIGNATURE = require_signature
    before = presence.local_count()
    assert not await handshake(*_fill(query, headers))
    assert presence.local_count() == before


@pytest.mark.parametrize(
    "query",
    [
        "?since=abc",
        "?since=-1",
        "?since=1.5",
        "?since=",
        "?since=%C2%B2",  # a superscript two: a digit to str.isdigit(), not to int()
        "?since=1234567890123456789",
        "?channels=",
        "?channels=a,,b",
        "?channels=bad!",
        "?channels=" + ",".join(str(n) for n in range(filters.MAX_CHANNELS + 1)),
        "?since",
        "?batch=2",
        "?batch=true",
        "?batch=",
    ],
)
async def test_malformed_parameters_are_refused(query: str) -> None:
    assert not await handshake(query)


async def test_handshakes_are_rate_limited(settings: Any) -> None:
    settings.RATE_LIMIT_PER_MINUTE = 2
    cache.clear()
    assert await handshake()
    assert await handshake()
    assert not await handshake()


# --- Groups and channels ---------------------------------------------------------


async def test_channels_subscribes_to_those_channels_only() -> None:
    async with ws("?channels=111,222") as communicator, ws() as everything:
        wanted_1 = await publish(channel="111")
        await publish(channel="333")
        wanted_2 = await publish(channel="222")
        assert await job_ids(communicator, 2) == [wanted_1["id"], wanted_2["id"]]
        assert await communicator.receive_nothing()
        # Once per job for a client of every channel, though two groups got it.
        assert len(await job_ids(everything, 3)) == 3
        assert await everything.receive_nothing()


# --- Replay ----------------------------------------------------------------------


async def test_since_replays_unexpired_jobs_oldest_first_then_goes_live(
    api: httpx.AsyncClient, sign: Callable[[], dict[str, str]], queue_backend: str
) -> None:
    before = await publish()
    pulled, expired, kept = await publish(), await publish(), await publish()
    await Job.objects.filter(id=expired["id"]).aupdate(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    # A job already handed out over GET /job/next is still history.
    claimed = await api.get("/job/next", headers=sign())
    assert claimed.json()["job"]["id"] == before["id"]
    assert (await api.get("/job/next", headers=sign())).json()["job"]["id"] == pulled[
        "id"
    ]

    async with ws(f"?since={before['id']}") as communicator:
        assert await communicator.receive_json_from() == {"type": "job", "job": pulled}
        assert await communicator.receive_json_from() == {"type": "job", "job": kept}
        assert await communicator.receive_nothing()
        live = await publish()
        assert await communicator.receive_json_from() == {"type": "job", "job": live}
        assert await communicator.receive_nothing()


async def test_since_with_channels_replays_those_channels_only() -> None:
    first = await publish(channel="111")
    await publish(channel="222")
    second = await publish(channel="111")
    async with ws("?since=0&channels=111") as communicator:
        assert await job_ids(communicator, 2) == [first["id"], second["id"]]
        assert await communicator.receive_nothing()


async def test_since_the_newest_job_replays_nothing() -> None:
    newest = await publish()
    async with ws(f"?since={newest['id']}") as communicator:
        assert await communicator.receive_nothing()


Channels = frozenset[str] | None
Reader = Callable[[int, Channels], Awaitable[list[dict[str, Any]]]]


@pytest.mark.parametrize("moment", ["before-the-read", "after-the-read"])
async def test_a_job_published_during_the_connect_arrives_exactly_once(
    monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    read: Reader = consumers._replay_batch
    during: list[dict[str, Any]] = []

    async def read_while_publishing(
        after: int, channels: Channels
    ) -> list[dict[str, Any]]:
        # The consumer has joined its group already: the job's live frame
        # reaches it whether or not the read sees the job too.
        if moment == "before-the-read" and not during:
            during.append(await publish())
        batch = await read(after, channels)
        if moment == "after-the-read" and not during:
            during.append(await publish())
        return batch

    earlier = await publish()
    monkeypatch.setattr(consumers, "_replay_batch", read_while_publishing)
    async with ws("?since=0") as communicator:
        assert await job_ids(communicator, 2) == [earlier["id"], during[0]["id"]]
        assert await communicator.receive_nothing()


async def test_a_job_the_live_stream_lacks_is_read_in_before_a_newer_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ids are committed in order (jobs.services), so a job arriving after a
    # gap means the gap's jobs are committed: another replica's broadcast not
    # here yet, or one the channel layer lost. The hub reads them in first.
    async with ws() as communicator:
        broadcast = services.broadcast
        skipped: list[dict[str, Any]] = []

        async def lose_the_first(job: dict[str, Any]) -> None:
            if not skipped:
                skipped.append(job)
                return
            await broadcast(job)

        monkeypatch.setattr(services, "broadcast", lose_the_first)
        lost, newer = await publish(), await publish()
        assert skipped == [lost]
        assert await job_ids(communicator, 2) == [lost["id"], newer["id"]]
        # Its copy arriving late is not sent again.
        await broadcast(lost)
        assert await communicator.receive_nothing()


async def test_a_late_live_copy_of_a_job_the_client_had_seen_is_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another process's broadcast can reach this one after the client attached:
    # the client's since job, already seen, must not come back after the replay.
    seen, missed = await publish(), await publish()
    read: Reader = consumers._replay_batch

    async def read_with_a_late_broadcast(
        after: int, channels: Channels
    ) -> list[dict[str, Any]]:
        await services.broadcast(seen)
        return await read(after, channels)

    monkeypatch.setattr(consumers, "_replay_batch", read_with_a_late_broadcast)
    async with ws(f"?since={seen['id']}") as communicator:
        assert await job_ids(communicator, 1) == [missed["id"]]
        assert await communicator.receive_nothing()


async def test_a_long_replay_is_read_in_batches_and_its_memory_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumers, "REPLAY_BATCH", 2)
    monkeypatch.setattr(consumers, "REPLAY_MEMORY", 2)
    jobs = [await publish() for _ in range(7)]
    async with ws("?since=0") as communicator:
        assert await job_ids(communicator, 7) == [job["id"] for job in jobs]
        # Late live copies of replayed jobs, remembered or below the floor,
        # are all recognised.
        for job in (jobs[0], jobs[3], jobs[6]):
            await services.broadcast(job)
        assert await communicator.receive_nothing()
        live = await publish()
        assert await job_ids(communicator, 1) == [live["id"]]


# --- Batched frames ----------------------------------------------------------------


async def turns_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the event loop run, turn by turn, until ``condition`` holds.

    Bounded by time, not turns: over Redis a message can take thousands of
    turns to arrive on a busy machine.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still false after {timeout} s")
        await asyncio.sleep(0)  # one turn of the loop, not a wait for time


class Holder:
    """A hub client that holds the hub on its first delivery until released."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def deliver(self, batch: fanout.Batch) -> None:
        self.holding.set()
        await self.release.wait()


async def test_jobs_ready_at_once_share_a_frame_for_clients_that_ask() -> None:
    hub = fanout.hub()
    async with ws("?batch=1") as batched, ws() as plain:
        holder = Holder()
        await hub.attach(holder)
        first = await publish()
        await asyncio.wait_for(holder.holding.wait(), 5)
        # The hub is busy: the next jobs wait for it, together.
        burst = [await publish() for _ in range(3)]
        await turns_until(lambda: hub.backlog == 3)
        hub.detach(holder)
        holder.release.set()
        assert await batched.receive_json_from() == {"type": "job", "job": first}
        assert await batched.receive_json_from() == {"type": "jobs", "jobs": burst}
        assert await batched.receive_nothing()
        assert await job_ids(plain, 4) == [first["id"]] + [j["id"] for j in burst]
        assert await plain.receive_nothing()


async def test_a_batched_replay_sends_many_jobs_per_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "MAX_BATCH", 2)
    jobs = [await publish() for _ in range(3)]
    async with ws("?since=0&batch=1") as communicator:
        assert await communicator.receive_json_from() == {
            "type": "jobs",
            "jobs": jobs[:2],
        }
        assert await communicator.receive_json_from() == {"type": "job", "job": jobs[2]}
        assert await communicator.receive_nothing()


async def test_a_batch_holding_a_replayed_job_is_sent_without_it() -> None:
    replayed = await publish()
    async with ws("?since=0&batch=1") as communicator:
        assert await communicator.receive_json_from() == {
            "type": "job",
            "job": replayed,
        }
        new = {**replayed, "id": replayed["id"] + 1, "job_id": uuid.uuid4().hex}
        # A late live copy of the replayed job, ready with a new one.
        await fanout.hub().dispatch([replayed, new])
        assert await communicator.receive_json_from() == {"type": "job", "job": new}
        assert await communicator.receive_nothing()


async def test_a_client_opens_no_channel_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = get_channel_layer()
    opened: list[str] = []
    real = layer.new_channel

    async def counted(*args: Any, **kwargs: Any) -> str:
        name: str = await real(*args, **kwargs)
        opened.append(name)
        return name

    async with ws() as first:  # the hub has its one channel from here on
        monkeypatch.setattr(layer, "new_channel", counted)
        async with ws() as second:
            job = await publish()
            assert await job_ids(second, 1) == [job["id"]]
        assert not await handshake(headers=[])  # refused: nothing opened either
        assert await job_ids(first, 1) == [job["id"]]
    assert opened == []


# --- Counts ----------------------------------------------------------------------


async def test_connected_clients_are_counted_in_health(
    request: pytest.FixtureRequest,
    settings: Any,
    api: httpx.AsyncClient,
    sign: Callable[[], dict[str, str]],
) -> None:
    if settings.REDIS_URL:
        request.getfixturevalue("clean_redis")  # no other process's count

    async def clients() -> dict[str, Any]:
        response = await api.get("/health", headers=sign())
        assert response.status_code == 200
        counts: dict[str, Any] = response.json()["websocket_clients"]
        return counts

    before = await clients()
    async with ws(), ws("?channels=111"):
        assert await clients() == {
            "process": before["process"] + 2,
            "total": before["total"] + 2,
        }
    assert await clients() == before


def test_the_asgi_module_makes_daphne_send_frames_at_once() -> None:
    # Behaviour through a real daphne: tests/test_ws_live.py (a full socket).
    from daphne.ws_protocol import WebSocketProtocol

    on_open = WebSocketProtocol.onOpen
    assert getattr(on_open, "writes_at_once", False)
    daphne_patches.write_frames_at_once()  # twice changes nothing
    assert WebSocketProtocol.onOpen is on_open


def test_the_asgi_module_offers_daphne_websockets_prepared_frames() -> None:
    from daphne.server import Server

    create_application = Server.create_application
    assert getattr(create_application, "offers_prepared_frames", False)
    daphne_patches.offer_prepared_frames()  # twice changes nothing
    assert Server.create_application is create_application


class Protocol:
    """What the prepared-frame sender uses of daphne's WebSocket protocol."""

    from autobahn.websocket.protocol import WebSocketProtocol as _autobahn

    STATE_OPEN = _autobahn.STATE_OPEN

    def __init__(self) -> None:
        self.state = self._autobahn.STATE_OPEN
        self.sent: list[Any] = []

    def sendPreparedMessage(self, message: Any) -> None:
        self.sent.append(message)


async def test_daphne_gives_websocket_scopes_a_sender_of_prepared_frames() -> None:
    from daphne.server import Server

    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)

    server = Server(application=app, endpoints=["tcp:port=0"])  # never run
    websocket, web = Protocol(), Protocol()
    server.connections = {websocket: {}, web: {}}
    server.create_application(websocket, {"type": "websocket", "path": "/ws"})
    server.create_application(web, {"type": "http", "path": "/health"})
    await asyncio.gather(
        *(c["application_instance"] for c in server.connections.values())
    )
    websocket_scope, http_scope = scopes
    assert fanout.PREPARED_FRAMES not in http_scope.get("extensions", {})

    frames = websocket_scope["extensions"][fanout.PREPARED_FRAMES]
    frame = frames.prepare('{"type":"job"}')
    frames.send(frame)
    assert websocket.sent == [frame]
    websocket.state = Protocol._autobahn.STATE_CLOSING
    frames.send(frame)  # dropped: autobahn would refuse it, daphne drop it once closed
    assert websocket.sent == [frame]


def unframe(message: Any) -> dict[str, Any]:
    """A prepared frame's JSON, after checking it is one whole unmasked text frame."""
    wire: bytes = message.payloadHybi
    assert wire[0] == 0x81  # FIN, text
    length, start = wire[1], 2
    if length == 126:
        length, start = int.from_bytes(wire[2:4]), 4
    assert len(wire) == start + length
    result: dict[str, Any] = json.loads(wire[start:])
    return result


class Sent(asyncio.Queue[Any]):
    """A stand-in for the server's prepared-frame sender: what it was given."""

    prepare = staticmethod(daphne_patches.PreparedFrames.prepare)

    def send(self, message: Any) -> None:
        self.put_nowait(message)

    async def next(self) -> Any:
        return await asyncio.wait_for(self.get(), 5)


async def test_live_frames_go_framed_once_through_a_servers_sender() -> None:
    # Under daphne (gateway_project.server): one framed copy for every client; what is
    # not live (the hello, a replay) goes through ASGI as before.
    replayed = await publish()
    sent = {"plain": Sent(), "batched": Sent()}
    communicators = {}
    for name, query in [("plain", "?since=0"), ("batched", "?batch=1")]:
        communicator = WebsocketCommunicator(
            application, f"/ws{query}", headers=KEY_HEADER
        )
        communicator.scope["extensions"] = {fanout.PREPARED_FRAMES: sent[name]}
        assert (await communicator.connect())[0]
        assert (await communicator.receive_json_from())["type"] == "hello"
        communicators[name] = communicator
    plain, batched = communicators["plain"], communicators["batched"]
    assert await plain.receive_json_from() == {"type": "job", "job": replayed}

    job = await publish(place_id=42)
    first_plain, first_batched = (
        await sent["plain"].next(),
        await sent["batched"].next(),
    )
    assert first_plain is first_batched  # framed once for both
    assert unframe(first_plain) == {"type": "job", "job": job}

    burst = [{**job, "id": job["id"] + n, "job_id": uuid.uuid4().hex} for n in (1, 2)]
    await fanout.hub().dispatch(burst)
    assert [unframe(await sent["plain"].next()) for _ in burst] == [
        {"type": "job", "job": one} for one in burst
    ]
    assert unframe(await sent["batched"].next()) == {"type": "jobs", "jobs": burst}
    for communicator in (plain, batched):
        assert await communicator.receive_nothing()
        await communicator.disconnect()
    assert sent["plain"].empty() and sent["batched"].empty()
