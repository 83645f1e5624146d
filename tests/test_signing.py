"""Signed requests (contract section 1): the signing module and the API's 401s."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async
from pytest_django import Settings

from gateway_client import signing
from jobs.models import Job
from tests.conftest import assert_error
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("empty_redis")]

Sign = Callable[..., dict[str, str]]

NOW = 1_700_000_000
KEYS = ["key-one"]
SECRETS = ["secret-one"]
VALID = "<a valid signature>"


def verify(
    api_key: str | None = "key-one",
    timestamp: str | None = str(NOW),
    signature: str | None = VALID,
    *,
    api_keys: list[str] = KEYS,
    secrets: list[str] = SECRETS,
    tolerance: int = 60,
    now: float = NOW,
) -> None:
    """Verify with the module defaults; ``signature`` defaults to a valid one."""
    if signature == VALID:
        signature = signing.sign(secrets[0], timestamp or "")
    signing.verify(
        api_key,
        timestamp,
        signature,
        api_keys=api_keys,
        secrets=secrets,
        tolerance=tolerance,
        now=now,
    )


def failure(**kwargs: object) -> str:
    """The error code ``verify(**kwargs)`` fails with."""
    with pytest.raises(signing.SignatureError) as caught:
        verify(**kwargs)  # type: ignore[arg-type]
    return caught.value.code


# --- The signing module -------------------------------------------------------


def test_contract_test_vector() -> None:
    assert signing.sign("another-secret", "1700000000") == (
        "f8afe52f00412804c44da62e42276be610568f7865d5f630f4b46c9923f3e15d"
    )


def test_signed_headers_sign_whole_seconds() -> None:
    headers = signing.signed_headers("k", "another-secret", now=1700000000.9)
    assert headers == {
        "X-API-KEY": "k",
        "X-TIMESTAMP": "1700000000",
        "X-SIGNATURE": (
            "f8afe52f00412804c44da62e42276be610568f7865d5f630f4b46c9923f3e15d"
        ),
    }


def test_valid_request_passes() -> None:
    verify()


@pytest.mark.parametrize("api_key", [None, ""])
def test_missing_api_key_comes_first(api_key: str | None) -> None:
    # Every other check would fail too: the first one is reported.
    assert failure(api_key=api_key, timestamp=None, signature=None) == (
        "missing_api_key"
    )


def test_bad_api_key_comes_before_the_signature() -> None:
    assert failure(api_key="wrong", timestamp=None, signature=None) == "bad_api_key"


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [(None, "ab"), ("", "ab"), (str(NOW), None), (str(NOW), ""), (None, None)],
)
def test_missing_signature(timestamp: str | None, signature: str | None) -> None:
    assert failure(timestamp=timestamp, signature=signature) == "missing_signature"


@pytest.mark.parametrize(
    "timestamp",
    ["12.5", "abc", "1e9", " 12", "12 ", "0x10", "+12", "\uff11\uff12", "1" * 16],
)
def test_bad_timestamp(timestamp: str) -> None:
    assert failure(timestamp=timestamp, signature="ab") == "bad_timestamp"


@pytest.mark.parametrize("offset", [-60, 0, 60])
def test_timestamp_within_tolerance_is_accepted(offset: int) -> None:
    verify(timestamp=str(NOW + offset))


@pytest.mark.parametrize("offset", [-61, 61, -NOW])
def test_stale_timestamp_past_or_future(offset: int) -> None:
    assert failure(timestamp=str(NOW + offset)) == "stale_timestamp"


def test_tolerance_is_configurable() -> None:
    verify(timestamp=str(NOW - 300), tolerance=300)
    assert failure(timestamp=str(NOW - 301), tolerance=300) == "stale_timestamp"


def test_stale_comes_before_bad_signature() -> None:
    assert failure(timestamp=str(NOW - 61), signature="0" * 64) == "stale_timestamp"


@pytest.mark.parametrize(
    "signature",
    [
        "0" * 64,
        signing.sign("secret-one", str(NOW + 1)),  # signs another timestamp
        signing.sign("another-secret", str(NOW)),  # signed with another secret
        signing.sign("secret-one", str(NOW))[:-1],  # truncated
    ],
)
def test_bad_signature(signature: str) -> None:
    assert failure(signature=signature) == "bad_signature"


def test_upper_case_hex_is_accepted() -> None:
    verify(signature=signing.sign("secret-one", str(NOW)).upper())


def test_the_same_timestamp_and_signature_are_accepted_repeatedly() -> None:
    signature = signing.sign("secret-one", str(NOW))
    for step in range(5):
        verify(signature=signature, now=NOW + step * 0.2)


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"api_key": "clé-ключ-🔑"}, "bad_api_key"),
        ({"signature": "é" * 64}, "bad_signature"),
        ({"timestamp": "\uff11\uff17\uff10\uff10", "signature": "ab"}, "bad_timestamp"),
    ],
)
def test_non_ascii_input_fails_cleanly(kwargs: dict[str, str], code: str) -> None:
    assert failure(**kwargs) == code


def test_any_listed_key_and_secret_is_accepted() -> None:
    keys = ["old-key", "new-key"]
    secrets = ["old-secret", "new-secret"]
    for key in keys:
        for secret in secrets:
            verify(
                key,
                str(NOW),
                signing.sign(secret, str(NOW)),
                api_keys=keys,
                secrets=secrets,
            )
    assert failure(api_key="retired-key", api_keys=keys, secrets=secrets) == (
        "bad_api_key"
    )


def test_no_configured_keys_admit_nobody() -> None:
    assert failure(api_keys=[]) == "bad_api_key"
    assert failure(api_key="key-one", signature="0" * 64, secrets=[]) == (
        "bad_signature"
    )


# --- Through the API ----------------------------------------------------------


def assert_401(response: httpx.Response, code: str) -> None:
    """A 401 in the contract's shape that gives no secret away."""
    assert_error(response, 401, code)
    for secret in (API_KEY, HMAC_SECRET, signing.sign(HMAC_SECRET, str(NOW))):
        assert secret not in response.text


