"""Signature v2: the signing module, the API's checks, nonces, and who sends v2.

Through the in-process application; real daphne processes (one, and two
replicas sharing Redis) are in tests/test_signing_live.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import time_machine
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from pytest_django import Settings

from discord_poller.config import PollerConfig
from discord_poller.cursor import snowflake_at
from discord_poller.embeds import ParsedJob
from discord_poller.publisher import PendingJob, Publisher
from gateway_client import AuthError, GatewayClient, signing
from gateway_project.asgi import application
from jobs.auth import remember_nonce
from jobs.models import Job
from jobs.responses import ApiError
from testkit.servers import REPO_ROOT
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("empty_redis")]

NOW = 1_700_000_000
NONCE = "000102030405060708090a0b0c0d0e0f"
BODY = b'{"job_id":"abc"}'
# The test vector of docs/security.md, checked independently with openssl.
VECTOR = "b935c27945e69642f89a17abc794081e6d8fb9e228a479fde7dd4bcc393931d5"


def v2(
    method: str = "GET",
    target: str = "/job/next",
    body: bytes = b"",
    *,
    key: str = API_KEY,
    secret: str = HMAC_SECRET,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    return signing.signed_headers_v2(
        key, secret, method=method, target=target, body=body, now=now, nonce=nonce
    )


def failure(headers: dict[str, str], **kwargs: object) -> str:
    """The error code ``verify_request`` fails with."""
    options: dict[str, object] = {
        "method": "GET",
        "target": "/job/next",
        "body": b"",
        "api_keys": [API_KEY],
        "secrets": [HMAC_SECRET],
        "now": NOW,
    }
    options.update(kwargs)
    with pytest.raises(signing.SignatureError) as caught:
        signing.verify_request(headers, **options)  # type: ignore[arg-type]
    return caught.value.code


# --- The signing module -------------------------------------------------------


def test_test_vector_and_the_exact_string_signed() -> None:
    body_hash = "7108ab5291bc62ab8685ed9a371e0c8d17113a56271152633e14a9a69f5c8701"
    signed = signing.string_to_sign_v2(str(NOW), NONCE, "post", "/job", BODY)
    assert signed == f"{NOW}\n{NONCE}\nPOST\n/job\n{body_hash}".encode()
    vector = signing.sign_v2("another-secret", str(NOW), NONCE, "POST", "/job", BODY)
    assert vector == VECTOR


def test_signed_headers_v2_carry_version_nonce_and_signature() -> None:
    headers = signing.signed_headers_v2(
        "k", "another-secret", method="POST", target="/job", body=BODY, now=NOW + 0.9
    )
    assert set(headers) == {
        "X-API-KEY",
        "X-TIMESTAMP",
        "X-NONCE",
        "X-SIGNATURE-VERSION",
        "X-SIGNATURE",
    }
    assert headers["X-TIMESTAMP"] == str(NOW)
    assert headers["X-SIGNATURE-VERSION"] == "2"
    nonce = headers["X-NONCE"]
    assert len(nonce) == 32 and int(nonce, 16) >= 0
    assert headers["X-SIGNATURE"] == signing.sign_v2(
        "another-secret", str(NOW), nonce, "POST", "/job", BODY
    )
    # Each call draws a new nonce.
    assert len({v2(now=NOW)["X-NONCE"] for _ in range(50)}) == 50


def test_a_valid_v2_request_verifies() -> None:
    verified = signing.verify_request(
        v2("POST", "/job", BODY, now=NOW, nonce=NONCE.upper()),
        method="POST",
        target="/job",
        body=BODY,
        api_keys=[API_KEY],
        secrets=[HMAC_SECRET],
        now=NOW,
    )
    # The nonce is remembered in one case, whatever case it was sent in.
    assert verified == signing.Verified(2, NOW, NONCE)


@pytest.mark.parametrize(
    ("part", "value"),
    [
        ("method", "POST"),
        ("target", "/job/next?wait=1"),
        ("target", "/health"),
        ("target", "/job/next?"),
        ("body", b"{}"),
    ],
)
def test_each_part_of_the_request_is_bound(part: str, value: object) -> None:
    headers = v2("GET", "/job/next", b"", now=NOW)
    assert failure(headers, **{part: value}) == "bad_signature"


def test_the_timestamp_and_nonce_are_bound() -> None:
    headers = v2(now=NOW, nonce=NONCE)
    moved = {**headers, "X-TIMESTAMP": str(NOW + 1)}
    assert failure(moved) == "bad_signature"
    other_nonce = {**headers, "X-NONCE": "f" * 32}
    assert failure(other_nonce) == "bad_signature"


def test_the_query_is_signed_as_sent_not_re_encoded() -> None:
    encoded = v2("GET", "/job/next?wait=%35", now=NOW)
    assert failure(encoded, target="/job/next?wait=5") == "bad_signature"
    signing.verify_request(
        encoded,
        method="GET",
        target="/job/next?wait=%35",
        api_keys=[API_KEY],
        secrets=[HMAC_SECRET],
        now=NOW,
    )


@pytest.mark.parametrize(
    ("nonce", "code"),
    [
        (None, "missing_nonce"),
        ("", "missing_nonce"),
        ("ab" * 15, "bad_nonce"),  # 15 bytes: too short
        ("0" * 129, "bad_nonce"),
        ("g" * 32, "bad_nonce"),
        ("\uff10" * 32, "bad_nonce"),  # full-width digits
        ("0x" + "0" * 30, "bad_nonce"),
    ],
)
def test_nonce_must_be_16_to_64_bytes_of_hex(nonce: str | None, code: str) -> None:
    headers = v2(now=NOW)
    del headers["X-NONCE"]
    if nonce is not None:
        headers["X-NONCE"] = nonce
    assert failure(headers) == code


@pytest.mark.parametrize("version", ["3", "v2", "", "2.0", "\uff12"])
def test_an_unknown_version_is_refused(version: str) -> None:
    headers = {**v2(now=NOW), "X-SIGNATURE-VERSION": version}
    assert failure(headers) == "bad_signature_version"


def test_require_v2_refuses_v1_explicit_or_not() -> None:
    v1 = signing.signed_headers(API_KEY, HMAC_SECRET, now=NOW)
    assert failure(v1, require_v2=True) == "signature_v2_required"
    explicit = {**v1, "X-SIGNATURE-VERSION": "1"}
    assert failure(explicit, require_v2=True) == "signature_v2_required"
    assert signing.verify_request(
        v1,
        method="GET",
        target="/x",
        api_keys=[API_KEY],
        secrets=[HMAC_SECRET],
        now=NOW,
    ) == signing.Verified(1, NOW)


def test_checks_run_in_order() -> None:
    headers = {**v2(now=NOW - 61), "X-SIGNATURE-VERSION": "9"}
    assert failure({**headers, "X-API-KEY": "wrong"}) == "bad_api_key"
    assert failure(headers) == "bad_signature_version"
    no_signature = v2(now=NOW - 61)
    del no_signature["X-SIGNATURE"]
    del no_signature["X-NONCE"]
    assert failure(no_signature) == "missing_signature"
    stale = v2(now=NOW - 61)
    assert failure({**stale, "X-NONCE": "zz"}) == "bad_nonce"
    assert failure({**stale, "X-TIMESTAMP": "soon"}) == "bad_timestamp"
    assert failure(stale) == "stale_timestamp"

    # The body is read only once the cheap checks have passed.
    def unreadable() -> bytes:
        raise AssertionError("the body was read for a stale request")

    assert failure(stale, body=unreadable) == "stale_timestamp"


def test_any_listed_key_and_secret_verify() -> None:
    keys, secrets = ["new-key", "old-key"], ["new-secret", "old-secret"]
    for key in keys:
        for secret in secrets:
            signing.verify_request(
                v2(key=key, secret=secret, now=NOW),
                method="GET",
                target="/job/next",
                api_keys=keys,
                secrets=secrets,
                now=NOW,
            )
    assert failure(v2(secret="retired", now=NOW), secrets=secrets) == ("bad_signature")


@pytest.mark.parametrize(("offset", "lifetime"), [(0, 61), (-60, 1), (60, 121)])
def test_a_nonce_is_kept_until_its_timestamp_goes_stale(
    offset: int, lifetime: int
) -> None:
    verified = signing.Verified(2, NOW + offset, NONCE)
    assert verified.nonce_lifetime(60, now=NOW) == lifetime


# --- The command line -----------------------------------------------------------


def parse_curl(arguments: str) -> dict[str, str]:
    words = arguments.split(" ")
    assert words[::2] == ["-H"] * (len(words) // 2)
    return dict(word.split(":", 1) for word in words[1::2])


def test_cli_signs_v1_without_arguments_and_v2_with_them(tmp_path: Path) -> None:
    env = {"API_KEY": "first-key,second-key", "HMAC_SECRET": "first,second"}
    v1 = parse_curl(signing.curl_arguments([], env, now=NOW))
    assert v1 == signing.signed_headers("first-key", "first", now=NOW)
    body = tmp_path / "job.json"
    body.write_bytes(BODY)
    headers = parse_curl(
        signing.curl_arguments(["POST", "/job", str(body)], env, now=NOW)
    )
    assert headers["X-API-KEY"] == "first-key"
    assert headers["X-SIGNATURE-VERSION"] == "2"
    signing.verify_request(
        headers,
        method="POST",
        target="/job",
        body=BODY,
        api_keys=["first-key"],
        secrets=["first"],
        require_v2=True,
        now=NOW,
    )
    forced = parse_curl(signing.curl_arguments(["--v1", "GET", "/x"], env, now=NOW))
    assert "X-NONCE" not in forced


@pytest.mark.parametrize("name", ["API_KEY", "HMAC_SECRET"])
def test_cli_refuses_a_credential_that_is_not_printable_ascii(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"API_KEY": "k", "HMAC_SECRET": "s", name: "\u2026-hidden"}
    with pytest.raises(SystemExit) as caught:
        signing.curl_arguments(["GET", "/health"], env)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert f"{name} must be printable ASCII" in err and "hidden" not in err


def test_cli_runs_as_a_module_and_reads_the_body_from_stdin() -> None:
    env = {"API_KEY": "k", "HMAC_SECRET": "s", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway_client.signing", "POST", "/job", "-"],
        input=BODY,
        capture_output=True,
        cwd=REPO_ROOT,
        env=env,
        check=True,
    )
    headers = parse_curl(result.stdout.decode().strip())
    verified = signing.verify_request(
        headers,
        method="POST",
        target="/job",
        body=BODY,
        api_keys=["k"],
        secrets=["s"],
        require_v2=True,
    )
    assert verified.version == 2
    bad = subprocess.run(
        [sys.executable, "-m", "gateway_client.signing", "GET", "job"],
        capture_output=True,
        cwd=REPO_ROOT,
        env=env,
    )
    assert bad.returncode == 2 and b"TARGET" in bad.stderr


# --- Through the API ----------------------------------------------------------


def assert_401(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code
    assert HMAC_SECRET not in response.text and API_KEY not in response.text


async def test_api_accepts_v2_once_and_refuses_the_replay(
    api: httpx.AsyncClient,
) -> None:
    body = b'{"job_id":"v2-once"}'
    headers = {**v2("POST", "/job", body), "Content-Type": "application/json"}
    first = await api.post("/job", content=body, headers=headers)
    assert first.status_code == 201, first.text
    again = await api.post("/job", content=body, headers=headers)
    assert_401(again, "replayed_nonce")
    assert await sync_to_async(Job.objects.count)() == 1
    pulled = await api.get("/job/next", headers=v2())
    assert pulled.status_code == 200 and pulled.json()["job"]["job_id"] == "v2-once"


@pytest.mark.parametrize(
    ("signed", "sent"),
    [
        (("GET", "/job/next?wait=0"), ("GET", "/job/next?wait=1")),
        (("GET", "/job/next?wait=0"), ("GET", "/job/next?wait=%30")),
        (("GET", "/health"), ("GET", "/job/next")),
        (("GET", "/job/next"), ("POST", "/job/next")),
    ],
)
async def test_api_binds_method_path_and_query(
    api: httpx.AsyncClient, signed: tuple[str, str], sent: tuple[str, str]
) -> None:
    response = await api.request(sent[0], sent[1], headers=v2(*signed))
    assert_401(response, "bad_signature")


async def test_api_signs_the_raw_target(api: httpx.AsyncClient) -> None:
    # Percent-encoded as sent: signed and checked in that form, not decoded.
    response = await api.get(
        "/job/next?wait=%30", headers=v2("GET", "/job/next?wait=%30")
    )
    assert response.status_code == 204, response.text


async def test_api_binds_the_body(api: httpx.AsyncClient) -> None:
    headers = {
        **v2("POST", "/job", b'{"job_id":"signed"}'),
        "Content-Type": "application/json",
    }
    response = await api.post("/job", content=b'{"job_id":"forged"}', headers=headers)
    assert_401(response, "bad_signature")
    assert await sync_to_async(Job.objects.count)() == 0


async def test_api_refuses_a_moved_timestamp_and_a_swapped_nonce(
    api: httpx.AsyncClient,
) -> None:
    headers = v2()
    moved = {**headers, "X-TIMESTAMP": str(int(headers["X-TIMESTAMP"]) - 1)}
    assert_401(await api.get("/job/next", headers=moved), "bad_signature")
    swapped = {**headers, "X-NONCE": signing.new_nonce()}
    assert_401(await api.get("/job/next", headers=swapped), "bad_signature")
    # Neither failure burnt the real nonce.
    assert (await api.get("/job/next", headers=headers)).status_code == 204


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"X-NONCE": None}, "missing_nonce"),
        ({"X-NONCE": "abc"}, "bad_nonce"),
        ({"X-SIGNATURE-VERSION": "3"}, "bad_signature_version"),
    ],
)
async def test_api_names_nonce_and_version_errors(
    api: httpx.AsyncClient, change: dict[str, str | None], code: str
) -> None:
    headers = v2()
    for name, value in change.items():
        headers.pop(name)
        if value is not None:
            headers[name] = value
    assert_401(await api.get("/job/next", headers=headers), code)


@pytest.mark.usefixtures("transactional_db")
async def test_a_nonce_is_forgotten_when_its_timestamp_goes_stale(
    settings: Settings,
) -> None:
    # The database store, which reads the clock time-machine moves; Redis
    # keeps its own clock, so there the TTL itself is checked (below).
    settings.REDIS_URL = ""
    verified = signing.Verified(2, NOW, signing.new_nonce())
    with time_machine.travel(NOW, tick=False):
        await remember_nonce(verified, "192.0.2.1")
    with time_machine.travel(NOW + 60, tick=False):
        with pytest.raises(ApiError) as replayed:
            await remember_nonce(verified, "192.0.2.1")
        assert replayed.value.code == "replayed_nonce"
    with time_machine.travel(NOW + 62, tick=False):
        # Forgotten: by now the timestamp itself is refused as stale.
        await remember_nonce(verified, "192.0.2.1")


async def test_nonces_live_in_redis_for_their_window(
    api: httpx.AsyncClient, settings: Settings, clean_redis: str
) -> None:
    settings.REDIS_URL = clean_redis
    headers = v2("GET", "/health")
    assert (await api.get("/health", headers=headers)).status_code == 200
    store = redis.Redis.from_url(clean_redis)
    key = f"gateway:once:nonce:{headers['X-NONCE']}"
    assert store.exists(key)
    assert 0 < store.ttl(key) <= settings.TIMESTAMP_TOLERANCE + 1
    assert_401(await api.get("/health", headers=headers), "replayed_nonce")


async def test_require_v2_refuses_v1_on_the_api(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.REQUIRE_SIGNATURE_V2 = True
    v1 = signing.signed_headers(API_KEY, HMAC_SECRET)
    assert_401(await api.get("/job/next", headers=v1), "signature_v2_required")
    assert (await api.get("/job/next", headers=v2())).status_code == 204


async def test_rotation_accepts_the_second_key_and_secret(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.API_KEYS = ["new-key", "old-key"]
    settings.HMAC_SECRETS = ["new-secret", "old-secret"]
    settings.REQUIRE_SIGNATURE_V2 = True
    second = v2(key="old-key", secret="old-secret")
    assert (await api.get("/job/next", headers=second)).status_code == 204
    retired = v2(key="retired-key", secret="old-secret")
    assert_401(await api.get("/job/next", headers=retired), "bad_api_key")


async def test_a_body_past_djangos_cap_is_413_for_v2(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = b'{"job_id":"x","title":"' + b"a" * 2000 + b'"}'
    headers = {**v2("POST", "/job", body), "Content-Type": "application/json"}
    response = await api.post("/job", content=body, headers=headers)
    assert response.status_code == 413 and response.json()["error"] == "too_large"


# --- The clients send v2 (the server requires it here) ----------------------------


@pytest.fixture
def v2_only(settings: Settings, api: httpx.AsyncClient) -> None:
    """The test database, and a gateway that takes signature v2 only."""
    settings.REQUIRE_SIGNATURE_V2 = True


def asgi() -> httpx.ASGITransport:
    return httpx.ASGITransport(app=application, client=("203.0.113.9", 5000))


@pytest.mark.usefixtures("v2_only")
async def test_the_python_client_speaks_v2_by_default() -> None:
    async with GatewayClient(
        "http://localhost",
        api_key=f"{API_KEY},second-key",
        hmac_secret=f"{HMAC_SECRET},second-secret",
        transport=asgi(),
    ) as client:
        published = await client.publish({"job_id": "from-client", "ttl": 60})
        assert published.queued
        pulled = await client.next_job()
        assert pulled is not None and pulled["job_id"] == "from-client"
        assert (await client.health())["ok"] is True
    async with GatewayClient(
        "http://localhost",
        api_key=API_KEY,
        hmac_secret=HMAC_SECRET,
        transport=asgi(),
        signature_version=1,
    ) as old:
        with pytest.raises(AuthError) as refused:
            await old.health()
    assert refused.value.code == "signature_v2_required"


@pytest.mark.usefixtures("v2_only")
async def test_the_poller_publishes_with_v2(settings: Settings) -> None:
    settings.API_KEYS = [API_KEY, "second-key"]
    settings.HMAC_SECRETS = [HMAC_SECRET, "second-secret"]
    settings.CHANNEL_IDS = ["1390012345678901234"]
    settings.DISCORD_TOKEN = "Bot token"
    config = PollerConfig.from_settings(settings)
    # The first of each list signs.
    assert (config.api_key, config.hmac_secret) == (API_KEY, HMAC_SECRET)
    channel = "1390012345678901234"
    job_id = uuid.uuid4().hex
    message_id = str(snowflake_at(time.time() * 1000) + uuid.uuid4().int % 4096)
    parsed = ParsedJob(job_id, 42, "Title", {}, message_id, channel)
    async with Publisher(
        "http://localhost",
        config.api_key,
        config.hmac_secret,
        ttl_seconds=300,
        transport=asgi(),
    ) as publisher:
        publisher.submit(PendingJob.from_message(parsed, channel, message_id))
        assert await publisher.publish_next(channel) == 0.0
    assert publisher.stats.published == 1, publisher.stats
    stored = await sync_to_async(Job.objects.get)(job_id=job_id)
    assert stored.source == "discord"


# --- The WebSocket handshake --------------------------------------------------------


async def handshake(path: str, headers: dict[str, str]) -> bool:
    communicator = WebsocketCommunicator(
        application,
        path,
        headers=[
            (name.lower().encode(), value.encode()) for name, value in headers.items()
        ],
    )
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    return bool(connected)


@pytest.mark.usefixtures("transactional_db")
async def test_ws_handshake_with_v2_when_signatures_are_required(
    settings: Settings,
) -> None:
    settings.WS_REQUIRE_SIGNATURE = True
    settings.REQUIRE_SIGNATURE_V2 = True
    headers = v2("GET", "/ws?since=0")
    assert await handshake("/ws?since=0", headers)
    assert not await handshake("/ws?since=0", headers)  # replayed
    # Signed for another query: refused.
    assert not await handshake("/ws?since=1", v2("GET", "/ws?since=0"))
    # v1, in headers or in the query, is refused when v2 is required.
    v1 = signing.signed_headers(API_KEY, HMAC_SECRET)
    assert not await handshake("/ws", v1)
    query = f"/ws?api_key={API_KEY}&ts={v1['X-TIMESTAMP']}&sig={v1['X-SIGNATURE']}"
    assert not await handshake(query, {})
    settings.REQUIRE_SIGNATURE_V2 = False
    assert await handshake(query, {})


def test_a_mismatch_names_what_was_signed_and_cuts_a_long_target() -> None:
    detail = signing.mismatch_detail_v2("get", "/job/next?" + "a" * 1000, b"{}")
    assert "method GET, path and query /job/next?" in detail
    assert "a" * signing.DETAIL_TARGET_CHARS not in detail  # cut, with an ellipsis
    assert "…, body SHA-256 " in detail
    assert f"{hashlib.sha256(b'{}').hexdigest()} (2 bytes)" in detail


def test_a_v1_mismatch_says_what_v1_signs() -> None:
    with pytest.raises(signing.SignatureError) as caught:
        signing.check_signature(str(NOW), "0" * 64, [HMAC_SECRET], now=NOW)
    assert caught.value.code == "bad_signature"
    assert "signs the X-TIMESTAMP value alone" in caught.value.detail