def signed_at(timestamp: str, **overrides: str) -> dict[str, str]:
    headers = {
        "X-API-KEY": API_KEY,
        "X-TIMESTAMP": timestamp,
        "X-SIGNATURE": signing.sign(HMAC_SECRET, timestamp),
    }
    headers.update(overrides)
    return headers


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"X-API-KEY": "wrong"}, "bad_api_key"),
        ({"X-API-KEY": API_KEY}, "missing_signature"),
        ({"X-API-KEY": API_KEY, "X-TIMESTAMP": str(NOW)}, "missing_signature"),
        ({"X-API-KEY": API_KEY, "X-SIGNATURE": "ab" * 32}, "missing_signature"),
        (signed_at("12.5"), "bad_timestamp"),
        (signed_at("abc"), "bad_timestamp"),
        (signed_at("1e9"), "bad_timestamp"),
        (signed_at(" 12"), "bad_timestamp"),
        (signed_at(str(NOW - 61)), "stale_timestamp"),
        (signed_at(str(NOW + 61)), "stale_timestamp"),
        (signed_at(str(NOW), **{"X-SIGNATURE": "0" * 64}), "bad_signature"),
    ],
)
async def test_api_names_the_failed_check(
    api: httpx.AsyncClient, headers: dict[str, str], code: str
) -> None:
    with time_machine.travel(NOW, tick=False):
        response = await api.get("/job/next", headers=headers)
    assert_401(response, code)


@pytest.mark.parametrize("offset", [-60, 60])
async def test_api_accepts_the_tolerance_edges(
    api: httpx.AsyncClient, offset: int
) -> None:
    with time_machine.travel(NOW, tick=False):
        response = await api.get("/job/next", headers=signed_at(str(NOW + offset)))
    assert response.status_code == 204


async def test_api_accepts_upper_case_and_repeated_signatures(
    api: httpx.AsyncClient,
) -> None:
    headers = signed_at(str(NOW))
    headers["X-SIGNATURE"] = headers["X-SIGNATURE"].upper()
    with time_machine.travel(NOW, tick=False):
        statuses = [
            (await api.get("/job/next", headers=headers)).status_code for _ in range(3)
        ]
    assert statuses == [204, 204, 204]


async def test_api_survives_non_ascii_headers(api: httpx.AsyncClient) -> None:
    # Raw bytes on the wire: header values are not guaranteed to be ASCII.
    key = await api.get("/job/next", headers=[(b"X-API-KEY", "clé🔑".encode())])
    assert_401(key, "bad_api_key")
    headers = [
        (name.encode(), value.encode()) for name, value in signed_at(str(NOW)).items()
    ]
    headers[-1] = (b"X-SIGNATURE", ("é" * 32).encode())
    with time_machine.travel(NOW, tick=False):
        signature = await api.get("/job/next", headers=headers)
    assert_401(signature, "bad_signature")


async def test_api_accepts_every_rotated_key_and_secret(
    api: httpx.AsyncClient, settings: Settings, sign: Sign
) -> None:
    settings.API_KEYS = ["old-key", "new-key"]
    settings.HMAC_SECRETS = ["old-secret", "new-secret"]
    for key in ("old-key", "new-key"):
        for secret in ("old-secret", "new-secret"):
            response = await api.get("/job/next", headers=sign(key, secret))
            assert response.status_code == 204, (key, secret, response.text)
    assert_401(
        await api.get("/job/next", headers=sign(API_KEY, "old-secret")), "bad_api_key"
    )


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/job"), ("GET", "/job/next"), ("GET", "/health")]
)
async def test_every_signed_endpoint_checks(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await api.request(method, path, json={"job_id": "unsigned"})
    assert_401(response, "missing_api_key")
    assert await sync_to_async(Job.objects.count)() == 0


async def test_a_rejected_post_stores_nothing(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    headers = sign()
    headers["X-SIGNATURE"] = "0" * 64
    response = await api.post("/job", json={"job_id": "forged"}, headers=headers)
    assert_401(response, "bad_signature")
    assert await sync_to_async(Job.objects.count)() == 0
